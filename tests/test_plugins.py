"""Methods from outside vistune: ``register_method``, ``vistune.methods`` entry points, ``--plugin``.

IA³ lives in ``examples/ia3.py``, not in ``src/vistune``; every test here reaches it the way a user
would (``--plugin examples/ia3.py``, an import that runs its ``@register_method``, or a package's
entry point), and checks that it goes through train, eval, sweep, the multi-task server and both
export formats like a built-in method.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vistune.methods as registry
from vistune import attach, load_tuned, register_method
from vistune.backbones import backbone_for_file, create_backbone, seeded_backbone
from vistune.cli import main
from vistune.errors import MethodError
from vistune.methods import get_method, method_names
from vistune.methods.base import Method
from vistune.plugins import PluginWarning, load_plugin
from vistune.tuning import read_tuned_file

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "ia3.py"
SIZE = 32


@pytest.fixture(scope="module")
def ia3():
    """The example imported as ``--plugin`` imports it (registering ``ia3``); gone again afterwards,
    so no other test module sees a method it did not load."""
    module = load_plugin(str(EXAMPLE))
    yield module
    registry._REGISTERED.pop("ia3", None)
    sys.modules.pop("ia3", None)


def vit() -> torch.nn.Module:
    return seeded_backbone("test_vit", None, SIZE)


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def perturb(params, seed: int) -> None:
    """Move every tuned tensor off its init, so equalities below are not those of the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def colour_folder(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    """An image folder whose class is its dominant colour channel (learnable by a tiny model)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 3), ("test", 3)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 60, (20, 20, 3), dtype=np.uint8)
                arr[..., c % 3] += 150
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------ the method

def test_ia3_starts_as_the_identity(ia3):
    base = vit()
    x = images(3)
    with torch.no_grad():
        want = base(x)
        got = attach(base, "ia3").model(x)
    assert torch.equal(got, want)


def test_ia3_merge_equals_unmerged_and_leaves_no_trace(ia3):
    base = vit()
    perturb([b.attn.qkv.bias for b in base.blocks], 9)  # timm zero-inits biases: give the fold work
    q_rows = base.blocks[0].attn.qkv.weight[:base.embed_dim].clone()
    tuned = attach(base, "ia3", num_classes=4)
    perturb(tuned.tuned_parameters(include_head=False), 0)
    x = images(3)
    with torch.no_grad():
        before = tuned(x)
        tuned.merge()
        merged = tuned(x)
    torch.testing.assert_close(merged, before, rtol=1e-5, atol=1e-5)
    assert (merged - tuned.unmerge()(x).detach()).abs().max() < 1e-5  # and back
    tuned.merge()
    assert not [n for n in base.state_dict() if "ia3" in n]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    assert torch.equal(base.blocks[0].attn.qkv.weight[:base.embed_dim], q_rows)  # q is not scaled
    assert not torch.equal(base.blocks[0].mlp.fc2.weight, vit().blocks[0].mlp.fc2.weight)


@pytest.mark.parametrize("targets, per_block", [("k,v,mlp", lambda d, h: 2 * d + h), ("mlp", lambda d, h: h),
                                                ("v", lambda d, h: d)])
@pytest.mark.parametrize("arch", ["test_vit", "vit_base_patch16_224"])
def test_ia3_count_is_the_closed_form(ia3, arch, targets, per_block):
    with torch.device("meta"):
        model = create_backbone(arch, num_classes=0, load_weights=False)
    d, h, depth = model.embed_dim, model.blocks[0].mlp.fc1.out_features, len(model.blocks)
    report = attach(model, "ia3", targets=targets).parameter_report()
    assert report["tuned_params"] == depth * per_block(d, h)
    if arch == "vit_base_patch16_224" and targets == "k,v,mlp":
        assert report["tuned_params"] == 55_296  # ViT-B/16: 12 * (2 * 768 + 3072)


def test_ia3_declares_what_vistune_asks_of_a_method(ia3):
    cls = get_method("ia3")
    assert cls is ia3.IA3 and cls.mergeable and cls.formats == ("timm", "onnx")
    from vistune.workflows.sweep import default_space

    space = default_space("ia3", None, 8)  # its own grid, not the AdamW default every method got
    assert space.optimizer == "adamw" and space.values == {"lr": [1e-2, 3e-3, 1e-3], "wd": [0.0]}
    with pytest.raises(MethodError, match=r"targets must be a non-empty subset of \['k', 'v', 'mlp'\]"):
        attach(vit(), "ia3", targets="q")
    with pytest.raises(MethodError, match="ia3: .* has no fc2 sites"):
        attach(seeded_backbone("test_efficientnet", None, SIZE), "ia3", targets="mlp")


# ------------------------------------------------------------------------ through every command

@pytest.fixture(scope="module")
def run(ia3, tmp_path_factory):
    """One IA³ run trained by ``vistune --plugin examples/ia3.py train``."""
    root = tmp_path_factory.mktemp("ia3run")
    data = colour_folder(root / "data")
    out = root / "run"
    argv = ["--plugin", str(EXAMPLE), "train", "--backbone", "test_vit", "--img-size", str(SIZE),
            "--method", "ia3", "-o", "targets=k,v,mlp", "--data", f"folder:{data}", "--epochs", "2",
            "--batch-size", "6", "--lr", "0.05", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return {"data": data, "out": out, "metrics": json.loads((out / "metrics.json").read_text())}


def test_cli_train_records_the_method_and_eval_reproduces(run, capsys):
    meta, tensors = read_tuned_file(run["out"] / "tuned.safetensors")
    assert meta["method"] == {"name": "ia3", "options": {"targets": ["k", "v", "mlp"]}}
    assert not all(torch.equal(t, torch.ones_like(t)) for k, t in tensors.items() if "ia3" in k)  # it trained
    assert run["metrics"]["tuned_params"] == 6 * (2 * 64 + 192)
    capsys.readouterr()
    assert main(["eval", "--tuned", str(run["out"]), "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["test_top1"] == pytest.approx(run["metrics"]["test_top1"], abs=1e-9)
    assert res["test_loss"] == pytest.approx(run["metrics"]["test_loss"], rel=1e-6)


def test_a_file_whose_plugin_is_absent_is_one_line(run, monkeypatch, capsys):
    monkeypatch.setattr(registry, "_REGISTERED", {})  # a process that never loaded examples/ia3.py
    assert main(["eval", "--tuned", str(run["out"]), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'ia3'" in err and "--plugin" in err
    assert "entry point group 'vistune.methods'" in err


def test_cli_sweep_runs_a_two_point_grid(run, tmp_path):
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    assert main(["--plugin", str(EXAMPLE), "sweep", "--backbone", "test_vit", "--img-size", str(SIZE),
                 "--method", "ia3", "--data", f"folder:{run['data']}", "--epochs", "1", "--batch-size", "6",
                 "--grid", "lr=0.05,0.005", "--grid", "wd=0", "--seeds", "1", "--pruner", "none",
                 "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "sweep.json").read_text())
    trials = sorted(p.name for p in (out / "trials").iterdir() if (p / "metrics.json").is_file())
    assert trials == ["lr=0.005,wd=0", "lr=0.05,wd=0"]
    final = json.loads((out / result["final"]["runs"][0]["dir"] / "metrics.json").read_text())
    assert final["method"] == "ia3" and final["lr"] == result["best"]["params"]["lr"]


def test_onnx_and_timm_exports_equal_the_run(run, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    import timm

    from vistune.export import export, load_run

    x = images(3, seed=5)
    with torch.no_grad():
        want = load_run(run["out"]).model(x)
    export(run["out"], "onnx", tmp_path / "onnx")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x.numpy()})
    assert float((torch.from_numpy(logits) - want).abs().max()) < 1e-4
    export(run["out"], "timm", tmp_path / "timm")  # merged: a plain timm model, no IA³ module left
    plain = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert not [n for n in plain.state_dict() if "ia3" in n]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
    assert float(want.abs().max()) > 1e-3  # not two near-zero tensors


def test_ia3_serves_in_one_mixed_batch_beside_a_builtin_lora(ia3, tmp_path):
    from vistune.serve.multitask import MultiTaskModel

    files = {}
    for i, (name, method, opts) in enumerate([("ia3", "ia3", {}), ("lora", "lora", {"rank": 2}),
                                              ("ia3_kv", "ia3", {"targets": "k,v"})]):
        tuned = attach(vit(), method, num_classes=3 + i, **opts)
        perturb(tuned.tuned_parameters(), i)
        files[name] = tuned.save_tuned(tmp_path / f"{name}.safetensors")
    mt = MultiTaskModel(vit())
    for name, path in files.items():
        mt.add_task(name, path)
    tasks = ["ia3", "lora", "ia3_kv", "lora", "ia3", "ia3_kv"]
    assert [sorted({tasks[i] for i in idx}) for _, idx in mt.passes(tasks)] == [sorted(files)]  # one pass
    x = images(len(tasks), seed=3)
    out = mt.forward(x, tasks)
    for name, path in files.items():
        idx = [i for i, t in enumerate(tasks) if t == name]
        meta, _ = read_tuned_file(path)
        with torch.no_grad():
            want = load_tuned(path, backbone_for_file(meta["backbone"], path)).eval()(x[idx])
        torch.testing.assert_close(torch.cat([out[i] for i in idx]), want, rtol=1e-5, atol=1e-5)


def test_the_plugin_flag_in_a_fresh_process(tmp_path):
    """The real command line: ``--plugin FILE`` before the command, the method in ``--help``."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vistune", *argv], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=300, check=False)

    res = cli("--plugin", str(EXAMPLE), "info", "--method", "ia3", "--help")  # one torch import in all
    text = " ".join(res.stdout.split())
    assert res.returncode == 0, res.stderr
    assert "tuning method: linear, full, bitfit, vpt, lora, adapter, spt, protuning, ia3" in text
    assert "options of method ia3 (-o KEY=VALUE): targets (tuple[str, ...], default [\"k\", \"v\", \"mlp\"]" in text
    res = cli("info", "--backbone", "test_vit", "--method", "ia3", "--plugin", str(EXAMPLE))
    assert res.returncode == 2 and res.stderr.strip() == (
        "vistune: error: --plugin goes before the command: vistune --plugin MODULE COMMAND ...")
    res = cli("--plugin", str(tmp_path / "nope.py"), "--help")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "nope.py does not exist" in res.stderr


# ------------------------------------------------------------------------- registration rules

def fake_distribution(root: Path, name: str, methods: dict[str, str]) -> None:
    """An installed package as importlib.metadata sees it: a dist-info folder with entry points."""
    info = root / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in methods.items())
    (info / "entry_points.txt").write_text(f"[vistune.methods]\n{lines}")


@pytest.fixture
def clean_registry(monkeypatch):
    """A process that has registered nothing (entry points only)."""
    monkeypatch.setattr(registry, "_REGISTERED", {})
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))  # where the fake packages' code lives


def test_an_installed_package_is_found_without_an_import(clean_registry, tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "ia3", raising=False)
    assert "ia3" not in method_names()
    fake_distribution(tmp_path, "vistune_ia3", {"ia3": "ia3:IA3"})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ia3" in method_names() and "ia3" not in sys.modules  # listing imports nothing
    cls = get_method("ia3")
    assert cls.__module__ == "ia3" and cls.name == "ia3"
    with torch.no_grad():
        assert attach(vit(), "ia3").parameter_report()["tuned_params"] == 6 * (2 * 64 + 192)


def test_a_package_installed_while_the_process_runs_is_found(clean_registry, tmp_path, monkeypatch):
    """Entry points are read once per state of the sys.path folders (a command asks ~10 times):
    a dist-info folder that appears in a folder already on the path (``pip install`` into
    site-packages while a server runs) is still found, as it was before the memo."""
    monkeypatch.delitem(sys.modules, "ia3", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ia3" not in method_names()  # read (and kept) with tmp_path on the path, empty
    time.sleep(0.05)  # a later clock tick than tmp_path's creation: file times are tick-grained
    fake_distribution(tmp_path, "vistune_ia3", {"ia3": "ia3:IA3"})
    assert "ia3" in method_names() and get_method("ia3").name == "ia3"


def test_a_broken_entry_point_fails_only_its_own_method(clean_registry, tmp_path, monkeypatch, capsys):
    fake_distribution(tmp_path, "brokenpkg", {"broken": "no_such_module_xyz:Thing"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SystemExit) as exit_:  # --help still works and lists it
        main(["train", "--help"])
    assert exit_.value.code == 0 and "broken" in capsys.readouterr().out
    with pytest.raises(MethodError) as err:
        get_method("broken")
    msg = str(err.value)
    assert "\n" not in msg and "distribution 'brokenpkg'" in msg and "ModuleNotFoundError" in msg
    assert get_method("lora").name == "lora"  # everyone else is unaffected
    assert main(["info", "--backbone", "test_vit", "--method", "broken"]) == 2
    assert "brokenpkg" in capsys.readouterr().err


def test_a_builtin_name_cannot_be_taken(clean_registry, tmp_path, monkeypatch, capsys, ia3):
    with pytest.raises(MethodError, match="'lora' is built into vistune .* cannot be overridden"):
        register_method("ia3:IA3", name="lora")

    class Imposter(ia3.IA3):
        name = "lora"

    with pytest.raises(MethodError, match="cannot be overridden"):
        register_method(Imposter)
    fake_distribution(tmp_path, "imposter", {"lora": "ia3:IA3"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(PluginWarning, match="distribution 'imposter' .* 'lora' is a built-in method name"):
        names = method_names()
    assert names.count("lora") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        assert get_method("lora").__module__ == "vistune.methods.lora"
    with pytest.raises(SystemExit):
        main(["--help"])
    err = capsys.readouterr().err
    assert err.count("vistune: warning:") == 1 and "'lora' is a built-in method name" in err


def test_two_plugins_with_one_name_is_one_error_naming_both(clean_registry, tmp_path, monkeypatch, ia3):
    fake_distribution(tmp_path, "first", {"dup": "ia3:IA3"})
    fake_distribution(tmp_path, "second", {"dup": "other_pkg:Dup"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MethodError, match="'dup' is provided by two plugins: distribution '(first|second)'.* "
                                          "and distribution '(first|second)'"):
        get_method("dup")

    class Other(ia3.IA3):
        name = "other"

    class AnotherOther(ia3.IA3):
        name = "other"

    register_method(Other)
    register_method(Other)  # the same class again: a no-op
    with pytest.raises(MethodError, match=r"'other' is registered twice: by .*Other and by .*AnotherOther"):
        register_method(AnotherOther)


def test_register_method_checks_what_it_is_given(clean_registry, ia3):
    class Unnamed(Method):
        pass

    class Named(ia3.IA3):
        name = "named"

    with pytest.raises(MethodError, match="has no name"):
        register_method(Unnamed)
    with pytest.raises(MethodError, match="not a subclass of vistune.methods.Method"):
        register_method(dict)
    with pytest.raises(MethodError, match="declares name 'named' but is registered as 'x'"):
        register_method(Named, name="x")
    with pytest.raises(MethodError, match="is invalid"):
        register_method("ia3:IA3", name="ia3+pvp")
    assert register_method(name="named")(Named) is Named  # the decorator form returns the class
    register_method("ia3:IA3", name="lazy")  # a string is imported only when used ...
    with pytest.raises(MethodError, match="method 'lazy': its class ia3:IA3 declares name 'ia3'"):
        get_method("lazy")  # ... and must name itself as registered
