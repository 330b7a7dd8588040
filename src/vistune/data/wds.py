"""``wds:DIR`` / ``wds:DIR/train-{000000..000127}.tar`` — WebDataset shards, read in place.

Layout (what ``python -m vistune.data shard`` writes, and what any WebDataset tool writes):
``train-*.tar`` (required), ``val-*.tar`` and ``test-*.tar`` (optional; missing splits are carved
by the loader as for every other kind) and an optional ``classes.json`` (a list of class names,
or ``{"classes": [...]}``; without it the classes are ``"0".."C-1"`` from the training labels).
Each sample is a group of adjacent tar members sharing a key (WebDataset's rule: the member name
up to its first dot): one image (``KEY.jpg``/``.jpeg``/``.png``/... , decoded by PIL whatever
it is) and ``KEY.cls`` (the integer label as text). Other members (``KEY.id``) are ignored.

A brace or glob pattern names the *train* shards (e.g. a first few shards for a quick run);
``val-*.tar`` / ``test-*.tar`` beside them are the other splits.

Why read a layout first instead of only streaming: the loader's rules (class-set checks,
carving, ``--shots``, the manifest) need every sample's id and label before training, and the
epoch length must be known to the LR schedule and equal on every rank. So :func:`read_wds`
scans each shard's tar *headers* once (seeking over the image bytes; only the tiny ``.cls``
members are read) and keeps each image's byte range: random access for val/test, few-shot
subsets and the decode cache. The training split, when it is taken whole and does not fit the
decode cache, is instead *streamed* shard by shard through the ``webdataset`` package
(:class:`ShardStream`): the engine gives each rank a fixed, balanced set of shards
(:func:`assign_shards`), each DataLoader worker a part of those, and each worker reads its
shards in a seeded order through a seeded shuffle buffer — so every sample is seen exactly once
per epoch across the job, and the order is a function of ``(seed, epoch, world, workers)``:
a run resumed at an epoch boundary reads the same order.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import random
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vistune.io import write_set_atomic

from .errors import DataError
from .loader import ReadOptions, complete_splits, read_source
from .sources import (
    IMAGE_EXTS,
    SPLITS,
    ImageSource,
    RawSplit,
    SourceData,
    as_label,
    classes_from_train,
)
from .transforms import Normalize, load_image_bytes, verify_image

log = logging.getLogger("vistune.data")

LABEL_EXT = "cls"
CLASSES_FILE = "classes.json"
#: tar members WebDataset's reader skips as metadata (``skip_meta`` of its tar iterator)
_META = re.compile(r"__[^/]*__($|/)")
WDS_FORMAT = "vistune.wds/1"
#: samples a worker's shuffle buffer holds (WebDataset's usual 1000: a few MB of JPEG bytes)
SHUFFLE_BUFFER = 1000


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        raise DataError("wds: data specs need the webdataset package: pip install 'vistune[wds]'") from None
    return webdataset


def _split_key(name: str) -> tuple[str | None, str | None]:
    """WebDataset's own key/extension rule, so the scan and the stream group members alike."""
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


# ------------------------------------------------------------------------------------ layout


def _expand(pattern: str) -> list[Path]:
    """Brace-expand then glob ``pattern``; every brace-expanded name must exist."""
    import braceexpand

    out: list[Path] = []
    for name in braceexpand.braceexpand(pattern):
        if glob.has_magic(name):
            out.extend(Path(p) for p in sorted(glob.glob(name)))
        elif Path(name).is_file():
            out.append(Path(name))
        else:
            raise DataError(f"wds: shard {name} (from the pattern {pattern!r}) does not exist")
    return out


def find_shards(arg: str) -> tuple[Path, dict[str, list[Path]]]:
    """The folder holding the shards and the shard files of each split found there."""
    given = Path(arg).expanduser()
    if given.is_dir():
        folder = given
        found = {s: sorted(folder.glob(f"{s}-*.tar")) for s in SPLITS}
        if not found["train"]:
            raise DataError(f"wds: no train-*.tar shards in {folder} (expected train-000000.tar, ...)")
    else:
        pattern = str(given)
        folder = Path(pattern).parent
        train = _expand(pattern)
        if not train:
            raise DataError(f"wds: the shard pattern {pattern!r} matches no file")
        found = {"train": train, **{s: sorted(folder.glob(f"{s}-*.tar")) for s in ("val", "test")}}
    seen: set[str] = set()
    for split, paths in found.items():
        for p in paths:
            if not p.is_file():
                raise DataError(f"wds: {p} ({split} shard) is not a file")
            if p.name in seen:
                raise DataError(f"wds: shard {p.name} is listed twice (ids are shard name/key, so names must differ)")
            seen.add(p.name)
    return folder, {s: p for s, p in found.items() if p}


@dataclass(frozen=True)
class Member:
    """Where one sample's image bytes lie in its shard."""

    shard: int
    offset: int
    size: int
    ext: str


def scan_shard(path: Path, shard: int, where: str) -> tuple[list[str], list[int], dict[str, Member]]:
    """Keys, labels and image byte ranges of one shard, in file order; tar headers only.

    A sample without an image or a ``.cls`` member, a label that is not an integer, or a key
    whose members are not adjacent (WebDataset would read it as two samples) is refused here,
    naming the shard and key, before anything trains.
    """
    keys: list[str] = []
    labels: list[int] = []
    members: dict[str, Member] = {}
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    order: list[str] = []
    try:
        with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            last = None
            for info in tar:
                if not info.isreg():
                    continue
                if _META.match(info.name):  # WebDataset skips these too (its skip_meta rule)
                    continue
                key, ext = _split_key(info.name)
                if key is None or ext is None:
                    continue
                if key != last:
                    if key in groups:
                        raise DataError(f"wds: {path}: the members of sample {key!r} are not adjacent "
                                        "(a WebDataset sample's files must follow each other in the tar)")
                    groups[key] = {}
                    order.append(key)
                    last = key
                groups[key][ext.lower()] = info
            for key in order:
                group = groups[key]
                image = next((e for e in IMAGE_EXTS if e in group), None)
                if image is None or LABEL_EXT not in group:
                    need = f"an image member ({'/'.join('.' + e for e in IMAGE_EXTS[:3])}, ...)" if image is None \
                        else f"a .{LABEL_EXT} member (the integer label)"
                    raise DataError(f"wds: {path}: sample {key!r} has no {need}; its members: "
                                    f"{', '.join(key + '.' + e for e in sorted(group))}")
                fh.seek(group[LABEL_EXT].offset_data)
                text = fh.read(group[LABEL_EXT].size).decode("utf-8", "replace")
                labels.append(as_label(text, f"wds: {path}:{key}.{LABEL_EXT}"))
                keys.append(key)
                info = group[image]
                members[f"{path.name}/{key}"] = Member(shard, info.offset_data, info.size, image)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"wds: cannot read {where} shard {path}: {err}") from None
    if not keys:
        raise DataError(f"wds: {path} ({where} shard) holds no samples (no KEY.<image> + KEY.cls members)")
    return keys, labels, members


def _read_classes(folder: Path) -> list[str] | None:
    path = folder / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"wds: cannot read {path}: {err}") from None
    names = data.get("classes") if isinstance(data, dict) else data
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"wds: {path}: expected a list of class names, or an object with a 'classes' list")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise DataError(f"wds: {path}: class name {dup!r} appears more than once")
    return list(names)


class TarImages(ImageSource):
    """Images inside shards, addressed as ``"<shard file name>/<key>"`` (random access by byte range).

    ``streamed``: the loader does not decode a training split it streams before training
    (that would read every shard on every rank); such images are checked as they are read.
    """

    streamed = True

    def __init__(self, shards: list[Path], members: dict[str, Member], split_shards: dict[str, list[int]],
                 counts: list[int]) -> None:
        self.shards = [str(p) for p in shards]
        self.members = members
        self.split_shards = split_shards
        self.counts = counts

    def encoded(self, sample_id: str) -> tuple[bytes, str]:
        m = self.members[sample_id]
        with open(self.shards[m.shard], "rb") as fh:
            fh.seek(m.offset)
            data = fh.read(m.size)
        if len(data) != m.size:
            raise OSError(f"{self.shards[m.shard]} is shorter than when it was scanned")
        return data, m.ext

    def load(self, sample_id: str, size: int) -> np.ndarray:
        return load_image_bytes(self.encoded(sample_id)[0], size)

    def verify(self, sample_id: str, size: int) -> None:
        verify_image(io.BytesIO(self.encoded(sample_id)[0]))

    def describe(self, sample_id: str) -> str:
        m = self.members.get(sample_id)
        return f"{self.shards[m.shard]}:{sample_id.rpartition('/')[2]}" if m else sample_id

    def stream(self, split: str, *, size: int, normalize: Normalize,
               augment: Callable[[torch.Tensor], torch.Tensor] | None, num_classes: int) -> ShardSet:
        idx = self.split_shards[split]
        return ShardSet([self.shards[i] for i in idx], [self.counts[i] for i in idx], size=size,
                        normalize=normalize, augment=augment, num_classes=num_classes)


def read_wds(arg: str) -> SourceData:
    """Scan the shards named by ``arg`` (see the module docstring) into ids + labels per split."""
    _webdataset()
    folder, found = find_shards(arg)
    shards: list[Path] = []
    split_shards: dict[str, list[int]] = {}
    counts: list[int] = []
    members: dict[str, Member] = {}
    splits: dict[str, RawSplit] = {}
    origins: dict[str, str] = {}
    for split, paths in found.items():
        ids: list[str] = []
        labels: list[int] = []
        split_shards[split] = []
        for p in paths:
            i = len(shards)
            shards.append(p)
            keys, labs, mem = scan_shard(p, i, split)
            split_shards[split].append(i)
            counts.append(len(keys))
            ids.extend(f"{p.name}/{k}" for k in keys)
            labels.extend(labs)
            members.update(mem)
        splits[split] = RawSplit(ids, labels)
        origins[split] = f"{folder}/{paths[0].name}..{paths[-1].name} ({len(paths)} {split} shards)" \
            if len(paths) > 1 else str(paths[0])
    notes = [f"wds shards: {', '.join(f'{s}={len(p)}' for s, p in found.items())}"]
    class_names = _read_classes(folder)
    if class_names is None:
        class_names = classes_from_train("wds", splits, origins)
        notes.append(f"no {CLASSES_FILE}: {len(class_names)} classes from the training labels")
    else:
        notes.append(f"{len(class_names)} classes from {folder / CLASSES_FILE}")
    source = TarImages(shards, members, split_shards, counts)
    return SourceData("wds", str(folder.resolve()), source, splits, class_names, notes, origins=origins)


# ------------------------------------------------------------------------------------ stream


def assign_shards(counts: Sequence[int], parts: int) -> list[list[int]]:
    """Split shards (by sample count) into ``parts`` groups of near-equal total, deterministically.

    Greedy longest-first into the currently smallest group (ties: lowest group, lowest shard
    index); each group lists its shards in index order. Every shard goes to exactly one group,
    so ranks (and, within a rank, DataLoader workers) read disjoint samples that together are
    the whole split. Balanced totals keep the ranks' step counts close: the shorter ranks wait
    the difference out with empty steps.
    """
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        g = min(range(parts), key=lambda g: (totals[g], g))
        groups[g].append(i)
        totals[g] += counts[i]
    return [sorted(g) for g in groups]


class ShardSet:
    """A split's shards and how to turn a sample into a training item (what the engine streams)."""

    def __init__(self, shards: list[str], counts: list[int], *, size: int, normalize: Normalize,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None, num_classes: int,
                 buffer: int = SHUFFLE_BUFFER) -> None:
        self.shards = shards
        self.counts = counts
        self.size = size
        self.normalize = normalize
        self.augment = augment
        self.num_classes = num_classes
        self.buffer = buffer

    def __len__(self) -> int:
        return sum(self.counts)

    def dataset(self, shard_ids: Sequence[int], seed: int, rank: int = 0) -> ShardStream:
        """The iterable of ``(item, label)`` over ``shard_ids`` (one rank's share)."""
        return ShardStream(self, list(shard_ids), seed, rank)


class ShardStream(IterableDataset):
    """One rank's shards as ``(FloatTensor[3,H,W], label)``; DataLoader workers split them.

    Per worker: its shards (:func:`assign_shards` of the rank's), in an order shuffled by a
    ``random.Random`` seeded from ``(seed, rank, worker)``, read with ``webdataset``'s tar
    iterator and mixed through ``webdataset.shuffle`` with the same generator. An image that
    does not decode is skipped with a warning (as the loader skips unreadable files).
    """

    def __init__(self, shardset: ShardSet, shard_ids: list[int], seed: int, rank: int) -> None:
        self.set = shardset
        self.shard_ids = shard_ids
        self.seed = seed
        self.rank = rank

    def worker_shards(self, worker: int, workers: int) -> list[int]:
        """The shards worker ``worker`` of ``workers`` reads (indices into the split's shards)."""
        parts = assign_shards([self.set.counts[i] for i in self.shard_ids], workers)
        return [self.shard_ids[j] for j in parts[worker]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        wds = _webdataset()
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        mine = self.worker_shards(worker, workers)
        state = np.random.SeedSequence([int(self.seed) % 2**63, self.rank, worker]).generate_state(2)
        rng = random.Random(int(state[0]) << 32 | int(state[1]))
        rng.shuffle(mine)
        urls = [{"url": self.set.shards[i]} for i in mine]
        samples = wds.tarfile_samples(urls)
        if self.set.buffer > 1:
            samples = wds.shuffle(self.set.buffer, initial=self.set.buffer, rng=rng)(samples)
        for sample in samples:
            yield from self._item(sample)

    def _item(self, sample: dict[str, Any]) -> Iterator[tuple[torch.Tensor, int]]:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        image = next((e for e in IMAGE_EXTS if e in sample), None)
        if image is None or LABEL_EXT not in sample:
            raise DataError(f"wds: {where}: sample without an image or .{LABEL_EXT} member (the shard changed "
                            "since it was scanned?)")
        label = as_label(sample[LABEL_EXT].decode("utf-8", "replace"), f"wds: {where}.{LABEL_EXT}")
        if label >= self.set.num_classes:
            raise DataError(f"wds: {where}: label {label} is outside the {self.set.num_classes} classes")
        try:
            arr = load_image_bytes(sample[image], self.set.size)
            x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # PIL's buffer may be read-only
        except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable image"
            log.warning("vistune.data: skipping unreadable image %s: %s: %s", where, type(err).__name__, err)
            return
        if self.set.augment is not None:
            x = self.set.augment(x)
        yield self.set.normalize(x), label


# ------------------------------------------------------------------------------------ writing


@dataclass
class ShardSummary:
    """What :func:`write_shards` wrote: per split shards and samples, member extensions, skips."""

    out: Path
    splits: dict[str, tuple[int, int]]
    extensions: dict[str, int]
    skipped: list[tuple[str, str]]
    notes: list[str]

    def line(self) -> str:
        parts = ", ".join(f"{s}: {n} samples in {k} shards" for s, (k, n) in self.splits.items())
        exts = ", ".join(f"{n} .{e}" for e, n in sorted(self.extensions.items()))
        skipped = f"; {len(self.skipped)} unreadable images skipped" if self.skipped else ""
        return f"{parts} ({exts}) -> {self.out}{skipped}"


def write_shards(spec: str, out: str | Path, shard_size: int, *, split_seed: int = 0, seed: int | None = 0,
                 data_root: str | None = None) -> ShardSummary:
    """Write the data set ``spec`` names as WebDataset shards plus ``classes.json`` in ``out``.

    Missing val/test splits are carved first, with the loader's own rule and ``split_seed``
    (so ``wds:OUT`` then gives the same three splits as ``spec`` with that split seed, and its
    train split can stream). The train split is written in an order shuffled by ``seed`` —
    source order is usually class by class, and a shuffle buffer cannot mix classes that lie
    shards apart; val and test keep their order. ``seed=None`` keeps the train split's order
    too: a run that caches the shards' images then trains on exactly the source's order (the
    same modules as from the source); a streamed run wants the shuffle. Each image goes in as its source stores it
    (:meth:`~vistune.data.sources.ImageSource.encoded`: a JPEG file or an npz's JPEG bytes are
    copied, not re-encoded; decoded pixels — npz arrays, Fashion-MNIST, some torchvision sets —
    are encoded once as PNG, losslessly), with ``KEY.cls`` (the label) and ``KEY.id`` (the
    source's id, for provenance). An image its source cannot read is skipped with a warning,
    as the loader skips it. The whole set is written as temp files renamed at the end
    (``classes.json`` last), so an interrupted run leaves no shard under a final name.
    """
    wds = _webdataset()
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"--shard-size must be a positive integer, got {shard_size!r}")
    out = Path(out).expanduser()
    _check_shard_out(out)
    src = read_source(spec, ReadOptions(data_root=data_root), task="classify")  # shards hold class labels
    splits, notes = complete_splits(src, split_seed)
    notes = src.notes + notes
    job = _ShardJob(wds, spec, src, splits)
    writers: list[tuple[str, Callable[[Path], None]]] = []
    for split in SPLITS:
        if split not in splits:
            continue
        n = len(splits[split])
        order = list(range(n))
        if split == "train" and seed is not None:
            order = np.random.default_rng([int(seed), 7]).permutation(n).tolist()
        for i, lo in enumerate(range(0, n, shard_size)):
            name = f"{split}-{i:06d}.tar"
            writers.append((name, job.shard_writer(split, order[lo: lo + shard_size], name)))

    def write_classes(tmp: Path) -> None:
        tmp.write_text(json.dumps({
            "format": WDS_FORMAT, "classes": list(src.class_names), "source": spec,
            "splits": {s: {"shards": k, "samples": n} for s, (k, n) in job.written.items()},
            "shard_size": shard_size, "seed": seed, "split_seed": split_seed, "notes": notes,
            "members": job.extensions,
        }, indent=1) + "\n")

    write_set_atomic(out, [*writers, (CLASSES_FILE, write_classes)])
    return ShardSummary(out, job.written, job.extensions, job.skipped, notes)


def _check_shard_out(out: Path) -> None:
    """``--out`` must be a folder without shards or ``classes.json``: two data sets must not mix."""
    if out.exists() and not out.is_dir():
        raise DataError(f"shard: --out {out} exists and is not a folder")
    if out.is_dir():
        taken = sorted(p.name for p in out.iterdir() if p.suffix == ".tar" or p.name == CLASSES_FILE)
        if taken:
            raise DataError(f"shard: --out {out} already holds {', '.join(taken[:3])}{', ...' if len(taken) > 3 else ''}; "
                            "choose an empty folder (shards of two data sets must not mix)")


class _ShardJob:
    """One ``write_shards`` call: the source being written and what its shard writers tally as
    they run (samples per split, member extensions, skipped images) for ``classes.json``."""

    def __init__(self, wds: Any, spec: str, src: SourceData, splits: dict[str, RawSplit]) -> None:
        self.wds, self.spec, self.src, self.splits = wds, spec, src, splits
        self.extensions: dict[str, int] = {}
        self.skipped: list[tuple[str, str]] = []
        self.written: dict[str, tuple[int, int]] = {}

    def shard_writer(self, split: str, rows: list[int], name: str) -> Callable[[Path], None]:
        """The writer of one shard (``rows`` of ``split``), run later by the atomic set writer."""
        raw, src = self.splits[split], self.src

        def write(tmp: Path) -> None:
            n = 0
            with open(tmp, "wb") as fh, self.wds.TarWriter(fh, encoder=False, mtime=0) as tar:
                for row in rows:
                    sid = raw.ids[row]
                    try:
                        data, ext = src.source.encoded(sid)
                    except Exception as err:  # noqa: BLE001 - any read/decode failure: skip, as the loader does
                        where = src.source.describe(sid)
                        log.warning("vistune.data: skipping unreadable image %s (%s split): %s", where, split, err)
                        self.skipped.append((where, f"{type(err).__name__}: {err}"))
                        continue
                    tar.write({"__key__": f"{row:09d}", ext: data, LABEL_EXT: str(raw.labels[row]).encode(),
                               "id": sid.encode("utf-8")})
                    self.extensions[ext] = self.extensions.get(ext, 0) + 1
                    n += 1
            if n == 0:
                raise DataError(f"shard: every image of {name} ({split} split of {self.spec}) is unreadable")
            k, total = self.written.get(split, (0, 0))
            self.written[split] = (k + 1, total + n)

        return write
