"""Full fine-tuning: every backbone parameter trains (the upper reference of every table)."""

from __future__ import annotations

import torch
from torch import nn

from vistune.backbones import head_parameters
from vistune.methods.base import VPT_ADAMW_LRS, Method, NothingToMerge, SearchSpace


class Full(NothingToMerge, Method):
    name = "full"
    formats = ("timm", "onnx")
    search_space = SearchSpace("adamw", VPT_ADAMW_LRS)  # VPT's end2end grid
    pretrainable = False  # the whole backbone: not a module to transfer
    backbone_trains = True  # dropout/drop-path/BatchNorm statistics behave as in normal training

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        head = {id(p) for p in head_parameters(model)}
        self._params = [p for p in model.parameters() if id(p) not in head]

    def tuned_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(self._params)

    def tuned_buffers(self, model: nn.Module) -> list[torch.Tensor]:
        """BatchNorm statistics train along with the weights, so the file must carry them."""
        return list(model.buffers())

