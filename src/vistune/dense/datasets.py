"""Dense-prediction data: decoding and letterboxing images with their masks and boxes.

Spec strings: ``camvid:PATH`` (segmentation), ``voc:PATH`` (detection), ``pennfudan:PATH``
(detection from the instance masks, or person/background segmentation). Their layouts are read,
split, capped and checked by :mod:`vistune.data` like every other kind (the readers are
:mod:`vistune.data.dense`, the steps :func:`vistune.data.loader.select_dense`); what is here is
what only dense data needs: decoding a mask or boxes with its image, the geometry that keeps
them aligned, the dataset with its joint flip, and the collate.

Geometry is the part that must never be wrong, so it lives in a handful of small functions
that the tests exercise on constructed examples:

* **Letterbox, top-left anchored.** The image is scaled so that its long side becomes
  ``img_size`` (aspect kept) and pasted at the top-left of a square canvas; the rest is padding
  (zeros after normalisation, ``IGNORE`` in masks). A box maps with one multiply per axis
  (``x_net = x * sx``) and back with one divide, so predictions return to the *original*
  image's coordinates without any offset bookkeeping. Square canvases are what fixed-size ViTs
  need; letterboxing instead of stretching keeps object shapes as the backbone saw them in
  pre-training.
* **Continuous pixel coordinates.** Pixel ``i`` covers ``[i, i+1)``; a box ``(x1, y1, x2, y2)``
  covers ``x1 <= x < x2``. VOC's 1-based inclusive ``xmin..xmax`` therefore becomes
  ``(xmin-1, ..., xmax)``; a Penn-Fudan instance whose pixels span columns ``a..b`` becomes
  ``(a, ..., b+1)``. Masks resize with nearest neighbour, which samples pixel centres under the
  same convention, so a mask and its box stay aligned after resizing.
* **Horizontal flip of the canvas** (training only): ``image[..., ::-1]``, ``mask[:, ::-1]`` and
  ``x -> S - x`` for boxes (``x1' = S - x2``, ``x2' = S - x1``), one function for all three.

Every file is decoded and every annotation parsed at load time, so a wrong path, a mask with an
unknown class value, a malformed XML or an image/mask size mismatch raises :class:`DataError`
naming the file before any training starts.

Evaluation targets are kept at the original resolution (``orig_mask``, ``orig_boxes``), so test
numbers are computed in the data set's own coordinates, not at the network's input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vistune.data.dense import RawItem
from vistune.data.errors import DataError
from vistune.data.loader import decode_workers, parallel_map, select_dense
from vistune.data.sources import SourceData

#: Mask value meaning "no label here" (void class, letterbox padding).
IGNORE = 255
TASKS = ("segment", "detect")
MANIFEST_FORMAT = "vistune.dense-splits/1"


# ------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class Letterbox:
    """How one image of size ``(width, height)`` sits on the ``size x size`` canvas."""

    width: int
    height: int
    size: int
    new_w: int
    new_h: int

    @property
    def sx(self) -> float:
        return self.new_w / self.width

    @property
    def sy(self) -> float:
        return self.new_h / self.height

    def boxes_to_canvas(self, boxes: np.ndarray) -> np.ndarray:
        """Original-image boxes (N, 4) xyxy -> canvas coordinates."""
        return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
                * np.array([self.sx, self.sy, self.sx, self.sy], dtype=np.float32))

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """Canvas boxes (N, 4) -> original-image coordinates, clipped to the image."""
        scale = boxes.new_tensor([self.sx, self.sy, self.sx, self.sy])
        out = boxes / scale
        out[:, 0::2] = out[:, 0::2].clamp(0, self.width)
        out[:, 1::2] = out[:, 1::2].clamp(0, self.height)
        return out


def letterbox_geometry(width: int, height: int, size: int) -> Letterbox:
    """Scale the long side to ``size`` (aspect kept); the short side rounds, at least 1 px."""
    if width < 1 or height < 1:
        raise DataError(f"image size {width}x{height} is empty")
    scale = size / max(width, height)
    new_w = max(1, min(size, int(round(width * scale))))
    new_h = max(1, min(size, int(round(height * scale))))
    return Letterbox(width, height, size, new_w, new_h)


def segmentation_to_original(logits: torch.Tensor, lb: Letterbox) -> torch.Tensor:
    """Canvas logits (K, S, S) -> label map (H, W) of the original image (crop, then resize)."""
    import torch.nn.functional as F

    crop = logits[:, : lb.new_h, : lb.new_w].float()
    up = F.interpolate(crop[None], size=(lb.height, lb.width), mode="bilinear", align_corners=False)[0]
    return up.argmax(0)


def letterbox_image(im: Image.Image, lb: Letterbox) -> np.ndarray:
    """RGB uint8 ``(3, S, S)``: bicubic resize to the letterbox, zero padding right/bottom.

    Zero padding is not "black after normalisation"; the head learns to ignore it, and masks
    mark it ``IGNORE`` so no loss or metric reads it.
    """
    if im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (lb.new_w, lb.new_h):
        im = im.resize((lb.new_w, lb.new_h), Image.Resampling.BICUBIC)
    canvas = np.zeros((3, lb.size, lb.size), dtype=np.uint8)
    canvas[:, : lb.new_h, : lb.new_w] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    return canvas


def letterbox_mask(mask: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Class-index mask ``(H, W)`` -> ``(S, S)`` uint8, nearest resize, padding = ``IGNORE``."""
    if mask.shape != (lb.height, lb.width):
        raise ValueError(f"mask shape {mask.shape} does not match image {lb.height}x{lb.width}")
    im = Image.fromarray(mask.astype(np.uint8), mode="L")
    if im.size != (lb.new_w, lb.new_h):
        im = im.resize((lb.new_w, lb.new_h), Image.Resampling.NEAREST)
    canvas = np.full((lb.size, lb.size), IGNORE, dtype=np.uint8)
    canvas[: lb.new_h, : lb.new_w] = np.asarray(im, dtype=np.uint8)
    return canvas


def hflip(
    image: torch.Tensor, mask: torch.Tensor | None, boxes: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mirror image ``(C, S, S)``, mask ``(S, S)`` and boxes ``(N, 4)`` about the canvas centre."""
    width = image.shape[-1]
    image = image.flip(-1)
    if mask is not None:
        mask = mask.flip(-1)
    if boxes is not None and len(boxes):
        boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    return image, mask, boxes


def boxes_from_instance_mask(mask: np.ndarray) -> np.ndarray:
    """One xyxy box per non-zero instance id of an instance mask, in id order."""
    ids = [int(v) for v in np.unique(mask) if v != 0]
    out = np.zeros((len(ids), 4), dtype=np.float32)
    for i, k in enumerate(ids):
        ys, xs = np.nonzero(mask == k)
        out[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return out


# ------------------------------------------------------------------------------------------
# Decoding


@dataclass
class Sample:
    """One decoded, letterboxed sample plus its original-resolution evaluation targets."""

    id: str
    image: np.ndarray  # (3, S, S) uint8
    lb: Letterbox
    mask: np.ndarray | None = None  # (S, S) uint8, IGNORE outside labels
    boxes: np.ndarray | None = None  # (N, 4) canvas coordinates
    labels: np.ndarray | None = None
    orig_mask: np.ndarray | None = None  # (H, W) uint8
    orig_boxes: np.ndarray | None = None  # (N, 4) original coordinates
    difficult: np.ndarray | None = None


def _open_image(path: Path, lb_size: int) -> tuple[Image.Image, int, int]:
    """Decode fully (corrupt files fail here); JPEG draft-decoding keeps ≥ the target size."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            if im.format == "JPEG":
                lb = letterbox_geometry(width, height, lb_size)
                im.draft("RGB", (lb.new_w, lb.new_h))
            im.load()
            return im.convert("RGB"), width, height
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"image {path} cannot be decoded ({err})") from None


def _read_mask(path: Path, width: int, height: int) -> np.ndarray:
    try:
        with Image.open(path) as m:
            if m.mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"mask {path} has mode {m.mode!r}; expected a single-channel index PNG")
            arr = np.asarray(m)
    except OSError as err:
        raise DataError(f"mask {path} cannot be decoded ({err})") from None
    if arr.shape != (height, width):
        raise DataError(f"mask {path} is {arr.shape[1]}x{arr.shape[0]} but its image is {width}x{height}")
    return arr


def decode_item(item: RawItem, src: SourceData, task: str, size: int) -> Sample:
    """Decode one raw item for ``task`` at canvas ``size``; annotation problems name the file.

    ``src.target_info`` says how its masks read: ``mask_kind`` "instance" (Penn-Fudan: instance
    ids, boxes per instance or person/background) or class indices with ``void_value`` ignored.
    """
    im, width, height = _open_image(item.image, size)
    lb = letterbox_geometry(width, height, size)
    sample = Sample(id=item.id, image=letterbox_image(im, lb), lb=lb)
    void_value = src.target_info.get("void_value")
    if src.target_info.get("mask_kind") == "instance":
        inst = _read_mask(item.mask, width, height)
        if task == "detect":
            boxes = boxes_from_instance_mask(inst)
            labels = np.zeros(len(boxes), dtype=np.int64)
            item = RawItem(item.id, item.image, boxes=boxes, labels=labels)
        else:
            semantic = (inst > 0).astype(np.uint8)  # 0 background, 1 person
            sample.orig_mask = semantic
            sample.mask = letterbox_mask(semantic, lb)
            return sample
    if task == "segment":
        arr = _read_mask(item.mask, width, height).astype(np.int64)
        n = len(src.class_names)
        ok = (arr < n) | (arr == IGNORE) | ((arr == void_value) if void_value is not None else False)
        if not ok.all():
            bad = int(arr[~ok][0])
            raise DataError(f"mask {item.mask} has value {bad}, outside classes 0..{n - 1} "
                            f"(void {void_value} and {IGNORE} are ignored)")
        arr = np.where(arr < n, arr, IGNORE).astype(np.uint8)
        sample.orig_mask = arr
        sample.mask = letterbox_mask(arr, lb)
        return sample
    boxes = np.asarray(item.boxes, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    sample.orig_boxes = boxes
    sample.boxes = lb.boxes_to_canvas(boxes)
    sample.labels = np.asarray(item.labels, dtype=np.int64)
    sample.difficult = (np.zeros(len(boxes), dtype=bool) if item.difficult is None
                        else np.asarray(item.difficult, dtype=bool))
    return sample


# ------------------------------------------------------------------------------------------
# Datasets


class DenseDataset(torch.utils.data.Dataset):
    """Decoded samples -> ``(image float (3,S,S), target dict)``, optional random h-flip.

    The target holds ``mask`` (long ``(S,S)``, segment) or ``boxes``/``labels`` (detect), plus
    ``index`` and ``flipped`` so cached features and evaluation can find the sample again.
    """

    def __init__(self, samples: list[Sample], task: str, mean: Sequence[float], std: Sequence[float],
                 flip: bool = False) -> None:
        self.samples = samples
        self.task = task
        self.flip = flip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.samples]

    def item(self, index: int, flipped: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        s = self.samples[index]
        image = torch.from_numpy(s.image).float().div_(255)
        mask = torch.from_numpy(s.mask).long() if s.mask is not None else None
        boxes = torch.from_numpy(s.boxes) if s.boxes is not None else None
        if flipped:
            image, mask, boxes = hflip(image, mask, boxes)
        image = (image - self.mean) / self.std
        target: dict[str, Any] = {"index": index, "flipped": flipped}
        if self.task == "segment":
            target["mask"] = mask
        else:
            target["boxes"] = boxes.float()
            target["labels"] = torch.from_numpy(s.labels)
        return image, target

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        flipped = bool(self.flip and torch.rand(()) < 0.5)
        return self.item(index, flipped)


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack images; keep targets as a list (box counts differ per image)."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


@dataclass
class DenseSplits:
    task: str
    train: DenseDataset
    val: DenseDataset | None
    test: DenseDataset | None
    num_classes: int
    class_names: list[str]
    info: dict[str, Any]

    def manifest(self) -> dict[str, Any]:
        """Which image went where (ids relative to the root), plus the load options and notes."""
        out = dict(self.info)
        out.update(format=MANIFEST_FORMAT, task=self.task, num_classes=self.num_classes,
                   class_names=list(self.class_names),
                   splits={n: None if d is None else {"size": len(d), "ids": d.ids}
                           for n, d in (("train", self.train), ("val", self.val), ("test", self.test))})
        return out


def load_dense_data(
    spec: str,
    task: str,
    *,
    img_size: int,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    augment: str | None = None,
    max_per_split: int | None = None,
    split_seed: int = 0,
    workers: int | None = None,
    trainval: bool = False,
    shots: int | None = None,
    subset: tuple[int, int] | None = None,
    imbalance: float | None = None,
) -> DenseSplits:
    """Read, validate and decode a dense data set; every error is raised before training.

    Which images go where is :func:`vistune.data.loader.select_dense` (the data package's parser,
    registry, split rules, ``max_per_split`` cap and ``trainval`` merge; ``shots``, ``subset``
    and ``imbalance`` are refused there). ``split_seed`` (not the run's seed) carves Penn-Fudan
    and picks ``max_per_split`` subsets, so runs with different training seeds share one test
    set. ``augment="flip"`` enables random horizontal flips on the train split only. Every
    chosen image and annotation is decoded here, on :func:`~vistune.data.loader.decode_workers`
    threads, and kept letterboxed in memory (dense sets are small; there is no lazy mode).
    """
    if task not in TASKS:
        raise DataError(f"task must be one of {TASKS}, got {task!r}")
    if augment not in (None, "none", "flip"):
        raise DataError(f"augment must be none or flip for dense tasks, got {augment!r}")
    if isinstance(img_size, bool) or int(img_size) < 8:
        raise DataError(f"img_size must be an integer >= 8, got {img_size!r}")
    chosen = select_dense(spec, task, max_per_split=max_per_split, split_seed=split_seed, trainval=trainval,
                          shots=shots, subset=subset, imbalance=imbalance)
    src = chosen.src
    class_names = list(src.class_names)
    if src.kind == "pennfudan" and task == "segment":
        class_names = ["background", "person"]
    threads = decode_workers(workers)
    datasets: dict[str, DenseDataset | None] = {"train": None, "val": None, "test": None}
    for name, split in chosen.splits.items():
        samples = parallel_map(lambda it: decode_item(it, src, task, int(img_size)), split.targets or [], threads)
        datasets[name] = DenseDataset(samples, task, mean, std, flip=(augment == "flip" and name == "train"))
    info = {
        "spec": spec, "kind": src.kind, "root": src.root, "img_size": int(img_size),
        "mean": list(mean), "std": list(std), "augment": augment, "max_per_split": chosen.max_per_split,
        "split_seed": chosen.split_seed, "trainval": bool(trainval), "notes": chosen.notes,
        "dropped_zero_area_boxes": src.target_info.get("dropped_boxes", 0),
        "letterbox": "top-left, long side = img_size", "ignore_index": IGNORE,
    }  # fmt: skip
    train = datasets["train"]
    assert train is not None
    return DenseSplits(task, train, datasets["val"], datasets["test"], len(class_names), class_names, info)
