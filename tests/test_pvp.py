"""PVP: module pre-training, --init-from transfer, and the few-shot protocol."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.test_engine import make_folder
from vistune.cli import main
from vistune.config import make_config
from vistune.engine.distributed import Dist
from vistune.errors import TunedFileError
from vistune.tasks.classify import ClassifyTask
from vistune.workflows.pvp import pretrain
from vistune.workflows.train import train


def prepare(cfg):
    """Set a classification task up (backbone, data, method, head) without training it."""
    task = ClassifyTask()
    task.setup(cfg, Dist(), None)
    return task


@pytest.fixture(scope="module")
def source_and_target(tmp_path_factory):
    root = tmp_path_factory.mktemp("pvp")
    src = make_folder(root / "src", classes=4, per_class=6, seed=1)
    tgt = make_folder(root / "tgt", classes=3, per_class=5, seed=2)
    return src, tgt


def base_cfg(data, out, **kw):
    d = dict(backbone="test_vit", img_size=32, method="vpt", options={"length": 3, "deep": True},
             data=f"folder:{data}", epochs=2, batch_size=8, lr=0.05, out=str(out), progress=False)
    d.update(kw)
    return make_config(**d)


@pytest.fixture(scope="module")
def vpt_modules(source_and_target, tmp_path_factory):
    src, _ = source_and_target
    out = tmp_path_factory.mktemp("pre")
    m = pretrain(base_cfg(src, out), [f"folder:{src}"], out)
    assert m["tuned_params"] == 6 * 3 * 64
    return out / "modules.safetensors"


def test_init_from_loads_saved_tensors_bit_equal(source_and_target, vpt_modules, tmp_path):
    _, tgt = source_and_target
    p = prepare(base_cfg(tgt, tmp_path, init_from=str(vpt_modules), options={}))
    with safe_open(str(vpt_modules), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    mine = p.tuned.tuned_state_dict(include_head=False)
    assert set(mine) == {k for k in saved if not k.startswith("head.")}
    for k, v in mine.items():
        assert torch.equal(v, saved[k]), k
    assert p.tuned.num_classes == 3  # a fresh head for the target classes
    assert p.tuned.spec.options["length"] == 3  # the file's options, not vpt's default 50


def test_init_from_refuses_mismatches(source_and_target, vpt_modules, tmp_path):
    _, tgt = source_and_target
    with pytest.raises(TunedFileError, match="'vpt'.*'lora'|holds 'vpt'"):
        prepare(base_cfg(tgt, tmp_path, method="lora", options={}, init_from=str(vpt_modules)))
    with pytest.raises(TunedFileError, match="length"):
        prepare(base_cfg(tgt, tmp_path, options={"length": 5}, init_from=str(vpt_modules)))
    with pytest.raises(TunedFileError, match="test_vit"):
        prepare(base_cfg(tgt, tmp_path, backbone="vit_tiny_patch16_224", options={}, init_from=str(vpt_modules)))


def test_source_containing_target_test_images_is_refused(source_and_target, tmp_path):
    src, _ = source_and_target
    out = tmp_path / "pre"
    pretrain(base_cfg(src, out, method="lora", options={"rank": 2}, epochs=1), [f"folder:{src}"], out)
    # the target's test split is made of the very same images the source trained on
    import shutil

    leak = tmp_path / "leak"
    shutil.copytree(src / "train", leak / "test")
    shutil.copytree(src / "val", leak / "train")
    shutil.copytree(src / "val", leak / "val")
    with pytest.raises(TunedFileError, match="test images were in the source"):
        prepare(base_cfg(leak, tmp_path / "x", method="lora", options={}, init_from=str(out / "modules.safetensors")))


def test_freeze_modules_trains_head_only(source_and_target, vpt_modules, tmp_path):
    _, tgt = source_and_target
    train(base_cfg(tgt, tmp_path / "f", init_from=str(vpt_modules), freeze_modules=True))
    with safe_open(str(vpt_modules), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys() if k.startswith("vpt.")}
    with safe_open(str(tmp_path / "f" / "tuned.safetensors"), "pt") as f:
        after = {k: f.get_tensor(k) for k in saved}
        head = f.get_tensor("head.weight")
    assert all(torch.equal(saved[k], after[k]) for k in saved)
    assert head.shape[0] == 3


def test_multi_source_pretrain_keeps_one_head_per_source(source_and_target, tmp_path):
    src, tgt = source_and_target
    out = tmp_path / "multi"
    m = pretrain(base_cfg(src, out, method="adapter", options={"bottleneck": 4}, epochs=1),
                 [f"folder:{src}", f"folder:{tgt}"], out)
    assert [s["num_classes"] for s in m["sources"]] == [4, 3]
    with safe_open(str(out / "heads.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["source0.weight"] == (4, 64) and shapes["source1.weight"] == (3, 64)


def test_pretrain_then_fewshot_cli_writes_table(source_and_target, tmp_path, capsys):
    src, tgt = source_and_target
    pre = tmp_path / "pre"
    assert main(["pretrain", "--backbone", "test_vit", "--img-size", "32", "--method", "lora", "-o", "rank=2",
                 "--data", f"folder:{src}", "--epochs", "1", "--batch-size", "8", "--lr", "0.05",
                 "--out", str(pre), "--no-progress"]) == 0
    out = tmp_path / "fs"
    assert main(["fewshot", "--backbone", "test_vit", "--img-size", "32", "--data", f"folder:{tgt}",
                 "--shots", "1,2", "--seeds", "2", "--compare", "lora,lora+pvp,linear",
                 "--pvp", f"lora={pre / 'modules.safetensors'}", "--epochs", "1", "--batch-size", "4",
                 "--lr", "0.05", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "fewshot.json").read_text())
    assert set(res["table"]) == {"lora", "lora+pvp", "linear"}
    assert all(res["table"][v]["1"]["n"] == 2 for v in res["table"])
    assert len(res["runs"]) == 3 * 2 * 2
    assert (out / "fewshot.png").stat().st_size > 1000
    assert "lora+pvp" in (out / "fewshot.md").read_text()
    # each run trained on exactly k per class, and the file list is saved beside it
    split = json.loads((out / "lora" / "2shot" / "seed1" / "splits.json").read_text())
    assert split["splits"]["train"]["size"] == 2 * 3


def test_pretrain_shots_samples_each_source(source_and_target, tmp_path):
    """``pretrain --shots K`` takes K images per class from every source (it used to be ignored)."""
    src, tgt = source_and_target
    out = tmp_path / "few"
    m = pretrain(base_cfg(src, out, shots=2, epochs=1), [f"folder:{src}", f"folder:{tgt}"], out)
    assert [s["num_train"] for s in m["sources"]] == [2 * 4, 2 * 3]


def test_pretrain_can_train_on_the_sources_test_split(source_and_target, tmp_path):
    src, _ = source_and_target
    out = tmp_path / "all"
    m = pretrain(base_cfg(src, out, epochs=1), [f"folder:{src}"], out, train_on_test=True)
    assert m["sources"][0]["num_train"] == 4 * (6 + 4)  # train + test of make_folder
    assert m["sources"][0]["eval_split"] == "val"
