"""Export (timm, ONNX, PEFT) and PEFT import: every method x format each claims, checked by the
tool that runs the artefact (plain timm in a vistune-free process, onnxruntime, peft), plus the
refusals and the bad-input lines. Tiny ``test_vit``/``test_efficientnet`` models keep it fast;
one real-weights check runs on the cached dinov2-s14 and skips without it."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path

from vistune import attach
from vistune.cli import main
from vistune.backbones import seeded_backbone
from vistune.export import ExportError, export, import_peft, load_run
from vistune.sensitivity import compute_sensitivity, save_scores

SIZE = 32
CLASSES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]

#: name -> (method, options, backbone). Options chosen so every code path has work to do: LoRA
#: mixes a fused-qkv rank (q,v -> 2r in PEFT) with single-matrix ranks and a non-unit scale.
CASES = {
    "linear": ("linear", {}, "test_vit"),
    "full": ("full", {}, "test_vit"),
    "bitfit": ("bitfit", {}, "test_vit"),
    "lora": ("lora", {"rank": 2, "alpha": 3.0, "targets": "q,v,proj,fc2"}, "test_vit"),
    "vpt": ("vpt", {"length": 3, "deep": True}, "test_vit"),
    "adapter": ("adapter", {"bottleneck": 4}, "test_vit"),
    "protuning": ("protuning", {"groups": 2}, "test_vit"),
    "spt-lora": ("spt", {"budget": "2%", "structured": "lora", "rank": 2}, "test_vit"),
    "spt-none": ("spt", {"budget": "2%", "structured": "none"}, "test_vit"),
    "spt-adapter": ("spt", {"budget": "2%", "structured": "adapter", "rank": 2}, "test_vit"),
    "full-cnn": ("full", {}, "test_efficientnet"),
    "spt-lora-cnn": ("spt", {"budget": "5%", "structured": "lora", "rank": 2}, "test_efficientnet"),
    "protuning-cnn": ("protuning", {}, "test_efficientnet"),
    "spt-adapter-cnn": ("spt", {"budget": "5%", "structured": "adapter", "rank": 2}, "test_efficientnet"),
    "lora-cnn": ("lora", {"rank": 2, "alpha": 3.0, "targets": "pw,dw"}, "test_efficientnet"),
    "adapter-cnn": ("adapter", {"bottleneck": 2}, "test_efficientnet"),
}
MERGEABLE = ["linear", "full", "bitfit", "lora", "spt-lora", "spt-none", "full-cnn", "spt-lora-cnn", "lora-cnn"]
NOT_MERGEABLE = ["vpt", "adapter", "protuning", "spt-adapter", "protuning-cnn", "spt-adapter-cnn", "adapter-cnn"]


pytestmark = pytest.mark.usefixtures("one_thread")


def perturb(tuned, seed: int = 1) -> None:
    """Move every tuned tensor off its initial value (zero-initialised B/up/expand would make any
    export look right), including BatchNorm statistics in full fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.tuned_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for b in tuned.method.tuned_buffers(tuned.model):
            if b.is_floating_point():
                b.mul_(1 + 0.1 * torch.rand(b.shape, generator=g))


def make_run(root: Path, case: str) -> Path:
    method, options, arch = CASES[case]
    options = dict(options)
    if method == "spt":
        probe = seeded_backbone(arch, None, SIZE)
        probe.reset_classifier(len(CLASSES))
        g = torch.Generator().manual_seed(3)
        batches = [(torch.randn(4, 3, SIZE, SIZE, generator=g), torch.randint(0, 5, (4,), generator=g))
                   for _ in range(2)]
        scores = root / f"{case}-scores.safetensors"
        save_scores(scores, compute_sensitivity(probe, batches, num_batches=2), probe, {"num_batches": 2})
        options["sensitivity"] = str(scores)
    tuned = attach(seeded_backbone(arch, None, SIZE), method, num_classes=len(CLASSES), **options)
    perturb(tuned)
    path = root / case / "tuned.safetensors"
    tuned.save_tuned(path, extra={"class_names": CLASSES})
    return path.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            cache[case] = make_run(root, case)
        return cache[case]

    return get


def generated_images(n: int = 3, size: int = SIZE, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def real_photos(size: int, mean, std, n: int = 4) -> torch.Tensor:
    """The first photo of each flowers-5 class, as vistune's data pipeline feeds them (skips when absent)."""
    from vistune.data.transforms import load_image_file

    root = shared_path("data", "flowers5")
    files = [min((root / c).glob("*.jpg")) for c in sorted(p.name for p in root.iterdir() if p.is_dir())][:n]
    x = torch.from_numpy(np.stack([load_image_file(f, size) for f in files])).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def vistune_outputs(run_dir: Path, x: torch.Tensor):
    return load_run(run_dir).model(x)


def max_diff(a, b) -> float:
    return float((torch.as_tensor(np.asarray(a)).double() - torch.as_tensor(np.asarray(b)).double()).abs().max())


# ------------------------------------------------------------------------------------------- timm

PLAIN_TIMM = r"""
import json, sys
import numpy as np, torch, timm
torch.set_num_threads(1)
jobs = json.load(open(sys.argv[1]))
for job in jobs:
    x = torch.from_numpy(np.load(job["x"]))
    side = json.load(open(job["dir"] + "/vistune_export.json"))
    k = side["num_classes"]
    a = timm.create_model("local-dir:" + job["dir"], pretrained=True).eval()
    b = timm.create_model(side["arch"], pretrained=True, pretrained_cfg_overlay=dict(
        file=job["dir"] + "/model.safetensors", num_classes=k), **side["timm_kwargs"]).eval()
    with torch.no_grad():
        np.save(job["out_local"], a(x).numpy())
        np.save(job["out_overlay"], b(x).numpy())
    if "pos_embed" in job:
        np.save(job["pos_embed"], a.pos_embed.detach().numpy())
assert "vistune" not in sys.modules, "plain timm must run without vistune"
print("plain-timm-ok", len(jobs))
"""


def run_plain_timm(tmp: Path, jobs: list[dict]) -> None:
    """Load every exported folder with plain timm in one fresh interpreter (one torch import)."""
    spec = tmp / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vistune is not even on the path
    res = subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(spec)], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert res.returncode == 0 and "plain-timm-ok" in res.stdout, res.stderr[-3000:]


def _dinov2_job(tmp: Path) -> tuple[dict, torch.Tensor, torch.Tensor] | None:
    """dinov2-s14 at 112 px, LoRA, exported to timm (None when its weights are not cached)."""
    from vistune.weights.cache import weights_dir

    if not (weights_dir() / "dinov2-s14.safetensors").is_file():
        return None
    tuned = attach(seeded_backbone("dinov2-s14", None, 112), "lora", num_classes=5, rank=2)
    perturb(tuned)
    tuned.save_tuned(tmp / "dinov2-run" / "tuned.safetensors", extra={"class_names": CLASSES})
    export(tmp / "dinov2-run", "timm", tmp / "dinov2-timm")
    run = load_run(tmp / "dinov2-run")
    try:
        x = real_photos(112, run.backbone["mean"], run.backbone["std"])
    except pytest.skip.Exception:
        x = generated_images(2, size=112)
    np.save(tmp / "dinov2-x.npy", x.numpy())
    with torch.no_grad():
        ref = run.model(x)
    job = {"dir": str(tmp / "dinov2-timm"), "x": str(tmp / "dinov2-x.npy"), "out_local": str(tmp / "dinov2-a.npy"),
           "out_overlay": str(tmp / "dinov2-b.npy"), "pos_embed": str(tmp / "dinov2-pos.npy")}
    return job, ref, run.tuned.model.pos_embed.detach().clone()


@pytest.fixture(scope="module")
def timm_results(runs, tmp_path_factory):
    """Export every mergeable case once (and DINOv2 when its weights are cached), load all with
    plain timm in one subprocess: each fresh interpreter costs a torch and timm import."""
    tmp = tmp_path_factory.mktemp("timm")
    jobs, expected = [], {}
    for case in MERGEABLE:
        out = tmp / case
        export(runs(case), "timm", out)
        x = generated_images()
        np.save(tmp / f"{case}-x.npy", x.numpy())
        expected[case] = vistune_outputs(runs(case), x)
        jobs.append({"dir": str(out), "x": str(tmp / f"{case}-x.npy"), "out_local": str(tmp / f"{case}-a.npy"),
                     "out_overlay": str(tmp / f"{case}-b.npy")})
    dinov2 = _dinov2_job(tmp)
    if dinov2 is not None:
        jobs.append(dinov2[0])
    run_plain_timm(tmp, jobs)
    results = {case: (expected[case], np.load(tmp / f"{case}-a.npy"), np.load(tmp / f"{case}-b.npy"))
               for case in MERGEABLE}
    if dinov2 is not None:
        job, ref, pos = dinov2
        results["dinov2"] = (ref, np.load(job["out_local"]), np.load(job["out_overlay"]), np.load(job["pos_embed"]), pos)
    return results


@pytest.mark.parametrize("case", MERGEABLE)
def test_timm_export_runs_in_plain_timm_with_equal_logits(case, timm_results):
    ref, local_dir, overlay = timm_results[case]
    assert max_diff(local_dir, ref) <= 1e-5, case
    assert max_diff(overlay, ref) <= 1e-5, case
    assert float(ref.abs().max()) > 1e-3  # far above the tolerance: not two near-zero tensors


def test_timm_folder_is_plain_timm_layout(runs, tmp_path):
    info = export(runs("lora"), "timm", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architecture"] == "test_vit" and cfg["num_classes"] == 5 and cfg["label_names"] == CLASSES
    assert cfg["model_args"]["num_classes"] == 5 and cfg["model_args"]["img_size"] == SIZE
    assert cfg["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5] and cfg["pretrained_cfg"]["input_size"] == [3, SIZE, SIZE]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]  # merged: no vistune module left
    assert info["class_names"] == CLASSES and info["timm_kwargs"] == cfg["model_args"]


@pytest.mark.parametrize("case", NOT_MERGEABLE)
def test_timm_refuses_unmergeable_methods_in_one_line(case, runs, tmp_path):
    with pytest.raises(ExportError, match="formats that carry it: onnx$") as err:
        export(runs(case), "timm", tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # no temp folder left either


# ------------------------------------------------------------------------------------------- onnx

@pytest.fixture(scope="module")
def onnx_dirs(runs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx")
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            cache[case] = tmp / case
            export(runs(case), "onnx", cache[case])
        return cache[case]

    return get


def ort_run(folder: Path, x: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_equals_vistune_for_every_method(case, onnx_dirs, runs):
    """Generated images, batch 3 and 1 (the batch axis is dynamic; the trace used batch 2)."""
    folder = onnx_dirs(case)
    info = json.loads((folder / "vistune_export.json").read_text())
    assert info["check"]["checked"] and info["check"]["max_abs_diff"] <= 1e-4
    for x in (generated_images(3), generated_images(1, seed=8)):
        (logits,) = ort_run(folder, x)
        ref = vistune_outputs(runs(case), x)
        assert logits.shape == tuple(ref.shape)
        assert max_diff(logits, ref) <= 1e-4, case


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_equals_vistune_on_real_photos(case, onnx_dirs, runs):
    meta = load_run(runs(case)).backbone
    x = real_photos(SIZE, meta["mean"], meta["std"])
    (logits,) = ort_run(onnx_dirs(case), x)
    assert max_diff(logits, vistune_outputs(runs(case), x)) <= 1e-4, case


@pytest.mark.slow
def test_onnx_dynamo_exporter(runs, tmp_path):
    """SPT's parameter swap and LoRA hooks through torch.export (every method: benchmarks/export_check.py)."""
    pytest.importorskip("onnxscript")
    case = "spt-lora"
    export(runs(case), "onnx", tmp_path / "out", exporter="dynamo")
    x = generated_images(3)
    (logits,) = ort_run(tmp_path / "out", x)
    assert max_diff(logits, vistune_outputs(runs(case), x)) <= 1e-4


# ------------------------------------------------------------------------------------ dense (onnx)

def make_dense_run(root: Path, task: str, method: str = "vpt", **options) -> Path:
    from vistune.dense.model import build_dense_model, save_dense

    tuned = attach(seeded_backbone("test_vit", None, 64), method, **options)
    model = build_dense_model(tuned, task, 2)
    perturb(tuned)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_dense(model, root / task, extra={"class_names": ["red", "green"]})
    return root / task


def detections_from_onnx(scores: np.ndarray, boxes: np.ndarray, post: dict) -> list[dict]:
    """The post-processing the sidecar documents, written from its description alone."""
    from torchvision.ops import batched_nms

    out = []
    bounds = np.cumsum([0, *post["level_sizes"]])
    for s, b in zip(torch.from_numpy(scores), torch.from_numpy(boxes)):
        keep_boxes, keep_scores, keep_labels = [], [], []
        for lo, hi in itertools.pairwise(bounds):
            sl = s[lo:hi]
            cand = (sl > post["score_threshold"]).nonzero()
            vals = sl[sl > post["score_threshold"]]
            if vals.numel() > post["candidates_per_level"]:
                vals, top = vals.topk(post["candidates_per_level"])
                cand = cand[top]
            keep_boxes.append(b[lo:hi][cand[:, 0]])
            keep_scores.append(vals)
            keep_labels.append(cand[:, 1])
        bx, sc, lb = torch.cat(keep_boxes), torch.cat(keep_scores), torch.cat(keep_labels)
        keep = batched_nms(bx, sc, lb, post["nms_iou"])[: post["max_detections"]]
        out.append({"boxes": bx[keep], "scores": sc[keep], "labels": lb[keep]})
    return out


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_onnx_dense_runs(task, tmp_path):
    run = make_dense_run(tmp_path, task)
    export(run, "onnx", tmp_path / "out")
    info = json.loads((tmp_path / "out" / "vistune_export.json").read_text())
    x = generated_images(2, size=64)
    outs = ort_run(tmp_path / "out", x)
    dense = load_run(run).dense
    with torch.no_grad():
        raw = dense(x)
    if task == "segment":
        assert list(info["outputs"]) == ["logits"] and outs[0].shape == (2, 2, 64, 64)
        assert max_diff(outs[0], raw) <= 1e-4
        return
    assert list(info["outputs"])[:2] == ["scores", "boxes"]
    want = dense.head.task_head.detections(raw)
    got = detections_from_onnx(outs[0], outs[1], info["outputs"]["postprocess"])
    assert sum(len(w["scores"]) for w in want) > 0  # the comparison has boxes in it
    for w, g in zip(want, got):
        assert torch.equal(w["labels"], g["labels"])
        assert max_diff(w["boxes"], g["boxes"]) <= 1e-3 and max_diff(w["scores"], g["scores"]) <= 1e-4


def test_dense_runs_refuse_timm_and_peft(tmp_path):
    run = make_dense_run(tmp_path, "segment", method="lora", rank=2)
    for fmt in ("timm", "peft"):
        with pytest.raises(ExportError, match="dense \\(segment\\) run.*formats that carry it: onnx"):
            export(run, fmt, tmp_path / fmt)


@pytest.mark.slow
def test_onnx_dynamo_exporter_on_a_dense_run(tmp_path):
    """VPT prompts inside the sequence and the dense feature capture, through torch.export."""
    pytest.importorskip("onnxscript")
    run = make_dense_run(tmp_path, "segment", method="vpt", length=2)
    export(run, "onnx", tmp_path / "out", exporter="dynamo")
    x = generated_images(2, size=64)
    with torch.no_grad():
        ref = load_run(run).dense(x)
    assert max_diff(ort_run(tmp_path / "out", x)[0], ref) <= 1e-4


# ------------------------------------------------------------------------------------------- peft

@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def peft_model(folder: Path):
    import timm
    from peft import PeftModel

    base = timm.create_model(f"local-dir:{folder / 'base'}", pretrained=True)
    return PeftModel.from_pretrained(base, str(folder)).eval()


@pytest.mark.parametrize("options", [
    {"rank": 2, "alpha": 3.0, "targets": "q,v,proj,fc2"},  # qkv rank 4 in PEFT, proj/fc2 rank 2
    {"rank": 3, "targets": "k"},  # a lone middle third
    {"rank": 1, "targets": "q,k,v,proj,fc1,fc2"},  # every matrix
])
def test_peft_export_gives_equal_logits(options, peft, tmp_path):
    tuned = attach(seeded_backbone("test_vit", None, SIZE), "lora", num_classes=5, **options)
    perturb(tuned)
    tuned.save_tuned(tmp_path / "run" / "tuned.safetensors")
    info = export(tmp_path / "run", "peft", tmp_path / "out")
    x = generated_images(3)
    with torch.no_grad():
        got = peft_model(tmp_path / "out")(x)
    ref = vistune_outputs(tmp_path / "run", x)
    assert max_diff(got, ref) <= 1e-5
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["head"] and info["peft"] == cfg


def test_peft_keys_are_peft_own_layout(peft, tmp_path):
    """Compare with what PEFT itself saves for the same targets on the same model."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    tuned = attach(seeded_backbone("test_vit", None, SIZE), "lora", num_classes=5, rank=2, targets="q,v,fc1")
    tuned.save_tuned(tmp_path / "run" / "tuned.safetensors")
    export(tmp_path / "run", "peft", tmp_path / "ours")
    model = seeded_backbone("test_vit", None, SIZE)
    model.reset_classifier(5)
    native = get_peft_model(model, LoraConfig(r=4, target_modules=["attn.qkv", "mlp.fc1"], rank_pattern={"mlp.fc1": 2},
                                              modules_to_save=["head"]))
    native.save_pretrained(tmp_path / "native")
    export(tmp_path / "run", "peft", tmp_path / "nobase", include_base=False)
    assert sorted(p.name for p in (tmp_path / "nobase").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "vistune_export.json"]
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "native" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_peft_refuses_other_methods(runs, tmp_path):
    for case in ("linear", "vpt", "spt-lora"):
        with pytest.raises(ExportError, match="lora method only"):
            export(runs(case), "peft", tmp_path / case)


# ------------------------------------------------------------------------------------------ import

def test_import_round_trip_is_exact_and_recovers_the_spec(runs, tmp_path):
    pytest.importorskip("peft")
    export(runs("lora"), "peft", tmp_path / "adapter")
    summary = import_peft(tmp_path / "adapter", tmp_path / "back.safetensors", backbone="test_vit", img_size=SIZE)
    assert summary["method"] == load_run(runs("lora")).meta["method"]  # rank 2, alpha 3, q,v,proj,fc2
    assert summary["dropped_targets"] == ["k"]
    x = generated_images(3)
    assert max_diff(vistune_outputs(tmp_path / "back.safetensors", x), vistune_outputs(runs("lora"), x)) <= 1e-6
    assert load_run(tmp_path / "back.safetensors").class_names == CLASSES
    # the sidecar remembers the backbone: other weights or another image size are refused
    with pytest.raises(ExportError, match="exported by vistune from a run on 'test_vit'.*other weights or image size"):
        import_peft(tmp_path / "adapter", tmp_path / "other.safetensors", backbone="test_vit", img_size=48)
    assert not (tmp_path / "other.safetensors").exists()


def native_adapter(folder: Path, **config):
    """An adapter trained the PEFT way (here: random B), saved by PEFT itself; returns its model."""
    from peft import LoraConfig, get_peft_model

    model = seeded_backbone("test_vit", None, SIZE)
    model.reset_classifier(4)
    pm = get_peft_model(model, LoraConfig(modules_to_save=["head"], **config))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(folder)
    return pm.eval()


@pytest.mark.parametrize("config", [
    # whole-qkv rank 3 with rsLoRA scaling, fc1 at another rank/alpha (scales folded into B)
    dict(r=3, lora_alpha=5, target_modules=["attn.qkv", "mlp.fc1"], use_rslora=True,
         rank_pattern={"mlp.fc1": 2}, alpha_pattern={"mlp.fc1": 7}),
    # only some blocks (the others get zero deltas), proj only
    dict(r=2, lora_alpha=2, target_modules=["proj"], layers_to_transform=[1, 3],
         layers_pattern="blocks"),
])
def test_import_native_peft_adapter_gives_equal_logits(config, peft, tmp_path):
    pm = native_adapter(tmp_path / "adapter", **config)
    import_peft(tmp_path / "adapter", tmp_path / "t.safetensors", backbone="test_vit", img_size=SIZE,
                class_names=["a", "b", "c", "d"])
    x = generated_images(3)
    with torch.no_grad():
        ref = pm(x)
    assert max_diff(vistune_outputs(tmp_path / "t.safetensors", x), ref) <= 1e-5


def test_import_refuses_what_vistune_cannot_express(peft, tmp_path):
    native_adapter(tmp_path / "conv", r=2, target_modules=["patch_embed.proj", "attn.qkv"])
    with pytest.raises(ExportError, match="patch_embed.proj.*not a site of test_vit.s blocks"):
        import_peft(tmp_path / "conv", tmp_path / "a.safetensors", backbone="test_vit", img_size=SIZE)
    native_adapter(tmp_path / "dora", r=2, target_modules=["attn.qkv"], use_dora=True)
    with pytest.raises(ExportError, match="use_dora=True"):
        import_peft(tmp_path / "dora", tmp_path / "b.safetensors", backbone="test_vit", img_size=SIZE)
    native_adapter(tmp_path / "bias", r=2, target_modules=["attn.qkv"], bias="all")
    with pytest.raises(ExportError, match="bias='all'"):
        import_peft(tmp_path / "bias", tmp_path / "c.safetensors", backbone="test_vit", img_size=SIZE)
    assert not list(tmp_path.glob("*.safetensors"))


def test_import_refuses_an_adapter_for_another_architecture(peft, tmp_path):
    native_adapter(tmp_path / "adapter", r=2, target_modules=["attn.qkv"])
    # same module names, other widths
    with pytest.raises(ExportError, match="for another architecture: blocks.0.attn.qkv"):
        import_peft(tmp_path / "adapter", tmp_path / "a.safetensors", backbone="vit_tiny_patch16_224", img_size=SIZE)
    # the adapter names its base model: a different timm architecture is refused before any shape test
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "timm/vit_small_patch16_224.augreg_in21k"}))
    with pytest.raises(ExportError, match="made for 'timm/vit_small_patch16_224.augreg_in21k', not for .*'test_vit'"):
        import_peft(tmp_path / "adapter", tmp_path / "a.safetensors", backbone="test_vit", img_size=SIZE)
    assert not (tmp_path / "a.safetensors").exists()


def lora_adapter(root: Path, rank: int = 16) -> Path:
    """A vistune-exported PEFT adapter of a rank-``rank`` LoRA on q,k,v (PEFT sees qkv at 3 x rank)."""
    tuned = attach(seeded_backbone("test_vit", None, SIZE), "lora", num_classes=len(CLASSES), rank=rank,
                   targets="q,k,v")
    perturb(tuned)
    tuned.save_tuned(root / "run" / "tuned.safetensors", extra={"class_names": CLASSES})
    export(root / "run", "peft", root / "adapter", include_base=False)
    return root / "adapter"


@pytest.mark.parametrize("edit,words", [
    ([], "adapter_config.json: expected a JSON object"),
    ("r=64", "adapter_config.json: says rank 64 for blocks.0.attn.qkv, but"),
    ("r=x", "adapter_config.json: r='x' is not a positive integer rank"),
    ("r=0", "adapter_config.json: r=0 is not a positive integer rank"),
    ("r=true", "adapter_config.json: r=True is not a positive integer rank"),
    ("lora_alpha=a", "adapter_config.json: lora_alpha='a' is not a finite number"),
    ("rank_pattern=[]", "adapter_config.json: rank_pattern must be an object"),
])
def test_import_refuses_a_config_that_disagrees_with_its_tensors(tmp_path, capsys, edit, words):
    """Issue item 8: ``[]`` was an AttributeError traceback; ``r`` 64, "x" or 0 beside rank-16
    tensors was imported silently (as the rank of B's non-zero columns). Every message names the file."""
    adapter = lora_adapter(tmp_path)
    cfg_path = adapter / "adapter_config.json"
    if isinstance(edit, list):
        cfg_path.write_text(json.dumps(edit))
    else:
        key, _, value = edit.partition("=")
        parsed = {"x": "x", "a": "a", "true": True, "[]": []}.get(value, value)
        cfg = json.loads(cfg_path.read_text())
        cfg[key] = int(parsed) if isinstance(parsed, str) and parsed.isdigit() else parsed
        cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=re.escape(words)) as info:
        import_peft(adapter, tmp_path / "t.safetensors", backbone="test_vit", img_size=SIZE)
    assert str(cfg_path) in str(info.value)
    assert main(["import-peft", str(adapter), "--backbone", "test_vit", "--img-size", str(SIZE),
                 "--out", str(tmp_path / "t.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cfg_path) in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "t.safetensors").exists()


def test_a_consistent_rank_16_adapter_still_imports(tmp_path):
    adapter = lora_adapter(tmp_path)
    summary = import_peft(adapter, tmp_path / "t.safetensors", backbone="test_vit", img_size=SIZE)
    assert summary["method"]["options"]["rank"] == 16
    x = generated_images(2)
    assert max_diff(vistune_outputs(tmp_path / "t.safetensors", x), vistune_outputs(tmp_path / "run", x)) <= 1e-5


# ------------------------------------------------------------------------------- bad input, CLI

def test_missing_backbone_weights_is_one_line_and_writes_nothing(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in seeded_backbone("test_vit", None, SIZE).state_dict().items()},
              str(weights))
    from vistune.backbones import create_backbone

    tuned = attach(create_backbone("test_vit", weights=str(weights), img_size=SIZE), "lora", num_classes=5, rank=2)
    tuned.save_tuned(tmp_path / "run" / "tuned.safetensors")
    weights.unlink()
    for fmt in ("timm", "onnx", "peft"):  # the file records the weights as a label, never a path it opens
        with pytest.raises(ExportError, match=f"cannot build its backbone: .*local file \\('{weights}'\\)"):
            export(tmp_path / "run", fmt, tmp_path / "out")
        with pytest.raises(ExportError, match=f"cannot build its backbone: .*{weights}"):
            export(tmp_path / "run", fmt, tmp_path / "out", weights=str(weights))  # given again, but gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_unknown_format_and_exporter(runs, tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'tflite'; formats: onnx, peft, timm"):
        export(runs("linear"), "tflite", tmp_path / "out")
    with pytest.raises(ExportError, match="unknown ONNX exporter 'jit'"):
        export(runs("linear"), "onnx", tmp_path / "out", exporter="jit")
    assert not (tmp_path / "out").exists()


def test_output_folder_is_replaced_only_with_overwrite(runs, tmp_path):
    out = tmp_path / "out"
    export(runs("linear"), "timm", out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ExportError, match="exists and is not empty; pass --overwrite"):
        export(runs("bitfit"), "timm", out)
    assert (out / "model.safetensors").read_bytes() == before
    export(runs("bitfit"), "timm", out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup folders left


def test_overwrite_never_deletes_the_run_or_its_siblings(tmp_path, capsys):
    """Issue item 4: ``--tuned runs/r1 --out runs --overwrite`` replaced the whole ``runs`` folder,
    deleting r1 itself and every other run; an --out that is or contains the run is refused now."""
    runs_dir = tmp_path / "runs"
    r1 = make_run(runs_dir, "linear")
    sibling = make_run(runs_dir, "bitfit")
    before = {p: p.read_bytes() for p in runs_dir.rglob("*") if p.is_file()}
    for out in (runs_dir, r1, tmp_path):
        for tuned in (r1, r1 / "tuned.safetensors"):
            with pytest.raises(ExportError, match="is or contains the run being exported"):
                export(tuned, "timm", out, overwrite=True)
            assert main(["export", "--tuned", str(tuned), "--format", "onnx", "--out", str(out), "--overwrite"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and str(out) in err[0], err
    assert {p: p.read_bytes() for p in runs_dir.rglob("*") if p.is_file()} == before
    assert (sibling / "tuned.safetensors").is_file()
    export(r1, "timm", r1 / "timm")  # a folder inside the run is fine
    assert (r1 / "timm" / "model.safetensors").is_file() and (r1 / "tuned.safetensors").is_file()


def test_overwrite_replaces_only_an_earlier_exports_files(runs, tmp_path):
    """Other files in --out stay; the old export's files go only once the new set is complete."""
    out = tmp_path / "out"
    export(runs("linear"), "onnx", out)
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    export(runs("bitfit"), "timm", out, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "notes.txt", "sub", "vistune_export.json"], names
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "vistune_export.json").read_text())["artefact"] == "timm"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup folders left
    # a new file whose name a foreign file holds is refused, and nothing changes
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.onnx").write_text("not mine to delete")
    with pytest.raises(ExportError, match="holds 'model.onnx', which no vistune export wrote"):
        export(runs("linear"), "onnx", other, overwrite=True)
    assert [p.name for p in other.iterdir()] == ["model.onnx"]
    assert (other / "model.onnx").read_text() == "not mine to delete"


def test_a_failed_overwrite_keeps_the_old_export(runs, tmp_path, monkeypatch):
    """A failure while building the new set (disk full, a failed check) leaves the old export whole."""
    from vistune.export import onnx_format

    out = tmp_path / "out"
    export(runs("linear"), "onnx", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out / "model.onnx"))

    monkeypatch.setattr(onnx_format, "check_graph", full_disk)
    with pytest.raises(OSError):
        export(runs("bitfit"), "onnx", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_export_and_import(runs, tmp_path, capsys):
    pytest.importorskip("peft")
    assert main(["export", "--tuned", str(runs("lora")), "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert "PeftModel.from_pretrained" in printed
    assert main(["import-peft", str(tmp_path / "p"), "--backbone", "test_vit", "--img-size", str(SIZE),
                 "--out", str(tmp_path / "t.safetensors")]) == 0
    assert "lora" in capsys.readouterr().out
    x = generated_images(2)
    assert max_diff(vistune_outputs(tmp_path / "t.safetensors", x), vistune_outputs(runs("lora"), x)) <= 1e-6
    assert main(["export", "--tuned", str(runs("vpt")), "--format", "timm", "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vistune export: error: cannot export") and "\n" not in err
    assert main(["export", "--tuned", str(runs("vpt")), "--format", "tflite", "--out", str(tmp_path / "v")]) == 2
    assert "unknown export format 'tflite'" in capsys.readouterr().err
    assert main(["import-peft", str(tmp_path / "nope"), "--backbone", "test_vit", "--out", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- real weights

@pytest.mark.slow
def test_dinov2_timm_export_keeps_the_antialias_free_pos_embed(timm_results):
    """dinov2-s14 at 112 px: vistune resamples the 37x37 grid without antialias after timm's load;
    the timm export must carry that tensor so plain timm reproduces vistune's logits."""
    from vistune.weights.cache import weights_dir

    if "dinov2" not in timm_results:
        pytest.skip(f"dinov2-s14 weights are not cached in {weights_dir()} (vistune weights get dinov2-s14)")
    ref, local_dir, overlay, plain_pos, vistune_pos = timm_results["dinov2"]
    assert np.array_equal(plain_pos, vistune_pos.numpy())
    assert max_diff(local_dir, ref) <= 1e-4
    assert max_diff(overlay, ref) <= 1e-4


def test_a_failure_inside_the_export_leaves_nothing(runs, tmp_path, monkeypatch):
    """The graph is written, then its check fails: neither the output nor a temp folder remains."""
    from vistune.export import onnx_format

    def bad_check(path, module, x, names):
        assert path.is_file()  # the graph was already written into the temp folder
        raise ExportError("simulated check failure")

    monkeypatch.setattr(onnx_format, "check_graph", bad_check)
    with pytest.raises(ExportError, match="simulated"):
        export(runs("linear"), "onnx", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_options_belong_to_their_format(runs, tmp_path):
    with pytest.raises(ExportError, match="format 'timm' has no option 'exporter'"):
        export(runs("linear"), "timm", tmp_path / "out", exporter="dynamo")


def test_a_graph_onnxruntime_cannot_load_is_one_line(runs, tmp_path, monkeypatch):
    from vistune.export import onnx_format

    def broken(path, x):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Invalid attribute perm\nmore detail")

    monkeypatch.setattr(onnx_format, "onnxruntime_outputs", broken)
    with pytest.raises(ExportError, match=r"onnxruntime cannot run the exported graph model.onnx: .*Invalid attribute perm$"):
        export(runs("linear"), "onnx", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
