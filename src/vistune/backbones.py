"""Backbones: every model vistune tunes is a plain timm model.

We never copy backbone source. A backbone is created by timm (by timm name, or by one of
vistune's offline weight names such as ``dinov2-s14``, which map onto a timm architecture plus
a converted local weights file), and methods later *attach* to it. This module also holds the
small structural helpers methods need to reach ViT blocks or CNN stages, so that no method
guesses module names on its own.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistune.io import unreadable_reason
from vistune.weights import get_entry, get_weights, zoo_names

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

    entry = get_entry(name)
    arch = entry.arch if entry is not None else name
    if entry is None and not timm.is_model(arch):
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
    if weights is not None:
        model, mean, std = _create_with_weights(name, arch, str(weights), kwargs)
    else:
        model, mean, std = _create(arch, kwargs, pretrained=False), None, None
    if img_size is not None:
        check_img_size(model, name, img_size)
    if mean is None and entry is not None:
        mean, std = entry.mean, entry.std
    model.vistune_info = _info_of(model, name, arch, img_size, mean, std, None if weights is None else str(weights))
    if device is not None:
        model.to(device)
    return model


def _create_with_weights(name: str, arch: str, wname: str, kwargs: dict[str, Any],
                         ) -> tuple[nn.Module, tuple | None, tuple | None]:
    """The model with ``wname`` (a zoo name or a local file) loaded through timm's own route, the
    load checked tensor by tensor; returns the zoo entry's normalisation when it has one."""
    mean, std = None, None
    wentry = get_entry(wname)
    if wentry is not None:
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
    file_state = read_weights_file(path)
    try:
        with _quiet_timm_loader():
            model = _create(arch, kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
    except (RuntimeError, KeyError, ValueError) as err:
        raise BackboneError(f"weights file {path} does not load into {arch!r}: {_first_line(err)}") from None
    check_weights_loaded(model, file_state, path, arch)
    del file_state
    if wentry is not None and wname in _POST_LOAD:
        module, func = _POST_LOAD[wname]
        getattr(importlib.import_module(module), func)(model, path)
    return model, mean, std


def _info_of(model: nn.Module, name: str, arch: str, img_size: int | None, mean: tuple | None,
             std: tuple | None, weights_label: str | None) -> BackboneInfo:
    """The model's :class:`BackboneInfo`; normalisation not set by the weights comes from timm's
    ``pretrained_cfg``, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if mean is None:
        mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        std = tuple(cfg.get("std", IMAGENET_STD))
    size = img_size or _native_img_size(model, cfg)
    return BackboneInfo(
        name=name, arch=arch, img_size=int(size), mean=tuple(mean), std=tuple(std), weights=weights_label
    )


def _first_line(err: BaseException) -> str:
    """An exception's message as one line (torch's load errors span many, one per tensor)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    detail = [line for line in lines[1:] if "mismatch" in line or "Missing" in line or "Unexpected" in line]
    text = lines[0] if not detail else f"{lines[0]} {detail[0]}"
    more = len(detail) - 1
    return text + (f" (and {more} more)" if more > 0 else "")


@contextlib.contextmanager
def _quiet_timm_loader():
    """Mute timm's "Unexpected keys ... may be expected" warning while it loads a file: whether
    the file fits is decided (and said in one line) by :func:`check_weights_loaded` instead."""
    log = logging.getLogger("timm.models._builder")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file as timm reads it (``.safetensors`` or a torch state dict).

    timm unwraps ``state_dict``/``model``/EMA entries and strips a ``module.`` prefix; reading
    it the same way lets :func:`check_weights_loaded` compare what timm loaded against the file.
    Anything that is not a weights file (text, garbage bytes, a pickle of other objects) is
    refused here with one line, before any model is built.
    """
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path))
    except Exception as err:  # safetensors, zip and unpickling errors share no base class

        raise BackboneError(
            f"weights file {path} is not a weights file (a .safetensors or a torch state dict): "
            f"{unreadable_reason(err)}"
        ) from None
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise BackboneError(f"weights file {path} holds no tensors")
    return state


def _head_keys(model: nn.Module) -> tuple[set[str], tuple[str, ...]]:
    """The classifier's state-dict names in the model, and the prefixes a file's classifier uses.

    timm drops (and re-initialises) a classifier whose class count differs from the file's, so
    those keys may legitimately be missing from the model, unexpected in the file, or differ.
    """
    head_ids = {id(p) for p in classifier(model).parameters()} if hasattr(model, "get_classifier") else set()
    names = {n for n, p in model.named_parameters() if id(p) in head_ids}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    prefixes = cfg.get("classifier") or ()
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return names, tuple(f"{p}." for p in prefixes)


def _fit(model: nn.Module, state: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, different) keys of ``state`` against the model's loaded tensors."""
    own = model.state_dict()
    head, prefixes = _head_keys(model)

    def is_head(key: str) -> bool:
        return key in head or key.startswith(prefixes)

    missing = [k for k in own if k not in state and not is_head(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own and not is_head(k)]
    different = []
    for k, t in own.items():
        v = state.get(k)
        if is_head(k) or not isinstance(v, torch.Tensor) or v.shape != t.shape or t.device.type == "meta":
            continue  # shape differs: resampled by timm's filter (position embeddings)
        if not torch.equal(v.to(device=t.device, dtype=t.dtype), t):
            different.append(k)
    return missing, unexpected, different


def check_weights_loaded(model: nn.Module, state: dict[str, Any], path: str | os.PathLike, arch: str) -> None:
    """Prove the backbone's tensors came from ``state`` (the file), or refuse with one line.

    timm loads a file non-strictly whenever the class count differs from the file's (always,
    for a backbone without head), so a file whose keys do not fit (a tuned file, a training
    checkpoint, another model's weights) would load nothing and leave a random backbone behind
    a ``weights=FILE`` label. Every backbone tensor must be in the file under its name and hold
    the file's values; only the classifier may be dropped and only timm-resampled tensors
    (other shape) may differ. Files in another layout that timm's own checkpoint filter for the
    architecture converts (e.g. original DINOv2 or open_clip keys) are checked after that filter.
    """
    missing, unexpected, different = _fit(model, state)
    if not (missing or unexpected or different):
        return

    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            filtered = filter_fn(dict(state), model)
        except Exception:  # noqa: BLE001 - a filter that cannot read this file: keep the plain verdict
            filtered = None
        if isinstance(filtered, dict) and not any(_fit(model, filtered)):
            return

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    n_own = len(model.state_dict())
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {n_own} tensors missing from the file ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) in the file ({some(unexpected)})")
    if different:
        parts.append(f"{len(different)} tensor(s) not loaded ({some(different)})")
    raise BackboneError(
        f"weights file {path} does not fit backbone {arch!r}: {'; '.join(parts)} "
        "(expected the backbone's own state dict, e.g. saved by timm; not a tuned file or checkpoint)"
    )


def check_img_size(model: nn.Module, name: str, img_size: int) -> None:
    """Refuse an input size the backbone cannot use as a whole.

    A ViT's patch embedding is a strided convolution: a size that is not a multiple of the
    patch size silently drops the last rows and columns (or fails at the first batch), and a
    size below one patch has no tokens at all. For other backbones, a size below the native one
    is tried once on a zero image (tiny at such sizes) so that one whose stages shrink the map
    below a kernel is refused now rather than at the first batch with a traceback (on the meta
    device, where ``info`` counts parameters, the same call checks shapes only).
    """
    pe = getattr(model, "patch_embed", None)
    patch = getattr(pe, "patch_size", None)
    if patch is not None and not getattr(pe, "dynamic_img_pad", False):
        p = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        if img_size < p:
            raise BackboneError(f"img_size {img_size} is smaller than one {p}-pixel patch of {name}")
        if img_size % p:
            low = img_size - img_size % p
            raise BackboneError(
                f"img_size {img_size} is not a multiple of {name}'s patch size {p}: the last "
                f"{img_size % p} pixel rows and columns would be dropped; use {low} or {low + p}"
            )
    first = next(iter(model.parameters()), None)
    native = int(((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))[-1])
    if first is None or img_size >= native:
        return
    was_training = model.training
    try:
        with torch.no_grad():  # on the meta device (``info``) this checks shapes only, for free
            model.eval()(torch.zeros(1, 3, img_size, img_size, device=first.device, dtype=first.dtype))
    except NotImplementedError:  # an op without a kernel here (meta): no verdict, the run will tell
        pass
    except (RuntimeError, AssertionError, ValueError) as err:
        raise BackboneError(f"img_size {img_size} is too small for {name}: {_first_line(err)}") from None
    finally:
        model.train(was_training)


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


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switch timm's fused attention (``F.scaled_dot_product_attention``) on or off in every block.

    Why off on CPU: PyTorch's CPU flash-attention *backward* is slow for the short sequences
    vistune trains on (65 tokens at 112 px): on DINOv2-S, batch 32, bf16 it took ~40% of a LoRA
    step, and the explicit softmax(q·kᵀ)·v path made the step 1.8x faster (forward alone: equal).
    Returns how many attention modules were switched.
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "fused_attn") and isinstance(m.fused_attn, bool):
            m.fused_attn = enabled
            n += 1
    return n


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
        if get_entry(str(label)) is None:
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
        and isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList))
        and hasattr(model, "num_prefix_tokens")
    )


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
