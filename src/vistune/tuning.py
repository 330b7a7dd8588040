"""The tuning contract: attach a method to a frozen backbone, and everything that follows from it.

Every method, engine feature and file format goes through :class:`TunedModel`, so checkpoints,
merging and reports are written once. A tuned file is one safetensors file holding only the
tuned tensors plus JSON metadata: the method spec, the backbone's name and a fingerprint of its
weights, so the file alone says what it is and which backbone it fits.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistune import __version__
from vistune.backbones import backbone_info, classifier, head_parameters
from vistune.errors import MergeError, MethodError, TunedFileError
from vistune.io import read_with_json_meta, write_atomic
from vistune.methods import get_method, parse_options
from vistune.methods.base import Method

FORMAT = "vistune.tuned/1"
_META_KEY = "vistune"


@dataclass
class MethodSpec:
    """Plain data naming a method and its options; round-trips through JSON."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodSpec:
        return cls(name=data["name"], options=dict(data.get("options", {})))


def fingerprint(model: nn.Module) -> str:
    """sha256 over the backbone's tensors (head excluded): names, shapes, dtypes and bytes.

    The head is excluded because every task replaces it. A model on the ``meta`` device has no
    values to hash and gets the fingerprint ``"meta"``.
    """
    head_ids = {id(p) for p in head_parameters(model)}
    head_names = {n for n, p in model.named_parameters() if id(p) in head_ids}
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        if name in head_names:
            continue
        if tensor.device.type == "meta":
            return "meta"
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _count(params) -> int:
    return sum(p.numel() for p in params)


class TunedModel(nn.Module):
    """A backbone with one method attached; the only object engines and files deal with."""

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        spec: MethodSpec,
        base_fingerprint: str,
        backbone_params: int,
    ) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.spec = spec
        self.base_fingerprint = base_fingerprint
        self.backbone_params = backbone_params

    # -- running ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-logit features (what the head reads); used to cache features for linear probing."""
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def train(self, mode: bool = True) -> TunedModel:
        """Frozen parts stay in eval mode (no dropout, drop-path or BatchNorm updates) unless the
        method trains the backbone itself; the method's own modules follow ``mode``."""
        self.training = mode
        self.model.train(mode and self.method.backbone_trains)
        for m in self.method.modules():
            m.train(mode)
        classifier(self.model).train(mode)
        return self

    # -- what is tuned ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0))

    def head_parameters(self) -> list[nn.Parameter]:
        return head_parameters(self.model)

    def tuned_parameters(self, include_head: bool = True) -> list[nn.Parameter]:
        """Tuned parameters, in a stable order, each once."""
        params = list(self.method.tuned_parameters(self.model))
        if include_head:
            params += self.head_parameters()
        seen: set[int] = set()
        out = []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def tuned_names(self, include_head: bool = True) -> list[str]:
        """Names (as in ``self.model``'s state dict) of the tuned parameters, found by identity."""
        ids = {id(p) for p in self.tuned_parameters(include_head)}
        return [n for n, p in self.model.named_parameters() if id(p) in ids]

    def _method_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers the method owns or trains (SPT's sparse indices; BatchNorm statistics in full)."""
        owned = {id(b) for b in self.method.tuned_buffers(self.model)}
        return {n: b for n, b in self.model.named_buffers() if id(b) in owned}

    def tuned_state_dict(self, include_head: bool = True) -> dict[str, torch.Tensor]:
        names = set(self.tuned_names(include_head))
        sd = {n: p.detach() for n, p in self.model.named_parameters() if n in names}
        sd.update({n: b.detach() for n, b in self._method_buffers().items()})
        return sd

    def freeze(self) -> None:
        """Make exactly the tuned parameters trainable (called at attach and after load/unmerge)."""
        tuned = {id(p) for p in self.tuned_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in tuned)

    # -- merging ------------------------------------------------------------------------
    def merge(self) -> TunedModel:
        """Fold mergeable deltas into the base weights; the model then has no extra modules.

        Like PEFT's ``safe_merge``, nothing is written unless every merged weight is finite: a
        non-finite tuned tensor, or a delta that overflows the weight's dtype, raises
        :class:`MergeError` and leaves the model exactly as it was (still unmerged).
        """
        if self.method.merged:
            return self
        tuned = {id(p) for p in self.tuned_parameters(include_head=False)}
        bad = [n for n, p in self.model.named_parameters()
               if id(p) in tuned and not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise MergeError(f"cannot merge: tuned tensor {bad[0]} holds non-finite values "
                             f"({len(bad)} such tensor(s)); the model is left unmerged")
        self.method.merge(self.model)
        return self

    def unmerge(self) -> TunedModel:
        if self.method.merged:
            self.method.unmerge(self.model)
            self.freeze()
        return self

    # -- reporting ----------------------------------------------------------------------
    def parameter_report(self) -> dict[str, Any]:
        """The one source of every parameter number vistune prints (README tables included)."""
        head = _count(self.head_parameters())
        tuned = _count(self.tuned_parameters(include_head=False))
        info = backbone_info(self.model)
        return {
            "backbone": info.name,
            "method": self.spec.name,
            "options": self.spec.options,
            "backbone_params": self.backbone_params,
            "tuned_params": tuned,
            "head_params": head,
            "trainable_params": tuned + head,
            "tuned_percent": 100.0 * tuned / max(self.backbone_params, 1),
            "mergeable": bool(self.method.mergeable),
        }

    def print_trainable_parameters(self) -> None:
        r = self.parameter_report()
        print(
            f"tuned params: {r['tuned_params']:,} (+ head {r['head_params']:,}) || "
            f"backbone params: {r['backbone_params']:,} || tuned%: {r['tuned_percent']:.4f}"
        )

    # -- files --------------------------------------------------------------------------
    def metadata(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        info = backbone_info(self.model)
        meta = {
            "format": FORMAT,
            "vistune_version": __version__,
            "method": self.spec.to_dict(),
            "backbone": {
                "name": info.name,
                "arch": info.arch,
                "img_size": info.img_size,
                "mean": list(info.mean),
                "std": list(info.std),
                "weights": info.weights,
                "fingerprint": self.base_fingerprint,
            },
            "num_classes": self.num_classes,
        }
        if extra:
            meta["extra"] = extra
        return meta

    def save_tuned(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write the tuned tensors and metadata atomically (temp file, then rename)."""
        return write_atomic(path, lambda tmp: self.write_tuned(tmp, extra))

    def write_tuned(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """The tuned file's bytes at ``path`` (non-atomic: for a writer that commits a set of files)."""
        from safetensors.torch import save_file

        if self.method.merged:
            raise TunedFileError(
                "this model is merged: its deltas live inside the base weights now; call "
                "unmerge() before save_tuned()"
            )
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.tuned_state_dict().items()}
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(self.metadata(extra))})

    @torch.no_grad()
    def cast_frozen_matmul_weights(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Store frozen Linear/Conv2d weights (and frozen biases) in ``dtype``; returns how many.

        Under bf16 autocast these are cast to bf16 on every forward anyway (autocast caches casts
        only of tensors that require grad), so storing them in bf16 gives bit-identical outputs,
        saves that cast each step and halves their memory. Modules whose weight a method swaps
        before the forward (a forward pre-hook, e.g. SPT's sparse deltas) keep fp32, so the delta
        is added in fp32 as before. Trained tensors are never cast (the optimizer keeps fp32).
        """
        n = 0
        for m in self.model.modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)) or m._forward_pre_hooks:
                continue
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter) and not p.requires_grad and p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    n += 1
        return n

    def features_are_static(self) -> bool:
        """True when the pre-logit features are a fixed function of the image during training.

        Then the backbone can run once per image and the epochs train the head on cached
        features: nothing before the head trains (linear probing; frozen PVP modules), the
        backbone stays in eval mode, and no inserted module draws random numbers (dropout).
        """
        if self.method.backbone_trains:
            return False
        if any(p.requires_grad for p in self.tuned_parameters(include_head=False)):
            return False
        return not any(isinstance(m, nn.Dropout) and m.p > 0 for mod in self.method.modules() for m in mod.modules())


def attach(
    model: nn.Module,
    method: str | MethodSpec,
    *,
    num_classes: int | None = None,
    state: dict[str, torch.Tensor] | None = None,
    base_fingerprint: str | None = None,
    **options: Any,
) -> TunedModel:
    """Freeze ``model``, attach ``method`` and return the :class:`TunedModel`.

    ``num_classes`` replaces the head when it differs from the model's; the head is always tuned.
    Options may be given as keywords or inside a :class:`MethodSpec`.
    """
    spec = method if isinstance(method, MethodSpec) else MethodSpec(method, dict(options))
    if isinstance(method, MethodSpec) and options:
        spec = MethodSpec(spec.name, {**spec.options, **options})
    cls = get_method(spec.name)
    opts = parse_options(cls, spec.options)
    if num_classes is not None and num_classes != getattr(model, "num_classes", None):
        model.reset_classifier(num_classes)
    fp = base_fingerprint or fingerprint(model)
    head_ids = {id(p) for p in head_parameters(model)}
    backbone_params = _count(p for p in model.parameters() if id(p) not in head_ids)
    for p in model.parameters():
        p.requires_grad_(False)
    instance = cls(opts)
    try:
        instance.attach(model, state=state)
    except (ValueError, TypeError) as err:
        if isinstance(err, MethodError):
            raise
        raise MethodError(f"method {spec.name!r} cannot attach to {type(model).__name__}: {err}") from err
    full_spec = MethodSpec(cls.name, instance.spec_options())
    tuned = TunedModel(model, instance, full_spec, fp, backbone_params)
    tuned.freeze()
    return tuned


def read_tuned_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of a tuned file; any corruption becomes a TunedFileError naming the file."""
    return read_with_json_meta(path, _META_KEY, FORMAT, TunedFileError, "tuned file", "save_tuned()")


def read_tuned_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """A tuned file's metadata from its JSON header alone (no tensor is read); None when the file
    is missing or is no readable tuned file. Why: telling a run's kind must be cheap and must not
    fail on a damaged file — the loader that runs next reports the damage in its own line."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY) or "null")
    except Exception:  # noqa: BLE001 - safetensors/JSON errors of a missing or damaged file
        return None
    return meta if isinstance(meta, dict) else None


def fingerprints_match(recorded: str | None, actual: str) -> bool:
    """The one fingerprint rule: equal, or ``actual`` is a meta-device model (no values to hash,
    used for counting). A *recorded* "meta" never matches real weights."""
    return actual == "meta" or recorded == actual


def check_backbone(path: str | os.PathLike, meta: dict[str, Any], model: nn.Module, fp: str) -> None:
    """Refuse a file made for another architecture or other backbone weights."""
    want = meta["backbone"]
    info = backbone_info(model)
    if want["arch"] != info.arch:
        raise TunedFileError(
            f"tuned file {path} was made for backbone {want['arch']!r}, not {info.arch!r}"
        )
    if want["fingerprint"] == "meta" and fp != "meta":
        raise TunedFileError(
            f"tuned file {path} was written from a model on the meta device (no weights), so it "
            "cannot prove which backbone weights it fits; re-save it from a real model"
        )
    if not fingerprints_match(want["fingerprint"], fp):
        raise TunedFileError(
            f"tuned file {path} was made for {want['name']!r} weights with fingerprint "
            f"{want['fingerprint'][:16]}…, but this backbone's weights fingerprint is {fp[:16]}… "
            "(different pre-trained weights or image size)"
        )


def load_tensors(tuned: TunedModel, tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 include_head: bool = True) -> None:
    """Copy file tensors into the tuned model; the key sets and shapes must match exactly."""
    expected = tuned.tuned_state_dict(include_head=include_head)
    if not include_head:
        head = set(tuned.tuned_names()) - set(tuned.tuned_names(include_head=False))
        tensors = {k: v for k, v in tensors.items() if k not in head}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise TunedFileError(
            f"tuned file {path} does not match method {tuned.spec.name!r} on this backbone: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name, target in expected.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(target.shape):
                raise TunedFileError(
                    f"tuned file {path}: tensor {name!r} has shape {tuple(src.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            if src.is_floating_point() and not bool(torch.isfinite(src).all()):
                raise TunedFileError(
                    f"tuned file {path}: tensor {name!r} holds NaN or infinite values (a diverged "
                    "run?); refusing to load it"
                )
            target.copy_(src.to(dtype=target.dtype, device=target.device))


def load_tuned(path: str | os.PathLike, backbone: nn.Module) -> TunedModel:
    """Rebuild the method recorded in ``path`` on a fresh ``backbone`` and load its tensors."""
    meta, tensors = read_tuned_file(path)
    fp = fingerprint(backbone)
    check_backbone(path, meta, backbone, fp)
    try:
        spec = MethodSpec.from_dict(meta["method"])
        num_classes = int(meta["num_classes"])
    except (KeyError, TypeError, ValueError) as err:
        raise TunedFileError(f"tuned file {path}: metadata lacks {err}") from None
    try:
        tuned = attach(backbone, spec, num_classes=num_classes, state=tensors, base_fingerprint=fp)
    except MethodError as err:
        raise TunedFileError(f"tuned file {path}: cannot rebuild its method: {err}") from None
    load_tensors(tuned, tensors, path)
    return tuned


def attach_from_file(
    backbone: nn.Module,
    method: str,
    path: str | os.PathLike,
    num_classes: int,
    options: dict[str, Any] | None = None,
) -> TunedModel:
    """Attach ``method`` with its modules initialised from a tuned file (PVP's stage 2).

    Options recorded in the file define the module shapes; options given here may only repeat
    them (a different rank or prompt length would not fit the pre-trained tensors and is refused
    with the offending key named). The head is new, for ``num_classes``: it never transfers.
    """
    meta, tensors = read_tuned_file(path)
    fp = fingerprint(backbone)
    check_backbone(path, meta, backbone, fp)
    file_spec = MethodSpec.from_dict(meta["method"])
    if file_spec.name != method:
        raise TunedFileError(
            f"--init-from {path}: the file holds {file_spec.name!r} modules, but the method is {method!r}"
        )
    attached = attach(backbone, MethodSpec(method, {**file_spec.options, **(options or {})}),
                      num_classes=num_classes, state=tensors, base_fingerprint=fp)
    for key, value in file_spec.options.items():
        mine = attached.spec.options.get(key)
        if mine != value:
            raise TunedFileError(
                f"--init-from {path}: option {key}={mine!r} differs from the pre-trained modules' "
                f"{key}={value!r}"
            )
    load_tensors(attached, tensors, path, include_head=False)
    return attached
