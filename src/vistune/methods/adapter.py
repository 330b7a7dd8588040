"""Adapter: a bottleneck Down → GELU → Up beside the MLP of every transformer block.

``position=sequential`` is Pfeiffer's placement (as in the VPT repo's adapter baseline): the
adapter reads the MLP's output and adds its result to it, before the block's residual.
``position=parallel`` is AdaptFormer's: the adapter reads the MLP's *input* and its output,
times ``scale``, is added to the MLP's output.

The up-projection is zero-initialised, so a freshly attached model computes exactly what the
backbone did. The down-projection gets a non-zero (Kaiming-uniform) init: with both zero (the
VPT repo's choice) the first gradients of the down-projection are zero as well and training
starts from a dead bottleneck. Adapters sit behind a non-linearity, so they are not mergeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vistune.backbones import is_vit
from vistune.errors import MethodError
from vistune.methods.base import Method, option


@dataclass
class AdapterOptions:
    bottleneck: int = option(8, "hidden width of the Down -> GELU -> Up bottleneck", min=1)
    position: str = option("sequential", "after the MLP (Pfeiffer) or beside it (AdaptFormer)",
                           choices=("sequential", "parallel"))
    scale: float = option(1.0, "multiplies the parallel branch (AdaptFormer uses 0.1)")


class Bottleneck(nn.Module):
    """x → up(GELU(down(x))), zero at initialisation."""

    def __init__(self, dim: int, bottleneck: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, out_dim or dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def _sequential(mlp: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + mlp.adapter(out)


def _parallel(mlp: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out + mlp.adapter(args[0]) * mlp.adapter.scale


class Adapter(Method):
    name = "adapter"
    not_mergeable_reason = "its bottlenecks sit behind a GELU beside the MLPs, so no weight change reproduces them"
    Options = AdapterOptions

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        if not is_vit(model):
            raise MethodError(
                f"adapter attaches to the MLP of timm ViT blocks; {type(model).__name__} has none "
                "(use protuning for CNNs)"
            )
        opts: AdapterOptions = self.options
        hook = _sequential if opts.position == "sequential" else _parallel
        self._adapters: list[Bottleneck] = []
        for bi, block in enumerate(model.blocks):
            mlp = getattr(block, "mlp", None)
            if mlp is None:
                raise MethodError(f"adapter: block {bi} has no mlp")
            dim = model.embed_dim
            adapter = Bottleneck(dim, opts.bottleneck).to(next(model.parameters()).device)
            adapter.scale = opts.scale
            mlp.add_module("adapter", adapter)
            self.add_hook(mlp.register_forward_hook(hook))
            self._adapters.append(adapter)

    def modules(self) -> list[nn.Module]:
        return list(self._adapters)
