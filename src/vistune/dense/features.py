"""Multi-scale feature maps from any tuned timm backbone, read *after* the method's hooks ran.

Why capture hooks instead of ``forward_intermediates``: methods attach to timm's own modules
with hooks (VPT inserts prompt tokens on ``blocks[0]`` and strips them after ``blocks[-1]``;
Pro-tuning adds its prompt to a stage's output in a forward hook). timm's
``forward_intermediates`` reshapes ViT tokens assuming exactly ``num_prefix_tokens`` leading
tokens, which is wrong inside a VPT model. So the extractor registers forward hooks on the
chosen modules *for the duration of one call* (so they are registered after the method's and
see its modified outputs), runs the model's own ``forward_features``, and stops the forward with
a private exception as soon as the last chosen module has produced its output (a CNN then skips
its 1x1 head conv, a ViT its final blocks when the chosen ones end earlier).

ViT tokens become grids by keeping the *last* ``H*W`` tokens (VPT puts its prompts between the
prefix tokens and the patches, so the patches are always last) and checking that the number of
leading tokens is what the model declares: ``num_prefix_tokens``, plus the tokens the method
says it adds (``Method.routing().tokens``) while they are inside the sequence. Each captured block output goes through the model's final norm
(DINOv2 and most timm ViTs are trained so the normed tokens are the features to read) and is
marked with a resampling factor: the neck turns the single-stride ViT into a simple pyramid
(ViTDet's idea; DPT's choice of blocks: four evenly spaced ones, scaled x4, x2, x1, x0.5).

CNN levels are timm's ``feature_info`` entries (the same list Pro-tuning indexes with
``stages``); by default the last four (strides 4-32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from vistune.backbones import is_vit, vit_geometry
from vistune.errors import VistuneError

#: Resampling factors of the ViT simple pyramid, finest first.
VIT_SCALES = (4.0, 2.0, 1.0, 0.5)
DEFAULT_CNN_LEVELS = 4


class FeatureError(VistuneError, ValueError):
    """The backbone does not expose the feature levels asked for."""


class StopForward(Exception):
    """Raised by the last capture hook: everything after it is not needed."""


@dataclass(frozen=True)
class Level:
    """One feature level: where it is read and what the neck gets."""

    index: int  # ViT block index, or CNN feature_info index
    module: str  # module name inside the timm model
    channels: int
    stride: float  # input pixels per feature cell, after resampling by ``scale``
    scale: float  # resampling the neck applies (ViT pyramid); 1.0 for CNNs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Level:
        return cls(int(d["index"]), str(d["module"]), int(d["channels"]), float(d["stride"]), float(d["scale"]))


def _cnn_entries(model: nn.Module) -> list[dict[str, Any]]:
    info = getattr(model, "feature_info", None)
    if info is None:
        raise FeatureError(f"{type(model).__name__} has no feature_info: dense heads need timm's feature levels")
    return info.get_dicts() if hasattr(info, "get_dicts") else [dict(e) for e in info]


def default_levels(model: nn.Module, indices: list[int] | tuple[int, ...] | None = None) -> list[Level]:
    """The levels a dense head reads, finest first.

    ViT: four evenly spaced blocks ending with the last (``indices`` = block indices, at most four,
    paired with the last ``len(indices)`` of :data:`VIT_SCALES`). CNN: the last four
    ``feature_info`` entries (``indices`` = feature_info indices, as timm's ``out_indices``).
    """
    if is_vit(model):
        g = vit_geometry(model)
        depth = g["depth"]
        if indices is None:
            n = min(4, depth)
            indices = sorted({(k + 1) * depth // n - 1 for k in range(n)})
        indices = sorted(int(i) for i in indices)
        if not indices or len(indices) > len(VIT_SCALES) or any(not 0 <= i < depth for i in indices):
            raise FeatureError(f"ViT levels must be 1-{len(VIT_SCALES)} block indices in 0..{depth - 1}, got {indices}")
        if len(set(indices)) != len(indices):
            raise FeatureError(f"ViT levels repeat a block: {indices}")
        scales = VIT_SCALES[len(VIT_SCALES) - len(indices):]
        return [Level(i, f"blocks.{i}", g["width"], g["patch"] / s, s) for i, s in zip(indices, scales)]
    entries = _cnn_entries(model)
    if indices is None:
        indices = list(range(max(0, len(entries) - DEFAULT_CNN_LEVELS), len(entries)))
    indices = sorted(int(i) for i in indices)
    if not indices or any(not 0 <= i < len(entries) for i in indices) or len(set(indices)) != len(indices):
        raise FeatureError(f"CNN levels must be distinct feature_info indices in 0..{len(entries) - 1}, got {indices}")
    out = []
    for i in indices:
        e = entries[i]
        out.append(Level(i, str(e["module"]), int(e["num_chs"]), float(e["reduction"]), 1.0))
    return out


def _resolve(model: nn.Module, name: str) -> nn.Module:
    for candidate in (name, name.replace(".", "_")):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    raise FeatureError(f"{type(model).__name__} has no submodule {name!r}")


class FeatureExtractor:
    """Callable ``images (B,3,S,S) -> [feature map (B,C,h,w)]`` for the given levels.

    Not an ``nn.Module``: it owns no parameters and holds no hooks between calls, so it can be
    rebuilt at will and never shows up in state dicts.
    """

    def __init__(self, model: nn.Module, levels: list[Level], extra_tokens: int | None = None) -> None:
        self.model = model
        #: tokens a method adds between the prefix tokens and the patches (``Routing.tokens``:
        #: VPT's prompts); None accepts any number (a server whose tasks add different numbers)
        self.extra_tokens = extra_tokens
        self.levels = list(levels)
        self.vit = is_vit(model)
        self.modules = [_resolve(model, lv.module) for lv in self.levels]
        self.channels_last = str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC")

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        pe = self.model.patch_embed
        if getattr(self.model, "dynamic_img_size", False):
            ph, pw = pe.patch_size if isinstance(pe.patch_size, (tuple, list)) else (pe.patch_size,) * 2
            return x.shape[-2] // ph, x.shape[-1] // pw
        return int(pe.grid_size[0]), int(pe.grid_size[1])

    def _tokens_to_map(self, out: torch.Tensor, grid: tuple[int, int], level: Level) -> torch.Tensor:
        h, w = grid
        if out.ndim != 3:
            raise FeatureError(f"block {level.module} returned shape {tuple(out.shape)}, expected (B, N, D)")
        leading = out.shape[1] - h * w
        prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        extra = self.extra_tokens
        if leading < prefix or (extra is not None and leading not in (prefix, prefix + extra)):
            added = "any number of" if extra is None else str(extra)
            raise FeatureError(
                f"block {level.module}: {out.shape[1]} tokens = {leading} leading + {h}x{w} patches, but the "
                f"model declares {prefix} prefix tokens (+{added} tokens its method adds); cannot find the patch grid"
            )
        norm = getattr(self.model, "norm", None)
        tokens = out[:, leading:]
        if isinstance(norm, nn.Module):
            tokens = norm(tokens)
        return tokens.transpose(1, 2).reshape(out.shape[0], -1, h, w)

    @contextlib.contextmanager
    def capture(self, stop: bool = False) -> Iterator[dict[int, Any]]:
        """Record each level module's output (after the method's hooks) while the block runs.

        With ``stop=True`` the forward is cut short after the last level (callers must catch
        :class:`StopForward`, as :meth:`__call__` does). Hooks exist only inside the block.
        """
        captured: dict[int, Any] = {}

        def make(i: int):
            def hook(module: nn.Module, args: tuple, out: Any) -> None:
                captured[i] = out
                if stop and len(captured) == len(self.modules):
                    raise StopForward

            return hook

        handles = [m.register_forward_hook(make(i)) for i, m in enumerate(self.modules)]
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()

    def maps(self, captured: dict[int, Any], x: torch.Tensor) -> list[torch.Tensor]:
        """Captured raw outputs -> NCHW feature maps (ViT tokens to normed grids)."""
        if len(captured) != len(self.modules):
            missing = [lv.module for i, lv in enumerate(self.levels) if i not in captured]
            raise FeatureError(f"forward_features never ran {missing}; cannot read those levels")
        grid = self._grid(x) if self.vit else None
        feats = []
        for i, level in enumerate(self.levels):
            out = captured[i]
            if self.vit:
                feats.append(self._tokens_to_map(out, grid, level))
            else:
                if not isinstance(out, torch.Tensor) or out.ndim != 4:
                    raise FeatureError(f"stage {level.module} did not return a 4-D feature map")
                feats.append(out.permute(0, 3, 1, 2) if self.channels_last else out)
        return feats

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        with self.capture(stop=True) as captured:
            try:
                self.model.forward_features(x)
            except StopForward:
                pass
        return self.maps(captured, x)
