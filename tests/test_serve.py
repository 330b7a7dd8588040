"""Multi-task serving: one backbone, many tuned files, mixed batches, the HTTP service.

The reference for every number is the task's own model, rebuilt the way ``vistune eval`` rebuilds
it (``seeded_backbone`` from the file's metadata + ``load_tuned``, or ``load_dense``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script
from vistune import attach, create_backbone, load_tuned
from vistune.dense.model import build_dense_model, load_dense, save_dense
from vistune.backbones import seeded_backbone
from vistune.errors import TunedFileError
from vistune.sensitivity import pool_parameters, save_scores
from vistune.precision import resolve_precision
from vistune.serve.batching import Batcher
from vistune.serve.multitask import DuplicateTaskError, MultiTaskModel, ServeError, UnknownTaskError
from vistune.serve.predict import BadImageError, classify_input, predict, prepare

fastapi = pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
from fastapi.testclient import TestClient

from vistune.serve.app import create_app

VIT = ("test_vit", 32)
CNN = ("test_efficientnet", 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def backbone(arch: str, size: int) -> torch.nn.Module:
    return seeded_backbone(arch, None, size)


def perturb(params, seed: int) -> None:
    """Move every tuned tensor off its init, so equality with the own model means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def spt_scores(model, path: Path) -> str:
    """Scores whose allocation touches a few modules: LoRA/adapter on q of block 0, sparse entries
    in a proj weight and an fc1 bias, a whole LayerNorm weight and a whole LayerNorm bias."""
    s = {n: torch.zeros(p.shape) for n, p in pool_parameters(model)}
    s["blocks.0.attn.qkv.weight"].view(-1)[torch.arange(0, 120 * 30, 30)] = 1.0
    s["blocks.3.attn.proj.weight"].view(-1)[torch.arange(0, 30 * 100, 100)] = 1.0
    s["blocks.2.norm1.weight"][:20] = 1.0
    s["blocks.4.mlp.fc1.bias"][:10] = 1.0
    s["blocks.5.norm2.bias"][:30] = 1.0
    return str(save_scores(path, s, model, {"num_batches": 1, "batch_size": 4}))


def random_scores(model, path: Path) -> str:
    g = torch.Generator().manual_seed(5)
    s = {n: torch.rand(p.shape, generator=g) ** 8 for n, p in pool_parameters(model)}
    return str(save_scores(path, s, model, {"num_batches": 1, "batch_size": 4}))


# name: (method, options); "SPT" options get a scores file at build time.
VIT_TASKS = {
    "linear": ("linear", {}),
    "bitfit": ("bitfit", {}),
    "vpt3": ("vpt", {"length": 3}),
    "vpt3deep": ("vpt", {"length": 3, "deep": True}),
    "vpt5deep": ("vpt", {"length": 5, "deep": True}),
    "lora": ("lora", {"rank": 4}),
    "lora_all": ("lora", {"rank": 2, "targets": "q,k,v,proj,fc1,fc2", "alpha": 4}),
    "adapter": ("adapter", {"bottleneck": 4}),
    "adapter_par": ("adapter", {"bottleneck": 4, "position": "parallel", "scale": 0.5}),
    "spt_lora": ("spt", {"budget": 1192, "structured": "lora"}),
    "spt_adapter": ("spt", {"budget": 1264, "structured": "adapter"}),
    "spt_heavy": ("spt", {"budget": "20k", "structured": "lora"}),
    "protuning": ("protuning", {}),
    "full": ("full", {}),
}
CNN_TASKS = {
    "linear": ("linear", {}),
    "bitfit": ("bitfit", {}),
    "protuning": ("protuning", {}),
    "spt": ("spt", {"budget": "2k", "structured": "lora"}),
    "vpt_pad": ("vpt", {"location": "pad", "length": 2}),
    "vpt_below": ("vpt", {"location": "below", "length": 2}),
    "full": ("full", {}),
    "lora": ("lora", {"rank": 2, "targets": "pw,dw"}),  # Conv-LoRA, factorised and grouped
    "adapter": ("adapter", {"bottleneck": 2}),  # residual conv adapters beside every block
}


def make_files(root: Path, arch: str, size: int, tasks: dict) -> dict[str, Path]:
    files = {}
    for i, (name, (method, opts)) in enumerate(tasks.items()):
        opts = dict(opts)
        if method == "spt":
            scorer = spt_scores if name in ("spt_lora", "spt_adapter") else random_scores
            opts["sensitivity"] = scorer(backbone(arch, size), root / f"{name}.scores.safetensors")
        tuned = attach(backbone(arch, size), method, num_classes=3 + i % 4, **opts)
        perturb(tuned.tuned_parameters(), i)
        files[name] = tuned.save_tuned(root / f"{name}.safetensors",
                                       extra={"class_names": [f"{name}-{c}" for c in range(3 + i % 4)]})
    return files


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory) -> dict[str, Path]:
    return make_files(tmp_path_factory.mktemp("vit"), *VIT, VIT_TASKS)


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory) -> dict[str, Path]:
    return make_files(tmp_path_factory.mktemp("cnn"), *CNN, CNN_TASKS)


DENSE = {  # name: (method, options, task)
    "seg_linear": ("linear", {}, "segment"),
    "seg_vpt": ("vpt", {"length": 4, "deep": True}, "segment"),
    "det_lora": ("lora", {}, "detect"),
    "seg_full": ("full", {}, "segment"),
}


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    runs = {}
    for i, (name, (method, opts, task)) in enumerate(DENSE.items()):
        model = build_dense_model(attach(backbone("test_vit", 64), method, **opts), task, 2 + i)
        perturb(model.trainable_parameters(), 10 + i)
        model.eval()
        save_dense(model, root / name, extra={"class_names": [f"{name}-{c}" for c in range(2 + i)]})
        runs[name] = root / name
    tuned = attach(backbone("test_vit", 64), "adapter", num_classes=3)
    perturb(tuned.tuned_parameters(), 20)
    runs["cls"] = tuned.save_tuned(root / "cls.safetensors", extra={"class_names": ["cat", "dog", "bee"]})
    return runs


def own_model(path: Path):
    """The task's own model, as ``vistune eval`` builds it."""
    from vistune.backbones import backbone_for_file
    from vistune.tuning import read_tuned_file

    meta, _ = read_tuned_file(path)
    return load_tuned(path, backbone_for_file(meta["backbone"], path)).eval()


def mixed(names: list[str], per_task: int, seed: int = 0) -> list[str]:
    order = [n for n in names for _ in range(per_task)]
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i] for i in perm]


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def check_against_own(mt: MultiTaskModel, files: dict[str, Path], size: int) -> None:
    tasks = mixed(list(files), 2)
    x = images(len(tasks), size)
    out = mt.forward(x, tasks)
    for name, path in files.items():
        idx = [i for i, t in enumerate(tasks) if t == name]
        with torch.no_grad():
            want = own_model(path)(x[idx])
        got = torch.cat([out[i] for i in idx])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"task {name}: {m}")


# ------------------------------------------------------------------------------------------------
# The multi-task model


def test_every_vit_method_in_one_mixed_batch_equals_its_own_model(vit_files):
    base = backbone(*VIT)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    mt = MultiTaskModel(base)
    for name, path in vit_files.items():
        mt.add_task(name, path)
    check_against_own(mt, vit_files, VIT[1])
    # Who shares the backbone pass: everything but full fine-tuning and the SPT allocation spread
    # over most weights (own passes), and shallow VPT (its prompts are tokens: a pass of 3). Deep
    # prompts join the plain pass as attention keys/values.
    tasks = list(vit_files)
    keys = {key: sorted({tasks[i] for i in idx}) for key, idx in mt.passes(tasks)}
    assert keys[(0, "")] == sorted(set(tasks) - {"vpt3", "full", "spt_heavy"})
    assert keys[(3, "")] == ["vpt3"] and (5, "") not in keys
    assert mt.tasks["vpt5deep"].kv and mt.tasks["vpt5deep"].info()["prompts_as_kv"]
    assert not mt.tasks["vpt3"].kv and mt.tasks["vpt3"].tokens == 3
    assert keys[(0, "full")] == ["full"] and keys[(0, "spt_heavy")] == ["spt_heavy"]
    # The routed SPT tasks really exercise all three routes (hooks, bias delta, re-run).
    kinds = {n: ("rerun" if r.rerun else "bias" if r.bias is not None else "hooks")
             for n, r in mt.tasks["spt_lora"].routes.items()}
    assert kinds == {"blocks.0.attn.qkv": "hooks", "blocks.2.norm1": "rerun", "blocks.3.attn.proj": "rerun",
                     "blocks.4.mlp.fc1": "rerun", "blocks.5.norm2": "bias"}
    for name in vit_files:
        mt.remove_task(name)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())
    assert base(images(2, VIT[1])).shape == (2, base.num_features)  # a plain backbone again


def test_prompt_lengths_share_one_padded_pass_and_each_row_equals_its_own_model(vit_files):
    """VPT rows (3 and 5 prompts) and rows with none share one pass, padded to 5 tokens and masked
    out of attention; each row must still equal its own model. A wrong mask (padding attended),
    padding placed where the prompts are, or a strip that cuts real tokens breaks the equality."""
    names = [n for n in vit_files if n != "protuning"]  # Pro-tuning reshapes tokens: never padded
    files = {n: vit_files[n] for n in names}
    mt = MultiTaskModel(backbone(*VIT), kv_prompts=False)  # deep prompts as tokens too
    for name, path in files.items():
        mt.add_task(name, path)
    tasks = mixed(names, 1, seed=5)
    # 44 padding tokens (eight rows x 5, two x 2) for two passes saved: merged from 22 tokens a pass
    mt.pass_cost_tokens = 22
    keys = {key: sorted({tasks[i] for i in idx}) for key, idx in mt.passes(tasks)}
    routed = sorted(set(names) - {"full", "spt_heavy"})
    assert keys == {(5, ""): routed, (0, "full"): ["full"], (0, "spt_heavy"): ["spt_heavy"]}
    check_against_own(mt, files, VIT[1])
    # the padding is paid per row: with a pass valued below 22 tokens the split comes back, same outputs
    x = images(len(tasks), VIT[1], seed=6)
    merged = mt.forward(x, tasks)
    mt.pass_cost_tokens = 21
    assert {k for k, _ in mt.passes(tasks)} >= {(0, ""), (3, ""), (5, "")}
    split = mt.forward(x, tasks)
    for a, b in zip(merged, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # one Pro-tuning row keeps every prompt length in its own pass again
    mt.pass_cost_tokens = 10**6
    mt.add_task("protuning", vit_files["protuning"])
    assert {k for k, _ in mt.passes([*tasks, "protuning"])} >= {(0, ""), (3, ""), (5, "")}


def test_deep_prompts_served_as_keys_and_values_equal_their_own_model(vit_files):
    """Deep VPT rows run at the plain sequence length, their prompts added to each block's
    attention as constant keys/values: the same output as the prompt tokens, in the plain pass
    and in a pass padded for shallow prompts (the padding keys masked out of the merge too)."""
    names = ["vpt3deep", "vpt5deep", "vpt3", "lora", "adapter", "linear"]
    files = {n: vit_files[n] for n in names}
    mt = MultiTaskModel(backbone(*VIT))
    for name, path in files.items():
        mt.add_task(name, path)
    deep = mt.tasks["vpt5deep"]
    assert deep.tokens == 0 and sorted(deep.kv) == [f"blocks.{i}.attn" for i in range(6)]
    assert all(k.shape == v.shape == (2, 5, 32) for k, v in deep.kv.values())  # heads, prompts, head dim
    assert not deep.routes  # the prompt hooks are gone: nothing but the keys/values
    # the merge is paid for in memory: keys and values of every block, beside the prompts
    assert kv_bytes(deep) == 6 * 2 * (2 * 5 * 32) * 4  # blocks x (k, v) x (heads, prompts, head dim) x fp32
    assert mt.memory_report()["tasks"]["vpt5deep"]["tensor_bytes"] >= kv_bytes(deep) + 6 * 5 * 64 * 4
    tasks = mixed(names, 2, seed=2)
    mt.pass_cost_tokens = 0  # a pass per prompt length: deep rows share the plain one
    assert {k for k, _ in mt.passes(tasks)} == {(0, ""), (3, "")}
    check_against_own(mt, files, VIT[1])
    mt.pass_cost_tokens = 10**6  # one pass padded to 3 tokens: deep rows carry padding keys
    assert [k for k, _ in mt.passes(tasks)] == [(3, "")]
    check_against_own(mt, files, VIT[1])
    # the same numbers as serving the prompts as tokens
    tokens = MultiTaskModel(backbone(*VIT), kv_prompts=False)
    for name, path in files.items():
        tokens.add_task(name, path)
    assert tokens.tasks["vpt5deep"].tokens == 5 and not tokens.tasks["vpt5deep"].kv
    x = images(len(tasks), VIT[1], seed=4)
    for a, b in zip(mt.forward(x, tasks), tokens.forward(x, tasks)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_deep_prompts_stay_tokens_where_tokens_cost_less(tmp_path):
    """Keys/values recompute the image tokens' scores (N^2 d per row and block), tokens run the
    prompts through the projections and MLP (p (4d^2 + 2dh)). test_vit (d 64, h 192) at 112 px
    has N = 50: 2,500 <= p * 640 holds for 5 prompts (3,200), not for 3 (1,920)."""
    files = {}
    for i, p in enumerate((3, 5)):
        tuned = attach(backbone("test_vit", 112), "vpt", num_classes=3, length=p, deep=True)
        perturb(tuned.tuned_parameters(), 30 + i)
        files[f"deep{p}"] = tuned.save_tuned(tmp_path / f"deep{p}.safetensors")
    mt = MultiTaskModel(backbone("test_vit", 112))
    for name, path in files.items():
        mt.add_task(name, path)
    assert mt.tasks["deep5"].kv and mt.tasks["deep5"].tokens == 0
    assert not mt.tasks["deep3"].kv and mt.tasks["deep3"].tokens == 3
    check_against_own(mt, files, 112)


def test_deep_prompts_stay_tokens_where_keys_and_values_do_not_reproduce_the_model(vit_files, monkeypatch):
    """add_task checks the keys/values against the task's own model on a probe image: wrong ones
    (here: keys of zero) are caught, warned about, and the prompts are served as tokens."""
    from vistune.serve import multitask

    real = multitask.prompt_kv
    monkeypatch.setattr(multitask, "prompt_kv", lambda block, p: (torch.zeros_like(real(block, p)[0]),
                                                                   real(block, p)[1]))
    mt = MultiTaskModel(backbone(*VIT))
    with pytest.warns(UserWarning, match="'vpt3deep': its deep prompts served as attention keys/values did not "
                                         "reproduce its model"):
        mt.add_task("vpt3deep", vit_files["vpt3deep"])
    task = mt.tasks["vpt3deep"]
    assert not task.kv and task.tokens == 3 and not mt._kv_routers
    check_against_own(mt, {"vpt3deep": vit_files["vpt3deep"]}, VIT[1])


def test_every_cnn_method_in_one_mixed_batch_equals_its_own_model(cnn_files):
    mt = MultiTaskModel(backbone(*CNN))
    for name, path in cnn_files.items():
        mt.add_task(name, path)
    check_against_own(mt, cnn_files, CNN[1])
    # BitFit on BatchNormAct2d re-runs the norm (an activation follows its bias); plain convs get deltas
    assert any(r.rerun for r in mt.tasks["bitfit"].routes.values())
    assert not mt.tasks["bitfit"].own_pass and mt.tasks["full"].own_pass
    # VPT-pad feeds the stem a larger image: its own pass; VPT-below is a row-wise stem hook: shared
    assert mt.tasks["vpt_pad"].own_pass and not mt.tasks["vpt_below"].own_pass


def test_one_sample_equals_its_own_model_whatever_the_batch_holds(vit_files):
    mt = MultiTaskModel(backbone(*VIT))
    names = ["lora", "vpt3deep", "bitfit", "spt_lora", "adapter"]
    for n in names:
        mt.add_task(n, vit_files[n])
    x = images(5, VIT[1], seed=3)
    out = mt.forward(x, names)
    for i, n in enumerate(names):
        with torch.no_grad():
            want = own_model(vit_files[n])(x[i:i + 1])
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mt.forward(x[i:i + 1], [n])[0], want, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_stays_close_to_fp32(vit_files):
    mt = MultiTaskModel(backbone(*VIT))
    names = ["lora", "vpt3deep", "bitfit", "full"]
    for n in names:
        mt.add_task(n, vit_files[n])
    x = images(4, VIT[1])
    exact = mt.forward(x, names)
    assert mt.precision.name == "fp32"  # auto on a CPU the suite treats as emulating bf16 (conftest)
    mt.precision = resolve_precision("bf16", "cpu")
    approx = mt.forward(x, names)
    for a, b in zip(approx, exact):
        assert a.dtype == torch.float32 and not torch.equal(a, b)  # bf16 really ran
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_dense_and_classification_tasks_share_one_model(dense_runs):
    mt = MultiTaskModel(backbone("test_vit", 64))
    for name, path in dense_runs.items():
        mt.add_task(name, path)
    assert {n: t.kind for n, t in mt.tasks.items()} == {
        "seg_linear": "segment", "seg_vpt": "segment", "det_lora": "detect", "seg_full": "segment", "cls": "classify"}
    assert mt.tasks["seg_vpt"].classes == ["seg_vpt-0", "seg_vpt-1", "seg_vpt-2"]
    tasks = mixed(list(dense_runs), 2, seed=1)
    x = images(len(tasks), 64)
    out = mt.forward(x, tasks)
    for name, path in dense_runs.items():
        idx = [i for i, t in enumerate(tasks) if t == name]
        with torch.no_grad():
            want = (own_model(path) if name == "cls" else load_dense(path)[0])(x[idx])
        if isinstance(want, dict):
            for k in ("cls", "box", "ctr"):
                got = torch.cat([out[i][k] for i in idx])
                torch.testing.assert_close(got, want[k], rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(torch.cat([out[i] for i in idx]), want, rtol=1e-5, atol=1e-5)


def test_cnn_dense_tasks_equal_their_own_models(tmp_path):
    runs = {}
    for i, (method, task) in enumerate((("protuning", "detect"), ("bitfit", "segment"), ("linear", "segment"))):
        model = build_dense_model(attach(backbone("test_efficientnet", 64), method), task, 2 + i)
        perturb(model.trainable_parameters(), 30 + i)
        save_dense(model.eval(), tmp_path / f"{method}-{task}")
        runs[f"{method}-{task}"] = tmp_path / f"{method}-{task}"
    mt = MultiTaskModel(backbone("test_efficientnet", 64))
    for name, path in runs.items():
        mt.add_task(name, path)
    assert all(not t.own_pass for t in mt.tasks.values())
    tasks = mixed(list(runs), 2, seed=2)
    x = images(len(tasks), 64)
    out = mt.forward(x, tasks)
    for name, path in runs.items():
        idx = [i for i, t in enumerate(tasks) if t == name]
        with torch.no_grad():
            want = load_dense(path)[0](x[idx])
        if isinstance(want, dict):
            for k in ("cls", "box", "ctr"):
                torch.testing.assert_close(torch.cat([out[i][k] for i in idx]), want[k], rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(torch.cat([out[i] for i in idx]), want, rtol=1e-5, atol=1e-5)


def kv_bytes(task) -> int:
    """What a task's deep-prompt keys and values hold (memory_report counts them as the task's)."""
    return sum(t.numel() * t.element_size() for pair in task.kv.values() for t in pair)


def test_each_task_costs_its_file_not_a_backbone(vit_files, dense_runs):
    mt = MultiTaskModel(backbone(*VIT))
    backbone_bytes = mt.memory_report()["backbone_bytes"]
    for name, path in vit_files.items():
        mt.add_task(name, path)
    report = mt.memory_report()
    assert report["backbone_bytes"] == backbone_bytes
    for name, row in report["tasks"].items():
        # exactly its tensors, nothing else (deep prompts: also their keys and values, per block)
        kv = kv_bytes(mt.tasks[name])
        assert row["tensor_bytes"] == row["file_bytes"] + kv > 0, name
        assert (kv > 0) == name.endswith("deep"), name
        if name != "full":
            assert row["tensor_bytes"] < backbone_bytes / 10, name
    # the views' untouched tensors are the backbone's own memory, not copies
    real = {t.untyped_storage().data_ptr() for t in mt.backbone.state_dict().values()}
    for route in mt.tasks["lora"].routes.values():
        assert route.host.weight.untyped_storage().data_ptr() in real
    dense = MultiTaskModel(backbone("test_vit", 64))
    for name, path in dense_runs.items():
        dense.add_task(name, path)
    for name, row in dense.memory_report()["tasks"].items():
        assert row["tensor_bytes"] == row["file_bytes"] + kv_bytes(dense.tasks[name]), name  # dense: tuned file + head file


def test_files_for_other_weights_or_size_are_refused(vit_files, tmp_path):
    mt = MultiTaskModel(backbone(*VIT))
    torch.manual_seed(123)
    other = attach(create_backbone("test_vit", img_size=32, num_classes=0), "lora", num_classes=3)
    with pytest.raises(TunedFileError, match="fingerprint"):
        mt.add_task("x", other.save_tuned(tmp_path / "other.safetensors"))
    bigger = attach(backbone("test_vit", 48), "lora", num_classes=3)
    with pytest.raises(TunedFileError, match="image size"):
        mt.add_task("x", bigger.save_tuned(tmp_path / "bigger.safetensors"))
    cnn = attach(backbone(*CNN), "linear", num_classes=3)
    with pytest.raises(TunedFileError, match="test_efficientnet"):
        mt.add_task("x", cnn.save_tuned(tmp_path / "cnn.safetensors"))
    assert mt.task_names() == [] and not mt._routers  # nothing half-added
    mt.add_task("x", vit_files["lora"])  # and the name is free to use


def test_adding_and_removing_tasks_leaves_the_others_alone(vit_files):
    mt = MultiTaskModel(backbone(*VIT))
    mt.add_task("a", vit_files["lora"])
    x = images(3, VIT[1])
    alone = mt.forward(x, ["a"] * 3)
    mt.add_task("b", vit_files["lora_all"])  # same hosts as "a": both routes on one router
    mt.add_task("c", vit_files["adapter"])
    mixed_out = mt.forward(torch.cat([x, x]), ["a"] * 3 + ["b", "c", "b"])
    for i in range(3):
        torch.testing.assert_close(mixed_out[i], alone[i], rtol=1e-6, atol=1e-6)
    mt.remove_task("b")
    mt.remove_task("c")
    again = mt.forward(x, ["a"] * 3)
    assert all(torch.equal(p, q) for p, q in zip(again, alone))
    assert set(mt._routers) == set(mt.tasks["a"].routes)


def test_task_errors_are_clear(vit_files, dense_runs, tmp_path):
    mt = MultiTaskModel(backbone(*VIT))
    mt.add_task("a", vit_files["linear"])
    with pytest.raises(DuplicateTaskError, match="already loaded"):
        mt.add_task("a", vit_files["lora"])
    with pytest.raises(ServeError, match="invalid"):
        mt.add_task("bad name/", vit_files["lora"])
    with pytest.raises(UnknownTaskError, match="no task 'zz'"):
        mt.forward(images(1, 32), ["zz"])
    with pytest.raises(UnknownTaskError):
        mt.remove_task("zz")
    with pytest.raises(TunedFileError, match="no such file"):
        mt.add_task("b", tmp_path / "missing.safetensors")
    with pytest.raises(ServeError, match="one task per image"):
        mt.forward(images(2, 32), ["a"])
    headless = attach(backbone(*VIT), "lora")  # num_classes=0 and no dense head beside it
    with pytest.raises(TunedFileError, match="no classification head"):
        mt.add_task("b", headless.save_tuned(tmp_path / "headless.safetensors"))
    with pytest.raises(ServeError, match="plain backbone"):
        MultiTaskModel(attach(backbone(*VIT), "lora").model)


def test_preprocessing_equals_the_data_loader(tmp_path):
    """The pixels a classification task sees are those `vistune eval` feeds it (JPEG draft decode,
    bicubic resize, grey broadcast, normalisation)."""
    from vistune.data import load_data

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    files = []
    for split in ("train", "val", "test"):
        for c, mode in enumerate(("RGB", "L")):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            arr = rng.integers(0, 255, (97, 131, 3) if mode == "RGB" else (97, 131), dtype=np.uint8)
            f = d / ("a.jpg" if mode == "RGB" else "a.png")
            Image.fromarray(arr, mode=mode).save(f)
            files.append(f)
    data = load_data(f"folder:{root}", img_size=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    for i, sid in enumerate(data.test.ids):
        want, _ = data.test[i]
        got = classify_input((root / "test" / sid).read_bytes() if (root / "test" / sid).exists()
                             else (root / sid).read_bytes(), 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
        assert torch.equal(got, want), sid


def test_dense_predictions_equal_vistune_predict(dense_runs, tmp_path):
    from vistune.dense.predict import predict_image

    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (45, 70, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    mt = MultiTaskModel(backbone("test_vit", 64))
    for name in ("seg_vpt", "det_lora"):
        mt.add_task(name, dense_runs[name])
    res = predict(mt, buf.getvalue(), score_threshold=0.0)
    seg, _ = load_dense(dense_runs["seg_vpt"])
    info = seg.tuned.model.vistune_info
    want = predict_image(seg, img, info.mean, info.std)["mask"]
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(res["seg_vpt"]["mask_png"]))))
    assert got.shape == (45, 70) and np.array_equal(got, want.numpy())
    det, _ = load_dense(dense_runs["det_lora"])
    want = predict_image(det, img, info.mean, info.std, score_threshold=0.0)
    got = res["det_lora"]["boxes"]
    assert len(got) == len(want["boxes"]) > 0
    np.testing.assert_allclose([b["box"] for b in got], want["boxes"].numpy(), atol=0.06)
    assert all(0 <= b["box"][0] <= b["box"][2] <= 70 and 0 <= b["box"][1] <= b["box"][3] <= 45 for b in got)


def test_prepare_refuses_what_is_not_an_image(vit_files):
    mt = MultiTaskModel(backbone(*VIT))
    mt.add_task("a", vit_files["linear"])
    for data, msg in ((b"", "empty"), (b"not an image", "not an image"), (PNG[:-60], "cannot be decoded")):
        with pytest.raises(BadImageError, match=msg):
            prepare(mt, data)


def _png(w: int = 48, h: int = 40, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


# ------------------------------------------------------------------------------------------------
# Batching


def test_batcher_groups_waiting_jobs_and_isolates_failures():
    seen: list[int] = []

    def run(items):
        seen.append(len(items))
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    async def main():
        b = Batcher(run, max_batch=4, window=0.2)
        jobs = [[1], [2, 3], [4], [5], [-1], [6, 7, 8, 9, 10]]
        results = await asyncio.gather(*(b.submit(j) for j in jobs), return_exceptions=True)
        await b.stop()
        return b, results

    b, results = asyncio.run(main())
    assert results[:4] == [[10], [20, 30], [40], [50]]
    assert isinstance(results[4], ValueError) and "bad -1" in str(results[4])
    assert results[5] == [60, 70, 80, 90, 100]  # larger than max_batch: run alone, in chunks
    # [1] [2,3] [4] fill the first batch; [5] [-1] the second; the big job then runs alone as 4 + 1
    assert seen == [4, 2, 4, 1] and b.stats.samples == 11 and b.stats.batches == 3


# ------------------------------------------------------------------------------------------------
# HTTP


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app) -> Iterator[str]:
    """``app`` behind a real uvicorn on 127.0.0.1 (a thread of this process), yielding its URL."""
    import threading
    import time

    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{srv.config.port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def service(dense_runs):
    mt = MultiTaskModel(backbone("test_vit", 64))
    for name in ("cls", "seg_vpt", "det_lora"):
        mt.add_task(name, dense_runs[name])
    app = create_app(mt, max_upload_bytes=100_000, batch_window_ms=2)
    with TestClient(app) as client:
        yield client, mt


def test_http_health_and_task_list(service):
    client, mt = service
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["tasks"] == 3 and h["backbone"]["name"] == "test_vit"
    tasks = {t["name"]: t for t in client.get("/tasks").json()["tasks"]}
    assert tasks["cls"]["classes"] == ["cat", "dog", "bee"] and tasks["cls"]["method"] == "adapter"
    assert tasks["cls"]["tuned_params"] == mt.tasks["cls"].report["tuned_params"] > 0
    assert tasks["det_lora"]["kind"] == "detect" and tasks["seg_vpt"]["shares_backbone_pass"]
    assert client.get("/tasks/cls").json()["name"] == "cls"
    assert client.get("/tasks/nope").status_code == 404
    body = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert "vistune serve" in client.get("/").text


def test_http_predict_multipart_and_json_agree_with_the_own_model(service, dense_runs):
    client, mt = service
    r = client.post("/predict", files={"file": ("a.png", PNG, "image/png")}, data={"task": "cls", "top_k": "2"})
    assert r.status_code == 200, r.text
    top = r.json()["results"]["cls"]["top"]
    x = classify_input(PNG, 64, mt.info.mean, mt.info.std)
    with torch.no_grad():
        probs = torch.softmax(own_model(dense_runs["cls"])(x[None])[0], 0)
    assert [t["label"] for t in top] == [["cat", "dog", "bee"][i] for i in probs.argsort(descending=True)[:2]]
    assert top[0]["prob"] == pytest.approx(probs.max().item(), abs=1e-5)
    r = client.post("/predict", json={"image": "data:image/png;base64," + base64.b64encode(PNG).decode(),
                                      "tasks": ["cls"], "top_k": 2})
    assert r.json()["results"]["cls"]["top"] == top
    every = client.post("/predict", files={"file": ("a.png", PNG, "image/png")}).json()["results"]
    assert set(every) == {"cls", "seg_vpt", "det_lora"}
    seg = every["seg_vpt"]
    overlay = Image.open(io.BytesIO(base64.b64decode(seg["overlay_png"])))
    assert overlay.size == (48, 40) and overlay.mode == "RGBA"
    assert sum(f["fraction"] for f in seg["fractions"]) == pytest.approx(1.0)
    assert every["det_lora"]["threshold"] == 0.3 and isinstance(every["det_lora"]["boxes"], list)


@pytest.mark.parametrize("kwargs,status,message", [
    (dict(files={"file": ("a.txt", b"hello", "text/plain")}), 400, "not an image"),
    (dict(files={"file": ("a.png", PNG, "image/png")}, data={"task": "nope"}), 404, "no task 'nope'"),
    (dict(files={"file": ("a.png", b"x" * 200_000, "image/png")}), 413, "at most 100,000"),
    (dict(json={"image": "@@@"}), 400, "not valid base64"),
    (dict(json={"picture": "x"}), 400, '"image"'),
    (dict(json={"image": base64.b64encode(PNG).decode(), "top_k": "many"}), 422, "top_k must be an integer"),
    (dict(json={"image": base64.b64encode(PNG).decode(), "score_threshold": 2}), 422, "score_threshold"),
    (dict(content=b"abc", headers={"content-type": "text/plain"}), 415, "not supported"),
    (dict(files={"task": (None, "cls")}), 400, "no image file"),
    (dict(data={"task": "cls"}), 415, "multipart/form-data"),
])
def test_http_bad_input_is_one_clear_4xx_and_the_service_keeps_serving(service, kwargs, status, message):
    client, _ = service
    r = client.post("/predict", **kwargs)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and message in detail
    assert client.post("/predict", files={"file": ("a.png", PNG, "image/png")}, data={"task": "cls"}).status_code == 200


def test_http_oversized_image_dimensions_are_refused(dense_runs):
    mt = MultiTaskModel(backbone("test_vit", 64))
    mt.add_task("cls", dense_runs["cls"])
    with TestClient(create_app(mt, max_pixels=1000)) as client:
        r = client.post("/predict", files={"file": ("a.png", PNG, "image/png")})
        assert r.status_code == 413 and "more than 1,000 pixels" in r.json()["detail"]


#: An admin token for tests (the service refuses tokens under 16 characters).
TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_http_add_and_remove_tasks_at_run_time(dense_runs, vit_files, tmp_path):
    import shutil

    root = tmp_path / "root"  # the task root: the only place POST /tasks may load from
    shutil.copytree(dense_runs["seg_linear"], root / "seg_linear")
    shutil.copy(vit_files["lora"], root / "lora32.safetensors")
    mt = MultiTaskModel(backbone("test_vit", 64))
    mt.add_task("cls", dense_runs["cls"])
    with TestClient(create_app(mt, admin=True, admin_token=TOKEN, task_root=root)) as client:
        r = client.post("/tasks", json={"name": "seg", "path": "seg_linear"}, headers=AUTH)
        assert r.status_code == 201 and r.json()["kind"] == "segment" and r.json()["path"] == "seg_linear"
        assert "seg" in client.post("/predict", files={"file": ("a.png", PNG, "image/png")}).json()["results"]
        assert client.post("/tasks", json={"name": "seg", "path": "seg_linear"}, headers=AUTH).status_code == 409
        r = client.post("/tasks", json={"name": "other", "path": "lora32.safetensors"}, headers=AUTH)  # made at 32 px
        assert r.status_code == 400 and "image size" in r.json()["detail"]
        assert str(root) not in r.json()["detail"] and "lora32.safetensors" in r.json()["detail"]
        assert client.post("/tasks", json={"name": "x"}, headers=AUTH).status_code == 400
        assert client.delete("/tasks/seg").status_code == 401  # no token: nothing removed
        assert client.delete("/tasks/seg", headers=AUTH).json() == {"removed": "seg", "tasks": ["cls"]}
        assert client.delete("/tasks/seg", headers=AUTH).status_code == 404
        assert client.post("/predict", files={"file": ("a.png", PNG, "image/png")}, data={"task": "seg"}).status_code == 404
    with TestClient(create_app(mt)) as client:  # the default: the admin API is off
        r = client.delete("/tasks/cls", headers=AUTH)
        assert r.status_code == 403 and "admin API is off" in r.json()["detail"]
        assert client.post("/tasks", json={"name": "a", "path": "x"}, headers=AUTH).status_code == 403
        assert mt.task_names() == ["cls"]


def assert_same_prediction(a: dict, b: dict) -> None:
    """Two predictions of one task on one image, made in different batches (fp32 rounding aside)."""
    assert a.keys() == b.keys() and a["kind"] == b["kind"]
    if a["kind"] == "classify":
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        np.testing.assert_allclose([t["prob"] for t in a["top"]], [t["prob"] for t in b["top"]], atol=1e-5)
    elif a["kind"] == "segment":
        assert [f["label"] for f in a["fractions"]] == [f["label"] for f in b["fractions"]]
        np.testing.assert_allclose([f["fraction"] for f in a["fractions"]], [f["fraction"] for f in b["fractions"]],
                                   atol=1e-3)
    else:
        assert [x["label"] for x in a["boxes"]] == [x["label"] for x in b["boxes"]]
        np.testing.assert_allclose([x["box"] for x in a["boxes"]], [x["box"] for x in b["boxes"]], atol=0.2)


def test_http_concurrent_requests_for_different_tasks_share_one_forward(dense_runs):
    import httpx

    mt = MultiTaskModel(backbone("test_vit", 64))
    for name in ("cls", "seg_linear", "det_lora"):
        mt.add_task(name, dense_runs[name])
    app = create_app(mt, max_batch=16, batch_window_ms=1000)
    want = {t: predict(mt, PNG, [t])[t] for t in ("cls", "seg_linear", "det_lora")}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            rs = await asyncio.gather(*(client.post("/predict", files={"file": ("a.png", PNG, "image/png")},
                                                    data={"task": t}) for t in ["cls", "seg_linear", "det_lora"] * 2))
            health = (await client.get("/health")).json()
        await app.state.batcher.stop()
        return rs, health

    rs, health = asyncio.run(main())
    assert all(r.status_code == 200 for r in rs)
    for r in rs:
        (task, res), = r.json()["results"].items()
        assert_same_prediction(res, want[task])
    assert health["batching"]["batches"] == 1 and health["batching"]["samples"] == 6


# ------------------------------------------------------------------------------------------------
# CLI / config


def test_serve_cli_builds_the_service_from_flags_and_yaml(dense_runs, tmp_path, monkeypatch, capsys):
    import uvicorn

    from vistune.cli import main

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    yaml_file = tmp_path / "conf" / "tasks.yaml"  # task paths are relative to the YAML's folder
    yaml_file.parent.mkdir()
    rel = os.path.relpath(dense_runs["seg_linear"], yaml_file.parent)
    yaml_file.write_text(f"tasks:\n  seg: {rel}\nmax_batch: 4\nport: 8123\n")
    rc = main(["serve", "--config", str(yaml_file), "--task", f"cls={dense_runs['cls']}", "--read-only"])
    assert rc == 0 and started["port"] == 8123 and started["host"] == "127.0.0.1"
    assert "2 tasks (seg, cls)" in capsys.readouterr().out
    with TestClient(started["app"]) as client:
        assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["seg", "cls"]
        assert client.get("/health").json()["max_batch"] == 4
        assert client.delete("/tasks/cls").status_code == 403
    for argv, message in (
        (["serve"], "no task to serve"),
        (["serve", "--task", "noequals"], "NAME=PATH"),
        (["serve", "--task", f"a={dense_runs['cls']}", "--task", f"a={dense_runs['cls']}"], "given twice"),
        (["serve", "--task", f"a={tmp_path / 'nope.safetensors'}"], "no such file"),
        (["serve", "--backbone", "test_vit", "--img-size", "32", "--task", f"a={dense_runs['cls']}"], "image size"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("vistune serve: error:") and message in err and "\n" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: {}\nwhat: 1\n")
    assert main(["serve", "--config", str(bad)]) == 2
    assert "unknown key 'what'" in capsys.readouterr().err


def test_shipped_serve_config_is_valid():
    from vistune.serve.config import load_config_file, make_config

    root = Path(__file__).resolve().parents[1]
    cfg = make_config(load_config_file(root / "configs" / "serve" / "demo.yaml"))
    assert cfg.backbone == "dinov2-s14" and cfg.img_size == 42
    assert {n: Path(p).resolve() for n, p in cfg.tasks.items()} == {
        n: (root / "runs" / "demo" / d / "final" / "seed0").resolve() for n, d in (("linear", "linear"), ("vpt-deep", "vpt-deep"),
                                                               ("lora", "lora"))}



def test_serve_benchmark_runs_and_each_task_adds_its_file(tmp_path):
    """benchmarks/serve.py end to end on a tiny model (it once broke silently when a module it
    imported moved): both modes answer over HTTP, and adding a LoRA task adds exactly its file's
    tensors to the service's memory."""
    proc = run_script(Path(__file__).resolve().parents[1] / "benchmarks" / "serve.py", "--backbone", "test_vit",
                      "--img-size", "32", "--tasks", "1", "--requests", "8", "--rounds", "2", "--warmup", "2",
                      "--concurrency", "2", "--memory-methods", "linear,lora", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
            for line in proc.stdout.splitlines() if line.startswith("|")}
    assert ("multitask", "1") in rows and ("naive", "1") in rows
    lora = next(line for line in proc.stdout.splitlines() if line.startswith("| lora |"))
    file_kb, tensor_kb = (float(c) for c in lora.strip("|").split("|")[1:3])
    assert file_kb > 0 and tensor_kb == file_kb
