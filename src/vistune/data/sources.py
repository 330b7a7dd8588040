"""The reader-neutral description of a data set.

Every reader (``folder``, ``npz``, ``vtab``, ``fgvc``, ``fashion-mnist``,
``hf``, ``tv``, ``wds``; the dense ``camvid``, ``voc``, ``pennfudan``; the table of
kinds is :mod:`vistune.data.registry`)
turns its on-disk layout into a :class:`SourceData`: per split, a list of
string ids plus integer labels (dense readers: plus one annotation record
per id), and an :class:`ImageSource` that can decode one id. Everything after that (carving missing splits, few-shot sampling,
decoding, skipping unreadable files, caching, checking the class set) is
shared code in :mod:`vistune.data.loader`, so the readers stay small and
behave alike.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .transforms import load_image_file, verify_image

SPLITS = ("train", "val", "test")

@dataclass
class RawSplit:
    """Ids and labels of one split, before any decoding.

    Ids are strings so a manifest can store them as-is: relative file paths
    for file-based sources, ``"<array>:<index>"`` for array sources.
    """

    ids: list[str]
    labels: list[int]
    #: dense readers: the annotation of each id (mask file, boxes), which the dense decoder reads;
    #: their ``labels`` are all 0 (an image has no single class), one stratum for carving and caps
    targets: list[Any] | None = None

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.labels):
            raise DataError(f"internal: {len(self.ids)} ids but {len(self.labels)} labels")
        if self.targets is not None and len(self.targets) != len(self.ids):
            raise DataError(f"internal: {len(self.ids)} ids but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, positions: Sequence[int]) -> RawSplit:
        targets = None if self.targets is None else [self.targets[i] for i in positions]
        return RawSplit([self.ids[i] for i in positions], [self.labels[i] for i in positions], targets)

    def __add__(self, other: RawSplit) -> RawSplit:
        targets = None if self.targets is None or other.targets is None else self.targets + other.targets
        return RawSplit(self.ids + other.ids, self.labels + other.labels, targets)


class ImageSource:
    """Decodes one id to ``uint8 (C, size, size)``, C in {1, 3}.

    Must be picklable (DataLoader workers receive it in lazy mode) and must
    raise on unreadable content; the loader turns that into a skip.
    """

    #: channel count if known for the whole source (1 = all grey), else 3.
    channels: int = 3
    #: True when decoding cannot fail (in-memory arrays): no validation pass.
    infallible: bool = False
    #: True when a whole training split can be streamed (WebDataset shards): the loader then
    #: leaves the per-image check to the stream instead of reading everything before training.
    streamed: bool = False

    def load(self, sample_id: str, size: int) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def load_many(self, sample_ids: Sequence[str], size: int) -> list[np.ndarray]:
        """Batch form of :meth:`load` (sources with a vectorised path override it)."""
        return [self.load(sid, size) for sid in sample_ids]

    def verify(self, sample_id: str, size: int) -> None:
        """Raise if ``sample_id`` cannot be decoded; the result is not kept.

        Used in lazy mode, where every chosen file is still checked once
        before training. Sources that can check without resizing (e.g. a
        reduced-scale JPEG decode) override it, which makes that check a
        small fraction of a full :meth:`load` at large ``size``.
        """
        self.load(sample_id, size)

    def describe(self, sample_id: str) -> str:
        """Human-readable location of an id, for warnings."""
        return sample_id

    def encoded(self, sample_id: str) -> tuple[bytes, str]:
        """The image as an encoded file, ``(bytes, extension)``, for writing shards.

        Sources holding encoded files return their bytes as stored (no re-encode: a JPEG stays
        the same JPEG); sources holding decoded pixels encode them once, losslessly, as PNG.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot give encoded images")


class FileImages(ImageSource):
    """Image files addressed by their path relative to ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def load(self, sample_id: str, size: int) -> np.ndarray:
        return load_image_file(self.root / sample_id, size)

    def verify(self, sample_id: str, size: int) -> None:
        verify_image(self.root / sample_id)

    def describe(self, sample_id: str) -> str:
        return str(self.root / sample_id)

    def encoded(self, sample_id: str) -> tuple[bytes, str]:
        return as_stored((self.root / sample_id).read_bytes())


class ArrayImages(ImageSource):
    """In-memory uint8 image arrays, ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB,
    addressed as ``"<array name>:<index>"``.

    Resizing is vectorised: bicubic resampling is separable and linear, so
    ``out = Rh @ X @ Rw^T`` with weight matrices taken from PIL itself (by
    resizing an identity matrix in float mode). That is PIL's bicubic kernel
    without its intermediate 8-bit rounding, ~2-3x faster than resizing
    60k tiny images one by one, and identical for the cached and the lazy
    (one image at a time) path.
    """

    infallible = True

    def __init__(self, arrays: dict[str, np.ndarray], origin: str) -> None:
        self.arrays = arrays
        self.origin = origin
        self.channels = 1 if all(a.ndim == 3 for a in arrays.values()) else 3
        self._weights: dict[tuple[int, int], torch.Tensor] = {}

    def _matrix(self, n: int, size: int) -> torch.Tensor:
        key = (n, size)
        if key not in self._weights:
            eye = Image.fromarray(np.eye(n, dtype=np.float32), mode="F")
            # Only the vertical pass runs (width unchanged): row i of the
            # result holds the weights of output row i over the n input rows.
            w = np.asarray(eye.resize((n, size), Image.Resampling.BICUBIC), dtype=np.float32)
            self._weights[key] = torch.from_numpy(w.copy())
        return self._weights[key]

    def load_many(self, sample_ids: Sequence[str], size: int) -> list[np.ndarray]:
        by_array: dict[str, list[tuple[int, int]]] = {}
        for slot, sid in enumerate(sample_ids):
            name, _, index = sid.rpartition(":")
            by_array.setdefault(name, []).append((slot, int(index)))
        out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(sample_ids)
        for name, pairs in by_array.items():
            batch = self.arrays[name][[i for _, i in pairs]]  # fancy indexing copies: writable
            x = torch.from_numpy(batch).float()
            x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
            n, h, w = x.shape[1:]
            # width pass as one big GEMM, then the height pass batched
            y = (x.reshape(-1, w) @ self._matrix(w, size).T).view(-1, n, h, size)
            y = torch.matmul(self._matrix(h, size), y)
            # +0.5 then truncation == round half up on the clamped range
            y = y.add_(0.5).clamp_(0, 255).numpy().astype(np.uint8)
            for (slot, _), img in zip(pairs, y):
                out[slot] = img
        return out

    def load(self, sample_id: str, size: int) -> np.ndarray:
        return self.load_many([sample_id], size)[0]

    def describe(self, sample_id: str) -> str:
        return f"{self.origin}[{sample_id}]"

    def encoded(self, sample_id: str) -> tuple[bytes, str]:
        name, _, index = sample_id.rpartition(":")
        return png_bytes(Image.fromarray(self.arrays[name][int(index)])), "png"


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded once, losslessly (what a shard stores for a source of decoded pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


#: encoded-image extensions a shard member may carry (lower case: WebDataset's suffix after the key)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")


def image_ext(data: bytes) -> str | None:
    """The extension for encoded image bytes, from PIL's reading of the header (no decode);
    None when PIL cannot tell or the format is not one of :data:`IMAGE_EXTS`."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "").lower()
    except Exception:  # noqa: BLE001 - not an image PIL knows
        return None
    ext = {"jpeg": "jpg", "mpo": "jpg", "tiff": "tif"}.get(fmt, fmt)  # MPO: a camera JPEG + previews
    return ext if ext in IMAGE_EXTS else None


def as_stored(data: bytes) -> tuple[bytes, str]:
    """Encoded bytes as they are when a shard can hold their format (no re-encode), else decoded
    and encoded once as PNG; raises when the bytes are no image at all (the caller skips it)."""
    ext = image_ext(data)
    if ext is not None:
        return data, ext
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return png_bytes(im), "png"


@dataclass
class SourceData:
    """What a reader found on disk.

    ``splits`` holds only the splits the layout provides; the loader carves
    the missing ones (``train`` is always present). ``notes`` explains any
    layout decision (e.g. which folder became the test split) and ends up
    in the manifest.
    """

    kind: str
    root: str
    source: ImageSource
    splits: dict[str, RawSplit]
    class_names: list[str]
    notes: list[str] = field(default_factory=list)
    #: True when the reader already applied ``trainval`` (VTAB's own file).
    handled_trainval: bool = False
    #: True when the layout fixes all splits (VTAB, FGVC): nothing is carved.
    fixed_splits: bool = False
    #: split -> where its labels come from (file, key, column), for errors.
    origins: dict[str, str] = field(default_factory=dict)
    #: dense readers: what decoding their targets needs and what reading dropped
    #: (``mask_kind`` "index"/"instance", ``void_value``, ``dropped_boxes``)
    target_info: dict[str, Any] = field(default_factory=dict)

    def origin(self, split: str) -> str:
        return self.origins.get(split) or f"{self.root} ({split} split)"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def as_label(value: object, where: str) -> int:
    """Parse one integer label, naming ``where`` it came from on failure."""
    if isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is not an integer")
    if isinstance(value, (int, np.integer)):
        label = int(value)
    elif isinstance(value, float) and value.is_integer():
        label = int(value)
    elif isinstance(value, str):
        try:
            label = int(value.strip())
        except ValueError:
            raise DataError(f"{where}: label {value!r} is not an integer") from None
    else:
        raise DataError(f"{where}: label {value!r} is not an integer")
    if label < 0:
        raise DataError(f"{where}: label {label} is negative")
    return label


def classes_from_train(
    kind: str, splits: dict[str, RawSplit], origins: dict[str, str], *, allow_gaps: bool = False
) -> list[str]:
    """Class names ``"0".."C-1"`` for a source that declares no class list.

    The range is taken from the *training* labels only: ``C = max + 1``.
    Why: with the old rule (max over all splits) one stray label 7 among
    {0, 1} in a test file silently made an 8-class problem whose extra
    classes can never be predicted right. So a val/test label outside the
    training range is refused, naming where it came from, and (unless
    ``allow_gaps``) so are class ids below the maximum that no training
    sample has: the labels must be ``0..C-1``. Readers whose layouts
    legitimately miss classes in train (VTAB-1k subsets of an unknown task)
    pass ``allow_gaps=True``. A source that knows its classes names them
    instead (e.g. an npz ``classes`` key) and skips this inference.
    """
    train = splits["train"].labels
    if not train:
        raise DataError(f"{kind}: {origins.get('train', 'train split')}: the train split is empty")
    num_classes = 1 + max(train)
    if not allow_gaps:
        gaps = sorted(set(range(num_classes)) - set(train))
        if gaps:
            seen = sorted(set(train))
            raise DataError(
                f"{kind}: {origins.get('train', 'train split')}: labels {_fmt_ids(seen)} leave class id(s) "
                f"{_fmt_ids(gaps)} without a training sample; labels must be 0..C-1 (a stray label?). "
                f"If the classes are really {num_classes}, declare them (e.g. a 'classes' array)"
            )
    for split, raw in splits.items():
        if split == "train":
            continue
        for row, lab in enumerate(raw.labels):
            if lab >= num_classes:
                raise DataError(
                    f"{kind}: {origins.get(split, split + ' split')}: label {lab} (row {row}) is outside the "
                    f"training labels' range 0..{num_classes - 1}; the source declares no class list, so the "
                    "classes are the training labels'"
                )
    return [str(i) for i in range(num_classes)]


def _fmt_ids(ids: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return "{" + shown + (", ..." if len(ids) > limit else "") + "}"
