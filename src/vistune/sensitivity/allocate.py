"""SPT stage A, part 2: turn sensitivity scores into an allocation at a parameter budget.

A global top-k over the scores marks entries as sensitive; each weight matrix then gets a
structured module (LoRA or an adapter) when enough of it is sensitive (α rule), each vector is
tuned whole when enough of it is (β rule), and everything else gets exactly its sensitive
entries as a sparse delta. :class:`Allocator` finds the top-k size whose realised count is the
closest to the budget exactly (the reference scans a 0.02 M grid).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vistune.backbones import backbone_info
from vistune.sensitivity.scores import SensitivityError, Unit, _check_keys, backbone_param_count, pool_units

STRUCTURED_TYPES = ("lora", "adapter", "none")

# ------------------------------------------------------------------------------------------------
# Budgets

_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmM%]?)\s*$")


def check_budget(budget: str | int | float) -> None:
    """Syntax check only: a percentage needs the backbone to become a count, so any positive
    percentage passes here (a huge stand-in backbone) and tiny ones fail at allocation."""
    parse_budget(budget, backbone_params=10**15)


def parse_budget(budget: str | int | float, backbone_params: int) -> int:
    """``400000``, ``"400k"``, ``"0.4M"`` → 400000; ``"0.5%"`` → 0.5 % of ``backbone_params``."""
    text = str(budget).replace("_", "").replace(",", "")
    m = _BUDGET_RE.match(text)
    if m is None:
        raise SensitivityError(f"budget {budget!r} is not a count (400000, 400k, 0.4M) or a percentage (0.5%)")
    value, suffix = float(m.group(1)), m.group(2).lower()
    if suffix == "%":
        count = backbone_params * value / 100.0
    else:
        count = value * {"": 1, "k": 1e3, "m": 1e6}[suffix]
    count = int(round(count))
    if count < 1:
        raise SensitivityError(f"budget {budget!r} is less than one parameter")
    return count


# ------------------------------------------------------------------------------------------------
# Allocation


@dataclass
class UnitChoice:
    """What one unit gets: ``structured``, ``unstructured`` (its ``indices``), ``whole`` or ``none``."""

    unit: Unit
    mode: str
    params: int
    sensitive: int | None = None  # n(W): its entries among the top-k (unknown when rebuilt from a file)
    indices: torch.Tensor | None = None  # unstructured: sorted flat indices relative to the unit


@dataclass
class Allocation:
    """The outcome of stage A at one budget: a choice per unit, plus how it was reached."""

    arch: str
    structured_type: str
    rank: int
    alpha: float
    beta: float
    choices: list[UnitChoice]
    target: int | None = None
    threshold: float | None = None  # sensitive ⇔ score >= threshold
    num_sensitive: int | None = None  # k: entries of the pool at or above the threshold
    max_realisable: int | None = None
    pool_size: int = 0
    backbone_params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def _params(self, mode: str, kind: str | None = None) -> int:
        return sum(c.params for c in self.choices
                   if c.mode == mode and (kind is None or (c.unit.kind == "vector") == (kind == "vector")))

    @property
    def realised(self) -> int:
        """Tuned parameters the allocation costs (head excluded), as TunedModel will count them."""
        return sum(c.params for c in self.choices)

    def structured_units(self) -> list[Unit]:
        return [c.unit for c in self.choices if c.mode == "structured"]

    def whole_params(self) -> list[str]:
        """Names of vectors tuned whole that are entire parameters (marked trainable as they are)."""
        return [c.unit.param for c in self.choices
                if c.mode == "whole" and c.unit.start == 0 and c.unit.numel == _param_numel(self, c.unit.param)]

    def sparse_indices(self) -> dict[str, torch.Tensor]:
        """Parameter name → sorted flat indices tuned through a sparse delta.

        Unstructured entries, plus whole vectors that are only part of a parameter (a third of a
        fused qkv bias): those cannot be marked trainable on their own, and a delta over their
        whole range costs the same parameters.
        """
        whole = set(self.whole_params())
        out: dict[str, list[torch.Tensor]] = {}
        for c in self.choices:
            u = c.unit
            if c.mode == "unstructured":
                out.setdefault(u.param, []).append(c.indices.to(torch.long) + u.start)
            elif c.mode == "whole" and u.param not in whole:
                out.setdefault(u.param, []).append(torch.arange(u.start, u.start + u.numel, dtype=torch.long))
        return {k: torch.sort(torch.cat(v)).values for k, v in out.items()}

    def summary(self) -> dict[str, Any]:
        """Plain numbers for logs, the CLI and reports."""
        structured = [c for c in self.choices if c.mode == "structured"]
        return {
            "arch": self.arch,
            "structured_type": self.structured_type,
            "rank": self.rank,
            "alpha": self.alpha,
            "beta": self.beta,
            "target": self.target,
            "realised": self.realised,
            "realised_over_target": (self.realised / self.target) if self.target else None,
            "max_realisable": self.max_realisable,
            "structured_params": self._params("structured"),
            "unstructured_params": self._params("unstructured", "matrix"),
            "unstructured_vector_params": self._params("unstructured", "vector"),
            "vector_params": self._params("whole"),
            "num_structured": len(structured),
            "num_unstructured_tensors": sum(c.mode == "unstructured" for c in self.choices),
            "num_whole_vectors": sum(c.mode == "whole" for c in self.choices),
            "structured_matrices": [c.unit.label for c in structured],
            "threshold": self.threshold,
            "num_sensitive": self.num_sensitive,
            "pool_size": self.pool_size,
            "backbone_params": self.backbone_params,
        }


def _param_numel(alloc: Allocation, param: str) -> int:
    return max(c.unit.start + c.unit.numel for c in alloc.choices if c.unit.param == param)


def _min_count(size: int, divisor: float) -> int:
    """Smallest integer n with n ≥ size/divisor, without float rounding surprises."""
    n = max(0, math.ceil(size / divisor))
    while n > 0 and (n - 1) * divisor >= size:
        n -= 1
    while n * divisor < size:
        n += 1
    return n


@dataclass
class _Ranked:
    unit: Unit
    flat: torch.Tensor  # the unit's scores, flattened (a view)
    cap: int | None  # n at which the unit jumps to structured/whole; None = never
    jump: int  # parameters once it has jumped
    values: torch.Tensor  # its top scores (> 0), descending
    indices: torch.Tensor  # their flat positions in the unit
    complete: bool  # values hold every positive entry up to the cap (not cut by a budget limit)


@dataclass
class _Events:
    """All units' ranked entries merged in descending score order (stable, so each unit's own
    order is kept), with the unit each belongs to and the realised-count increment it causes."""

    values: torch.Tensor
    unit: torch.Tensor
    incr: torch.Tensor
    realised: torch.Tensor  # cumulative sum of incr

    def valid(self) -> torch.Tensor:
        """Positions that end a tie group: a threshold cannot separate equal scores."""
        last = torch.ones(len(self.values), dtype=torch.bool)
        if len(self.values) > 1:
            last[:-1] = self.values[:-1] != self.values[1:]
        return last


class Allocator:
    """Allocation of one score set at any number of budgets (the ranking is done once).

    For a threshold t, n(W) = #entries of W with score ≥ t. A matrix costs P_struct(W) when
    n(W) ≥ P_struct(W)/α, else n(W); a vector costs its length when n ≥ len/β, else n. Each unit's
    cost is non-decreasing in n, so the realised count is a monotone step function of the top-k
    size: it rises by one per sensitive entry and jumps when a unit turns structured/whole. Only
    each unit's top ``cap`` scores can change its cost, so we keep just those, merge them into one
    ranked event list with the cost increment each event causes, and a cumulative sum gives the
    realised count at every possible k. The closest to the target is then exact (ties go to the
    smaller count), not a grid scan. Every event raises the count by at least one, so events past
    the target's rank cannot matter: units no structured module fits keep only target+1 entries.

    The closest top-k can still miss the target by up to half a jump (a LoRA on a ViT-B fc matrix
    turns ~3k sensitive entries into 30,720 parameters). ``fill=True`` goes beyond the paper to
    honour the budget: it takes the largest top-k at or under the target, then walks on down the
    ranking taking every entry whose cost still fits (a single entry, or a unit's jump to
    structured if the whole module fits), skipping units whose jump does not. Each unit still
    obeys the α/β rules for the entries it holds; only the global top-k property is relaxed.
    """

    def __init__(
        self,
        model: nn.Module,
        scores: dict[str, torch.Tensor],
        structured: str = "lora",
        alpha: float = 10.0,
        beta: float = 5.0,
        rank: int = 8,
    ) -> None:
        if structured not in STRUCTURED_TYPES:
            raise SensitivityError(f"structured must be one of {STRUCTURED_TYPES}, got {structured!r}")
        if not (0 < alpha < math.inf and 0 < beta < math.inf) or rank < 1:  # NaN fails too
            raise SensitivityError(f"need alpha > 0, beta > 0 and rank >= 1 (got {alpha}, {beta}, {rank})")
        _check_keys(scores, model, "scores")
        self.arch = backbone_info(model).arch
        self.structured, self.alpha, self.beta, self.rank = structured, float(alpha), float(beta), int(rank)
        self.units = pool_units(model)
        self.backbone_params = backbone_param_count(model)
        self.pool_size = sum(u.numel for u in self.units)
        self._scores = scores
        self._ranked: list[_Ranked | None] = [None] * len(self.units)
        self._limit = 0  # every entry of _ranked is valid for budgets up to this many events

    def _rank_unit(self, u: Unit, limit: int) -> _Ranked:
        flat = self._scores[u.param].detach().reshape(-1)[u.start:u.start + u.numel]
        if u.kind == "vector":
            cap, jump = _min_count(u.numel, self.beta), u.numel
        else:
            size = u.structured_size(self.structured, self.rank)
            cap, jump = (None, 0) if size is None else (_min_count(size, self.alpha), size)
        if cap is not None and cap > u.numel:
            cap = None
        need = min(u.numel, cap if cap is not None else u.numel)
        keep = min(need, limit)
        cpu = flat.to("cpu")
        values, idx = torch.topk(cpu, keep, sorted=True) if keep else (cpu[:0], torch.zeros(0, dtype=torch.long))
        if torch.isnan(values).any():
            raise SensitivityError(f"scores of {u.label} contain NaN")
        positive = values > 0
        complete = keep == need or not bool(positive.all())
        return _Ranked(u, flat, cap, jump, values[positive], idx[positive], complete)

    def _ranking(self, limit: int) -> list[_Ranked]:
        """Each unit's top entries; a larger limit re-ranks only the units the old one cut short."""
        if limit > self._limit:
            for i, u in enumerate(self.units):
                r = self._ranked[i]
                if r is None or not r.complete:
                    self._ranked[i] = self._rank_unit(u, limit)
            self._limit = limit
        return list(self._ranked)

    @staticmethod
    def _events(ranked: list[_Ranked]) -> _Events:
        values, incr, owner = [], [], []
        for i, r in enumerate(ranked):
            n = len(r.values)
            step = torch.ones(n, dtype=torch.long)
            if r.cap is not None and r.cap <= n:
                step[r.cap - 1] = r.jump - (r.cap - 1)
            values.append(r.values.to(torch.float64))
            incr.append(step)
            owner.append(torch.full((n,), i, dtype=torch.long))
        v = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
        order = torch.sort(v, descending=True, stable=True).indices
        inc = torch.cat(incr)[order] if incr else torch.zeros(0, dtype=torch.long)
        return _Events(v[order], torch.cat(owner)[order] if owner else inc, inc, torch.cumsum(inc, 0))

    def allocate(self, budget: str | int | float, fill: bool = False) -> Allocation:
        """The allocation whose realised count is the closest to ``budget`` (see :func:`parse_budget`);
        with ``fill``, the closest at or under it, topped up as the class docstring describes."""
        target = parse_budget(budget, self.backbone_params)
        ranked = self._ranking(target + 1)
        ev = self._events(ranked)
        ends = torch.nonzero(ev.valid()).reshape(-1)  # a top-k = all events up to and including an end
        options = torch.cat([torch.zeros(1, dtype=torch.long), ev.realised[ends]])
        if fill:
            best = int((options <= target).sum()) - 1  # options are non-decreasing: the last one under
        else:
            best = int(torch.argmin((options - target).abs()))  # first minimum: the smaller count wins ties
        top = 0 if best == 0 else int(ends[best - 1]) + 1  # events in the top-k part
        threshold = float("inf") if best == 0 else float(ev.values[top - 1])
        counts = torch.bincount(ev.unit[:top], minlength=len(ranked)).tolist()
        filled = 0
        if fill:
            filled = self._fill(ev, top, target - int(options[best]), counts, ranked)
        choices, k = [], 0  # counts already include the filled entries
        for r, n in zip(ranked, counts):
            choice, n_sensitive = self._choose(r, n, threshold)
            choices.append(choice)
            k += n_sensitive
        alloc = Allocation(
            arch=self.arch, structured_type=self.structured, rank=self.rank, alpha=self.alpha, beta=self.beta,
            choices=choices, target=target, threshold=None if best == 0 else threshold, num_sensitive=k,
            pool_size=self.pool_size, backbone_params=self.backbone_params, extra={"fill": fill, "filled": filled},
        )
        if ev.realised.numel() == 0 or int(ev.realised[-1]) < target:
            # Every event adds at least one parameter, so a list cut at target+1 events alone would
            # exceed the target: falling short means all lists were complete and this is the most
            # the positive scores can buy.
            alloc.max_realisable = int(ev.realised[-1]) if ev.realised.numel() else 0
            warnings.warn(f"SPT budget {target:,} is out of reach: only {alloc.max_realisable:,} parameters "
                          "have positive sensitivity under these rules", stacklevel=2)
        return alloc

    @staticmethod
    def _fill(ev: _Events, start: int, room: int, counts: list[int], ranked: list[_Ranked]) -> int:
        """Walk the ranking past the top-k taking what fits; updates ``counts``, returns entries taken."""
        blocked: set[int] = set()
        taken = 0
        units, incr = ev.unit.tolist(), ev.incr.tolist()
        for pos in range(start, len(units)):
            if room <= 0:
                break
            u = units[pos]
            if u in blocked:
                continue
            if incr[pos] <= room:
                room -= incr[pos]
                counts[u] += 1
                taken += 1
            else:
                blocked.add(u)  # its jump does not fit, and later entries of it would need the jump
        return taken

    def _choose(self, r: _Ranked, n: int, threshold: float) -> tuple[UnitChoice, int]:
        """The unit's choice given n (its entries in the allocation); also its sensitive count."""
        u = r.unit
        if n == len(r.values) and n and not r.complete and float(r.values[-1]) >= threshold:
            # the list was cut at the target's rank; ties at the threshold may reach past it
            mask = r.flat >= threshold
            n = int(mask.sum())
            idx = torch.nonzero(mask.to("cpu")).reshape(-1)
        else:
            idx = r.indices[:n]
        if n == 0:
            return UnitChoice(u, "none", 0, 0), 0
        if r.cap is not None and n >= r.cap:
            # k counts every entry at or above the threshold, also those a structured module
            # subsumes (the top-k list stops at the cap)
            k = max(n, int((r.flat >= threshold).sum())) if threshold != float("inf") else n
            return UnitChoice(u, "whole" if u.kind == "vector" else "structured", r.jump, k), k
        return UnitChoice(u, "unstructured", n, n, torch.sort(idx.to(torch.long)).values), n


def allocate(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    budget: str | int | float,
    structured: str = "lora",
    alpha: float = 10.0,
    beta: float = 5.0,
    rank: int = 8,
    fill: bool = False,
) -> Allocation:
    """Allocate ``budget`` tuned parameters over ``model``'s pool by its sensitivity ``scores``.

    One-shot form of :class:`Allocator` (use that to try several budgets on one score set).
    ``model`` is only read for its structure, so a ``meta``-device model works.
    """
    return Allocator(model, scores, structured, alpha, beta, rank).allocate(budget, fill=fill)
