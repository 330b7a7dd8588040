"""Plain timm checkpoints: merge what is mergeable, write timm's own local folder layout.

The folder is what ``timm.models.save_for_hf`` writes and ``timm.create_model("local-dir:DIR")``
reads: ``model.safetensors`` (the model's own state dict, nothing of vistune left in it) and
``config.json`` (``architecture``, ``num_classes``, ``model_args`` with the keywords that rebuild
the geometry, ``pretrained_cfg`` with mean/std/input size, ``label_names``). It also loads the
older way, ``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=...,
num_classes=K), num_classes=K, img_size=S)``: the overlay's ``num_classes`` matters, since timm
drops a checkpoint's classifier whose size differs from the pretrained config's.

Position embeddings are stored as the run used them, at the run's image size. timm's checkpoint
filter resamples ``pos_embed`` only when its length or recorded grid differs from the model's, so a
model created at the same ``img_size`` takes the tensor unchanged. That is what keeps the zoo's
``dinov2-s14`` exact: vistune resamples its 37x37 grid *without* antialias after timm's load (as
upstream DINOv2 does), which plain timm would not redo.

Why we write ``config.json`` ourselves rather than call ``save_for_hf``: its signature has grown
across timm 1.0.x (``model_args``/``data_config``), and the few keys below are all a loader reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistune.export.run import (
    SIDECAR,
    ExportError,
    Run,
    carriers,
    load_run,
    refuse,
    refuse_dense,
    sidecar,
    staged_dir,
    state_for_file,
    timm_kwargs,
    write_json,
)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

#: pretrained_cfg entries kept from the source model (the rest is set from the run).
_CFG_KEEP = ("tag", "first_conv", "classifier", "license", "fixed_input_size")


def plain_timm_reference(arch: str, kwargs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a freshly created timm model (on the meta device: no memory, no weights)."""
    import timm

    with torch.device("meta"):
        ref = timm.create_model(arch, pretrained=False, **kwargs)
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def check_plain(state: dict[str, torch.Tensor], arch: str, kwargs: dict[str, Any], what: str) -> None:
    """Refuse a state dict that a plain timm model would not load strictly (a method leftover)."""
    ref = plain_timm_reference(arch, kwargs)
    extra = sorted(set(state) - set(ref))
    missing = sorted(set(ref) - set(state))
    shapes = sorted(k for k in set(ref) & set(state) if tuple(state[k].shape) != ref[k])
    if extra or missing or shapes:
        raise ExportError(
            f"{what} does not match a plain timm {arch} {kwargs}: extra keys {extra[:4]}, missing {missing[:4]}, "
            f"shapes differ for {shapes[:4]}"
        )


def write_timm_folder(folder: Path, state: dict[str, torch.Tensor], model: nn.Module, run: Run,
                      num_classes: int, class_names: list[str] | None) -> dict[str, Any]:
    """``model.safetensors`` + ``config.json`` in timm's local-folder layout; returns the config."""
    from safetensors.torch import save_file

    bb = run.backbone
    arch, size = bb["arch"], int(bb["img_size"])
    kwargs = timm_kwargs(model, num_classes, size)
    check_plain(state, arch, kwargs, f"the exported state dict of {run.path}")
    src_cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg = {k: src_cfg[k] for k in _CFG_KEEP if k in src_cfg}
    cfg.update(
        num_classes=int(num_classes),
        input_size=[3, size, size],
        mean=list(bb["mean"]),
        std=list(bb["std"]),
        interpolation="bicubic",
        crop_pct=1.0,
        crop_mode="squash",  # vistune resizes straight to SxS, no crop
        custom_load=False,
    )
    config: dict[str, Any] = {
        "architecture": arch,
        "num_classes": int(num_classes),
        "num_features": int(getattr(model, "num_features", 0)),
        "model_args": kwargs,
        "pretrained_cfg": cfg,
    }
    if class_names and num_classes == len(class_names):
        config["label_names"] = list(class_names)
    save_file(state_for_file(state), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, config)
    return config


def loader_lines(out: Path, arch: str, kwargs: dict[str, Any]) -> dict[str, str]:
    """The Python that loads the folder with plain timm, both ways."""
    k = int(kwargs["num_classes"])
    rest = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    return {
        "local_dir": f'timm.create_model("local-dir:{out}", pretrained=True).eval()',
        "overlay": (
            f'timm.create_model("{arch}", pretrained=True, pretrained_cfg_overlay=dict(file="{out / WEIGHTS_FILE}", '
            f"num_classes={k}), {rest}).eval()"
        ),
    }


def export_timm(run_path: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False, weights: str | None = None) -> dict[str, Any]:
    """Merge the run's method into the backbone and write a plain timm folder at ``out``.

    Refuses (one line, nothing written) dense runs and methods that cannot be merged (VPT,
    Adapter, Pro-tuning, SPT with adapters). Returns the sidecar data (also written as
    ``vistune_export.json``).
    """
    run = load_run(run_path, weights)
    if run.task_class.own_head_module:  # a dense head: only a traced graph carries it
        raise refuse_dense(run, "timm")
    if "timm" not in carriers(run):
        raise refuse(run, "timm", run.tuned.method.not_mergeable_reason)
    tuned = run.tuned
    tuned.merge()
    model = tuned.model
    state = model.state_dict()
    out = Path(out)
    kwargs = timm_kwargs(model, tuned.num_classes, int(run.backbone["img_size"]))
    with staged_dir(out, overwrite, source=run.path) as tmp:
        write_timm_folder(tmp, state, model, run, tuned.num_classes, run.class_names)
        info = sidecar(run, "timm", files=[WEIGHTS_FILE, CONFIG_FILE, SIDECAR], timm_kwargs=kwargs,
                       load=loader_lines(out.resolve(), run.backbone["arch"], kwargs))
        write_json(tmp / SIDECAR, info)
    return info
