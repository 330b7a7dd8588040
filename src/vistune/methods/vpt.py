"""VPT: visual prompt tuning (Jia et al., ECCV 2022), on ViTs, Swin and ConvNets.

Three places a prompt can go (``location``), as in the official repository (KMnP/vpt):

* ``prepend`` (transformers). **ViT**: prompts are inserted between the prefix tokens (CLS,
  registers) and the patch tokens, after the position embedding, and never receive one. Deep
  prompts *replace* the prompt slots before every block i >= 1. Prompts are stripped after the
  last block, so timm's own final norm, pooling and head run unchanged. **Swin v1**: see
  :func:`_swin_hooks` — prompts are attended inside every local window and never enter the
  (B, H, W, C) maps, so the pooled feature is computed from patch tokens only.
* ``pad`` (ConvNets): a learnable frame of p pixels around the image (``src/models/resnet.py``).
* ``below`` (any backbone with a stem convolution): p extra input channels of learnable maps,
  read by new stem weights beside the frozen original ones.

We attach through hooks on timm's existing modules instead of wrapping or copying them: the
backbone's module tree and state-dict keys stay exactly timm's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from vistune.anatomy import Anatomy, try_describe
from vistune.backbones import backbone_info, is_vit, vit_geometry
from vistune.errors import MethodError
from vistune.methods.base import VPT_SGD_SEARCH, Method, Routing, option

LOCATIONS = ("prepend", "pad", "below")


@dataclass
class VPTOptions:
    length: int = option(50, "prompt tokens per layer (VPT's p: 1-200 in the paper's grid); location=pad: "
                             "frame width in pixels; location=below: extra input channels", min=1)
    deep: bool = option(False, "new prompts at every block's input (deep) or only before the first (shallow)")
    dropout: float = option(0.0, "dropout on the prompt tokens (VPT uses 0.1 on some tasks)", min=0.0, below=1.0)
    location: str = option("prepend", "prepend: prompt tokens (ViT, Swin); pad: a learnable pixel frame around "
                                      "the image (ConvNets); below: extra input channels through a widened stem "
                                      "(any backbone)", choices=LOCATIONS)

    def validate(self) -> None:
        if self.location != "prepend" and self.deep:
            raise ValueError(f"deep=true needs location=prepend (deep prompts are tokens before every block); "
                             f"location={self.location} prompts the input once")
        if self.location != "prepend" and self.dropout:
            raise ValueError(f"dropout applies to prompt tokens (location=prepend); location={self.location} "
                             "has none, as in VPT's repository")


def _uniform(shape: tuple[int, ...], low: float, high: float) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    nn.init.uniform_(p, low, high)
    return p


class VPTPrompts(nn.Module):
    """The prompt tensors: (1, p, D) shallow, plus (depth-1, p, D) deep."""

    def __init__(self, length: int, width: int, depth: int, patch: int, deep: bool, dropout: float):
        super().__init__()
        bound = math.sqrt(6.0 / float(3 * patch * patch + width))
        self.shallow = nn.Parameter(torch.empty(1, length, width))
        nn.init.uniform_(self.shallow, -bound, bound)
        if deep and depth > 1:
            self.deep = nn.Parameter(torch.empty(depth - 1, length, width))
            nn.init.uniform_(self.deep, -bound, bound)
        else:
            self.deep = None
        self.dropout = nn.Dropout(dropout)
        self.length = length


class SwinPrompts(nn.Module):
    """Swin's prompts: ``shallow`` (1, p, C0); deep adds ``deep.<s>`` (n_s, p, C_s) per stage.

    n_0 = depth_0 - 1 (the first block reads the shallow prompts), n_s = depth_s for s >= 1: the
    official ``deep_prompt_embeddings_{0..3}``. All use VPT's bound sqrt(6 / (3·patch² + C0)).
    """

    def __init__(self, length: int, widths: list[int], depths: list[int], patch: int, deep: bool,
                 dropout: float):
        super().__init__()
        bound = math.sqrt(6.0 / float(3 * patch * patch + widths[0]))
        self.shallow = _uniform((1, length, widths[0]), -bound, bound)
        self.deep: nn.ParameterDict | None = None
        if deep:
            self.deep = nn.ParameterDict()
            for s, (w, d) in enumerate(zip(widths, depths)):
                n = d - 1 if s == 0 else d
                if n > 0:
                    self.deep[str(s)] = _uniform((n, length, w), -bound, bound)
        self.dropout = nn.Dropout(dropout)
        self.length = length


class PadPrompts(nn.Module):
    """A frame of p learnable pixels around an S×S image: ``tb`` (1, 3, 2p, S+2p) holds the top and
    bottom strips, ``lr`` (1, 3, S, 2p) the left and right ones (VPT's ``prompt_embeddings_tb/lr``).

    Initialised uniform(0, 1) in pixel space and normalised with the backbone's mean/std at every
    forward, as VPT's repository does, so the frame starts as a plausible image border.
    """

    def __init__(self, length: int, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.length, self.size = length, size
        self.mean, self.std = tuple(mean), tuple(std)
        self.tb = _uniform((1, 3, 2 * length, size + 2 * length), 0.0, 1.0)
        self.lr = _uniform((1, 3, size, 2 * length), 0.0, 1.0)

    def normed(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=t.device, dtype=t.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=t.device, dtype=t.dtype).view(1, -1, 1, 1)
        return ((t - mean) / std).to(like.dtype)

    def frame(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, 3, S, S) inside its frame: (B, 3, S+2p, S+2p)."""
        b, p = x.shape[0], self.length
        lr, tb = self.normed(self.lr, x), self.normed(self.tb, x)
        x = torch.cat([lr[..., :p].expand(b, -1, -1, -1), x, lr[..., p:].expand(b, -1, -1, -1)], dim=-1)
        return torch.cat([tb[:, :, :p].expand(b, -1, -1, -1), x, tb[:, :, p:].expand(b, -1, -1, -1)], dim=-2)


class BelowPrompts(nn.Module):
    """c extra input channels: ``maps`` (1, c, S, S) and the stem's new input-channel weights
    ``weight`` (out, c, kh, kw).

    As in VPT's ``resnet.py``: the maps start uniform(0, 1) and are normalised with the mean of the
    backbone's per-channel mean and std; the new weights are what xavier-uniform gives the widened
    (in + c)-channel stem, uniform(±sqrt(6 / ((in + c)·kh·kw + out·kh·kw))). Unlike VPT, which
    re-creates and trains the whole first convolution, the original stem weights stay frozen.
    """

    def __init__(self, length: int, size: int, stem: nn.Conv2d, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        kh, kw = stem.kernel_size
        out, cin = stem.out_channels, stem.in_channels
        bound = math.sqrt(6.0 / float((cin + length) * kh * kw + out * kh * kw))
        self.length, self.size = length, size
        self.mean, self.std = sum(mean) / len(mean), sum(std) / len(std)
        self.maps = _uniform((1, length, size, size), 0.0, 1.0)
        self.weight = _uniform((out, length, kh, kw), -bound, bound)


class VPT(Method):
    name = "vpt"
    search_space = VPT_SGD_SEARCH
    not_mergeable_reason = "its prompt tokens are extra inputs to the blocks, not weights of the architecture"
    Options = VPTOptions

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self._overrides: list[nn.Module] = []  # attention modules whose _get_rel_pos_bias we wrapped
        self._routing = Routing()

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        opts: VPTOptions = self.options
        arch = backbone_info(model).arch
        if opts.location == "prepend":
            if is_vit(model):
                if getattr(model, "rope", None) is not None:
                    raise MethodError(
                        f"vpt: {arch} applies rotary position embeddings (rope) to every token by its patch "
                        "position and prompt tokens have none; use lora, adapter or protuning, or vpt -o "
                        "location=below"
                    )
                self._attach_vit(model)
                return
            anat = try_describe(model)
            if anat is None or anat.layout != "windows":
                family = f" ({anat.family})" if anat is not None else ""
                raise MethodError(
                    f"vpt location=prepend needs prompt tokens: a timm VisionTransformer or Swin; {arch}{family} "
                    "has feature maps (no patch_embed/blocks/num_prefix_tokens): use -o location=pad or location=below"
                )
            self._attach_swin(model, anat)
            return
        anat = try_describe(model)  # the stem is the anatomy's first convolution on the image
        if anat is None or anat.stem is None:
            raise MethodError(f"vpt location={opts.location}: {arch} has no stem convolution on the image")
        stem = anat.stem
        if opts.location == "pad":
            if anat.layout != "maps":
                raise MethodError(
                    f"vpt location=pad feeds (S+2p)-pixel images, but {arch} is built for a fixed S (its position "
                    "embedding or windows): use location=prepend or location=below"
                )
            self._attach_pad(model, stem)
        else:
            self._attach_below(model, stem)

    # -- ViT ----------------------------------------------------------------------------
    def _attach_vit(self, model: nn.Module) -> None:
        g = vit_geometry(model)
        opts: VPTOptions = self.options
        p = opts.length
        prompts = VPTPrompts(p, g["width"], g["depth"], g["patch"], opts.deep, opts.dropout)
        self._add(model, prompts)
        prefix = g["prefix"]
        blocks = list(model.blocks)

        def insert(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            tokens = prompts.dropout(prompts.shallow.expand(x.shape[0], -1, -1)).to(x.dtype)
            return (torch.cat([x[:, :prefix], tokens, x[:, prefix:]], dim=1), *args[1:])

        def make_replace(i: int):
            def replace(module: nn.Module, args: tuple) -> tuple:
                x = args[0]
                tokens = prompts.dropout(prompts.deep[i - 1].expand(x.shape[0], -1, -1)).to(x.dtype)
                return (torch.cat([x[:, :prefix], tokens, x[:, prefix + p:]], dim=1), *args[1:])

            return replace

        def strip(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return torch.cat([out[:, :prefix], out[:, prefix + p:]], dim=1)

        self.add_hook(blocks[0].register_forward_pre_hook(insert))
        if prompts.deep is not None:
            for i in range(1, len(blocks)):
                self.add_hook(blocks[i].register_forward_pre_hook(make_replace(i)))
        self.add_hook(blocks[-1].register_forward_hook(strip))
        def kv_prompts() -> list[tuple[nn.Module, torch.Tensor]]:
            return [(blocks[0], prompts.shallow[0]), *((blocks[i], prompts.deep[i - 1]) for i in range(1, len(blocks)))]

        # prompts first, patches after: padding may trail; deep prompts are constants at every block,
        # replaced before their outputs are read, so they may be served as keys/values
        self._routing = Routing(tokens=p, tokenwise=True,
                                kv_prompts=kv_prompts if prompts.deep is not None else None)

    # -- Swin ---------------------------------------------------------------------------
    def _attach_swin(self, model: nn.Module, anat: Anatomy) -> None:
        for b in anat.blocks:
            if not callable(getattr(type(b.attn), "_get_rel_pos_bias", None)):
                raise MethodError(
                    f"vpt: {anat.arch}'s window attention ({type(b.attn).__name__}, Swin V2) computes its "
                    "relative-position bias inline, so prompt rows cannot get a zero bias without copying "
                    "timm's code; use lora, adapter or protuning (or vpt -o location=below)"
                )
        opts: VPTOptions = self.options
        widths = [s.width for s in anat.stages]
        depths = [len(s.blocks) for s in anat.stages]
        prompts = SwinPrompts(opts.length, widths, depths, int(anat.stem.kernel_size[0]), opts.deep, opts.dropout)
        self._add(model, prompts)
        _swin_hooks(self, anat, prompts)
        self._routing = Routing(own_pass=True)

    # -- ConvNets -----------------------------------------------------------------------
    def _attach_pad(self, model: nn.Module, stem: nn.Conv2d) -> None:
        info = backbone_info(model)
        if stem.in_channels != len(info.mean):
            raise MethodError(f"vpt location=pad: the stem of {info.arch} reads {stem.in_channels} channels, "
                              f"its normalisation has {len(info.mean)}")
        prompts = PadPrompts(self.options.length, info.img_size, info.mean, info.std)
        self._add(model, prompts)

        def pad(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            _check_size(x, prompts.size, "pad", "its frame")
            return (prompts.frame(x), *args[1:])

        # On the stem rather than the root module: callers that run forward_features() (the
        # server, dense features) reach the stem too; nothing precedes it in timm's CNNs.
        self.add_hook(stem.register_forward_pre_hook(pad))
        self._routing = Routing(own_pass=True)

    def _attach_below(self, model: nn.Module, stem: nn.Conv2d) -> None:
        info = backbone_info(model)
        if type(stem) is not nn.Conv2d or stem.groups != 1:
            raise MethodError(f"vpt location=below widens a plain nn.Conv2d stem; {info.arch}'s stem is "
                              f"{type(stem).__name__} (groups={stem.groups}): use location=pad")
        prompts = BelowPrompts(self.options.length, info.img_size, stem, info.mean, info.std)
        self._add(model, prompts)

        def below(module: nn.Conv2d, args: tuple, out: torch.Tensor) -> torch.Tensor:
            _check_size(args[0], prompts.size, "below", "its prompt maps")
            maps = ((prompts.maps - prompts.mean) / prompts.std).to(out.dtype)
            # conv([x; m], [W; W_extra]) = conv(x, W) + conv(m, W_extra): the stem's own output plus
            # the new channels' contribution, the same for every row (a (1, out, h, w) broadcast).
            return out + module._conv_forward(maps, prompts.weight.to(out.dtype), None)

        self.add_hook(stem.register_forward_hook(below))

    # -- shared -------------------------------------------------------------------------
    def _add(self, model: nn.Module, prompts: nn.Module) -> None:
        prompts.to(next(model.parameters()).device)
        model.add_module("vpt", prompts)
        self._prompts = prompts

    def modules(self) -> list[nn.Module]:
        return [self._prompts]

    def remove_hooks(self) -> None:
        """Remove the hooks and the ``_get_rel_pos_bias`` overrides: the class method is back."""
        super().remove_hooks()
        for attn in self._overrides:
            attn.__dict__.pop("_get_rel_pos_bias", None)
        self._overrides.clear()

    def routing(self) -> Routing:
        """ViT: the prompts lengthen the sequence from the first block to the last one. Swin: its
        hooks run inside window attention, whose batch is B·nW, and pad changes the input size:
        both run in a pass of their own. below: a row-wise stem hook, shares the backbone pass."""
        return self._routing


def _check_size(x: torch.Tensor, size: int, location: str, what: str) -> None:
    if tuple(x.shape[-2:]) != (size, size):
        raise MethodError(
            f"vpt location={location} was built for {size}x{size} images ({what} has that size); got "
            f"{x.shape[-2]}x{x.shape[-1]}: resize inputs to {size}"
        )


def _swin_hooks(method: VPT, anat: Anatomy, prompts: SwinPrompts) -> None:
    """Prompts inside Swin v1's window attention, with the semantics of VPT's
    ``src/models/vit_prompt/swin_transformer.py``.

    Each image carries p prompt tokens beside its (B, H, W, C) map. Every block applies ``norm1``
    to them and prepends them to *every* window of that image; window attention runs with the
    relative-position bias and the shift mask padded with zeros for the prompt rows and columns;
    the prompts' attention outputs are averaged over the image's windows, then the residual
    (``drop_path1``) and the block's MLP with ``norm2`` (``drop_path2``) update them like any token.
    Deep: each block's prompt input is a new parameter at its stage's width (the first block of
    stage 0 reads the shallow prompts). Shallow: the prompts are carried from block to block and
    through each stage's patch merging, where VPT concatenates four copies of a prompt along the
    channels before norm + reduction: we call timm's own ``downsample`` on a (B·p, 2, 2, C) tensor
    holding the prompt in all four positions. Prompts never enter the maps, so the final norm and
    pooling see patch tokens only. Where a block's prompt outputs are never read (deep mode, where
    the next block reads new prompts, and after the last block) their residual + MLP is skipped.

    Windows are batch-major in timm (window index = b·nW + w), so prompts are expanded as
    ``repeat_interleave(nW, 0)`` would and averaged over ``view(B, nW, ...)``. The official repository
    expands window-major (``expand(nW, ...)``), which in shallow mode hands image b's prompts to
    other images' windows when B > 1; we keep rows independent (a multi-task server, and any
    batch-size-invariant evaluation, need each row to be a function of itself only).

    All hooks share one per-forward ``state`` in a :class:`_SwinContext` (no global state, so two tuned
    models in one process are independent); the padded bias is an instance attribute wrapping
    the attention's own ``_get_rel_pos_bias``, removed again by :meth:`VPT.remove_hooks`.
    """
    ctx = _SwinContext(prompts=prompts, anat=anat, p=prompts.length, last=anat.blocks[-1].index)
    attn_pre, attn_post = _swin_attn_hooks(ctx)
    for b in anat.blocks:
        j = b.index - anat.stages[b.stage].blocks.start
        method.add_hook(b.module.register_forward_pre_hook(_swin_block_pre(ctx, b.index, b.stage, j)))
        method.add_hook(b.attn.register_forward_pre_hook(attn_pre, with_kwargs=True))
        method.add_hook(b.attn.register_forward_hook(attn_post))
        method.add_hook(b.module.register_forward_hook(_swin_block_post(ctx, b.index)))
        b.attn._get_rel_pos_bias = _swin_padded_bias(ctx, b.attn)
        method._overrides.append(b.attn)


@dataclass
class _SwinContext:
    """What every Swin prompt hook of one model shares: the prompts, the layout and the
    per-forward ``state`` (one per model, so two tuned models in a process stay independent)."""

    prompts: SwinPrompts
    anat: Anatomy
    p: int  # prompt tokens per image
    last: int  # index of the last block: its prompt outputs are never read
    state: dict[str, torch.Tensor | int] = field(default_factory=dict)


def _swin_prompt_input(ctx: _SwinContext, index: int, stage: int, j: int, x: torch.Tensor) -> torch.Tensor:
    """The prompts block ``index`` reads: shallow at block 0, a deep parameter, or the previous
    block's carried prompts (merged like a patch at a stage's first block)."""
    prompts, p = ctx.prompts, ctx.p
    b = x.shape[0]
    if index == 0:
        return prompts.dropout(prompts.shallow.expand(b, -1, -1)).to(x.dtype)
    if prompts.deep is not None:
        return prompts.dropout(prompts.deep[str(stage)][j - 1 if stage == 0 else j].expand(b, -1, -1)).to(x.dtype)
    carry = ctx.state.get("carry")
    if not isinstance(carry, torch.Tensor) or carry.shape[0] != b:
        raise MethodError("vpt on Swin: a block ran without the previous block's prompts (run the whole "
                          "model, not a block on its own)")
    down = ctx.anat.stages[stage].downsample
    if j == 0 and down is not None:
        n, _, c = carry.shape
        merged = down(carry.reshape(n * p, 1, 1, c).expand(n * p, 2, 2, c))
        carry = merged.reshape(n, p, -1)
    return carry


def _swin_block_pre(ctx: _SwinContext, index: int, stage: int, j: int):
    """Block pre-hook: the block's prompt input and its ``norm1`` (what its windows get)."""
    state = ctx.state

    def block_pre(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if index == 0:
            state.clear()  # a new forward: nothing of an earlier (perhaps interrupted) one is read
        state["in"] = _swin_prompt_input(ctx, index, stage, j, x)
        state["normed"] = module.norm1(state["in"])

    return block_pre


def _swin_attn_hooks(ctx: _SwinContext):
    """Window-attention pre/post hooks: prepend each image's prompts to its windows (with a
    padded mask), then average the prompts' outputs over the windows and strip them."""
    state, p = ctx.state, ctx.p

    def attn_pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        windows, normed = args[0], state["normed"]
        b = normed.shape[0]
        if not torch.jit.is_tracing() and windows.shape[0] % b:
            raise MethodError(f"vpt on Swin: {windows.shape[0]} windows do not split over {b} images")
        nw = windows.shape[0] // b
        mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
        if mask is not None:
            mask = F.pad(mask, (p, 0, p, 0))  # prompts come first: zero rows and columns
        state["pad_bias"] = p
        # batch-major: image i's prompts for windows i·nW .. i·nW+nW-1 (= repeat_interleave(nW, 0),
        # written as expand + reshape so that an ONNX trace keeps nW symbolic)
        mine = normed.to(windows.dtype).unsqueeze(1).expand(-1, nw, -1, -1).reshape(-1, p, normed.shape[-1])
        windows = torch.cat([mine, windows], dim=1)
        return (windows,), {**kwargs, "mask": mask}

    def attn_post(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        state["pad_bias"] = 0
        b = state["normed"].shape[0]
        state["attn"] = out[:, :p].reshape(b, -1, p, out.shape[-1]).mean(1)
        return out[:, p:]

    return attn_pre, attn_post


def _swin_block_post(ctx: _SwinContext, index: int):
    """Block post-hook: residual + MLP update of the prompts, carried to the next block (shallow
    mode only; skipped where nothing reads them)."""
    state = ctx.state

    def block_post(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        h, a = state.pop("in"), state.pop("attn")
        state.pop("normed")
        if ctx.prompts.deep is not None or index == ctx.last:
            state.clear()  # the next block reads new prompts, or none: free the graph
            return
        h = h + module.drop_path1(a)
        state["carry"] = h + module.drop_path2(module.mlp(module.norm2(h)))

    return block_post


def _swin_padded_bias(ctx: _SwinContext, attn: nn.Module):
    """The attention's relative-position bias, zero-padded for the prompt rows and columns while
    its prompts are in the windows."""
    original = attn._get_rel_pos_bias  # the class's method, bound to this module

    def padded_rel_pos_bias() -> torch.Tensor:
        bias = original()
        pad = ctx.state.get("pad_bias", 0)
        return F.pad(bias, (pad, 0, pad, 0)) if pad else bias

    return padded_rel_pos_bias
