"""``--precision auto``: bf16 autocast only where the hardware runs it natively, else fp32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_engine import cfg_for, make_folder
from vistune import precision as P
from vistune.cli import main
from vistune.precision import PrecisionError, resolve_precision
from vistune.workflows.train import evaluate_run, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def emulating_cpu(monkeypatch):
    """A CPU like a 2-core AVX2 AMD EPYC: no AVX512-BF16, no AMX (the feature flags mocked)."""
    monkeypatch.delenv("VISTUNE_CPU_BF16", raising=False)
    monkeypatch.setattr(P, "cpu_features", lambda: set())
    monkeypatch.setattr(P, "cpu_capability", lambda: "AVX2")
    P._warn_once.cache_clear()


@pytest.fixture
def native_cpu(monkeypatch):
    monkeypatch.delenv("VISTUNE_CPU_BF16", raising=False)
    monkeypatch.setattr(P, "cpu_features", lambda: {"AVX512_BF16"})
    monkeypatch.setattr(P, "cpu_capability", lambda: "AVX512")


def test_auto_is_fp32_where_bf16_is_emulated(emulating_cpu):
    p = resolve_precision("auto", "cpu")
    assert p.name == "fp32" and p.dtype is None and p.requested == "auto"
    assert "AVX2 without AVX512_BF16/AMX" in p.reason


def test_auto_is_bf16_where_bf16_is_native(native_cpu):
    p = resolve_precision("auto", "cpu")
    assert p.name == "bf16" and p.dtype == torch.bfloat16
    assert "AVX512 with AVX512_BF16" in p.reason


def test_auto_keeps_a_preferred_fp32_and_never_picks_emulated_bf16(native_cpu, monkeypatch):
    assert resolve_precision("auto", "cpu", prefer="fp32").name == "fp32"  # eval of an fp32 run
    assert resolve_precision("auto", "cpu", prefer="bf16").name == "bf16"
    monkeypatch.setattr(P, "cpu_features", lambda: set())
    assert resolve_precision("auto", "cpu", prefer="bf16").name == "fp32"  # never emulate for auto


def test_env_override_beats_the_feature_flags(monkeypatch):
    monkeypatch.setattr(P, "cpu_features", lambda: {"AMX"})
    monkeypatch.setenv("VISTUNE_CPU_BF16", "0")
    assert resolve_precision("auto", "cpu").name == "fp32"
    monkeypatch.setattr(P, "cpu_features", lambda: set())
    monkeypatch.setenv("VISTUNE_CPU_BF16", "1")
    assert resolve_precision("auto", "cpu").name == "bf16"


def test_explicit_bf16_on_an_emulating_cpu_runs_and_warns_once(emulating_cpu, capsys):
    p = resolve_precision("bf16", "cpu")
    assert p.name == "bf16" and not p.native
    resolve_precision("bf16", "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "emulated" in err[0] and "7x slower" in err[0]


def test_fp16_needs_cuda_and_unknown_names_are_refused():
    with pytest.raises(PrecisionError, match="fp16 autocast needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(PrecisionError, match="precision must be one of auto, fp32, bf16, fp16"):
        resolve_precision("half", "cpu")


def test_cpu_features_are_a_subset_of_the_known_ones():
    assert P.cpu_features() <= {"AVX512_BF16", "AMX"}
    line = P.machine_line("fp32", threads=2)
    assert "capability" in line and "2 threads" in line and torch.__version__ in line
    assert f"vistune {P.code_version()}" in line


def test_code_version_names_the_commit_in_a_checkout(tmp_path, monkeypatch):
    """In a git checkout the version carries the commit; outside one (an installed wheel, no git)
    it is the plain package version, never an error."""
    import subprocess

    import vistune

    version = P.code_version()
    inside = subprocess.run(["git", "-C", str(Path(P.__file__).parent), "rev-parse", "HEAD"],
                            check=False, capture_output=True, text=True).returncode == 0
    if inside:
        assert version.startswith(vistune.__version__ + "+g") and len(version.split("+g")[1].split(".")[0]) == 10
    else:
        assert version == vistune.__version__
    P.code_version.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on PATH
    try:
        assert P.code_version() == vistune.__version__
    finally:
        P.code_version.cache_clear()


@pytest.mark.parametrize("hardware,expected", [("emulating_cpu", "fp32"), ("native_cpu", "bf16")])
def test_a_run_records_the_resolved_precision_and_why(hardware, expected, request, tmp_path):
    request.getfixturevalue(hardware)
    folder = make_folder(tmp_path / "data")
    m = train(cfg_for(folder, tmp_path / "run", epochs=1))
    assert m["precision"] == expected and m["precision_requested"] == "auto"
    assert m["precision_reason"].startswith("auto: CPU")
    assert m["machine"]["cpu_capability"] in ("AVX2", "AVX512")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["precision"] == expected
    # eval keeps the precision the run trained in (its test number reproduces exactly)
    res = evaluate_run(tmp_path / "run", device="cpu")
    assert res["precision"] == expected and res["test_top1"] == pytest.approx(m["test_top1"], abs=1e-9)


def test_eval_of_an_fp32_run_stays_fp32_on_a_bf16_machine(native_cpu, tmp_path):
    folder = make_folder(tmp_path / "data")
    m = train(cfg_for(folder, tmp_path / "run", epochs=1, precision="fp32"))
    assert m["precision"] == "fp32"
    res = evaluate_run(tmp_path / "run", device="cpu")
    assert res["precision"] == "fp32" and res["test_top1"] == pytest.approx(m["test_top1"], abs=1e-9)
    assert evaluate_run(tmp_path / "run", device="cpu", precision="bf16")["precision"] == "bf16"


def test_first_log_line_names_the_precision(emulating_cpu, tmp_path, capsys):
    folder = make_folder(tmp_path / "data")
    train(cfg_for(folder, tmp_path / "run", epochs=1, progress=True))
    first = capsys.readouterr().err.strip().splitlines()[0]
    assert first.startswith("vistune: precision fp32 (auto: CPU AVX2 without AVX512_BF16/AMX")


def test_fp16_on_cpu_is_one_line_exit_2(tmp_path, capsys):
    folder = make_folder(tmp_path / "data")
    rc = main(["train", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data",
               f"folder:{folder}", "--epochs", "1", "--precision", "fp16", "--out", str(tmp_path / "r"),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "fp16 autocast needs a CUDA device" in err[0]
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_fp16_grad_scaler_path_trains(tmp_path, monkeypatch):
    """The fp16 branch of the loop (scale, unscale before clipping, scaler step) on CPU autocast —
    refused for users on CPU, but the same code runs on CUDA."""
    from vistune.tasks import base

    fp16 = P.Precision("fp16", "fp16", "test: fp16 on CPU autocast")
    monkeypatch.setattr(base, "resolve_precision", lambda requested, device, prefer=None: fp16)
    folder = make_folder(tmp_path / "data")
    m = train(cfg_for(folder, tmp_path / "run", epochs=2, method="lora", lr=0.05, clip_grad=1.0))
    assert m["precision"] == "fp16"
    assert all(torch.isfinite(torch.tensor(m["final_train_loss"])).reshape(-1))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0


def test_report_heads_its_table_with_the_machine_and_precision(emulating_cpu, tmp_path, capsys):
    folder = make_folder(tmp_path / "data")
    train(cfg_for(folder, tmp_path / "a", epochs=1))
    train(cfg_for(folder, tmp_path / "b", epochs=1, precision="bf16"))
    capsys.readouterr()
    assert main(["report", str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("machine: ") and "capability AVX2" in lines[0] and lines[0].endswith("precision fp32")
    assert lines[2].startswith("| method |")
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("precision fp32 (rows: lora)") and lines[1].endswith("precision bf16 (rows: lora)")


def test_serve_precision_is_auto_and_the_old_bf16_switch_still_works(emulating_cpu):
    import timm

    from vistune.serve.config import ServeConfigError, make_config
    from vistune.serve.multitask import MultiTaskModel

    assert make_config({"tasks": {"a": "x"}}).precision == "auto"
    assert MultiTaskModel(timm.create_model("test_vit", img_size=32)).precision.name == "fp32"
    assert MultiTaskModel(timm.create_model("test_vit", img_size=32), bf16=True).bf16
    cfg = make_config({"tasks": {"a": "x"}, "bf16": True})
    assert cfg.bf16 is True and cfg.precision == "auto"  # build_model turns it into precision bf16
    with pytest.raises(ServeConfigError, match="bf16: true contradicts precision: fp32"):
        make_config({"tasks": {"a": "x"}, "bf16": True, "precision": "fp32"})
    with pytest.raises(ServeConfigError, match="precision must be one of"):
        make_config({"tasks": {"a": "x"}, "precision": "half"})


def test_auto_is_fp32_when_aten_dispatches_avx2_on_a_bf16_cpu(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 CPU: bf16 ran 11x slower than native (1202 vs 109 ms)."""
    monkeypatch.delenv("VISTUNE_CPU_BF16", raising=False)
    monkeypatch.setattr(P, "cpu_features", lambda: {"AVX512_BF16"})
    monkeypatch.setattr(P, "cpu_capability", lambda: "AVX2")
    p = resolve_precision("auto", "cpu")
    assert p.name == "fp32" and "AVX2 dispatch" in p.reason
