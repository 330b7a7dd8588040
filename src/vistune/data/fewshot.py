"""Seeded, stratified index selection: few-shot sampling, split carving,
proportional caps.

All selections are *per class* with a generator seeded from
``(seed, class, purpose)``. Why per class: adding or removing samples of one
class never changes which samples another class gets, and the result does
not depend on the order classes happen to be visited. Why positions in a
caller-given sequence: readers list files sorted by relative path, so the
same seed picks the same files on every machine regardless of file-system
order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import DataError

# Distinct stream tags so that e.g. split carving and few-shot sampling with
# the same seed do not reuse the same permutation.
PURPOSE_FEWSHOT = 1
PURPOSE_CARVE = 2
PURPOSE_CAP = 3
# 4 is taken by the VTAB-1k subset draw (loader._vtab_subset).
PURPOSE_LONGTAIL = 5


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def class_members(labels: Sequence[int]) -> dict[int, list[int]]:
    """label -> ascending positions of that label."""
    members: dict[int, list[int]] = {}
    for pos, lab in enumerate(labels):
        lab = int(lab)
        if lab < 0:
            raise DataError(f"label at position {pos} is negative ({lab})")
        members.setdefault(lab, []).append(pos)
    return dict(sorted(members.items()))


def class_orders(labels: Sequence[int], seed: int, purpose: int = PURPOSE_FEWSHOT) -> dict[int, list[int]]:
    """label -> that class's positions in a seeded random order.

    Taking a prefix of an order is a uniform sample without replacement;
    walking further along it gives deterministic *replacements* when a
    chosen file turns out to be unreadable.
    """
    seed = _check_seed(seed)
    orders = {}
    for lab, pos in class_members(labels).items():
        rng = np.random.default_rng([seed, lab, purpose])
        orders[lab] = [pos[i] for i in rng.permutation(len(pos))]
    return orders


def fewshot_indices(
    labels: Sequence[int], k: int, seed: int, *, num_classes: int | None = None, class_names: Sequence[str] | None = None
) -> list[int]:
    """Positions of exactly ``k`` samples per class, sorted ascending.

    Deterministic for a given ``(labels, k, seed)``. Raises :class:`DataError`
    naming the class when a class has fewer than ``k`` samples; with
    ``num_classes`` given, classes absent from ``labels`` count as having 0
    (a few-shot run that silently lacks a class is not a K-shot run).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"shots must be a positive integer, got {k!r}")
    members = class_members(labels)
    wanted = range(num_classes) if num_classes is not None else members.keys()
    for lab in wanted:
        have = len(members.get(lab, ()))
        if have < k:
            raise DataError(
                f"few-shot: class {_class_name(lab, class_names)} has only {have} training samples, need {k}"
            )
    orders = class_orders(labels, seed, PURPOSE_FEWSHOT)
    return sorted(p for order in orders.values() for p in order[:k])


def _class_name(lab: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 0 <= lab < len(class_names) and class_names[lab] != str(lab):
        return f"{class_names[lab]!r} (label {lab})"
    return f"label {lab}"


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def stratified_split(
    labels: Sequence[int], fractions: Sequence[float], seed: int
) -> list[list[int]]:
    """Carve positions into parts with the given fractions, per class.

    ``fractions`` are for parts 1..n; part 0 receives the remainder (so
    ``(0.1, 0.2)`` gives train/val/test = 70/10/20). Per class, part sizes
    are rounded half-up and part 0 keeps at least one sample, so a tiny
    class is never carved out of training entirely. Each part is sorted.
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise DataError(f"split fractions must be >= 0 and sum to < 1, got {tuple(fractions)}")
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for order in class_orders(labels, seed, PURPOSE_CARVE).values():
        n = len(order)
        sizes = [_round_half_up(f * n) for f in fractions]
        # Keep >= 1 for the remainder part: shrink the largest carved parts.
        while sum(sizes) > n - 1 and sum(sizes) > 0:
            j = int(np.argmax(sizes))
            sizes[j] -= 1
        start = 0
        for j, size in enumerate(sizes, start=1):
            parts[j].extend(order[start : start + size])
            start += size
        parts[0].extend(order[start:])
    return [sorted(p) for p in parts]


def longtail_counts(n_max: int, factor: float, num_classes: int) -> list[int]:
    """Images kept per *rank* (head first) in a long-tailed split: CIFAR-10-LT's rule.

    Cao et al. 2019 (LDAM, ``imbalance_cifar.py::get_img_num_per_cls``) keep
    ``int(img_max * (imb_factor ** (cls_idx / (cls_num - 1.0))))`` with ``imb_factor = 1/R``;
    this is that expression evaluated the same way (float power of ``1/R``, then truncation),
    so the published counts come out exactly (CIFAR-10, R=100: 5000, 2997, ..., 50). The tail
    keeps ``int(n_max * (1/R))`` whatever the number of classes.
    """
    if num_classes < 2:
        raise DataError(f"imbalance needs at least 2 classes, got {num_classes}")
    imb_factor = 1.0 / factor
    return [int(n_max * (imb_factor ** (i / (num_classes - 1.0)))) for i in range(num_classes)]


def longtail_class_order(num_classes: int, seed: int) -> list[int]:
    """Labels from head to tail: a permutation seeded by ``seed`` alone.

    Why a permutation and not label order: with label order, class 0 would always be the head,
    so a result on "the few-shot classes" would be a result on whichever classes a data set
    happens to list last. A stream of its own, so the same seed's image draws are unaffected.
    """
    seed = _check_seed(seed)
    return [int(c) for c in np.random.default_rng([seed, PURPOSE_LONGTAIL]).permutation(num_classes)]


def longtail_quota(
    n_max: int, factor: float, num_classes: int, seed: int, class_names: Sequence[str] | None = None
) -> tuple[list[int], dict[int, int]]:
    """(head-to-tail labels, label -> images kept) for a long tail of factor ``factor``.

    Refuses (one line naming the class) a plan that leaves a class with no image: a run that
    silently lacks a class would not be the long-tailed version of the data set.
    """
    order = longtail_class_order(num_classes, seed)
    counts = longtail_counts(n_max, factor, num_classes)
    quota = {lab: n for lab, n in zip(order, counts)}
    for rank, lab in enumerate(order):
        if quota[lab] < 1:
            raise DataError(
                f"imbalance {factor:g}: class {_class_name(lab, class_names)} (rank {rank + 1} of {num_classes}) "
                f"would keep int({n_max} * {factor:g}^(-{rank}/{num_classes - 1})) = 0 training images; "
                f"the head class has {n_max}; lower the imbalance or keep more images per class"
            )
    return order, dict(sorted(quota.items()))


#: per-split salt of :func:`seeded_cap`'s draw
_CAP_SALT = {"train": 1, "val": 2, "test": 3}


def seeded_cap(n: int, cap: int, split_seed: int, split: str) -> list[int]:
    """Positions of at most ``cap`` of a split's ``n`` items, a seeded draw kept in file order.

    The cap of sources with no class per image (dense data): one permutation per
    ``(split_seed, split)``, its first ``cap`` positions, sorted.
    """
    if n <= cap:
        return list(range(n))
    rng = np.random.default_rng([split_seed, _CAP_SALT[split]])
    return sorted(int(i) for i in rng.permutation(n)[:cap])


def proportional_quota(counts: Mapping[int, int], total: int) -> dict[int, int]:
    """Per-class quotas summing to ``min(total, sum(counts))``, proportional
    to ``counts`` (largest-remainder rounding, ties to the lower label), so a
    capped split keeps the class balance of the full one."""
    n = sum(counts.values())
    if total >= n:
        return dict(counts)
    exact = {lab: c * total / n for lab, c in counts.items()}
    quota = {lab: int(np.floor(v)) for lab, v in exact.items()}
    left = total - sum(quota.values())
    by_rem = sorted(exact, key=lambda lab: (-(exact[lab] - quota[lab]), lab))
    for lab in by_rem[:left]:
        quota[lab] += 1
    return quota
