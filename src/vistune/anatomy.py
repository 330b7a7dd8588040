"""What a backbone is made of, described once per family, for every method to read.

Methods must find their places by what modules *are* (an attention's fused q/k/v Linear, an MLP's
first Linear, a pointwise convolution), not by one family's attribute names; otherwise every new
backbone family means edits across methods. :func:`describe` returns an :class:`Anatomy`: the
stages, the blocks in model order, each block's weight-bearing sites by *role*, the token layout
and the stem. Adding a family is one :class:`Family` entry in :data:`FAMILIES`.

Roles mean the same across families:

* ``q``, ``k``, ``v``, ``proj`` — attention matrices (``q/k/v`` are row slices of a fused ``qkv``
  Linear where timm fuses them: ViT, DeiT, DINOv2, EVA, Swin);
* ``fc1``, ``fc2`` — the two matrices of a transformer MLP, or of ConvNeXt's inverted bottleneck;
* ``pw`` (1×1 convolutions), ``conv`` (k×k convolutions over all channels) and ``dw``
  (depthwise k×k) — the convolutions of residual CNN blocks.

Groups name several roles at once: ``attn`` = q,k,v,proj; ``mlp`` = fc1,fc2; ``convs`` = pw,conv.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from vistune.backbones import BackboneError, is_vit, vit_block_linears

ATTN_ROLES = ("q", "k", "v", "proj")
MLP_ROLES = ("fc1", "fc2")
CONV_ROLES = ("pw", "conv", "dw")
#: Every role, in the order tables print them.
ROLES = ATTN_ROLES + MLP_ROLES + CONV_ROLES
#: Names that stand for several roles.
GROUPS: dict[str, tuple[str, ...]] = {"attn": ATTN_ROLES, "mlp": MLP_ROLES, "convs": ("pw", "conv")}


@dataclass(frozen=True, eq=False)
class Site:
    """One weight a method can target: its module (a Linear or a Conv2d) and its output rows."""

    role: str
    module: nn.Module
    rows: slice
    name: str  # dotted path of ``module`` in the model


@dataclass(frozen=True, eq=False)
class Block:
    """One residual block: where adapters sit beside (``mlp``) or parallel to (the whole block)."""

    index: int  # over all stages, in model order
    stage: int
    name: str
    module: nn.Module
    in_width: int  # channels (or token width) entering the block
    out_width: int
    stride: int  # spatial reduction inside the block (1 for transformers)
    sites: tuple[Site, ...]
    mlp: nn.Module | None = None  # a transformer-style MLP (input width = in_width)
    attn: nn.Module | None = None


@dataclass(frozen=True, eq=False)
class Stage:
    index: int
    name: str
    module: nn.Module
    width: int
    blocks: range  # indices into Anatomy.blocks
    downsample: nn.Module | None = None  # runs at the stage's start (Swin's patch merging)


@dataclass(frozen=True, eq=False)
class Anatomy:
    """A backbone's description (see the module docstring)."""

    family: str
    #: "tokens": one sequence of prefix + patch tokens (ViT); "windows": (B, H, W, C) maps attended
    #: inside local windows (Swin); "maps": convolutional feature maps (NCHW, or NHWC inside
    #: ConvNeXt's MLP).
    layout: str
    blocks: tuple[Block, ...]
    stages: tuple[Stage, ...]
    stem: nn.Conv2d | None  # the first convolution on the image (patch embedding for transformers)
    arch: str = ""
    #: the roles a low-rank update targets when the user names none (the family's :class:`Family`)
    default_roles: tuple[str, ...] = ()

    def roles(self) -> list[str]:
        """The roles this backbone offers, in :data:`ROLES` order."""
        present = {s.role for b in self.blocks for s in b.sites}
        return [r for r in ROLES if r in present]

    def expand(self, names: Iterable[str]) -> list[str]:
        """Role names with groups expanded, order kept, duplicates dropped; unknown names refused."""
        out: list[str] = []
        for name in names:
            if name in GROUPS:
                wanted = [r for r in GROUPS[name] if r in self.roles()]
            elif name in ROLES:
                wanted = [name]
            else:
                raise BackboneError(
                    f"{self.arch}: {name!r} is not a role; roles offered: {self.offer()}"
                )
            out.extend(r for r in wanted if r not in out)
        return out

    def offer(self) -> str:
        groups = [g for g, members in GROUPS.items() if any(r in self.roles() for r in members)]
        return ", ".join(self.roles() + groups)

    def sites(self, roles: Sequence[str]) -> list[Site]:
        """Every site of the given roles (groups allowed), in model order.

        A role this backbone does not have is refused with the roles it does have, so that
        ``targets=q,v`` on a ResNet never silently tunes nothing.
        """
        wanted = self.expand(roles)
        missing = [r for r in wanted if r not in self.roles()]
        if missing or not wanted:
            raise BackboneError(
                f"{self.arch} ({self.family}) has no {','.join(missing or list(roles))} sites; roles offered: "
                f"{self.offer()}"
            )
        return [s for b in self.blocks for s in b.sites if s.role in wanted]

    def block_of(self) -> dict[int, int]:
        """id(module) → index of the block holding it, for every module inside a block."""
        out: dict[int, int] = {}
        for b in self.blocks:
            for m in b.module.modules():
                out[id(m)] = b.index
        return out


# ---------------------------------------------------------------------------------------------
# Families


@dataclass(frozen=True)
class Family:
    name: str
    detect: Callable[[nn.Module], bool]
    stages: Callable[[nn.Module], list[tuple[str, nn.Module, list[tuple[str, nn.Module]], nn.Module | None]]]
    layout: str
    stem: Callable[[nn.Module], nn.Module | None]
    #: (a block, {id(module): name}) → (its sites, the MLP an adapter sits beside or None)
    sites: Callable[[nn.Module, dict[int, str]], tuple[tuple[Site, ...], nn.Module | None]]
    #: roles (or groups) a low-rank update targets by default: the paper's q,v on transformers,
    #: the pointwise MLP on ConvNeXt, every full convolution on ResNets (a BasicBlock has no 1×1),
    #: the pointwise convs on EfficientNets
    default_roles: tuple[str, ...] = ()


def conv_role(conv: nn.Conv2d) -> str:
    """``pw`` for 1×1, ``dw`` for depthwise, ``conv`` for any other k×k convolution."""
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "dw"
    if tuple(conv.kernel_size) == (1, 1):
        return "pw"
    return "conv"


def _transformer_sites(block: nn.Module, names: dict[int, str]) -> tuple[tuple[Site, ...], nn.Module | None]:
    sites = []
    for role, (lin, rows) in vit_block_linears(block).items():
        sites.append(Site(role, lin, rows, names[id(lin)]))
    # ConvNeXt with conv_mlp=True holds its MLP as 1x1 convolutions.
    mlp = getattr(block, "mlp", None)
    for role in MLP_ROLES:
        conv = getattr(mlp, role, None)
        if isinstance(conv, nn.Conv2d):
            sites.append(Site(role, conv, slice(0, conv.out_channels), names[id(conv)]))
    return tuple(sorted(sites, key=lambda s: ROLES.index(s.role))), mlp


def _convnext_sites(block: nn.Module, names: dict[int, str]) -> tuple[tuple[Site, ...], nn.Module | None]:
    """ConvNeXt: the depthwise 7×7, then the inverted-bottleneck MLP (fc1, fc2)."""
    sites, mlp = _transformer_sites(block, names)
    dw = getattr(block, "conv_dw", None)
    if type(dw) is nn.Conv2d:
        sites = (Site(conv_role(dw), dw, slice(0, dw.out_channels), names[id(dw)]), *sites)
    return sites, mlp


#: Direct children of CNN blocks that hold the block's own convolutions (squeeze-excite and
#: shortcut convolutions are not sites: they are not on the block's main path).
_CNN_CONV_ATTRS = ("conv_dw", "conv1", "conv_pw", "conv2", "conv3", "conv_pwl", "conv", "conv_exp",
                   "conv1_1x1", "conv2_kxk", "conv3_1x1", "dw_start", "pw_exp", "dw_mid", "pw_proj", "dw_end")


def plain_conv(module: nn.Module | None) -> bool:
    """A convolution that computes conv(x, W) with W as stored: nn.Conv2d, or timm's Conv2dSame
    (TF ports: the same product after a dynamic 'same' pad). Weight-standardised or conditional
    convolutions transform W first, so an update added to W would not act as stated."""
    if type(module) is nn.Conv2d:
        return True
    from timm.layers import Conv2dSame

    return type(module) is Conv2dSame


def _conv_of(child: nn.Module | None) -> nn.Conv2d | None:
    if plain_conv(child):
        return child
    inner = getattr(child, "conv", None)  # timm's ConvNormAct wraps its Conv2d
    return inner if plain_conv(inner) else None


def _cnn_sites(block: nn.Module, names: dict[int, str]) -> tuple[tuple[Site, ...], nn.Module | None]:
    sites = []
    for attr, child in block.named_children():  # registration order = forward order in timm
        conv = _conv_of(child) if attr in _CNN_CONV_ATTRS else None
        if conv is not None:
            sites.append(Site(conv_role(conv), conv, slice(0, conv.out_channels), names[id(conv)]))
    return tuple(sites), None


def _vit_stages(model: nn.Module):
    return [("blocks", model.blocks, [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], None)]


def _staged(attr: str, inner: str | None):
    """Stages at ``model.<attr>[i]``, their blocks at ``stage.<inner>`` (or the stage itself)."""

    def stages(model: nn.Module):
        out = []
        for i, stage in enumerate(getattr(model, attr)):
            holder = getattr(stage, inner) if inner else stage
            blocks = [(f"{attr}.{i}.{inner + '.' if inner else ''}{j}", b) for j, b in enumerate(holder)]
            down = getattr(stage, "downsample", None)
            out.append((f"{attr}.{i}", stage, blocks, None if isinstance(down, nn.Identity) else down))
        return out

    return stages


def _resnet_stages(model: nn.Module):
    out = []
    for i in range(1, 5):
        layer = getattr(model, f"layer{i}", None)
        if layer is None:
            break
        out.append((f"layer{i}", layer, [(f"layer{i}.{j}", b) for j, b in enumerate(layer)], None))
    return out


def _first_block(model: nn.Module, stages_fn) -> nn.Module | None:
    try:
        stages = stages_fn(model)
        return stages[0][2][0][1]
    except (AttributeError, IndexError, TypeError):
        return None


def _is_swin(model: nn.Module) -> bool:
    block = _first_block(model, _staged("layers", "blocks")) if hasattr(model, "layers") else None
    return block is not None and hasattr(getattr(block, "attn", None), "window_size")


def _is_convnext(model: nn.Module) -> bool:
    block = _first_block(model, _staged("stages", "blocks")) if hasattr(model, "stages") else None
    return block is not None and hasattr(block, "conv_dw") and hasattr(block, "mlp")


def _is_resnet(model: nn.Module) -> bool:
    layer1 = getattr(model, "layer1", None)
    return isinstance(layer1, nn.Sequential) and bool(
        _cnn_sites(layer1[0], {id(m): n for n, m in layer1[0].named_modules()})[0])


def _is_efficientnet(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return (hasattr(model, "conv_stem") and isinstance(blocks, nn.Sequential) and len(blocks) > 0
            and isinstance(blocks[0], nn.Sequential))


def _patch_stem(model: nn.Module) -> nn.Module | None:
    return getattr(getattr(model, "patch_embed", None), "proj", None)


def _first_conv(*paths: str):
    """The first of ``paths`` that exists; a deep stem (``conv1 = Sequential(conv, bn, ...)``)
    gives its first Conv2d."""

    def stem(model: nn.Module) -> nn.Module | None:
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue
            # any Conv2d, timm's Conv2dSame ("same" padding of TF ports) included
            return next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        return None

    return stem


#: One entry per family, tried in order; the first whose ``detect`` accepts a model describes it.
FAMILIES: list[Family] = [
    Family("vit", is_vit, _vit_stages, "tokens", _patch_stem, _transformer_sites, ("q", "v")),
    Family("swin", _is_swin, _staged("layers", "blocks"), "windows", _patch_stem, _transformer_sites, ("q", "v")),
    Family("convnext", _is_convnext, _staged("stages", "blocks"), "maps", _first_conv("stem.0"), _convnext_sites, ("mlp",)),
    Family("resnet", _is_resnet, _resnet_stages, "maps", _first_conv("conv1"), _cnn_sites, ("convs",)),
    Family("efficientnet", _is_efficientnet, _staged("blocks", None), "maps", _first_conv("conv_stem"),
           _cnn_sites, ("pw",)),
]


def _widths(block: nn.Module, sites: tuple[Site, ...], mlp: nn.Module | None) -> tuple[int, int, int]:
    convs = [s.module for s in sites if isinstance(s.module, nn.Conv2d) and s.role in CONV_ROLES]
    if convs and mlp is None:
        stride = 1
        for c in convs:
            stride *= int(c.stride[0])
        return int(convs[0].in_channels), int(convs[-1].out_channels), stride
    fc1 = getattr(mlp, "fc1", None)
    width = int(fc1.in_features if isinstance(fc1, nn.Linear) else fc1.in_channels) if fc1 is not None else 0
    stride = 1
    dw = getattr(block, "conv_dw", None)
    if isinstance(dw, nn.Conv2d):
        stride = int(dw.stride[0])
    return width, width, stride


def describe(model: nn.Module) -> Anatomy:
    """The :class:`Anatomy` of ``model``, or one line naming what it is and what is supported."""
    arch = getattr(getattr(model, "vistune_info", None), "arch", None) or type(model).__name__
    family = next((f for f in FAMILIES if f.detect(model)), None)
    if family is None:
        raise BackboneError(
            f"{arch}: no backbone family describes {type(model).__name__} (known: "
            f"{', '.join(f.name for f in FAMILIES)}); use linear, full, bitfit, spt or protuning"
        )
    names = {id(m): n for n, m in model.named_modules()}
    blocks: list[Block] = []
    stages: list[Stage] = []
    for si, (sname, smod, sblocks, down) in enumerate(family.stages(model)):
        start = len(blocks)
        for bname, bmod in sblocks:
            sites, mlp = family.sites(bmod, names)
            in_w, out_w, stride = _widths(bmod, sites, mlp)
            attn = getattr(bmod, "attn", None)
            blocks.append(Block(len(blocks), si, bname, bmod, in_w, out_w, stride, sites, mlp,
                                attn if any(s.role in ATTN_ROLES for s in sites) else None))
        if len(blocks) == start:
            continue
        stages.append(Stage(len(stages), sname, smod, blocks[-1].out_width, range(start, len(blocks)), down))
    stem = family.stem(model)
    return Anatomy(family.name, family.layout, tuple(blocks), tuple(stages),
                   stem if isinstance(stem, nn.Conv2d) else None, arch, family.default_roles)


def try_describe(model: nn.Module) -> Anatomy | None:
    """:func:`describe`, or None for a model no family covers."""
    try:
        return describe(model)
    except BackboneError:
        return None
