"""Pro-tuning (Nie et al., 2022): stage-wise, input-dependent prompt blocks for CNNs and ViTs.

What the paper states (METHODS.md §4): the backbone stays frozen and training learns
task-specific prompts *for the input images* through several stage-wise prompt blocks that plug
into CNN and Transformer backbones. Their internals are not published and no code exists, so
the design below is **vistune's assumption**, chosen to be simple, exact at initialisation and
cheap. It is not a reproduction.

Design as built
---------------
*Where.* After each selected stage ``s`` a prompt block ``g_s`` reads that stage's output
feature map ``F_s`` and the rest of the network receives ``F_s + g_s(F_s)``. The prompt is
computed from the features, which is what "prompts for the input images" implies; adding it
(rather than concatenating channels) keeps every frozen layer's input shape, so no timm code
changes. On CNNs a forward hook on the stage module replaces its output (on ViTs a pre-hook on a
group's first block, see below), so anything that runs the stages (``forward``,
``forward_features``, ``forward_intermediates``) sees prompted features, including the
dense-prediction heads that read a CNN's multi-scale maps.

*The block.* ``1x1 conv C→C/ρ`` → ``kxk depthwise conv`` → ``GELU`` → ``1x1 conv C/ρ→C``, each
with a bias and no normalisation: BatchNorm would need batch statistics (the backbone's own are
frozen, and a tuned block should not depend on the batch), LayerNorm on a feature map costs
more than it buys in a residual branch that starts at zero. The depthwise conv is what makes the
prompt spatial (it mixes a k×k neighbourhood, so the prompt is a function of local content, not
a per-pixel channel remap). The expand conv is zero-initialised, so a freshly attached model
computes exactly what the backbone does; the reduce and depthwise convs keep PyTorch's default
init so gradients reach them once the expand weights move. With hidden width ``h = max(1, C//ρ)``
one block has ``C·h + h`` (reduce) ``+ h·k² + h`` (depthwise) ``+ h·C + C`` (expand) parameters.

*Reduction* ``ρ = 8`` by default. A block costs about ``2C²/ρ``; at ρ=8 Pro-tuning is ~0.7% of
ViT-B/16 (4 groups) and ~6% of ResNet-50, on a par with the adapter/LoRA defaults on ViTs,
while ρ=4 doubles that for ResNet-50 (>10%, hardly "a few parameters"). On the small mobile
CNNs the project targets (EfficientNet-Lite0, MobileNetV2: ~30k parameters, 0.9–1.3%) ρ=8
leaves 12–40 bottleneck channels in the two deepest stages, which hold ~95% of the count; the
shallow 24–40 channel stages get 3–5 (cheap, and their features are the most generic).

*CNN stages.* Stages are the entries of timm's ``model.feature_info`` (their ``module`` names are
resolved with ``get_submodule``); the ``stages`` option indexes that list, i.e. it means what
timm's ``out_indices`` means. By default the **last four** entries are prompted (all of them when
there are fewer): the usual C2–C5 pyramid at strides 4–32. On timm's 5-level CNNs this leaves
out the stride-2 entry, which is not a stage end worth prompting: for ResNets it is ``act1``
(the stem's activation), for EfficientNet/MobileNet a single block at full stem resolution, where
a depthwise conv costs the most compute per parameter and the features are the most generic.
ConvNeXt (4 levels) and the CIFAR ResNets (3 levels, ``layer1..3``) get every stage. The last
stage is included: its prompt adapts the very features the head reads. NHWC backbones (timm
models whose ``output_fmt`` is ``NHWC``, e.g. Swin) are permuted around the block.

*ViT stages.* The ``depth`` blocks are split into ``groups`` contiguous groups (default 4, so
ViT-B's 12 blocks give groups of 3; sizes differ by at most one, the first groups taking the
remainder). Group ``s`` receives ``X + g_s(X)`` where ``X`` is what enters its first block: the
embedded tokens for group 0, the previous group's output otherwise. This is the CNN rule shifted
by one stage, on purpose: a prompt *after* the last block only changes patch tokens, which a
CLS-pooled head (the usual ViT classifier) throws away, so that block would never get a
gradient; placed at group inputs, every block reaches the head. Patch tokens are reshaped to
their grid (``model.patch_embed.grid_size``, or the grid of the current input when the model
was built with ``dynamic_img_size``), prompted, and flattened back; prefix tokens (CLS,
registers, distillation) pass through untouched.

*Merging* is impossible: the prompt is a non-linear function of each input's features, not a
fixed change of the weights, so :meth:`ProTuning.merge` raises ``NotMergeableError`` saying so.

The prompt blocks live in one ``model.protuning`` ``ModuleDict`` (keys ``stage{i}`` for CNNs,
``group{i}`` for ViTs, ``i`` being the stage index), so timm's own state-dict keys are unchanged
and a tuned file's keys say which stage each tensor belongs to. Resolved stages and groups are
written into the method spec, so a tuned file rebuilds the same blocks even if defaults change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from vistune.backbones import is_vit, vit_geometry
from vistune.errors import MethodError, NotMergeableError
from vistune.methods.base import VPT_SGD_SEARCH, Method, option

#: How many trailing CNN feature levels are prompted by default (the C2–C5 pyramid).
DEFAULT_CNN_LEVELS = 4
#: Default number of block groups a ViT is split into.
DEFAULT_VIT_GROUPS = 4


@dataclass
class ProTuningOptions:
    stages: tuple[int, ...] = option((), "stage indices to prompt: timm feature_info indices for CNNs, group "
                                          "indices for ViTs; empty = the last four CNN levels / every ViT group")
    reduction: int = option(8, "channel reduction ρ of the block's bottleneck (hidden = max(1, C // ρ))", min=1)
    kernel: int = option(3, "depthwise kernel size (odd, so the feature map keeps its size)", min=1)
    groups: int | None = option(None, "ViTs only: contiguous block groups acting as stages (none = 4)", min=1)

    def validate(self) -> None:
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")
        negative = [s for s in self.stages if s < 0]
        if negative:
            raise ValueError(f"stages must be non-negative indices, got {negative[0]}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages contains a repeated index: {list(self.stages)}")


class PromptBlock(nn.Module):
    """``F → expand(GELU(depthwise(reduce(F))))`` on an NCHW map; zero at initialisation."""

    def __init__(
        self,
        channels: int,
        reduction: int = 8,
        kernel: int = 3,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        hidden = hidden_width(channels, reduction)
        f: dict[str, Any] = dict(device=device, dtype=dtype)
        self.channels = channels
        self.reduce = nn.Conv2d(channels, hidden, 1, **f)
        self.dw = nn.Conv2d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden, **f)
        self.act = nn.GELU()
        self.expand = nn.Conv2d(hidden, channels, 1, **f)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.act(self.dw(self.reduce(x))))


def hidden_width(channels: int, reduction: int) -> int:
    """Bottleneck width of a prompt block: ``max(1, C // ρ)`` (never a zero-width conv)."""
    return max(1, channels // reduction)


# ------------------------------------------------------------------------------------------
# Where the stages are.


class StageRef(NamedTuple):
    """One CNN feature level: its module name in the model, the module, channels, stride."""

    name: str
    module: nn.Module
    channels: int
    reduction: int


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def stage_modules(model: nn.Module) -> list[StageRef]:
    """Every feature level timm declares for a CNN, resolved to its module, in order.

    Reads ``model.feature_info`` (a list of dicts on timm models, a ``FeatureInfo`` on
    ``features_only`` wrappers, whose submodules replace ``.`` by ``_``). Reusable by the dense
    heads: the i-th entry is what timm's ``out_indices=(i,)`` returns.
    """
    info = getattr(model, "feature_info", None)
    if info is None:
        raise MethodError(
            f"{_arch(model)} has no feature_info: protuning needs timm's feature levels to find a "
            "CNN's stages (or a ViT with patch_embed/blocks)"
        )
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    out: list[StageRef] = []
    for entry in entries:
        name = str(entry["module"])
        module = None
        for candidate in (name, name.replace(".", "_")):
            try:
                module = model.get_submodule(candidate)
                break
            except AttributeError:
                continue
        if module is None:
            raise MethodError(f"{_arch(model)}: feature_info module {name!r} is not a submodule")
        out.append(StageRef(name, module, int(entry["num_chs"]), int(entry["reduction"])))
    return out


def default_cnn_stages(n_levels: int) -> tuple[int, ...]:
    """The last ``DEFAULT_CNN_LEVELS`` feature levels (strides 4–32 on timm's ImageNet CNNs)."""
    return tuple(range(max(0, n_levels - DEFAULT_CNN_LEVELS), n_levels))


def vit_groups(depth: int, groups: int) -> list[range]:
    """Split ``depth`` blocks into ``groups`` contiguous groups, sizes differing by at most one."""
    if not 1 <= groups <= depth:
        raise MethodError(f"protuning: groups={groups} must be between 1 and the depth ({depth})")
    base, extra = divmod(depth, groups)
    out, start = [], 0
    for g in range(groups):
        size = base + (1 if g < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def _check_stages(stages: tuple[int, ...], n: int, what: str, model: nn.Module) -> None:
    for s in stages:
        if s >= n:
            raise MethodError(
                f"protuning: stage {s} is out of range: {_arch(model)} has {n} {what} "
                f"(valid stages 0 to {n - 1})"
            )


# ------------------------------------------------------------------------------------------
# Hooks (factories, so each closure binds its own block).


def _cnn_hook(block: PromptBlock, name: str, channels_last: bool) -> Callable:
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            raise MethodError(f"protuning: stage {name!r} did not return a 4-D feature map")
        fmap = out.permute(0, 3, 1, 2) if channels_last else out
        if fmap.shape[1] != block.channels:
            raise MethodError(
                f"protuning: stage {name!r} returned {fmap.shape[1]} channels, feature_info says "
                f"{block.channels}"
            )
        prompt = block(fmap).to(out.dtype)
        if channels_last:
            prompt = prompt.permute(0, 2, 3, 1)
        return out + prompt

    return hook


def _vit_hook(block: PromptBlock, prefix: int, grid: Callable[[], tuple[int, int]]) -> Callable:
    """A forward *pre*-hook: the block receives its input tokens with the patch tokens prompted."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        h, w = grid()
        tokens = args[0]
        patches = tokens[:, prefix:]
        b, n, d = patches.shape
        if n != h * w:
            raise MethodError(
                f"protuning: {n} patch tokens do not fill the {h}x{w} grid (a ViT that adds "
                "tokens after patch_embed is not supported)"
            )
        fmap = patches.transpose(1, 2).reshape(b, d, h, w)
        prompt = block(fmap).flatten(2).transpose(1, 2).to(tokens.dtype)
        return (torch.cat([tokens[:, :prefix], patches + prompt], dim=1), *args[1:])

    return hook


class ProTuning(Method):
    name = "protuning"
    search_space = VPT_SGD_SEARCH
    not_mergeable_reason = "its prompt blocks compute an input-dependent prompt, so no weight change reproduces them"
    Options = ProTuningOptions

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        if hasattr(model, "protuning"):
            raise MethodError(f"{_arch(model)} already has a 'protuning' module (attached twice?)")
        opts: ProTuningOptions = self.options
        ref = next(model.parameters())
        factory: dict[str, Any] = dict(device=ref.device, dtype=ref.dtype)
        blocks = nn.ModuleDict()
        if is_vit(model):
            resolved = self._attach_vit(model, opts, blocks, factory)
        else:
            if opts.groups is not None:
                raise MethodError(
                    f"protuning: groups={opts.groups} applies to ViTs only; {_arch(model)} is a "
                    "CNN whose stages come from feature_info (use stages=...)"
                )
            resolved = self._attach_cnn(model, opts, blocks, factory)
        model.add_module("protuning", blocks)
        self._blocks = blocks
        # Record what was built, not "default": a file then rebuilds the same blocks for good.
        self.options = resolved

    def _attach_cnn(self, model: nn.Module, opts: ProTuningOptions, blocks: nn.ModuleDict,
                    factory: dict[str, Any]) -> ProTuningOptions:
        levels = stage_modules(model)
        stages = opts.stages or default_cnn_stages(len(levels))
        names = ", ".join(lv.name for lv in levels)
        _check_stages(stages, len(levels), f"feature stages ({names})", model)
        channels_last = str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC")
        for s in sorted(stages):
            level = levels[s]
            block = PromptBlock(level.channels, opts.reduction, opts.kernel, **factory)
            blocks[f"stage{s}"] = block
            self.add_hook(level.module.register_forward_hook(_cnn_hook(block, level.name, channels_last)))
        return dataclasses.replace(opts, stages=tuple(sorted(stages)))

    def _attach_vit(self, model: nn.Module, opts: ProTuningOptions, blocks: nn.ModuleDict,
                    factory: dict[str, Any]) -> ProTuningOptions:
        g = vit_geometry(model)
        n_groups = opts.groups or min(DEFAULT_VIT_GROUPS, g["depth"])
        groups = vit_groups(g["depth"], n_groups)
        stages = opts.stages or tuple(range(n_groups))
        _check_stages(stages, n_groups, f"block groups (groups={n_groups})", model)
        grid = self._grid_source(model, (g["grid_h"], g["grid_w"]))
        for s in sorted(stages):
            block = PromptBlock(g["width"], opts.reduction, opts.kernel, **factory)
            blocks[f"group{s}"] = block
            first = model.blocks[groups[s][0]]
            self.add_hook(first.register_forward_pre_hook(_vit_hook(block, g["prefix"], grid)))
        return dataclasses.replace(opts, stages=tuple(sorted(stages)), groups=n_groups)

    def _grid_source(self, model: nn.Module, fixed: tuple[int, int]) -> Callable[[], tuple[int, int]]:
        """The patch grid of the current forward.

        Fixed-size ViTs use ``patch_embed.grid_size``. With ``dynamic_img_size`` timm's patch
        embed returns an NHWC map, so a hook on it records this input's grid for the block hooks
        of the same forward (state on this attachment only).
        """
        if not getattr(model, "dynamic_img_size", False):
            return lambda: fixed
        current = {"grid": fixed}

        def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                current["grid"] = (int(out.shape[1]), int(out.shape[2]))

        self.add_hook(model.patch_embed.register_forward_hook(record))
        return lambda: current["grid"]

    def modules(self) -> list[nn.Module]:
        return [self._blocks]

    def merge(self, model: nn.Module) -> None:
        raise NotMergeableError(
            "method 'protuning' cannot be merged: its prompts are computed from each input's stage "
            "features through a non-linear block (input-dependent), so no fixed change of the "
            "backbone weights reproduces them; keep the prompt blocks attached for inference"
        )
