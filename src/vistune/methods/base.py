"""The interface every tuning method implements, and the option parsing they share.

A method object is created per attachment (it holds the hook handles and the modules it
inserted), so two tuned models never share state. Methods identify what they tune
structurally: they return the parameter objects themselves, never names to match.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from vistune.errors import MergeError, MethodError, NotMergeableError


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           below: float | None = None, choices: Sequence[Any] | None = None,
           each: Sequence[Any] | None = None) -> Any:
    """A method option: its default, its help text and its bounds, in one place (PEFT's
    ``field(metadata={"help": ...})`` style).

    ``-o KEY=VALUE`` parsing checks the bounds (``min``/``max`` inclusive, ``below`` exclusive,
    ``choices`` for a value, ``each`` for every item of a tuple), ``vistune info --method X --help``
    prints the table, and the tuned file's metadata stores the parsed dataclass, so one
    declaration serves all three. Cross-field rules stay in the Options class's ``validate``.
    """
    meta = {"help": help, "min": min, "max": max, "below": below,
            "choices": tuple(choices) if choices is not None else None,
            "each": tuple(each) if each is not None else None}
    return dataclasses.field(default=default, metadata=meta)


def check_bounds(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Raise ValueError when ``value`` breaks the bounds declared by :func:`option`."""
    if value is None:
        return
    low, high, below = meta.get("min"), meta.get("max"), meta.get("below")
    if low is not None and value < low:
        raise ValueError(f"{key} must be >= {low:g}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{key} must be <= {high:g}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{key} must be < {below:g}, got {value}")
    choices, each = meta.get("choices"), meta.get("each")
    if choices is not None and value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if each is not None:
        bad = [v for v in value if v not in each]
        if bad or not value:
            raise ValueError(f"{key} must be a non-empty subset of {list(each)}, got {list(value)}")


def option_table(options_cls: type) -> list[dict[str, Any]]:
    """Every option of a method: name, type, default, help and bounds (for help screens)."""
    hints = typing.get_type_hints(options_cls)
    rows = []
    for f in dataclasses.fields(options_cls):
        meta = dict(f.metadata)
        bounds = []
        if meta.get("min") is not None:
            bounds.append(f">= {meta['min']:g}")
        if meta.get("max") is not None:
            bounds.append(f"<= {meta['max']:g}")
        if meta.get("below") is not None:
            bounds.append(f"< {meta['below']:g}")
        if meta.get("choices") is not None:
            bounds.append("one of " + "|".join(map(str, meta["choices"])))
        if meta.get("each") is not None:
            bounds.append("subset of " + ",".join(map(str, meta["each"])))
        default = f.default if f.default is not dataclasses.MISSING else None
        rows.append({"name": f.name, "type": _type_name(hints[f.name]), "default": _to_plain(default),
                     "help": meta.get("help", ""), "bounds": "; ".join(bounds)})
    return rows


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", text) if typing.get_origin(annotation) is None else text


@dataclasses.dataclass
class NoOptions:
    """Options of a method that has none."""


@dataclasses.dataclass(frozen=True)
class Routing:
    """What a multi-task server must know to run an attachment's hooks on some rows of a batch.

    The server (``vistune.serve``) calls a task's own hooks on that task's rows only, so hooks
    must be row-wise functions of their host's inputs and outputs. Two things cannot be seen
    from the hooks alone and are declared here:

    * ``swaps``: hosts whose own parameters the method replaces for the duration of their
      forward (SPT's sparse deltas). Their output cannot be patched afterwards; the server
      re-runs the host on the task's rows instead.
    * ``tokens``: how many tokens the method adds to the sequence between its first and last
      hook (VPT's prompts). Rows of tasks with different values cannot share one tensor, so the
      server runs them in separate passes.
    * ``own_pass``: the hooks cannot run on a subset of rows at all (VPT on Swin hooks window
      attention, whose batch is B·nW; VPT-pad feeds the stem a larger image). The server runs
      the task's view as a standalone model, on that task's rows only, in a pass of its own.
    * ``tokenwise``: every hook treats the tokens after those it inserted one by one (never
      reshapes them into a map or pools over them), so its rows may carry trailing padding
      tokens that attention masks out. That lets rows of tasks with different ``tokens`` share
      one padded pass instead of a pass per prompt length. False unless a method says so
      (Pro-tuning reshapes the patch tokens into a feature map).
    * ``kv_prompts``: every hook only inserts, replaces and finally strips prompt tokens, and the
      prompts each block sees are learned constants whose outputs are never read (deep VPT:
      replaced at the next block, stripped after the last). Such prompts act on the image tokens
      only as extra keys and values of each block's attention, and those are constants too. A
      callable returning ``[(block, prompts (p, D)), ...]`` lets the server drop the hooks and
      add the precomputed keys/values to attention instead: the rows keep the plain sequence
      length (no extra pass, no padding) and skip the prompts' projections and MLPs.
    """

    swaps: tuple[nn.Module, ...] = ()
    tokens: int = 0
    own_pass: bool = False
    tokenwise: bool = False
    kv_prompts: Callable[[], list[tuple[nn.Module, torch.Tensor]]] | None = None


#: VPT's grids (tune_vtab.py::get_lrwd_range): base learning rates for SGD, and weight decays.
VPT_SGD_BASE_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1, 0.05)
VPT_ADAMW_LRS = (1e-3, 5e-4, 1e-4, 5e-3)  # VPT's end2end (full fine-tuning) grid
VPT_WDS = (0.01, 1e-3, 1e-4, 0.0)
#: AdamW grid for the low-rank and bottleneck modules (LoRA, Adapter, SPT): around the 1e-3 that
#: SPT's and LoRA's recipes use (METHODS.md §2.2), a decade either side.
MODULE_ADAMW_LRS = (1e-2, 5e-3, 1e-3, 5e-4, 1e-4)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A method's default ``vistune sweep`` grid, declared by the method (its paper's protocol).

    ``lrs="vpt-sgd"`` means VPT's SGD base rates scaled by batch/256 (the linear scaling rule
    VPT's tuning script applies); otherwise the learning rates themselves.
    """

    optimizer: str
    lrs: tuple[float, ...] | str
    wds: tuple[float, ...] = VPT_WDS


#: What a method without a declaration gets: AdamW around 1e-3, as for small inserted modules.
MODULE_SEARCH = SearchSpace("adamw", MODULE_ADAMW_LRS)
#: VPT's own protocol: SGD over its scaled base rates (linear probing, BitFit, prompts).
VPT_SGD_SEARCH = SearchSpace("sgd", "vpt-sgd")


class Method:
    """Base class: subclasses set ``name``/``Options`` and implement :meth:`attach`.

    Everything the rest of vistune needs to know about a method is declared here, on the
    method, so no module outside ``methods/`` keeps a table keyed by method names: whether it
    merges (and why not), which export formats carry it, its sweep grid, whether PVP can
    pre-train it, and how a server routes it (:meth:`routing`).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    #: True when merge() folds everything into base weights (or there is nothing to fold).
    mergeable: ClassVar[bool] = False
    #: Why merge() cannot fold it (quoted when a format that needs plain weights refuses it).
    not_mergeable_reason: ClassVar[str] = "it adds computation that cannot be folded into the backbone weights"
    #: True when the backbone itself trains (dropout, drop-path, BatchNorm statistics active).
    backbone_trains: ClassVar[bool] = False
    #: Export formats that can carry a run ("timm": merged plain weights, "onnx": a traced graph,
    #: "peft": HF PEFT's LoRA layout); "timm" is dropped for an attachment that is not mergeable.
    formats: ClassVar[tuple[str, ...]] = ("onnx",)
    #: The default sweep grid (``vistune sweep`` without ``--grid``).
    search_space: ClassVar[SearchSpace] = MODULE_SEARCH
    #: True when the method has modules that PVP stage 1 (``vistune pretrain``) can pre-train.
    pretrainable: ClassVar[bool] = True

    def __init__(self, options: Any | None = None) -> None:
        self.options = options if options is not None else self.Options()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.merged = False

    # -- what subclasses implement -------------------------------------------------------
    @classmethod
    def prepare(cls, backbone: nn.Module, options: dict[str, Any], probe: Any) -> dict[str, Any]:
        """Data-dependent set-up before :meth:`attach`; returns the options to attach with.

        The engine calls this for every method with ``probe``, the task the run trains (a
        ``vistune.tasks.base.TaskProbe``: its loss on the first training batches through a fresh
        throw-away head, and where to cache a result). Most methods need nothing; SPT measures
        its sensitivity scores here, with the task's own loss.
        """
        return options

    def attach(self, model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        """Insert this method's modules/hooks into ``model`` (already frozen).

        ``state`` holds the tensors of a tuned file being loaded (keyed by parameter/buffer
        name), for methods whose structure depends on data (SPT's allocation).
        """
        raise NotImplementedError

    def tuned_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters this method trains, head excluded."""
        return [p for m in self.modules() for p in m.parameters()]

    def tuned_buffers(self, model: nn.Module) -> list[torch.Tensor]:
        """Buffers saved with the tuned tensors: by default those of the inserted modules."""
        return [b for m in self.modules() for b in m.buffers()]

    def modules(self) -> list[nn.Module]:
        """Modules this method inserted (their train/eval mode follows the tuned model's)."""
        return []

    def merge(self, model: nn.Module) -> None:
        raise NotMergeableError(
            f"method {self.name!r} adds computation that cannot be folded into the backbone "
            "weights; keep it attached for inference"
        )

    def unmerge(self, model: nn.Module) -> None:
        raise NotMergeableError(f"method {self.name!r} is not mergeable, so there is nothing to unmerge")

    #: The attachment's hooks are token-wise (see :attr:`Routing.tokenwise`); a method that
    #: overrides :meth:`routing` says it there instead.
    tokenwise_hooks: ClassVar[bool] = False

    def routing(self) -> Routing:
        """How a multi-task server may route this attachment (see :class:`Routing`)."""
        return Routing(tokenwise=self.tokenwise_hooks)

    def export_formats(self) -> tuple[str, ...]:
        """The formats that can carry this attachment (an unmergeable one never becomes plain timm)."""
        return tuple(f for f in self.formats if f != "timm" or self.mergeable)

    def trace_friendly(self, on: bool = True) -> None:
        """Switch to ops a graph exporter can trace (``on``) or back to the fast path; same function.

        Most methods trace as they are; SPT's sparse deltas switch to weight swaps here."""

    def spec_options(self) -> dict[str, Any]:
        """Options as plain JSON-able data, stored in tuned files."""
        return _to_plain(dataclasses.asdict(self.options))

    # -- helpers for subclasses --------------------------------------------------------
    def add_hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._hooks.append(handle)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def check_merged_finite(model: nn.Module, host: nn.Module, attr: str, merged: torch.Tensor) -> None:
    """Refuse a merge whose result ``merged`` (the would-be value of ``host.<attr>``) is not finite.

    Called for every site *before* any weight is written (PEFT's ``safe_merge`` idea): a delta
    that overflows the weight's dtype would otherwise leave inf/NaN in the backbone, and
    ``unmerge`` could not subtract it back out (inf - inf is NaN).
    """
    if torch.isfinite(merged).all():
        return
    name = next((n for n, m in model.named_modules() if m is host), type(host).__name__)
    where = f"{name}.{attr}" if name else attr
    bad = int((~torch.isfinite(merged)).sum())
    raise MergeError(
        f"merging would make {bad} value(s) of {where} non-finite (the delta overflows "
        f"{str(merged.dtype).removeprefix('torch.')}); the model is left unmerged"
    )


class NothingToMerge:
    """Mixin for methods that only re-train existing weights: merging is a no-op by nature."""

    mergeable: ClassVar[bool] = True

    def merge(self, model: nn.Module) -> None:
        self.merged = True

    def unmerge(self, model: nn.Module) -> None:
        self.merged = False


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------
# Options parsing: CLI strings, YAML values and Python values all go through here.

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce_value(value: Any, annotation: Any, none_words: bool = True) -> Any:
    """Convert a loose value (CLI string, YAML scalar, Python value) to ``annotation``.

    Shared by method options and run configs so ``true``/``1``/``yes`` and integer checks mean
    the same everywhere. Raises ValueError/TypeError; callers add the key and file to the message.
    ``none_words`` lets the strings ``none``/``null`` stand for None in an optional field.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (none_words and isinstance(value, str) and value.lower() in {"none", "null"}):
            return None
        for alternative in non_none[:-1]:  # ``bool | str``: a true/false word, else the string
            try:
                return coerce_value(value, alternative, none_words)
            except (TypeError, ValueError):
                pass
        annotation = non_none[-1]
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError("expected true/false")
    if annotation is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        return int(value)
    if annotation is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    if annotation is str:
        return str(value)
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else list(value)
        items = [str(i).strip() for i in items if str(i).strip()]
        inner = args[0] if args else str
        out = [coerce_value(i, inner, none_words) for i in items]
        return tuple(out) if origin is tuple else out
    return value


def _coerce(method: str, key: str, value: Any, annotation: Any) -> Any:
    try:
        return coerce_value(value, annotation)
    except (TypeError, ValueError) as err:
        raise MethodError(f"method {method!r}: option {key}={value!r} is invalid ({err})") from None


def parse_options(method_cls: type[Method], options: dict[str, Any] | None) -> Any:
    """Build the method's Options dataclass from loose values; unknown keys are an error."""
    options = dict(options or {})
    fields = {f.name: f for f in dataclasses.fields(method_cls.Options)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise MethodError(
            f"method {method_cls.name!r} has no option {unknown[0]!r}; valid options: {valid}"
        )
    hints = typing.get_type_hints(method_cls.Options)
    values = {k: _coerce(method_cls.name, k, v, hints[k]) for k, v in options.items()}
    try:
        opts = method_cls.Options(**values)
    except (TypeError, ValueError) as err:
        raise MethodError(f"method {method_cls.name!r}: {err}") from None
    validate = getattr(opts, "validate", None)
    try:
        for name, f in fields.items():
            check_bounds(name, getattr(opts, name), f.metadata)
        if validate is not None:
            validate()
    except ValueError as err:
        raise MethodError(f"method {method_cls.name!r}: {err}") from None
    return opts


def parse_kv(pairs: Iterable[str]) -> dict[str, str]:
    """``["rank=8", "targets=q,v"]`` → dict; a malformed pair names itself in the error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise MethodError(f"option {pair!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out
