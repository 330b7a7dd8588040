"""Method x format table of export fidelity: max |artefact output - vistune output| on real photos.

For every method (and the dense tasks) a run is made on the chosen backbone with every tuned
tensor moved off its initial value (zero-initialised LoRA B / adapter up-projections would make
any export look exact), then exported to each format that carries it and run by the tool that
owns the format:

* ``timm``: plain timm in a fresh interpreter that never imports vistune (asserted), loading the
  folder with ``timm.create_model("local-dir:...")``;
* ``onnx/torchscript`` and ``onnx/dynamo``: onnxruntime (CPU);
* ``peft``: ``peft.PeftModel.from_pretrained`` on the exported ``base/`` timm folder;
* ``import``: the PEFT adapter read back by ``vistune.export.import_peft`` (round trip).

Images: the first photos of each flowers-5 class (``../shared/data/flowers5``), preprocessed as
vistune's data pipeline does; generated images when that folder is absent (the table says which).
``refused`` means the export was refused with its one-line reason (checked), ``-`` not applicable.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_check.py                     # test_vit @32
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_check.py --backbone dinov2-s14 --img-size 112
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_check.py --backbone efficientnet-lite0 --img-size 112
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from vistune import attach
from vistune.backbones import is_vit
from vistune.errors import MethodError
from vistune.backbones import seeded_backbone
from vistune.export import ExportError, export, import_peft, load_run
from vistune.export.onnx_format import graph_module

FLOWERS = REPO.parent / "shared" / "data" / "flowers5"
CLASSES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
FORMATS = ["timm", "onnx/torchscript", "onnx/dynamo", "peft", "import"]

VIT_CASES = {
    "linear": ("linear", {}),
    "full": ("full", {}),
    "bitfit": ("bitfit", {}),
    "lora (q,v r8)": ("lora", {"rank": 8}),
    "lora (all, r4, alpha 8)": ("lora", {"rank": 4, "alpha": 8.0, "targets": "q,k,v,proj,fc1,fc2"}),
    "vpt (deep, 10)": ("vpt", {"length": 10, "deep": True}),
    "adapter": ("adapter", {"bottleneck": 8}),
    "protuning": ("protuning", {}),
    "spt (lora)": ("spt", {"budget": "1%", "structured": "lora", "rank": 4}),
    "spt (none)": ("spt", {"budget": "1%", "structured": "none"}),
    "spt (adapter)": ("spt", {"budget": "1%", "structured": "adapter", "rank": 4}),
}
DENSE_CASES = {"segment (lora)": ("segment", "lora", {"rank": 4}), "detect (vpt)": ("detect", "vpt", {"length": 4})}
CNN_DENSE_CASES = {"segment (protuning)": ("segment", "protuning", {}), "detect (bitfit)": ("detect", "bitfit", {})}

PLAIN_TIMM = r"""
import json, sys
import numpy as np, torch, timm
jobs = json.load(open(sys.argv[1]))
for job in jobs:
    m = timm.create_model("local-dir:" + job["dir"], pretrained=True).eval()
    with torch.no_grad():
        np.save(job["out"], m(torch.from_numpy(np.load(job["x"]))).numpy())
assert "vistune" not in sys.modules
print("ok")
"""


def images(size: int, mean, std, n: int) -> tuple[torch.Tensor, str]:
    from vistune.data.transforms import load_image_file

    if not FLOWERS.is_dir():
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)), "generated"
    classes = sorted(p.name for p in FLOWERS.iterdir() if p.is_dir())
    per_class = {c: sorted((FLOWERS / c).glob("*.jpg")) for c in classes}
    files = [per_class[classes[i % len(classes)]][i // len(classes)] for i in range(n)]
    x = torch.from_numpy(np.stack([load_image_file(f, size) for f in files])).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x, f"{n} flowers-5 photos"


def perturb(tuned, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.tuned_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def sensitivity_file(root: Path, backbone: str, size: int) -> str:
    from vistune.sensitivity import compute_sensitivity, save_scores

    path = root / "scores.safetensors"
    if not path.is_file():
        probe = seeded_backbone(backbone, None, size)
        probe.reset_classifier(len(CLASSES))
        g = torch.Generator().manual_seed(3)
        batches = [(torch.randn(8, 3, size, size, generator=g), torch.randint(0, 5, (8,), generator=g))]
        save_scores(path, compute_sensitivity(probe, batches, num_batches=1), probe, {"num_batches": 1})
    return str(path)


def make_run(root: Path, name: str, method: str, options: dict, backbone: str, size: int) -> Path:
    options = dict(options)
    if method == "spt":
        options["sensitivity"] = sensitivity_file(root, backbone, size)
    tuned = attach(seeded_backbone(backbone, None, size), method, num_classes=len(CLASSES), **options)
    perturb(tuned)
    folder = root / name.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
    tuned.save_tuned(folder / "tuned.safetensors", extra={"class_names": CLASSES})
    return folder


def make_dense_run(root: Path, name: str, task: str, method: str, options: dict, backbone: str, size: int) -> Path:
    from vistune.dense.model import build_dense_model, save_dense

    tuned = attach(seeded_backbone(backbone, None, size), method, **options)
    model = build_dense_model(tuned, task, 3)
    perturb(tuned)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    folder = root / name.split()[0]
    save_dense(model, folder, extra={"class_names": ["a", "b", "c"]})
    return folder


def diff(a, b) -> float:
    a = a if isinstance(a, (list, tuple)) else [a]
    b = b if isinstance(b, (list, tuple)) else [b]
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) for x, y in zip(a, b))


def onnx_outputs(folder: Path, x: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="test_vit")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--methods", default=None, help="comma-separated row names (default: all)")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--no-dynamo", action="store_true")
    ap.add_argument("--out", default=None, help="work folder (default: a temp folder)")
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="export_check."))
    root.mkdir(parents=True, exist_ok=True)

    runs: dict[str, tuple[Path, torch.Tensor, object]] = {}
    cases = {k: v for k, v in VIT_CASES.items() if not args.methods or k in args.methods.split(",")}
    rows: dict[str, dict[str, str]] = {name: {} for name in cases}  # table rows in case order
    x_label = ""
    vit = is_vit(seeded_backbone(args.backbone, None, args.img_size))
    for name, (method, options) in cases.items():
        try:
            folder = make_run(root, name, method, options, args.backbone, args.img_size)
        except MethodError:  # lora, vpt, adapter need ViT blocks
            rows[name] = dict.fromkeys(FORMATS, "n/a (ViT only)")
            continue
        run = load_run(folder)
        x, x_label = images(args.img_size, run.backbone["mean"], run.backbone["std"], args.images)
        with torch.no_grad():
            runs[name] = (folder, x, run.model(x).numpy())
    if not args.no_dense:
        for name, (task, method, options) in (DENSE_CASES if vit else CNN_DENSE_CASES).items():
            size = max(args.img_size, 64)
            folder = make_dense_run(root, name, task, method, options, args.backbone, size)
            run = load_run(folder)
            x, _ = images(size, run.backbone["mean"], run.backbone["std"], min(args.images, 4))
            module = graph_module(run)[0]
            with torch.no_grad():
                out = module(x)
            out = [o.numpy() for o in out] if isinstance(out, tuple) else out.numpy()
            runs[name] = (folder, x, out)

    timm_jobs = []
    for name, (folder, x, ref) in runs.items():
        row = rows[name] = {}
        for fmt in FORMATS:
            if fmt == "import" or (fmt == "onnx/dynamo" and args.no_dynamo):
                continue
            kind, _, exporter = fmt.partition("/")
            out = root / "out" / f"{folder.name}-{kind}{'-' + exporter if exporter else ''}"
            opts = {"exporter": exporter} if exporter else {}
            t0 = time.perf_counter()
            try:
                export(folder, kind, out, overwrite=True, **opts)
            except ExportError as err:
                assert "formats that carry it" in str(err) and "\n" not in str(err), err
                row[fmt] = "refused"
                if kind == "peft":
                    row["import"] = "-"
                continue
            secs = time.perf_counter() - t0
            if kind == "onnx":
                got = onnx_outputs(out, x)
                if isinstance(ref, list):  # detect: scores, and boxes in canvas pixels
                    row[fmt] = f"{diff(got[0], ref[0]):.1e} / {diff(got[1], ref[1]):.1e} px ({secs:.1f} s)"
                else:
                    row[fmt] = f"{diff(got, ref):.1e} ({secs:.1f} s)"
            elif kind == "timm":
                np.save(root / f"{folder.name}-x.npy", x.numpy())
                timm_jobs.append({"name": name, "dir": str(out), "x": str(root / f"{folder.name}-x.npy"),
                                  "out": str(root / f"{folder.name}-timm.npy")})
            elif kind == "peft":
                import timm
                from peft import PeftModel

                base = timm.create_model(f"local-dir:{out / 'base'}", pretrained=True)
                with torch.no_grad():
                    got = PeftModel.from_pretrained(base, str(out)).eval()(x).numpy()
                row[fmt] = f"{diff(got, ref):.1e}"
                back = root / f"{folder.name}-imported.safetensors"
                bb = load_run(folder).backbone
                import_peft(out, back, backbone=bb["name"], img_size=bb["img_size"])
                with torch.no_grad():
                    row["import"] = f"{diff(load_run(back).model(x).numpy(), ref):.1e}"
    if timm_jobs:
        spec = root / "timm_jobs.json"
        spec.write_text(json.dumps(timm_jobs))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        res = subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(spec)], capture_output=True, text=True, env=env,
                             check=False)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-2000:])
        for job in timm_jobs:
            rows[job["name"]]["timm"] = f"{diff(np.load(job['out']), runs[job['name']][2]):.1e}"

    cols = [f for f in FORMATS if not (f == "onnx/dynamo" and args.no_dynamo)]
    print(f"backbone {args.backbone} @ {args.img_size} px (dense rows @ {max(args.img_size, 64)}), inputs: "
          f"{x_label}; max |artefact - vistune| (export seconds for onnx)\n")
    print("| method | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(row.get(c, "-") for c in cols) + " |")
    torch_version = torch.__version__
    print(f"\ntorch {torch_version}; outputs compared: logits (classify), per-pixel logits (segment), "
          "detect: scores / boxes in pixels of the canvas")


if __name__ == "__main__":
    main()
