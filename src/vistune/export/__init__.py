"""Export tuned runs to formats other tools run without vistune, and import PEFT LoRA adapters.

::

    from vistune.export import export, import_peft
    export("runs/lora", "timm", "out/lora-timm")    # merged plain timm folder (model.safetensors + config.json)
    export("runs/vpt", "onnx", "out/vpt-onnx")      # model.onnx, any method, classify/segment/detect
    export("runs/lora", "peft", "out/lora-peft")    # HF PEFT adapter (+ base/ timm folder)
    import_peft("out/lora-peft", "lora.safetensors", backbone="dinov2-s14", img_size=112)

Which format carries which method:

============  =====  ====  ====
method        timm   onnx  peft
============  =====  ====  ====
linear        yes    yes   -
full          yes    yes   -
bitfit        yes    yes   -
lora          yes    yes   yes
spt           yes*   yes   -
vpt           -      yes   -
adapter       -      yes   -
protuning     -      yes   -
dense runs    -      yes   -
============  =====  ====  ====

``*`` SPT with ``structured=lora`` or ``none``; with adapters it is ONNX only. Every output is a
folder written atomically (built in a temp folder beside it, then moved in; ``overwrite``
replaces only an earlier export's files, never the run itself or other files), with a
``vistune_export.json`` saying what it holds, how to preprocess images and the Python that runs
it without vistune.
"""

from __future__ import annotations

import os
from typing import Any

from vistune.export.onnx_format import EXPORTERS, export_onnx
from vistune.export.peft_format import export_peft, import_peft
from vistune.export.run import SIDECAR, ExportError, Run, check_out_vs_source, load_run
from vistune.export.timm_format import export_timm

FORMATS = ("onnx", "peft", "timm")
OPTIONS = {"onnx": {"exporter", "opset", "check"}, "peft": {"include_base"}, "timm": set()}


def export(run: str | os.PathLike, fmt: str, out: str | os.PathLike, *, overwrite: bool = False,
           weights: str | None = None, **options: Any) -> dict[str, Any]:
    """Export the run at ``run`` (run folder or tuned file) as ``fmt`` into the folder ``out``.

    ``weights``: the backbone weights file, for a run trained on a local file (its tuned file
    records only a label). ``options``: ``exporter``/``opset``/``check`` for onnx, ``include_base``
    for peft. Returns the
    sidecar data written to ``out/vistune_export.json``.
    """
    writers = {"onnx": export_onnx, "peft": export_peft, "timm": export_timm}
    if fmt not in writers:
        raise ExportError(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}")
    unknown = sorted(set(options) - OPTIONS[fmt])
    if unknown:
        valid = ", ".join(sorted(OPTIONS[fmt])) or "none"
        raise ExportError(f"format {fmt!r} has no option {unknown[0]!r} (its options: {valid})")
    check_out_vs_source(out, run)  # before the (slow) rebuild of the run
    return writers[fmt](run, out, overwrite=overwrite, weights=weights, **options)


__all__ = [
    "EXPORTERS",
    "FORMATS",
    "SIDECAR",
    "ExportError",
    "Run",
    "export",
    "export_onnx",
    "export_peft",
    "export_timm",
    "import_peft",
    "load_run",
]
