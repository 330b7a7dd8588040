"""Issue 14: no silent garbage. Safe merges, --weights files that must really load, input sizes a
backbone can use, devices this machine has, YAML without duplicate keys, reports of damaged runs."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.test_engine import make_folder
from tests.test_spt import EXPECTED_LORA, known_scores, scores_file, small_vit
from vistune import attach, create_backbone
from vistune.backbones import BackboneError
from vistune.cli import main
from vistune.config import ConfigError, load_config_file
from vistune.engine.distributed import DeviceError, resolve_device
from vistune.errors import MergeError
from vistune.report import ReportError, load_metrics


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"vistune {command}: error"), err
    assert "Traceback" not in err
    return lines[0]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = module.state_dict()
    assert list(after) == list(before)  # same keys: no branch removed
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, equal_nan=True, msg=k)


# ------------------------------------------------------------------------------------------------
# 1. merge refuses to write non-finite weights and leaves the model as it was


def lora_model():
    torch.manual_seed(0)
    tuned = attach(create_backbone("test_vit", img_size=32, num_classes=3), "lora", rank=2).eval()
    with torch.no_grad():
        for p in tuned.tuned_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tuned


def test_lora_merge_overflow_is_refused_and_model_untouched():
    tuned = lora_model()
    x = torch.randn(2, 3, 32, 32)
    branch = tuned.model.blocks[1].attn.qkv.lora
    with torch.no_grad():
        branch.B["v"].fill_(3e38)  # finite, but B·A (rank 2) overflows float32
        branch.A["v"].fill_(1.0)
    before, want = snapshot(tuned.model), tuned(x)
    with pytest.raises(MergeError, match=r"blocks\.1\.attn\.qkv\.weight.*non-finite.*left unmerged"):
        tuned.merge()
    assert not tuned.method.merged
    assert_same_state(before, tuned.model)  # block 0 (checked first, fine) was not merged either
    assert tuned.model.blocks[0].attn.qkv.lora is not None and tuned.model.blocks[0].attn.qkv._forward_hooks
    torch.testing.assert_close(tuned(x), want, rtol=0, atol=0, equal_nan=True)  # still the branched model


def test_merge_of_non_finite_tuned_tensor_is_refused():
    tuned = lora_model()
    with torch.no_grad():
        tuned.model.blocks[0].attn.qkv.lora.A["q"][0, 0] = float("nan")
    before = snapshot(tuned.model)
    with pytest.raises(MergeError, match=r"blocks\.0\.attn\.qkv\.lora\.A\.q"):
        tuned.merge()
    assert not tuned.method.merged
    assert_same_state(before, tuned.model)


def test_a_good_lora_merge_still_works():
    tuned = lora_model()
    x = torch.randn(2, 3, 32, 32)
    want = tuned(x)
    tuned.merge()
    assert tuned.method.merged
    torch.testing.assert_close(tuned(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", ["lora", "sparse"])
def test_spt_merge_overflow_is_refused_and_model_untouched(tmp_path, site):
    model = small_vit()
    path = scores_file(tmp_path, model, known_scores(model))
    tuned = attach(copy.deepcopy(model), "spt", budget=EXPECTED_LORA, sensitivity=path).eval()
    qkv = tuned.model.blocks[0].attn.qkv
    with torch.no_grad():
        if site == "lora":
            qkv.spt_lora.B["q"].fill_(1e38)
            qkv.spt_lora.A["q"].fill_(1.0)
        else:  # a sparse entry whose base value plus delta overflows
            i = int(qkv.spt_sparse.index("weight")[0])
            qkv.weight.view(-1)[i] = 3e38
            qkv.spt_sparse.delta("weight")[0] = 3e38
    x = torch.randn(2, 3, 32, 32)
    before, want = snapshot(tuned.model), tuned(x)
    with pytest.raises(MergeError, match=r"blocks\.0\.attn\.qkv\.weight.*non-finite"):
        tuned.merge()
    assert not tuned.method.merged
    assert_same_state(before, tuned.model)
    torch.testing.assert_close(tuned(x), want, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------
# 2. --weights files that do not fit are refused instead of silently leaving a random backbone


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    vit = timm.create_model("test_vit", img_size=32)  # with its 1000-class head
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(sd, str(d / "good.safetensors"))
    torch.save({"state_dict": sd}, d / "wrapped.pth")  # timm unwraps state_dict/model entries
    tuned = attach(create_backbone("test_vit", img_size=32, num_classes=3), "lora")
    tuned.save_tuned(d / "tuned.safetensors")
    torch.save({"epoch": 3, "optimizer": {}, "model": tuned.tuned_state_dict()}, d / "checkpoint.pt")
    torch.save(timm.create_model("test_resnet").state_dict(), d / "resnet.pth")
    save_file({k: sd[k] for k in list(sd)[:10]}, str(d / "partial.safetensors"))
    (d / "notes.txt").write_text("these are not weights\n")
    (d / "garbage.safetensors").write_bytes(bytes(range(256)) * 4)
    return d, sd


def test_fitting_weights_file_loads_every_backbone_tensor(weight_files):
    d, sd = weight_files
    for name in ("good.safetensors", "wrapped.pth"):
        model = create_backbone("test_vit", weights=d / name, img_size=32, num_classes=3)  # head dropped
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in sd.items() if not k.startswith("head.")), name
        assert model.vistune_info.weights == str(d / name)
    model = create_backbone("test_vit", weights=d / "good.safetensors", img_size=64)  # pos_embed resampled
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("name,words", [
    ("tuned.safetensors", ["missing", "unexpected", "lora"]),
    ("checkpoint.pt", ["missing", "unexpected"]),
    ("resnet.pth", ["missing", "unexpected", "conv1"]),
    ("partial.safetensors", ["missing", "of the model's"]),
    ("notes.txt", ["not a weights file"]),
    ("garbage.safetensors", ["not a weights file"]),
])
def test_weights_file_that_does_not_fit_is_refused(weight_files, name, words):
    d, _ = weight_files
    with pytest.raises(BackboneError) as info:
        create_backbone("test_vit", weights=d / name, img_size=32, num_classes=3)
    text = str(info.value)
    assert name in text and "\n" not in text
    for w in words:
        assert w in text, (w, text)


def test_cli_train_with_a_tuned_file_as_weights_is_one_line_and_writes_nothing(weight_files, tmp_path, capsys):
    d, _ = weight_files
    data = make_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "run"
    rc = main(["train", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data",
               f"folder:{data}", "--epochs", "1", "--weights", str(d / "tuned.safetensors"), "--out", str(out),
               "--no-progress"])
    assert rc == 2
    assert "does not fit backbone 'test_vit'" in one_error_line(capsys, "train")
    assert not (out / "tuned.safetensors").exists() and not (out / "metrics.json").exists()


# ------------------------------------------------------------------------------------------------
# 3. input sizes the backbone cannot use whole


def test_img_size_not_a_multiple_of_the_patch_is_refused():
    with pytest.raises(BackboneError, match=r"img_size 30 is not a multiple of test_vit's patch size 16.*14"):
        create_backbone("test_vit", img_size=30)
    with pytest.raises(BackboneError, match=r"img_size 8 is smaller than one 16-pixel patch"):
        create_backbone("test_vit", img_size=8)
    assert create_backbone("test_vit", img_size=48).vistune_info.img_size == 48


def test_img_size_too_small_for_a_cnn_is_refused_also_on_meta():
    with pytest.raises(BackboneError, match=r"img_size 16 is too small for test_convnext"):
        create_backbone("test_convnext", img_size=16)
    with torch.device("meta"), pytest.raises(BackboneError, match="too small"):
        create_backbone("test_convnext", img_size=16, load_weights=False)
    create_backbone("test_convnext", img_size=64)
    create_backbone("test_resnet", img_size=16)  # CNNs that pool down to 1 pixel are fine


def test_cli_info_img_size_is_one_line(capsys):
    assert main(["info", "--backbone", "test_vit", "--method", "lora", "--img-size", "30"]) == 2
    line = one_error_line(capsys, "info")
    assert "30" in line and "16" in line


# ------------------------------------------------------------------------------------------------
# 4. devices


def test_unknown_and_absent_devices_are_refused(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'banana'"):
        resolve_device("banana")
    with pytest.raises(DeviceError, match="meta"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="'cuda' is not available on this machine"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match="'cuda:5' does not exist: this machine has 2 cuda"):
        resolve_device("cuda:5")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("device", ["banana", "cuda:99"])
def test_cli_bad_device_is_one_line_before_any_output(tmp_path, capsys, device):
    data = make_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "run"
    rc = main(["train", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data",
               f"folder:{data}", "--epochs", "1", "--device", device, "--out", str(out), "--no-progress"])
    assert rc == 2
    assert device in one_error_line(capsys, "train")
    assert not (out / "tuned.safetensors").exists()


# ------------------------------------------------------------------------------------------------
# 5. YAML with a duplicate key


def test_yaml_duplicate_key_is_refused_naming_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.01\nepochs: 3\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice \(lines 1 and 3\)"):
        load_config_file(f)
    f.write_text("options:\n  rank: 4\n  rank: 8\n")
    with pytest.raises(ConfigError, match="'rank' is given twice"):
        load_config_file(f)
    # anchors and merge keys stay usable: an explicit key may override a merged one
    f.write_text("options: &o {rank: 4}\nhead_options:\n  <<: *o\n  rank: 8\n")
    assert load_config_file(f)["head_options"] == {"rank": 8}


# ------------------------------------------------------------------------------------------------
# 6. other one-line gaps


def test_report_refuses_damaged_metrics(tmp_path, capsys):
    cases = {"nan": '{"method": "lora", "test_top1": NaN}', "list": "[1, 2]",
             "text": '{"method": "lora", "test_top1": "high"}', "broken": '{"method": '}
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(text)
        with pytest.raises(ReportError, match=name):
            load_metrics([tmp_path / name])
        assert main(["report", str(tmp_path / name)]) == 2
        one_error_line(capsys, "report")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "metrics.json").write_text(json.dumps({"method": "linear", "test_top1": 50.0}))
    assert load_metrics([tmp_path / "ok", tmp_path / "missing"]) == [{"method": "linear", "test_top1": 50.0}]


def test_argparse_errors_are_one_line(capsys):
    for argv in (["train", "--lr", "abc"], ["eval", "--tuned", "x", "--split", "nope"], ["nope"], []):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "error:" in err and "--help" in err, err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write read-only folders")
def test_out_in_a_read_only_folder_is_one_line(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=2)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(["train", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data",
                   f"folder:{data}", "--epochs", "1", "--out", str(ro / "run"), "--no-progress"])
    finally:
        ro.chmod(0o755)
    assert rc == 2
    one_error_line(capsys, "train")


# ------------------------------------------------------------------------------------------------
# fixes already on main that had no test of their own


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One finished linear run and one stopped after its first of two epochs (shared, copied per test)."""
    from tests.test_engine import cfg_for
    from vistune.workflows.train import train

    root = tmp_path_factory.mktemp("runs")
    data = make_folder(root / "data", per_class=3)
    train(cfg_for(data, root / "done", method="linear", epochs=1))
    assert train(cfg_for(data, root / "stopped", method="linear", epochs=2), stop_after_epoch=1) == {
        "stopped_after_epoch": 1}
    return root


def copy_run(runs, name, tmp_path):
    import shutil

    return Path(shutil.copytree(runs / name, tmp_path / name))


def rewrite_meta(path, edit) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["vistune"])
    edit(meta)
    save_file(load_file(str(path)), str(path), metadata={"vistune": json.dumps(meta)})


def test_recorded_weights_path_is_a_label_never_opened(runs, tmp_path, capsys):
    run = copy_run(runs, "done", tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    rewrite_meta(run / "tuned.safetensors", lambda m: m["backbone"].update(weights=str(secret)))
    assert main(["eval", "--tuned", str(run), "--no-progress"]) == 2
    line = one_error_line(capsys, "eval")
    # refused for being a local file it will not open, not for failing to read it
    assert "pass that file again with --weights" in line and "not a weights file" not in line


def test_meta_fingerprint_does_not_skip_the_check_for_a_real_backbone(runs, tmp_path):
    from vistune.errors import TunedFileError
    from vistune.tuning import load_tuned

    path = copy_run(runs, "done", tmp_path) / "tuned.safetensors"
    rewrite_meta(path, lambda m: m["backbone"].update(fingerprint="meta"))
    with pytest.raises(TunedFileError, match="meta device"):
        load_tuned(path, create_backbone("test_vit", img_size=32))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "text", "foreign"])
def test_damaged_checkpoint_on_resume_is_one_line(runs, tmp_path, capsys, damage):
    run = copy_run(runs, "stopped", tmp_path)
    ckpt = run / "checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "garbage":
        ckpt.write_bytes(bytes(range(256)) * 8)
    elif damage == "text":
        ckpt.write_text("hello\n")  # unpickling it raised KeyError(101), a traceback
    else:
        torch.save({"epoch": 1, "model": {}}, ckpt)
    rc = main(["train", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data",
               f"folder:{runs / 'data'}", "--epochs", "2", "--batch-size", "8", "--lr", "0.05", "--warmup-epochs",
               "0.5", "--optimizer", "sgd", "--out", str(run), "--resume", "--no-progress"])
    assert rc == 2
    line = one_error_line(capsys, "train")
    assert "checkpoint" in line and "weights_only=False" not in line
    assert not (run / "metrics.json").exists()


def test_fewshot_refuses_a_bad_variant_before_training(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "fs"
    rc = main(["fewshot", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data",
               f"folder:{data}", "--epochs", "1", "--shots", "1", "--seeds", "1", "--compare", "linear,nope",
               "--out", str(out), "--no-progress"])
    assert rc == 2 and "nope" in one_error_line(capsys, "fewshot")
    assert not out.exists() or not any(out.rglob("tuned.safetensors"))  # linear was not trained first


@pytest.mark.filterwarnings("ignore:sensitivity")
def test_missing_sensitivity_file_is_computed_there(runs, tmp_path):
    from tests.test_engine import cfg_for
    from vistune.workflows.train import train

    scores = tmp_path / "new" / "scores.safetensors"
    m = train(cfg_for(runs / "data", tmp_path / "spt", method="spt", epochs=1, options={"budget": "2k"},
                      sensitivity=str(scores), batch_size=4))
    assert scores.is_file() and m["tuned_params"] > 0


# ------------------------------------------------------------------------------------------------
# issue items 4 and 7: --overwrite keeps the old run until the new one is complete; a full disk,
# Ctrl-C and a lost rank are one line


def train_argv(data, out, *extra):
    return ["train", "--backbone", "test_vit", "--img-size", "32", "--method", "linear", "--data", f"folder:{data}",
            "--epochs", "1", "--batch-size", "8", "--no-progress", "--out", str(out), *extra]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".vistune.lock"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("full") / "data", per_class=2)


def test_a_failed_overwrite_keeps_the_finished_run(tiny_data, tmp_path, capsys, monkeypatch):
    """Issue item 4: ``train --overwrite`` deleted the old run's files first, so a new run that
    failed (here: safetensors reporting a full disk) left nothing. Now the old run comes back."""
    import safetensors.torch

    out = tmp_path / "run"
    assert main(train_argv(tiny_data, out)) == 0
    before = files_of(out)

    def full(*args, **kwargs):
        raise safetensors.SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    assert main(train_argv(tiny_data, out, "--epochs", "2", "--overwrite")) == 2
    line = one_error_line(capsys, "train")
    assert "No space left on device" in line and str(out / "tuned.safetensors") in line, line
    assert files_of(out) == before  # the old run, whole; no .previous, no temp files
    monkeypatch.undo()
    assert main(train_argv(tiny_data, out, "--epochs", "2", "--overwrite")) == 0  # a good re-run replaces it
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
    assert not (out / ".previous").exists()


def test_an_interrupted_overwrite_can_be_resumed(tiny_data, tmp_path):
    """Stopped mid-way, the re-run keeps its checkpoint (and the old run aside): --resume finishes it."""
    from tests.test_engine import cfg_for
    from vistune.workflows.train import train

    out = tmp_path / "run"
    train(cfg_for(tiny_data, out, method="linear", epochs=1))
    old = (out / "metrics.json").read_bytes()
    assert train(cfg_for(tiny_data, out, method="linear", epochs=2), overwrite=True, stop_after_epoch=1) == {
        "stopped_after_epoch": 1}
    assert not (out / "metrics.json").exists() and (out / ".previous" / "metrics.json").read_bytes() == old
    assert train(cfg_for(tiny_data, out, method="linear", epochs=2), resume=True)["epochs"] == 2
    assert not (out / ".previous").exists()


def test_a_torch_write_failure_is_one_line_naming_the_file(tiny_data, tmp_path, capsys, monkeypatch):
    """Issue item 7: ``RuntimeError: [enforce fail at inline_container.cc:672]`` was a traceback."""
    import torch as torch_module

    def failed(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch_module, "save", failed)
    assert main(train_argv(tiny_data, tmp_path / "run")) == 2
    line = one_error_line(capsys, "train")
    assert "checkpoint.pt" in line and "file write failed" in line, line
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_ctrl_c_is_one_line_saying_how_to_resume(tiny_data, tmp_path, capsys, monkeypatch):
    from vistune.workflows import sweep
    from vistune.workflows import train as train_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main(train_argv(tiny_data, tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert err.strip() == "vistune train: interrupted; resume with --resume" and "Traceback" not in err, err
    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    assert main(["sweep", *train_argv(tiny_data, tmp_path / "sw")[1:]]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted; resume by running the same command again" in err[0], err


def test_a_lost_rank_is_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    """Issue item 7: a rank whose peer was killed printed gloo's traceback and no vistune line."""
    from vistune.workflows import train as train_module

    def lost(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:40173")

    monkeypatch.setattr(train_module, "train", lost)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(train_argv(tiny_data, tmp_path / "run")) == 2
    line = one_error_line(capsys, "train")
    assert "(rank 1 of 2)" in line and "lost contact with another process" in line and "--resume" in line, line


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs: a real full disk (mounting needs root; skipped where the sandbox refuses)."""
    import subprocess

    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err})")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30, check=False)


def fill(folder: Path) -> None:
    """Write a filler file until the file system is full."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    try:  # the last partial buffer may still be pending
        with open(folder / "filler2", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass


def test_a_full_disk_is_one_line_and_keeps_the_old_run(tiny_data, small_tmpfs, capsys):
    """A real full disk (tmpfs): train, train --overwrite and export each end in one line, and the
    finished run that was there stays whole."""
    out = small_tmpfs / "run"
    assert main(train_argv(tiny_data, out)) == 0
    before = files_of(out)
    fill(small_tmpfs)
    capsys.readouterr()
    assert main(train_argv(tiny_data, out, "--epochs", "2", "--overwrite")) == 2
    assert "No space left on device" in one_error_line(capsys, "train")
    assert files_of(out) == before
    assert main(train_argv(tiny_data, small_tmpfs / "new")) == 2
    assert "No space left on device" in one_error_line(capsys, "train")
    assert main(["export", "--tuned", str(out), "--format", "timm", "--out", str(small_tmpfs / "x")]) == 2
    assert "No space left on device" in one_error_line(capsys, "export")
    assert not list(small_tmpfs.glob(".x.*"))


def test_report_lists_what_it_skipped_and_keeps_the_good_rows(runs, tmp_path, capsys):
    """Issue item 9: an absent path, an empty folder or an unfinished run vanished silently (exit 0:
    a typo went unnoticed), and one broken file aborted the whole table."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text('{"method": ')
    paths = {"absent": tmp_path / "absnet", "empty": tmp_path / "empty", "unfinished": runs / "stopped",
             "broken": tmp_path / "broken"}
    capsys.readouterr()
    assert main(["report", str(runs / "done"), *map(str, paths.values())]) == 0
    out, err = capsys.readouterr()
    table = [line for line in out.splitlines() if line.startswith("| linear")]
    assert len(table) == 1, out
    lines = err.strip().splitlines()
    assert len(lines) == 4 and "Traceback" not in err, err
    reasons = {"absent": "no such file or folder", "empty": "empty folder", "unfinished": "unfinished run",
               "broken": "is not JSON"}
    for (name, path), line in zip(paths.items(), lines):
        assert line.startswith(f"vistune report: skipped {path}: ") and reasons[name] in line, (name, line)
    # nothing readable: exit 2, one line naming every path and why
    assert main(["report", *map(str, paths.values())]) == 2
    line = one_error_line(capsys, "report")
    assert all(str(p) in line for p in paths.values()) and "empty folder" in line, line


def test_a_sweep_on_a_full_disk_is_one_line_and_resumes_once_space_is_free(tiny_data, small_tmpfs, capsys):
    """A real full disk under a sweep: one line; freeing space and rerunning finishes every point
    once (a failed write once left the trial's folder lock held, and the rerun looped on it)."""
    out = small_tmpfs / "s"
    argv = ["sweep", *train_argv(tiny_data, out)[1:], "--pruner", "none", "--grid", "lr=0.05,0.01", "--grid", "wd=0",
            "--stage", "search", "--method", "lora", "-o", "rank=2"]
    assert main([*argv, "--max-trials", "1"]) == 0
    fill(small_tmpfs)
    capsys.readouterr()
    assert main(argv) == 2
    assert "No space left on device" in one_error_line(capsys, "sweep")
    for filler in small_tmpfs.glob("filler*"):
        filler.unlink()
    assert main(argv) == 0
    result = json.loads((out / "sweep.json").read_text())
    complete = sorted(t["params"]["lr"] for t in result["trials"] if t["state"] == "COMPLETE")
    assert complete == [0.01, 0.05], result["trials"]
