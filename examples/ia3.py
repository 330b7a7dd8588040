"""IA³ as a vistune plugin: a complete tuning method written outside vistune, with no edit to it.

IA³ (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning") learns one scaling vector, initialised to ones, for each of three
activations of every transformer block: the attention keys, the attention values and the MLP's
hidden activation (after its activation function, i.e. the input of ``fc2``). That is 2·D + D_hidden
parameters per block (ViT-B/16: 12·(2·768 + 3072) = 55,296), and it merges exactly: a key/value
scale multiplies the rows of the qkv weight and bias that produce it, the MLP scale multiplies the
columns of ``fc2``'s weight.

Use it from the command line (``--plugin`` imports this file, whose ``@register_method`` makes the
name ``ia3`` known; a package would declare ``ia3 = my_pkg.ia3:IA3`` in its ``vistune.methods``
entry points instead)::

    vistune --plugin examples/ia3.py train --backbone test_vit --img-size 32 --method ia3 \\
        -o targets=k,v,mlp --data folder:DATA --out runs/ia3

or from Python: ``import ia3`` (this file on ``sys.path``), then ``vistune.attach(model, "ia3")``.

Sites are found by role through :func:`vistune.anatomy.describe` (``k``, ``v`` and ``fc2``), so it
runs on every family that has them: ViT/DeiT/DINOv2, Swin, and ConvNeXt (``targets=mlp``).
The hooks only read their host's own inputs and outputs row by row, which is what lets the
multi-task server run an IA³ task in a mixed batch without knowing anything about IA³.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from vistune import register_method
from vistune.anatomy import describe
from vistune.backbones import BackboneError
from vistune.errors import MergeError, MethodError
from vistune.methods.base import Method, SearchSpace, check_merged_finite, option

#: Option value → the anatomy role whose module carries the scale.
ROLE = {"k": "k", "v": "v", "mlp": "fc2"}


@dataclass
class IA3Options:
    targets: tuple[str, ...] = option(("k", "v", "mlp"), "activations to rescale: k and v (attention keys and "
                                      "values), mlp (the MLP's hidden activation, fc2's input)",
                                      each=tuple(ROLE))


class Scales(nn.Module):
    """Learned scales for some channel slices of a host's output (k, v) or of its input (mlp).

    ``vector()`` is the full-width scale, ones outside the slices, so a fused qkv Linear is
    scaled with one multiply and the q rows stay untouched."""

    def __init__(self, width: int, slices: dict[str, slice]) -> None:
        super().__init__()
        self.width = width
        self.slices = dict(sorted(slices.items(), key=lambda kv: kv[1].start))
        self.scale = nn.ParameterDict({k: nn.Parameter(torch.ones(s.stop - s.start)) for k, s in self.slices.items()})

    def vector(self) -> torch.Tensor:
        any_scale = next(iter(self.scale.values()))
        pieces, pos = [], 0
        for key, sl in self.slices.items():
            if sl.start > pos:
                pieces.append(any_scale.new_ones(sl.start - pos))
            pieces.append(self.scale[key])
            pos = sl.stop
        if pos < self.width:
            pieces.append(any_scale.new_ones(self.width - pos))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _channel_shape(host: nn.Module, ndim: int) -> tuple[int, ...]:
    """Where the channel axis is: last for a Linear, 1 for a Conv2d (NCHW)."""
    return (-1,) if isinstance(host, nn.Linear) else (-1,) + (1,) * (ndim - 2)


def _scale_output(host: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out * host.ia3.vector().to(out.dtype).view(_channel_shape(host, out.ndim))


def _scale_input(host: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x * host.ia3.vector().to(x.dtype).view(_channel_shape(host, x.ndim)), *args[1:])


@register_method
class IA3(Method):
    name = "ia3"
    Options = IA3Options
    mergeable = True
    formats = ("timm", "onnx")
    #: The paper trains IA³ at 3e-3 (Adafactor); AdamW around it. No weight decay: it would pull
    #: the scales towards 0, i.e. switch activations off, not towards the identity.
    search_space = SearchSpace("adamw", (1e-2, 3e-3, 1e-3), wds=(0.0,))

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        opts: IA3Options = self.options
        try:
            sites = describe(model).sites([ROLE[t] for t in opts.targets])
        except BackboneError as err:
            raise MethodError(f"ia3: {err}") from None
        device = next(model.parameters()).device
        by_host: dict[int, tuple[nn.Module, dict[str, slice], bool]] = {}
        for site in sites:
            host, on_input = site.module, site.role == "fc2"
            if isinstance(host, nn.Conv2d) and host.groups != 1:
                raise MethodError(f"ia3: {site.name} is a grouped convolution; its input cannot be scaled "
                                  "into its weight")
            parent = model.get_submodule(site.name.rpartition(".")[0])
            if getattr(parent, "q_bias", None) is not None and not getattr(parent, "qkv_bias_separate", False):
                raise MethodError(f"ia3: {site.name} is computed with F.linear on its weight (EVA-style "
                                  "attention), so a scale there would never run; use targets=mlp")
            slices = by_host.setdefault(id(host), (host, {}, on_input))[1]
            slices.update({"mlp": slice(0, host.weight.shape[1])} if on_input else {site.role: site.rows})
        self._sites = [(host, Scales(host.weight.shape[1 if on_input else 0], slices).to(device), on_input)
                       for host, slices, on_input in by_host.values()]
        self.options = dataclasses.replace(opts, targets=tuple(t for t in ROLE if t in opts.targets))
        self._hook_sites()

    def _hook_sites(self) -> None:
        for host, scales, on_input in self._sites:
            host.add_module("ia3", scales)
            if on_input:
                self.add_hook(host.register_forward_pre_hook(_scale_input))
            else:
                self.add_hook(host.register_forward_hook(_scale_output))

    def modules(self) -> list[nn.Module]:
        return [scales for _, scales, _ in self._sites]

    @staticmethod
    def _folded(host: nn.Module, scale: torch.Tensor, on_input: bool) -> dict[str, torch.Tensor]:
        """The host's weight (and bias) with ``scale`` folded in: columns for an input scale,
        rows (and the bias) for an output scale."""
        w = host.weight
        if on_input:
            return {"weight": w * scale.to(w.dtype).view(1, -1, *([1] * (w.ndim - 2)))}
        out = {"weight": w * scale.to(w.dtype).view(-1, *([1] * (w.ndim - 1)))}
        if host.bias is not None:
            out["bias"] = host.bias * scale.to(host.bias.dtype)
        return out

    @torch.no_grad()
    def merge(self, model: nn.Module) -> None:
        folded = [self._folded(host, scales.vector(), on_input) for host, scales, on_input in self._sites]
        for (host, _, _), new in zip(self._sites, folded):  # all finite before any weight is written
            for attr, value in new.items():
                check_merged_finite(model, host, attr, value)
        for (host, _, _), new in zip(self._sites, folded):
            for attr, value in new.items():
                getattr(host, attr).copy_(value)
            del host._modules["ia3"]
        self.remove_hooks()
        self.merged = True

    @torch.no_grad()
    def unmerge(self, model: nn.Module) -> None:
        if any(bool((scales.vector() == 0).any()) for _, scales, _ in self._sites):
            raise MergeError("ia3: a learned scale is 0, so the merged weights cannot be divided back; "
                             "the model stays merged")
        for host, scales, on_input in self._sites:
            for attr, value in self._folded(host, 1.0 / scales.vector(), on_input).items():
                getattr(host, attr).copy_(value)
        self._hook_sites()
        self.merged = False
