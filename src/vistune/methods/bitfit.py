"""BitFit: tune every bias term of the backbone (linear, conv and normalisation biases).

Biases are found structurally: the ``bias`` entry of each module's own parameter table (the
slot PyTorch layers register their bias in), not by matching parameter names."""

from __future__ import annotations

import torch
from torch import nn

from vistune.backbones import head_parameters
from vistune.methods.base import VPT_SGD_SEARCH, Method, NothingToMerge


class BitFit(NothingToMerge, Method):
    name = "bitfit"
    formats = ("timm", "onnx")
    search_space = VPT_SGD_SEARCH
    tokenwise_hooks = True  # see Routing.tokenwise

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        head = {id(p) for p in head_parameters(model)}
        seen: set[int] = set()
        self._params: list[nn.Parameter] = []
        for module in model.modules():
            bias = module._parameters.get("bias")
            if isinstance(bias, nn.Parameter) and id(bias) not in head and id(bias) not in seen:
                seen.add(id(bias))
                self._params.append(bias)
        if not self._params:
            raise ValueError(f"{type(model).__name__} has no bias parameters for BitFit to tune")

    def tuned_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(self._params)

