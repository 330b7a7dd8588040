"""Adapter: a bottleneck Down → GELU → Up beside the MLP of every transformer block.

``position=sequential`` is Pfeiffer's placement (as in the VPT repo's adapter baseline): the
adapter reads the MLP's output and adds its result to it, before the block's residual.
``position=parallel`` is AdaptFormer's: the adapter reads the MLP's *input* and its output,
times ``scale``, is added to the MLP's output.

The up-projection is zero-initialised, so a freshly attached model computes exactly what the
backbone did. The down-projection gets a non-zero (Kaiming-uniform) init: with both zero (the
VPT repo's choice) the first gradients of the down-projection are zero as well and training
starts from a dead bottleneck. Adapters sit behind a non-linearity, so they are not mergeable.

Any block with a transformer-style MLP takes it (ViT, Swin, ConvNeXt: read from
:mod:`vistune.anatomy`). Residual CNNs without one (ResNet, EfficientNet, MobileNet) get
Rebuffi et al.'s (2017) *parallel residual adapter* instead: 1×1 conv down (with the block's
stride) → act → 1×1 conv up to the block's output channels, zero-initialised, its output added to
the block's — so the block's own computation is untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vistune.anatomy import Block, describe
from vistune.backbones import BackboneError
from vistune.errors import MethodError
from vistune.methods.base import Method, option


@dataclass
class AdapterOptions:
    bottleneck: int = option(8, "hidden width of the Down -> GELU -> Up bottleneck", min=1)
    position: str = option("sequential", "after the MLP (Pfeiffer) or beside it (AdaptFormer)",
                           choices=("sequential", "parallel"))
    scale: float = option(1.0, "multiplies the parallel branch (AdaptFormer uses 0.1)")


class Bottleneck(nn.Module):
    """x → up(GELU(down(x))), zero at initialisation; Linear layers on the last dimension.

    :meth:`conv` builds the same bottleneck from 1×1 convolutions (NCHW maps: ConvNeXt's conv
    MLP, and Rebuffi's parallel residual adapters, whose down-projection takes the block's stride).
    """

    def __init__(self, dim: int, bottleneck: int, out_dim: int | None = None, *,
                 layers: tuple[nn.Module, nn.Module] | None = None) -> None:
        super().__init__()
        self.down, self.up = layers or (nn.Linear(dim, bottleneck), nn.Linear(bottleneck, out_dim or dim))
        self.act = nn.GELU()
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @classmethod
    def conv(cls, in_ch: int, bottleneck: int, out_ch: int, stride: int = 1) -> Bottleneck:
        return cls(in_ch, bottleneck, layers=(nn.Conv2d(in_ch, bottleneck, 1, stride=stride),
                                              nn.Conv2d(bottleneck, out_ch, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def _beside_block(block: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + (block.adapter(args[0]) * block.adapter.scale).to(out.dtype)


def _sequential(mlp: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + mlp.adapter(out)


def _parallel(mlp: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + mlp.adapter(args[0]) * mlp.adapter.scale


class Adapter(Method):
    name = "adapter"
    not_mergeable_reason = "its bottlenecks sit behind a GELU beside the MLPs, so no weight change reproduces them"
    Options = AdapterOptions
    tokenwise_hooks = True  # see Routing.tokenwise

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        try:
            anatomy = describe(model)
        except BackboneError as err:
            raise MethodError(f"adapter: {err}") from None
        opts: AdapterOptions = self.options
        device = next(model.parameters()).device
        self._adapters: list[nn.Module] = []
        for block in anatomy.blocks:
            if block.mlp is not None:
                self._beside_mlp(block, opts, device)
            elif block.in_width and block.out_width:
                self._parallel_conv(block, opts, device)
            else:
                raise MethodError(f"adapter: block {block.name} of {anatomy.arch} has neither an MLP nor convolutions")

    def _beside_mlp(self, block: Block, opts: AdapterOptions, device: torch.device) -> None:
        hook = _sequential if self.options.position == "sequential" else _parallel
        if isinstance(getattr(block.mlp, "fc1", None), nn.Conv2d):  # ConvNeXt's conv_mlp: NCHW, 1x1 convs
            adapter = Bottleneck.conv(block.in_width, opts.bottleneck, block.in_width).to(device)
        else:
            adapter = Bottleneck(block.in_width, opts.bottleneck).to(device)
        adapter.scale = opts.scale
        block.mlp.add_module("adapter", adapter)
        self.add_hook(block.mlp.register_forward_hook(hook))
        self._adapters.append(adapter)

    def _parallel_conv(self, block: Block, opts: AdapterOptions, device: torch.device) -> None:
        # A residual adapter always reads the block's input; ``position`` has no second meaning here.
        adapter = Bottleneck.conv(block.in_width, opts.bottleneck, block.out_width, block.stride).to(device)
        adapter.scale = opts.scale
        block.module.add_module("adapter", adapter)
        self.add_hook(block.module.register_forward_hook(_beside_block))
        self._adapters.append(adapter)

    def modules(self) -> list[nn.Module]:
        return list(self._adapters)
