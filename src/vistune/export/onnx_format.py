"""ONNX graphs of any run: every method (prompts, adapters, prompt blocks, sparse deltas are traced
into the graph as they run), classification and dense tasks, a dynamic batch axis, the run's
fixed image size.

Inputs and outputs (also written into ``vistune_export.json``):

* input ``image``: ``(batch, 3, S, S)`` float32, already normalised with the run's mean/std.
* classify: ``logits`` ``(batch, K)``.
* segment: ``logits`` ``(batch, K, S, S)``: class scores at the input resolution (the head
  upsamples); ``argmax(1)`` is the mask on the letterboxed canvas.
* detect: ``scores`` ``(batch, L, K)`` = sqrt(sigmoid(class logit) x sigmoid(centre-ness)) and
  ``boxes`` ``(batch, L, 4)`` = x1, y1, x2, y2 in canvas pixels, clamped to the canvas, for each
  of the L FCOS locations of every level (finest level first). These are vistune's own decoded
  candidates *before* thresholding and NMS, which stay outside the graph because they return a
  different number of boxes per image: keep (location, class) pairs whose score exceeds
  ``score_threshold``, at most 1000 per level, run class-wise NMS at ``nms_iou`` and keep
  ``max_detections`` (the sidecar records these values and the per-level location counts); that
  is exactly ``FCOSHead.detections``.

Exporters: ``torchscript`` (the default) traces the model by running it, so every method's
forward hooks, including SPT's parameter swap, become plain graph operations; it is fast
(~0.2 s for a tiny ViT). ``dynamo`` uses ``torch.export`` (PyTorch's default since 2.9; needs
``onnxscript``) and gives the same graphs here, at ~15x the export time. PyTorch has deprecated
the TorchScript route; when it is removed, ``--exporter dynamo`` is the drop-in.

After writing, the graph is run with onnxruntime (when installed) on a seeded batch and compared
with the PyTorch model; a difference above 1e-4 (for boxes: 1e-4 of the canvas size) fails the
export and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vistune.dense.heads import _decode
from vistune.export.run import (
    SIDECAR,
    ExportError,
    Run,
    load_run,
    sidecar,
    staged_dir,
    write_json,
)
from vistune.tasks import get_task

ONNX_FILE = "model.onnx"
EXPORTERS = ("torchscript", "dynamo")
TOLERANCE = 1e-4
INPUT = "image"


class DenseGraph(nn.Module):
    """A dense run as a graph: segmentation logits, or decoded detection candidates.

    ``DenseModel.forward`` ends the backbone's forward early by raising an exception from a hook
    after the last feature level; ``torch.export`` cannot trace through that (its module stack is
    left unbalanced), so the graph runs the whole ``forward_features`` under the extractor's
    capture hooks instead. The outputs are the same; the unused tail is pruned from the graph.
    Detection outputs use ``FCOSHead.detections``' own arithmetic, before its per-image
    thresholding and NMS.
    """

    def __init__(self, dense: nn.Module, detections: bool = False) -> None:
        super().__init__()
        self.dense = dense
        self.detections = detections  # decode FCOS outputs to (scores, boxes); else the logits as they are

    def forward(self, x: torch.Tensor) -> Any:
        extractor = self.dense.extractor
        with extractor.capture() as captured:
            self.dense.tuned.model.forward_features(x)
        out = self.dense.head(extractor.maps(captured, x), tuple(x.shape[-2:]))
        if not self.detections:
            return out
        h, w = out["image_size"]
        b, n, _ = out["box"].shape
        scores = torch.sqrt(out["cls"].sigmoid() * out["ctr"].sigmoid()[..., None])
        points = out["points"][None].expand(b, -1, -1).reshape(b * n, 2)
        boxes = _decode(points, out["box"].reshape(b * n, 4)).reshape(b, n, 4)
        x1, y1, x2, y2 = boxes.unbind(-1)
        boxes = torch.stack([x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)], dim=-1)
        return scores, boxes


def graph_module(run: Run) -> tuple[nn.Module, tuple[str, ...], dict[str, Any]]:
    """The module to export, its output names and their documentation for the sidecar (declared by
    the run's task class: :meth:`vistune.tasks.base.Task.export_graph`)."""
    return get_task(run.task).export_graph(run, int(run.backbone["img_size"]))


def example_input(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded, normalised-looking batch (the graph is traced with it and checked on it)."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _quiet():
    """Silence the exporters' progress prints and warnings (the CLI prints one summary line)."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


def write_onnx(module: nn.Module, x: torch.Tensor, path: Path, outputs: tuple[str, ...],
               exporter: str = "torchscript", opset: int | None = None) -> None:
    """``torch.onnx.export`` with a dynamic batch axis; any exporter failure becomes one line."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    names = [INPUT, *outputs]
    try:
        with _quiet(), torch.no_grad():
            if exporter == "torchscript":
                torch.onnx.export(
                    module, (x,), str(path), input_names=[INPUT], output_names=list(outputs),
                    dynamic_axes={n: {0: "batch"} for n in names}, opset_version=opset or 17,
                    do_constant_folding=True, dynamo=False,
                )
            else:
                try:
                    import onnxscript  # noqa: F401  (the dynamo exporter needs it)
                except ImportError:
                    raise ExportError("--exporter dynamo needs onnxscript: pip install 'vistune[onnx]'") from None
                program = torch.onnx.export(
                    module, (x,), None, input_names=[INPUT], output_names=list(outputs),
                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=opset, dynamo=True,
                )
                program.save(str(path))
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 - the exporters raise many types; the first line says what failed
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"torch.onnx ({exporter}) could not export the model: {first}") from None


def onnxruntime_outputs(path: str | os.PathLike, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: x})


@torch.no_grad()
def torch_outputs(module: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    out = module(x)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.float().numpy() for o in out]


def output_diffs(names: tuple[str, ...], got: list[np.ndarray], want: list[np.ndarray],
                 size: int) -> dict[str, float]:
    """Max |got - want| per output. Boxes are in canvas pixels, so theirs is divided by the canvas
    size: fp32 rounding grows with the coordinates (1e-4 px on a 112 px canvas is 1e-6 of it)."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return {n: float("inf") for n in names}
    out = {}
    for name, g, w in zip(names, got, want):
        d = float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max()) if g.size else 0.0
        out[name] = d / size if name == "boxes" else d
    return out


def check_graph(path: Path, module: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> dict[str, Any]:
    """onnxruntime vs PyTorch on ``x`` and on its first image alone (the batch axis is dynamic)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"checked": False, "why": "onnxruntime is not installed"}
    diffs: dict[str, float] = {}
    for batch in (x, x[:1]):
        try:
            got = onnxruntime_outputs(path, batch.numpy())
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own (pybind) error types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"onnxruntime cannot run the exported graph {path.name}: {first}") from None
        for k, v in output_diffs(names, got, torch_outputs(module, batch), x.shape[-1]).items():
            diffs[k] = max(diffs.get(k, 0.0), v)
    worst = max(diffs.values())
    if not worst <= TOLERANCE:
        raise ExportError(
            f"the exported graph {path.name} disagrees with the PyTorch model: max |onnxruntime - torch| = "
            f"{worst:.3g} > {TOLERANCE:g} on a generated batch ({diffs})"
        )
    note = " (boxes: in units of the canvas size)" if "boxes" in diffs else ""
    return {"checked": True, "images": "generated (seeded normal), batch 2 and 1", "max_abs_diff": worst,
            "per_output": diffs, "note": f"max |onnxruntime - torch|{note}"}


def export_onnx(run_path: str | os.PathLike, out: str | os.PathLike, *, exporter: str = "torchscript",
                opset: int | None = None, check: bool = True, overwrite: bool = False, weights: str | None = None) -> dict[str, Any]:
    """Write ``model.onnx`` + ``vistune_export.json`` into the folder ``out``; returns the sidecar data."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    run = load_run(run_path, weights)
    run.tuned.method.trace_friendly(True)  # e.g. SPT: sparse deltas as weight swaps, which ONNX can express
    module, outputs, doc = graph_module(run)
    size = int(run.backbone["img_size"])
    x = example_input(size)
    out = Path(out)
    with staged_dir(out, overwrite, source=run.path) as tmp:
        write_onnx(module, x, tmp / ONNX_FILE, outputs, exporter, opset)
        result = check_graph(tmp / ONNX_FILE, module, x, outputs) if check else {"checked": False, "why": "check=False"}
        info = sidecar(
            run, "onnx", files=sorted(p.name for p in tmp.iterdir()) + [SIDECAR], exporter=exporter,
            input={INPUT: f"(batch, 3, {size}, {size}) float32, normalised"}, outputs=doc, check=result,
            load=f'onnxruntime.InferenceSession("{out.resolve() / ONNX_FILE}").run(None, {{"{INPUT}": x}})',
        )
        write_json(tmp / SIDECAR, info)
    return info
