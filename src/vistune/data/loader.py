"""``load_data``: spec -> three ready-to-train datasets plus a manifest.

Pipeline (the same for every reader):

1. read the layout (the reader of the spec's kind in :mod:`.registry`: :mod:`.folder`,
   :mod:`.npz`, :mod:`.vtab`, :mod:`.fgvc`, :mod:`.fashion_mnist`, :mod:`.hf`, :mod:`.tv`,
   :mod:`.wds`) into ids + labels per split, and check the class set (:func:`check_classes`);
2. carve missing splits, seeded and stratified by ``split_seed``
   (:func:`complete_splits`);
3. ``trainval``: merge val into train, val = None;
4. choose samples: ``shots`` -> exactly K per class from train (seeded by
   ``seed``); ``imbalance`` R > 1 -> a long-tailed train split (CIFAR-10-LT's
   rule, :func:`longtail_plan`); ``max_per_split`` -> a class-proportional
   seeded cap;
5. decode (or, in lazy mode, verify) every chosen file once, *before
   training*; nothing that is not chosen is decoded. Unreadable files are
   skipped (one warning each, listed in ``skipped``); for few-shot/capped
   selections the next file of the same class in the seeded order replaces
   them, so K stays exact;
6. keep the decoded ``uint8`` images in memory when they fit ``cache_mb``,
   otherwise decode lazily per item (files were still all checked in 5).
   Exception: a ``wds:`` training split taken whole that does not fit is *streamed*
   (``ImageDataset.stream``; the engine reads it shard by shard) and is not read in 5 —
   checking it would read every shard on every rank; its images are checked as streamed.

Dense specs (``camvid:``, ``voc:``, ``pennfudan:``; :mod:`.dense`) go through steps 1-4 in
:func:`select_dense` (same registry, split rules, checks and caps' seed); their decoding, which
letterboxes image, mask and boxes together, is :func:`vistune.dense.datasets.load_dense_data`'s,
on the same threads (:func:`parallel_map`, :func:`decode_workers`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError
from .fewshot import (
    PURPOSE_CAP,
    PURPOSE_FEWSHOT,
    _check_seed,
    class_orders,
    fewshot_indices,
    longtail_quota,
    proportional_quota,
    seeded_cap,
    stratified_split,
)
from .registry import CLASSIFY, READERS, ReadOptions, check_task, parse_spec
from .sources import SPLITS, ImageSource, RawSplit, SourceData
from .transforms import Normalize, make_augment

log = logging.getLogger("vistune.data")

#: Fractions carved when a split is missing (see :func:`complete_splits`).
VAL_FRACTION = 0.1
TEST_FRACTION = 0.2
DEFAULT_CACHE_MB = 2048
MANIFEST_FORMAT = "vistune.data/1"


def read_source(spec: str, opts: ReadOptions = ReadOptions(), task: str | None = None) -> SourceData:
    """Parse ``spec``, check its reader feeds ``task`` (None: whichever it feeds) and read its
    layout (ids + labels or dense targets, no pixels decoded); a label source's class set is
    then checked (:func:`check_classes`). ``tv:`` downloads here when its files are absent."""
    kind, arg = parse_spec(spec)
    reader = READERS[kind]
    check_task(kind, task, spec)
    if kind != "hf" and (opts.image_column is not None or opts.label_column is not None):
        raise DataError(f"image_column/label_column apply to hf: data specs only, not {spec!r}")
    src = reader.read(arg, opts)
    if reader.tasks == CLASSIFY:
        check_classes(src)
    return src


def check_classes(src: SourceData) -> None:
    """Refuse a class set that cannot give a meaningful classifier.

    Every reader declares its classes (folder names, a class list, a table,
    or :func:`~vistune.data.sources.classes_from_train`); here, for all of
    them alike: at least 2 classes, at least 2 of them present in the train
    split (a one-class training set "learns" to always answer that class and
    reports 100%), and every label of every split inside the declared range,
    naming where an offending label came from.
    """
    names = src.class_names
    if len(names) < 2:
        shown = f" ({', '.join(repr(n) for n in names)})" if names else ""
        raise DataError(
            f"{src.kind}: {src.root} has {len(names)} class{'' if len(names) == 1 else 'es'}{shown}; "
            "a classifier needs at least 2"
        )
    for split, raw in src.splits.items():
        for row, lab in enumerate(raw.labels):
            if not 0 <= lab < len(names):
                raise DataError(
                    f"{src.kind}: {src.origin(split)}: label {lab} (row {row}) is outside the {len(names)} declared "
                    f"classes 0..{len(names) - 1}"
                )
    present = sorted(set(src.splits["train"].labels))
    if not present:
        raise DataError(f"{src.kind}: {src.origin('train')}: the train split is empty")
    if len(present) < 2:
        raise DataError(
            f"{src.kind}: {src.origin('train')}: the train split has samples of only one class "
            f"({names[present[0]]!r}); a classifier needs at least 2"
        )


class ImageDataset(Dataset):
    """One split. Items are ``(FloatTensor[3, H, W] normalised, int label)``.

    ``images`` is the cached ``uint8 (N, C, H, W)`` tensor (C = 1 for grey
    data, expanded to 3 on access) or ``None`` in lazy mode, where each item
    is decoded from ``source`` on access. Engines that batch by hand can use
    ``images[idx]`` + ``normalize(batch)`` directly; ``ids[i]`` is the
    manifest id of item ``i``.

    ``stream`` (``wds:`` training splits too large to cache, else None): the split's shards,
    which the engine's training loader reads sequentially instead of indexing items; indexing
    still works (random access into the shards) for everything else.
    """

    stream: Any = None

    def __init__(
        self,
        ids: list[str],
        targets: list[int],
        *,
        size: int,
        normalize: Normalize,
        augment: Callable[[torch.Tensor], torch.Tensor] | None,
        images: torch.Tensor | None,
        source: ImageSource | None,
    ) -> None:
        if images is None and source is None:
            raise DataError("internal: ImageDataset needs cached images or a source")
        self.ids = ids
        self.targets = targets
        self.size = size
        self.normalize = normalize
        self.augment = augment
        self.images = images
        self.source = source

    def __len__(self) -> int:
        return len(self.ids)

    def uint8(self, index: int) -> torch.Tensor:
        """The resized, un-normalised, un-augmented image ``(C, H, W)``."""
        if self.images is not None:
            return self.images[index]
        assert self.source is not None
        return torch.from_numpy(self.source.load(self.ids[index], self.size))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.uint8(index)
        if self.augment is not None:
            x = self.augment(x)
        return self.normalize(x), self.targets[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch used by DataLoader: one gather + one normalise per
        batch instead of per item (cached, un-augmented case only)."""
        if self.images is None or self.augment is not None:
            return [self[i] for i in indices]
        x = self.normalize(self.images[list(indices)])
        return list(zip(x.unbind(0), (self.targets[i] for i in indices)))

    @property
    def cached(self) -> bool:
        return self.images is not None

    def __add__(self, other: ImageDataset) -> ImageDataset:
        """Both splits as one (the first split's augmentation applies). Splits of one load are
        either all cached or all lazy on the same source, so they always join."""
        if self.size != other.size or (self.images is None) != (other.images is None):
            raise DataError("internal: only splits of one load_data call can be joined")
        images = None if self.images is None else torch.cat([self.images, other.images])
        return ImageDataset(self.ids + other.ids, self.targets + other.targets, size=self.size,
                            normalize=self.normalize, augment=self.augment, images=images,
                            source=self.source or other.source)


@dataclass
class DataSplits:
    """The three splits of one data set plus everything needed to reproduce them.

    ``val`` is None with ``trainval=True`` (the final run trains on train+val
    and does no model selection). ``skipped`` lists ``(file, reason)`` for
    every unreadable image left out. ``info`` carries the load options and
    layout notes that :meth:`manifest` writes out.
    """

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset | None
    num_classes: int
    class_names: list[str]
    skipped: list[tuple[str, str]]
    info: dict[str, Any] = field(default_factory=dict)

    def _split(self, split: str) -> ImageDataset | None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        return getattr(self, split)

    def labels(self, split: str) -> list[int]:
        """Labels of a split in item order; ``[]`` for an absent split."""
        ds = self._split(split)
        return [] if ds is None else list(ds.targets)

    def manifest(self) -> dict[str, Any]:
        """JSON-able record of exactly which samples are in which split.

        Holds the spec and load options, the layout decisions (``notes``), the
        class names, and per split its size, images per class, ids (relative
        paths, or ``"<array>:<row>"``) and labels, plus few-shot K/seed and the
        long-tail plan (``imbalance``). Given the same
        files, ``load_data`` with the recorded options reproduces these ids;
        the ids alone are enough to rebuild the splits by other means.
        """
        splits: dict[str, Any] = {}
        for name in SPLITS:
            ds = self._split(name)
            splits[name] = None if ds is None else {
                "size": len(ds), "class_counts": class_counts(ds.targets, self.num_classes),
                "ids": list(ds.ids), "labels": list(ds.targets),
            }  # fmt: skip
        out = dict(self.info)
        out.update(
            format=MANIFEST_FORMAT,
            num_classes=self.num_classes,
            class_names=list(self.class_names),
            splits=splits,
            skipped=[[f, r] for f, r in self.skipped],
        )
        return out


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    """Images per label ``0..num_classes-1`` (what the long-tail metrics group classes by)."""
    counts = Counter(int(lab) for lab in labels)
    return [counts.get(c, 0) for c in range(num_classes)]


def longtail_plan(
    labels: Sequence[int], factor: float, seed: int, *, num_classes: int, class_names: Sequence[str],
    shots: int | None = None, cap: int | None = None,
) -> tuple[dict[int, int], dict[str, Any]]:
    """Per-class quotas of a long-tailed training split, and its record for ``splits.json``.

    Class at rank ``i`` of a seeded permutation keeps ``int(n_max * (1/R) ** (i / (C-1)))``
    images (:func:`~vistune.data.fewshot.longtail_counts`). ``n_max`` is ``shots`` when given
    (the K-shot set with its tail cut short), else the smallest class's count in the pool — after
    the ``max_per_split`` cap when one applies — so every class can give its share exactly (for
    a balanced pool such as CIFAR-10 that is the per-class count, as in Cao et al.). The images
    are a prefix of each class's seeded few-shot order, so for one seed a larger R keeps a
    subset of a smaller R's images, and ``shots`` + R a subset of the K-shot set.
    """
    if shots is not None:
        n_max = shots
    else:
        pool = Counter(labels)
        if cap is not None and len(labels) > cap:
            pool = Counter(proportional_quota(pool, cap))
        missing = [c for c in range(num_classes) if pool.get(c, 0) == 0]
        if missing:
            c = missing[0]
            raise DataError(f"imbalance: class {class_names[c]!r} (label {c}) has no training images; "
                            "a long-tailed split needs every class")
        n_max = min(pool[c] for c in range(num_classes))
    order, quota = longtail_quota(n_max, factor, num_classes, seed, class_names)
    record = {
        "factor": factor, "seed": seed, "n_max": n_max, "head_to_tail": order,
        "counts": [quota[c] for c in range(num_classes)],
        "rule": "class at rank i of head_to_tail keeps int(n_max * (1/factor) ** (i / (C - 1))) (Cao et al. 2019)",
    }  # fmt: skip
    return quota, record


def complete_splits(src: SourceData, split_seed: int) -> tuple[dict[str, RawSplit], list[str]]:
    """Fill in missing val/test splits by seeded stratified carving.

    Rules (never select a model on the test split):

    * train+val+test given: used as is.
    * train+test: val = 10% of train.
    * train+val, no test (e.g. hymenoptera ``train/`` ``val/``): the given val
      becomes **test** — it is the held-out set results on such layouts are
      reported on — and a fresh 10% val is carved from train for model
      selection.
    * train only (flat class folder, e.g. flowers5): 70/10/20 train/val/test.

    ``split_seed`` is separate from the few-shot ``seed`` so that runs over
    several few-shot seeds share one test set.
    """
    splits = dict(src.splits)
    if src.fixed_splits:
        return splits, []
    train = splits["train"]
    has_val, has_test = "val" in splits, "test" in splits
    if has_val and has_test:
        return splits, ["train/val/test given"]
    if has_val:
        splits["test"] = splits.pop("val")
    if has_val or has_test:
        keep, val = stratified_split(train.labels, (VAL_FRACTION,), split_seed)
        splits["train"], splits["val"] = train.subset(keep), train.subset(val)
        note = (
            "the given val split is used as test; " if has_val else ""
        ) + f"val carved from train: {VAL_FRACTION:.0%} per class, split_seed={split_seed}"
        return splits, [note]
    keep, val, test = stratified_split(train.labels, (VAL_FRACTION, TEST_FRACTION), split_seed)
    splits.update(train=train.subset(keep), val=train.subset(val), test=train.subset(test))
    frac_train = 1 - VAL_FRACTION - TEST_FRACTION
    return splits, [
        f"no given splits: carved {frac_train:.0%}/{VAL_FRACTION:.0%}/{TEST_FRACTION:.0%} train/val/test "
        f"per class, split_seed={split_seed}"
    ]


def check_splits(src: SourceData, splits: dict[str, RawSplit], notes: list[str]) -> None:
    """Refuse an empty split; warn (and note in the manifest) when train and test share ids."""
    for name, split in splits.items():
        if not len(split):
            raise DataError(
                f"{src.kind}: the {name} split of {src.root} is empty "
                f"({'; '.join(notes)}); classes are too small to carve it — add images or give split folders"
            )
    overlap = set(splits["train"].ids) & set(splits.get("test", RawSplit([], [])).ids)
    if overlap:
        example = sorted(overlap)[0]
        log.warning("vistune.data: %d ids are in both train and test (e.g. %s)", len(overlap), example)
        notes.append(f"WARNING: {len(overlap)} ids in both train and test, e.g. {example}")


def _decode(
    source: ImageSource, ids: list[str], size: int, keep: bool, workers: int
) -> list[tuple[np.ndarray | None, str | None]]:
    """Decode ids in parallel; (array-or-None, error-or-None) per id.

    Threads, not processes: PIL releases the GIL while decoding/resampling,
    and threads share the result arrays without pickling.
    """

    def work(chunk: list[str]) -> list[tuple[np.ndarray | None, str | None]]:
        out: list[tuple[np.ndarray | None, str | None]] = []
        for sid in chunk:
            try:
                if keep:
                    out.append((source.load(sid, size), None))
                else:
                    source.verify(sid, size)
                    out.append((None, None))
            except Exception as e:  # any decoder failure means "unreadable file"
                out.append((None, f"{type(e).__name__}: {e}"))
        return out

    if source.infallible:
        # In-memory arrays: one vectorised call per chunk; threads would only
        # fight over the GIL (measured slower on small images).
        step = 1024
        return [
            (arr if keep else None, None)
            for i in range(0, len(ids), step)
            for arr in source.load_many(ids[i : i + step], size)
        ]
    chunk_size = 64
    chunks = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
    return list(chain.from_iterable(parallel_map(work, chunks, workers)))


def decode_workers(workers: int | None) -> int:
    """Decoding threads for a load: ``workers`` as given (at least 1), default the CPU count,
    at most 8 (past that, reading the files, not decoding them, is the limit)."""
    return max(1, min(8, os.cpu_count() or 1)) if workers is None else max(1, int(workers))


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """``[fn(x) for x in items]`` on ``workers`` threads, in order (one thread: no pool).

    Threads, not processes: PIL releases the GIL while decoding/resampling, and threads share
    the result arrays without pickling. Every load of every reader decodes through here.
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def _materialise(
    name: str,
    split: RawSplit,
    source: ImageSource,
    *,
    size: int,
    quota: dict[int, int] | None,
    seed: int,
    purpose: int,
    keep: bool,
    workers: int,
    skipped: list[tuple[str, str]],
    check: bool = True,
) -> tuple[list[int], list[np.ndarray] | None, dict[int, int]]:
    """Decode the selected samples of one split, replacing unreadable ones.

    Without a quota every sample is taken. With a per-class quota, each class
    walks its seeded order (:func:`class_orders`) until the quota is met with
    *readable* files, so a corrupt file is replaced by the next one in that
    order. Returns sorted positions, their arrays (if ``keep``) and the
    per-class shortfall.
    """
    if quota is None:
        queues = {-1: list(range(len(split)))}
        need = {-1: len(split)}
    else:
        orders = class_orders(split.labels, seed, purpose)
        queues = {c: orders.get(c, []) for c in quota}
        need = dict(quota)
    got = dict.fromkeys(queues, 0)
    cursor = dict.fromkeys(queues, 0)
    kept: dict[int, np.ndarray | None] = {}
    validate = keep or (check and not source.infallible)
    while True:
        batch: list[tuple[int, int]] = []
        for c, queue in queues.items():
            take = queue[cursor[c] : cursor[c] + need[c] - got[c]]
            cursor[c] += len(take)
            batch.extend((c, p) for p in take)
        if not batch:
            break
        if validate:
            results = _decode(source, [split.ids[p] for _, p in batch], size, keep, workers)
        else:
            results = [(None, None)] * len(batch)
        for (c, p), (arr, err) in zip(batch, results):
            if err is not None:
                where = source.describe(split.ids[p])
                log.warning("vistune.data: skipping unreadable image %s (%s split): %s", where, name, err)
                skipped.append((where, err))
            else:
                got[c] += 1
                kept[p] = arr
    positions = sorted(kept)
    arrays = [kept[p] for p in positions] if keep else None
    shortfall = {c: need[c] - got[c] for c in queues if got[c] < need[c]}
    return positions, arrays, shortfall  # type: ignore[return-value]


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    if all(a.shape[0] == 1 for a in arrays):
        return torch.from_numpy(np.stack(arrays))
    return torch.from_numpy(np.stack([np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]))


def _vtab_subset(splits: dict[str, RawSplit], subset: tuple[int, int], split_seed: int, shots: int | None,
                 kind: str) -> tuple[dict[str, RawSplit], str]:
    """VTAB-1k: ``n_train`` + ``n_val`` random images of the training pool become train and val."""
    if shots is not None:
        raise DataError("subset (VTAB-1k train/val sizes) and shots (few-shot sampling) exclude each other")
    n_train, n_val = (_positive_int(int(n), "subset size") for n in subset)
    pool = splits["train"]
    if len(pool) < n_train + n_val:
        raise DataError(f"{kind}: subset {n_train}/{n_val} needs {n_train + n_val} training images, the pool has {len(pool)}")
    order = np.random.default_rng([split_seed, 4]).permutation(len(pool))
    out = dict(splits)
    out["train"] = pool.subset(sorted(order[:n_train].tolist()))
    out["val"] = pool.subset(sorted(order[n_train:n_train + n_val].tolist()))
    dropped = " (the original val split is not used)" if "val" in splits else ""
    return out, f"subset: {n_train} train / {n_val} val drawn from the training pool, split_seed={split_seed}{dropped}"


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def load_data(
    spec: str,
    *,
    img_size: int,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    shots: int | None = None,
    seed: int = 0,
    augment: str | None = None,
    trainval: bool = False,
    max_per_split: int | None = None,
    subset: tuple[int, int] | None = None,
    split_seed: int = 0,
    cache_mb: float = DEFAULT_CACHE_MB,
    workers: int | None = None,
    data_root: str | os.PathLike[str] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    imbalance: float | None = None,
) -> DataSplits:
    """Load the data set named by ``spec`` (see :func:`parse_spec`).

    Args:
        img_size: every image is resized (bicubic, directly, no crop) to
            ``img_size x img_size``; grey becomes 3-channel.
        mean, std: RGB normalisation applied per item.
        shots, seed: exactly ``shots`` training samples per class, chosen by
            ``seed``. Val and test are not subsampled (test never is).
        augment: ``None``/``"none"`` or ``"flip"`` (train split only).
        trainval: train on train+val, ``val=None`` (VTAB: ``train800val200``).
        max_per_split: class-proportional seeded cap on every split's size
            (for quick runs on large sets; not applied to a few-shot train
            split, which ``shots`` already bounds). Results on a capped test
            split are not comparable with published numbers; the manifest
            records the cap.
        subset: ``(n_train, n_val)``, VTAB-1k's protocol (800, 200): both drawn at random
            (by ``split_seed``, so every seed and method shares them) from the training pool,
            any original val split discarded, test untouched; ``trainval`` then trains on all
            ``n_train + n_val``. Not combinable with ``shots``.
        imbalance: ``R >= 1``: make the *training* split long-tailed, CIFAR-10-LT style
            (:func:`longtail_plan`; head-to-tail order and images chosen by ``seed``). Applied
            last, to the split that trains: after ``subset`` and the ``trainval`` merge, on
            ``shots`` (n_max = K) or on the ``max_per_split`` cap. Val and test are untouched;
            ``R = 1`` (or None) changes nothing.
        split_seed: seed for carving missing splits and for the cap; kept
            apart from ``seed`` so few-shot seeds share one test set.
        cache_mb: keep decoded uint8 images in memory when they fit this
            budget (fast epochs); above it, items are decoded on access.
            Either way every chosen file is checked once here to find bad
            ones (lazy mode: a cheap reduced-scale decode, no resize).
        workers: decoding threads (default: CPU count, at most 8).
        data_root: where ``tv:`` data sets live and are downloaded to
            (default ``$VISTUNE_DATA_ROOT``, else ``~/.cache/vistune/data``);
            other kinds name their own path and ignore it (``hf:`` uses the
            ``datasets`` library's cache).
        image_column, label_column: the ``hf:`` columns to use instead of the
            first ``Image`` / ``ClassLabel`` feature; an error for other kinds.

    Raises:
        DataError: on any problem with the spec, layout, labels or options,
            before any training could start.
    """
    o = _check_load(spec, img_size, mean, std, shots, seed, augment, trainval, max_per_split, subset, split_seed,
                    cache_mb, workers, imbalance)
    opts = ReadOptions(
        trainval=o.trainval, data_root=None if data_root is None else os.fspath(data_root),
        image_column=image_column, label_column=label_column, split_seed=o.split_seed,
    )  # fmt: skip
    src = read_source(spec, opts, task="classify")
    splits, notes = _arrange_splits(src, o)
    quotas, purposes, longtail = _plan_quotas(src, splits, o, notes)
    datasets, skipped, keep, stream_train = _decode_splits(src, splits, o, quotas, purposes)
    train = datasets["train"]
    assert train is not None
    return DataSplits(
        train=train, val=datasets["val"], test=datasets["test"], num_classes=src.num_classes,
        class_names=list(src.class_names), skipped=skipped,
        info=_manifest(src, o, notes, longtail, keep, stream_train),
    )  # fmt: skip


@dataclass
class _Load:
    """``load_data``'s options once checked, handed from phase to phase as one value."""

    spec: str
    img_size: int
    normalize: Normalize
    augment: str | None
    train_augment: Any
    shots: int | None
    seed: int
    split_seed: int
    max_per_split: int | None
    imbalance: float | None
    trainval: bool
    subset: tuple[int, int] | None
    cache_mb: float
    workers: int


def _check_load(spec: str, img_size: Any, mean: Sequence[float], std: Sequence[float], shots: Any, seed: Any,
                augment: str | None, trainval: bool, max_per_split: Any, subset: tuple[int, int] | None,
                split_seed: Any, cache_mb: float, workers: int | None, imbalance: Any) -> _Load:
    """Every scalar option checked (in the order errors are reported) before any file is read."""
    if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)) or img_size < 1:
        raise DataError(f"img_size must be a positive integer, got {img_size!r}")
    img_size = int(img_size)
    normalize = Normalize(mean, std)
    train_augment = make_augment(augment, img_size)
    seed, split_seed = _check_seed(seed), _check_seed(split_seed)
    if shots is not None:
        shots = _positive_int(shots, "shots")
    if max_per_split is not None:
        max_per_split = _positive_int(max_per_split, "max_per_split")
    if imbalance is not None:
        if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float, np.integer, np.floating)) \
                or not np.isfinite(imbalance) or imbalance < 1:
            raise DataError(f"imbalance must be a finite number >= 1, got {imbalance!r}")
        imbalance = float(imbalance) if imbalance > 1 else None  # R = 1: the data as it is
    return _Load(spec=spec, img_size=img_size, normalize=normalize, augment=augment, train_augment=train_augment,
                 shots=shots, seed=seed, split_seed=split_seed, max_per_split=max_per_split, imbalance=imbalance,
                 trainval=bool(trainval), subset=subset, cache_mb=cache_mb, workers=decode_workers(workers))


def _arrange_splits(src: SourceData, o: _Load) -> tuple[dict[str, RawSplit], list[str]]:
    """The final train/val/test files: missing splits carved, the VTAB subset drawn, val merged
    into train for ``trainval``; checked, with the notes for the manifest."""
    splits, notes = complete_splits(src, o.split_seed)
    notes = src.notes + notes
    if o.subset is not None:
        splits, note = _vtab_subset(splits, o.subset, o.split_seed, o.shots, src.kind)
        notes.append(note)
    if o.trainval and not src.handled_trainval:
        if "val" in splits:
            splits["train"] = splits["train"] + splits.pop("val")
            order = sorted(range(len(splits["train"])), key=splits["train"].ids.__getitem__)
            splits["train"] = splits["train"].subset(order)
        notes.append("trainval: val merged into train, no val split")
    if o.trainval:
        splits.pop("val", None)
    check_splits(src, splits, notes)
    return splits, notes


def _plan_quotas(src: SourceData, splits: dict[str, RawSplit], o: _Load, notes: list[str],
                 ) -> tuple[dict[str, dict[int, int] | None], dict[str, tuple[int, int]], dict[str, Any] | None]:
    """Per split, how many images of each class to take (few-shot, cap, long tail; None = all)
    and the (seed, purpose) of the seeded order they are taken in."""
    quotas: dict[str, dict[int, int] | None] = {}
    purposes: dict[str, tuple[int, int]] = {}
    longtail: dict[str, Any] | None = None
    for name, split in splits.items():
        quotas[name], purposes[name] = None, (o.split_seed, PURPOSE_CAP)
        if name == "train" and o.shots is not None:
            # validates the class sizes; _materialise walks the same seeded orders
            fewshot_indices(split.labels, o.shots, o.seed, num_classes=src.num_classes, class_names=src.class_names)
            quotas[name] = dict.fromkeys(range(src.num_classes), o.shots)
            purposes[name] = (o.seed, PURPOSE_FEWSHOT)
        elif o.max_per_split is not None and len(split) > o.max_per_split:
            quotas[name] = proportional_quota(Counter(split.labels), o.max_per_split)
        if name == "train" and o.imbalance is not None:
            quotas[name], longtail = longtail_plan(
                split.labels, o.imbalance, o.seed, num_classes=src.num_classes, class_names=src.class_names,
                shots=o.shots, cap=o.max_per_split,
            )  # fmt: skip
            purposes[name] = (o.seed, PURPOSE_FEWSHOT)
            notes.append(f"imbalance {o.imbalance:g}: long-tailed train split, {longtail['n_max']} (head) to "
                         f"{min(longtail['counts'])} (tail) images per class, order by seed={o.seed}")
    return quotas, purposes, longtail


def _decode_splits(src: SourceData, splits: dict[str, RawSplit], o: _Load,
                   quotas: dict[str, dict[int, int] | None], purposes: dict[str, tuple[int, int]],
                   ) -> tuple[dict[str, ImageDataset | None], list[tuple[str, str]], bool, bool]:
    """Decode (or check) the chosen images of every split into datasets: cached in memory when
    they fit ``cache_mb``; a whole uncached ``wds:`` train split is streamed instead."""
    expected = sum(len(s) if quotas[n] is None else sum(quotas[n].values()) for n, s in splits.items())
    estimate_mb = expected * src.source.channels * o.img_size * o.img_size / 2**20
    keep = estimate_mb <= o.cache_mb
    # a whole wds: train split that is not cached is streamed (see the module docstring, step 6)
    stream_train = (not keep and src.source.streamed and quotas["train"] is None
                    and splits["train"] is src.splits.get("train"))
    skipped: list[tuple[str, str]] = []
    datasets: dict[str, ImageDataset | None] = dict.fromkeys(SPLITS)
    for name in SPLITS:
        if name not in splits:
            continue
        split = splits[name]
        split_seed_or_seed, purpose = purposes[name]
        positions, arrays, shortfall = _materialise(
            name, split, src.source, size=o.img_size, quota=quotas[name], seed=split_seed_or_seed,
            purpose=purpose, keep=keep, workers=o.workers, skipped=skipped,
            check=not (name == "train" and stream_train),
        )  # fmt: skip
        if name == "train" and (o.shots is not None or o.imbalance is not None) and shortfall:
            _raise_shortfall(src, quotas[name], shortfall, o.imbalance)
        if not positions:
            raise DataError(f"{src.kind}: the {name} split of {src.root} has no readable images")
        sub = split.subset(positions)
        datasets[name] = ImageDataset(
            sub.ids, sub.labels, size=o.img_size, normalize=o.normalize,
            augment=o.train_augment if name == "train" else None,
            images=_stack(arrays) if arrays is not None else None,
            source=None if keep else src.source,
        )  # fmt: skip
        if name == "train" and stream_train:
            datasets[name].stream = src.source.stream(  # type: ignore[attr-defined,union-attr]
                "train", size=o.img_size, normalize=o.normalize, augment=o.train_augment,
                num_classes=src.num_classes)
    return datasets, skipped, keep, stream_train


def _raise_shortfall(src: SourceData, quota: dict[int, int] | None, shortfall: dict[int, int],
                     imbalance: float | None) -> None:
    """A few-shot or long-tailed train split lost images to unreadable files: say which class."""
    c = min(shortfall)
    assert quota is not None
    what = "few-shot" if imbalance is None else f"imbalance {imbalance:g}"
    raise DataError(
        f"{what}: class {src.class_names[c]!r} (label {c}) has only {quota[c] - shortfall[c]} readable "
        f"training images, need {quota[c]} (see the skipped-file warnings)"
    )


def _manifest(src: SourceData, o: _Load, notes: list[str], longtail: dict[str, Any] | None, keep: bool,
              stream_train: bool) -> dict[str, Any]:
    """``DataSplits.info``: everything that decided which images a run saw (saved with the run)."""
    return {
        "spec": o.spec, "kind": src.kind, "root": src.root, "img_size": o.img_size,
        "mean": list(o.normalize.shift.flatten().div(255).tolist()),
        "std": list(o.normalize.scale.flatten().div(255).tolist()),
        "split_seed": o.split_seed, "trainval": o.trainval, "max_per_split": o.max_per_split,
        "subset": None if o.subset is None else list(o.subset),
        "fewshot": None if o.shots is None else {"shots": o.shots, "seed": o.seed},
        "imbalance": longtail,
        "augment": o.augment, "cached": keep, "notes": notes,
        **({"streamed": "train"} if stream_train else {}),
    }  # fmt: skip


@dataclass
class DenseSelection:
    """The images and raw targets a dense load decodes: the source, its final splits (ids in
    order, :class:`~vistune.data.dense.RawItem` targets) and the notes for the manifest."""

    src: SourceData
    splits: dict[str, RawSplit]
    notes: list[str]
    max_per_split: int | None
    split_seed: int


def select_dense(
    spec: str,
    task: str,
    *,
    max_per_split: int | None = None,
    split_seed: int = 0,
    trainval: bool = False,
    shots: int | None = None,
    subset: tuple[int, int] | None = None,
    imbalance: float | None = None,
) -> DenseSelection:
    """Which images (and raw targets) of a dense spec go into which split, before decoding.

    The same steps as :func:`load_data`: one parser and reader registry (:func:`read_source`,
    which also refuses a kind that cannot feed ``task``), :func:`complete_splits` (the dense
    layouts fix their splits, so it records and carves nothing), :func:`check_splits`, then
    ``max_per_split`` and ``trainval``. Two rules differ, because runs written before dense
    data joined this loader must select the same images: the cap is a seeded draw of the
    split's positions (:func:`~vistune.data.fewshot.seeded_cap`; no image-level classes to keep
    in proportion), and ``trainval`` appends the (capped) val split to train in order instead of
    re-sorting the merged ids. ``shots``, ``subset`` and ``imbalance`` are refused.
    """
    refused = (("shots", shots, "few-shot sampling needs a class per image"),
               ("subset", subset, "VTAB-1k's train/val draw is a classification protocol"),
               ("imbalance", imbalance, "a long-tailed split needs a class per image"))
    for name, value, why in refused:
        if value is not None:
            raise DataError(f"{name} is for classification data only, not task {task!r}: {why}")
    split_seed = _check_seed(split_seed)
    if max_per_split is not None:
        max_per_split = _positive_int(max_per_split, "max_per_split")
    src = read_source(spec, ReadOptions(split_seed=split_seed), task=task)
    splits, notes = complete_splits(src, split_seed)
    notes = src.notes + notes
    check_splits(src, splits, notes)
    if max_per_split is not None:
        splits = {name: split.subset(seeded_cap(len(split), max_per_split, split_seed, name))
                  for name, split in splits.items()}
    if trainval:
        if "val" in splits:
            splits["train"] = splits["train"] + splits.pop("val")
        notes.append("trainval: val merged into train, no val split")
    return DenseSelection(src, splits, notes, max_per_split, split_seed)
