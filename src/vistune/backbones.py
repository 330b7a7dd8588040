"""Backbones: every model vistune tunes is a plain timm model.

We never copy backbone source. A backbone is created by timm (by timm name, or by one of
vistune's offline weight names such as ``dinov2-s14``, which map onto a timm architecture plus
a converted local weights file), and methods later *attach* to it. This module also holds the
small structural helpers methods need to reach ViT blocks or CNN stages, so that no method
guesses module names on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: Fix-ups after timm's loading, per zoo name. DINOv2's position embeddings must be resampled
#: without antialias, as upstream DINOv2 and the ONNX graph do (timm's default antialiases:
#: CLS cosine only 0.994 at 112 px against the original model).
_POST_LOAD = {"dinov2-s14": ("vistune.weights.dinov2", "match_onnx_pos_embed")}


class BackboneError(ValueError):
    """A backbone cannot be created as asked (unknown name, bad weights file, ...)."""


@dataclass(frozen=True)
class BackboneInfo:
    """What the data pipeline and the tuned-file metadata need to know about a backbone."""

    name: str  # what the user asked for (timm name or vistune zoo name)
    arch: str  # the timm architecture actually built
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str | None  # zoo name or file path the weights came from, None = random init


def _zoo_entry(name: str):
    """Look a name up in the offline weights catalogue (lazy import: it pulls in converters)."""
    try:
        from vistune.weights import get_entry
    except ImportError:  # pragma: no cover - the weights package is part of vistune
        return None
    return get_entry(name)


def create_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    img_size: int | None = None,
    num_classes: int = 0,
    device: str | torch.device | None = None,
    load_weights: bool = True,
    **timm_kwargs: Any,
) -> nn.Module:
    """Create a timm model, optionally with weights from a local file or a vistune weights name.

    ``name`` is a timm architecture (``vit_base_patch16_224``, ``resnet18``...) or a vistune zoo
    name (``dinov2-s14``, ``efficientnet-lite0``, ``mobilenetv2``, ``resnet20-cifar``...). For a zoo
    name, ``weights`` defaults to that name's converted file (fetched on first use). ``weights``
    may also be a path to a ``.safetensors``/``.pth`` file that loads into the architecture.
    ``load_weights=False`` builds the architecture only (e.g. on the meta device, to count
    parameters) while keeping the zoo entry's normalisation.

    Weights are loaded through timm's own ``pretrained_cfg_overlay=dict(file=...)`` route, so
    timm's checkpoint filters do what they do for hub weights: position embeddings are resampled
    to ``img_size`` and a classifier of the wrong size is dropped. The returned model carries a
    :class:`BackboneInfo` as ``model.vistune_info`` (normalisation for the data pipeline).
    """
    import timm

    entry = _zoo_entry(name)
    arch = entry.arch if entry is not None else name
    if entry is None and not timm.is_model(arch):
        from vistune.weights import zoo_names

        raise BackboneError(
            f"unknown backbone {name!r}: not a timm model name and not one of vistune's "
            f"weights names {zoo_names()} (see `timm.list_models()`)"
        )
    if entry is not None and weights is None:
        weights = name
    if not load_weights:
        weights = None

    kwargs: dict[str, Any] = dict(timm_kwargs)
    kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size

    weights_label: str | None = None
    mean, std = None, None
    if weights is not None:
        wname = str(weights)
        wentry = _zoo_entry(wname)
        if wentry is not None:
            from vistune.weights import get_weights

            if wentry.arch != arch:
                raise BackboneError(
                    f"weights {wname!r} are for {wentry.arch!r}, not for backbone {name!r}"
                )
            path = get_weights(wname)
            mean, std = wentry.mean, wentry.std
            overlay = dict(file=str(path), num_classes=wentry.num_classes, mean=wentry.mean, std=wentry.std)
        else:
            path = Path(wname).expanduser()
            if not path.is_file():
                raise BackboneError(
                    f"weights {wname!r}: no such file and not a vistune weights name"
                )
            overlay = dict(file=str(path))
        weights_label = wname
        try:
            model = _create(arch, kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
        except (RuntimeError, KeyError, ValueError) as err:
            raise BackboneError(f"weights file {path} does not load into {arch!r}: {err}") from err
        if wentry is not None and wname in _POST_LOAD:
            import importlib

            module, func = _POST_LOAD[wname]
            getattr(importlib.import_module(module), func)(model, path)
    else:
        model = _create(arch, kwargs, pretrained=False)

    cfg = getattr(model, "pretrained_cfg", None) or {}
    if mean is None and entry is not None:
        mean, std = entry.mean, entry.std
    if mean is None:
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
    size = img_size or _native_img_size(model, cfg)
    model.vistune_info = BackboneInfo(
        name=name, arch=arch, img_size=int(size), mean=tuple(mean), std=tuple(std), weights=weights_label
    )
    if device is not None:
        model.to(device)
    return model


def seeded_backbone(name: str, weights: str | os.PathLike | None = None, img_size: int | None = None,
                    num_classes: int = 0) -> nn.Module:
    """:func:`create_backbone` under a fixed seed (0), whatever the run's seed.

    Only matters for randomly initialised backbones (tests, ablations): every run, seed, worker
    process and ``eval`` then sees the same backbone, so tuned files and PVP modules fit across
    seeds and ranks agree without a broadcast.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(name, weights=weights, img_size=img_size, num_classes=num_classes)


def backbone_for_file(recorded: dict[str, Any], source: str | os.PathLike,
                      weights: str | os.PathLike | None = None) -> nn.Module:
    """Rebuild the backbone a tuned file's metadata (``recorded = meta["backbone"]``) names.

    The recorded ``weights`` is a *label*, never a path this function opens: a file received from
    someone else must not make vistune read arbitrary local files. Zoo names (``dinov2-s14``) are
    rebuilt from the zoo; a run trained on a local weights file needs that file passed again as
    ``weights`` (the caller's fingerprint check then proves it is the same file).
    """
    try:
        name, label, img_size = recorded["name"], recorded.get("weights"), recorded.get("img_size")
    except (KeyError, TypeError):
        raise BackboneError(f"{source}: metadata does not name its backbone") from None
    if weights is None and label is not None:
        if _zoo_entry(str(label)) is None:
            raise BackboneError(
                f"{source} was trained on backbone weights from a local file ({label!r}); pass that "
                "file again with --weights PATH (its fingerprint is checked)"
            )
        weights = None if label == name else label
    return seeded_backbone(name, weights=weights, img_size=img_size)


def _create(arch: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    """timm.create_model, dropping ``img_size`` for architectures (CNNs) that take any size."""
    import timm

    try:
        return timm.create_model(arch, **extra, **kwargs)
    except TypeError as err:
        if "img_size" not in kwargs or "img_size" not in str(err):
            raise
        rest = {k: v for k, v in kwargs.items() if k != "img_size"}
        return timm.create_model(arch, **extra, **rest)


def _native_img_size(model: nn.Module, cfg: dict) -> int:
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        return int(pe.img_size[0])
    size = cfg.get("input_size", (3, 224, 224))
    return int(size[-1])


def backbone_info(model: nn.Module) -> BackboneInfo:
    """The BackboneInfo recorded at creation, or one derived from timm's config for foreign models."""
    info = getattr(model, "vistune_info", None)
    if info is not None:
        return info
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture", type(model).__name__)
    return BackboneInfo(
        name=arch,
        arch=arch,
        img_size=_native_img_size(model, cfg),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        weights=None,
    )


# --------------------------------------------------------------------------------------------
# Structural helpers: methods reach a backbone's parts only through these.


def is_vit(model: nn.Module) -> bool:
    """A timm ViT-like model: tokens from a patch embed, then a ``blocks`` sequence."""
    return (
        hasattr(model, "patch_embed")
        and isinstance(getattr(model, "blocks", None), nn.Sequential)
        and hasattr(model, "num_prefix_tokens")
    )


def vit_blocks(model: nn.Module) -> list[nn.Module]:
    if not is_vit(model):
        raise BackboneError(f"{type(model).__name__} is not a timm VisionTransformer-like model")
    return list(model.blocks)


def vit_geometry(model: nn.Module) -> dict[str, int]:
    """Width, depth, patch size and prefix-token count of a timm ViT."""
    pe = model.patch_embed
    patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else int(pe.patch_size)
    return dict(
        width=int(model.embed_dim),
        depth=len(model.blocks),
        patch=int(patch),
        prefix=int(model.num_prefix_tokens),
        grid_h=int(pe.grid_size[0]),
        grid_w=int(pe.grid_size[1]),
    )


def classifier(model: nn.Module) -> nn.Module:
    """The model's head as timm defines it (``get_classifier``)."""
    if not hasattr(model, "get_classifier"):
        raise BackboneError(f"{type(model).__name__} has no get_classifier(); not a timm model")
    return model.get_classifier()


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(classifier(model).parameters())


#: The per-block weight matrices methods can target, in the order SPT's figures use.
VIT_MATRICES = ("q", "k", "v", "proj", "fc1", "fc2")


def vit_block_linears(block: nn.Module) -> dict[str, tuple[nn.Linear, slice]]:
    """Map q/k/v/proj/fc1/fc2 of a timm ViT block to (the nn.Linear holding it, its output rows).

    timm fuses q, k and v into one ``attn.qkv`` Linear with 3·D outputs; a method that targets
    only q (say) must touch only the first third of its rows, so each entry carries that slice.
    """
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    out: dict[str, tuple[nn.Linear, slice]] = {}
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        d = qkv.out_features // 3
        out["q"] = (qkv, slice(0, d))
        out["k"] = (qkv, slice(d, 2 * d))
        out["v"] = (qkv, slice(2 * d, 3 * d))
    else:
        for key, attr in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            lin = getattr(attn, attr, None)
            if isinstance(lin, nn.Linear):
                out[key] = (lin, slice(0, lin.out_features))
    for key, parent, attr in (("proj", attn, "proj"), ("fc1", mlp, "fc1"), ("fc2", mlp, "fc2")):
        lin = getattr(parent, attr, None)
        if isinstance(lin, nn.Linear):
            out[key] = (lin, slice(0, lin.out_features))
    return out
