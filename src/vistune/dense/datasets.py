"""Dense-prediction data: index-PNG masks (CamVid), PASCAL VOC boxes (BCCD), Penn-Fudan.

Spec strings: ``camvid:PATH`` (segmentation), ``voc:PATH`` (detection), ``pennfudan:PATH``
(detection from the instance masks, or person/background segmentation).

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
naming the file before any training starts. Boxes of zero area are dropped and counted (BCCD
has two), not errors: they carry no extent to learn from and COCO evaluation cannot score them.

Evaluation targets are kept at the original resolution (``orig_mask``, ``orig_boxes``), so test
numbers are computed in the data set's own coordinates, not at the network's input size.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vistune.data.errors import DataError

#: Mask value meaning "no label here" (void class, letterbox padding).
IGNORE = 255
TASKS = ("segment", "detect")
KINDS = ("camvid", "voc", "pennfudan")
#: Which tasks each layout can serve.
KIND_TASKS = {"camvid": ("segment",), "voc": ("detect",), "pennfudan": ("segment", "detect")}
CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree",
    "sign", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
#: Penn-Fudan carving (train/val/test fractions of the sorted, seeded image list).
PENNFUDAN_FRACTIONS = (0.6, 0.2, 0.2)
MANIFEST_FORMAT = "vistune.dense-splits/1"
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


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
# Raw records (what a layout reader finds) and decoded samples.


@dataclass
class RawItem:
    """One annotated image as found on disk, before decoding."""

    id: str  # path relative to the data root
    image: Path
    mask: Path | None = None  # index-PNG (semantic) or instance PNG (Penn-Fudan)
    boxes: np.ndarray | None = None  # (N, 4) xyxy, original pixels, continuous coordinates
    labels: np.ndarray | None = None  # (N,)
    difficult: np.ndarray | None = None  # (N,) bool


@dataclass
class Source:
    """A layout's reading of a root folder: split -> items, plus what was decided and dropped."""

    kind: str
    root: Path
    class_names: list[str]
    splits: dict[str, list[RawItem]]
    notes: list[str] = field(default_factory=list)
    dropped_boxes: int = 0
    #: mask decoding: "index" (class per pixel, void value -> IGNORE) or "instance" (Penn-Fudan)
    mask_kind: str = "index"
    void_value: int | None = None


def parse_spec(spec: str) -> tuple[str, Path]:
    """``kind:PATH`` -> (kind, path). The path must exist."""
    kind, sep, arg = str(spec).partition(":")
    if not sep or kind not in KINDS or not arg:
        raise DataError(
            f"dense data spec {spec!r} is not one of {', '.join(k + ':PATH' for k in KINDS)}"
        )
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"{kind}: data folder {root} does not exist")
    return kind, root


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_EXTS and p.is_file())


def read_camvid(root: Path) -> Source:
    """``{train,val,test}/<name>.jpg`` + ``{split}annot/<name>.png`` (mode-L class indices).

    A ``classes.txt`` (one name per line) in the root makes this any index-PNG data set; without
    it the 11 CamVid classes apply. The value ``len(classes)`` (CamVid's void, 11) and 255 are
    ignored; any other value outside the class range is an error naming the file.
    """
    names_file = root / "classes.txt"
    if names_file.is_file():
        names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
        if not names:
            raise DataError(f"camvid: {names_file} lists no class names")
    else:
        names = list(CAMVID_CLASSES)
    splits: dict[str, list[RawItem]] = {}
    for split in ("train", "val", "test"):
        img_dir, ann_dir = root / split, root / f"{split}annot"
        if not img_dir.is_dir():
            if split == "val":
                continue
            raise DataError(f"camvid: {img_dir} is missing (expected {{train,val,test}}/ and {{split}}annot/)")
        if not ann_dir.is_dir():
            raise DataError(f"camvid: annotation folder {ann_dir} is missing for {img_dir}")
        items = []
        for img in _images_in(img_dir):
            mask = ann_dir / (img.stem + ".png")
            if not mask.is_file():
                raise DataError(f"camvid: no mask {mask} for image {img}")
            items.append(RawItem(id=f"{split}/{img.name}", image=img, mask=mask))
        if not items:
            raise DataError(f"camvid: {img_dir} holds no images")
        splits[split] = items
    return Source("camvid", root, names, splits, void_value=len(names))


def _voc_float(obj: ET.Element, key: str, path: Path) -> float:
    node = obj.find(f"bndbox/{key}")
    if node is None or node.text is None:
        raise DataError(f"voc: {path}: an <object> has no bndbox/{key}")
    try:
        return float(node.text)
    except ValueError:
        raise DataError(f"voc: {path}: bndbox/{key} = {node.text!r} is not a number") from None


def parse_voc_xml(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, int, tuple[int, int] | None]:
    """Names, boxes (continuous coordinates), difficult flags, zero-area count, (W, H) if given."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DataError(f"voc: annotation {path} is not readable XML ({err})") from None
    size = None
    w, h = root.find("size/width"), root.find("size/height")
    if w is not None and h is not None and w.text and h.text:
        try:
            size = (int(float(w.text)), int(float(h.text)))
        except ValueError:
            raise DataError(f"voc: {path}: size {w.text!r}x{h.text!r} is not numeric") from None
    names, boxes, difficult, dropped = [], [], [], 0
    for obj in root.iter("object"):
        name_node = obj.find("name")
        if name_node is None or not (name_node.text or "").strip():
            raise DataError(f"voc: {path}: an <object> has no <name>")
        x1, y1, x2, y2 = (_voc_float(obj, k, path) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x2 <= x1 or y2 <= y1:
            dropped += 1  # zero (or negative) extent in the file's own coordinates
            continue
        diff = obj.find("difficult")
        names.append(name_node.text.strip())
        boxes.append((x1 - 1.0, y1 - 1.0, x2, y2))  # 1-based inclusive -> continuous
        difficult.append(diff is not None and (diff.text or "0").strip() == "1")
    arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return names, arr, np.asarray(difficult, dtype=bool), dropped, size


def read_voc(root: Path) -> Source:
    """PASCAL VOC: ``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/{train,val,test}.txt``.

    Class names are the sorted set of object names over every listed annotation (so every split
    and every capped run agrees on the label numbering).
    """
    sets = root / "ImageSets" / "Main"
    if not (root / "Annotations").is_dir() or not (root / "JPEGImages").is_dir():
        raise DataError(f"voc: {root} needs JPEGImages/ and Annotations/ folders")
    parsed: dict[str, list[tuple[str, Path, list[str], np.ndarray, np.ndarray]]] = {}
    dropped = 0
    for split in ("train", "val", "test"):
        listing = sets / f"{split}.txt"
        if not listing.is_file():
            if split == "val":
                continue
            raise DataError(f"voc: split file {listing} is missing")
        ids = [ln.split()[0] for ln in listing.read_text().splitlines() if ln.strip()]
        if not ids:
            raise DataError(f"voc: split file {listing} lists no images")
        rows = []
        for stem in ids:
            xml = root / "Annotations" / f"{stem}.xml"
            if not xml.is_file():
                raise DataError(f"voc: {listing} lists {stem!r} but {xml} does not exist")
            img = next((root / "JPEGImages" / (stem + e) for e in _IMAGE_EXTS
                        if (root / "JPEGImages" / (stem + e)).is_file()), None)
            if img is None:
                raise DataError(f"voc: {listing} lists {stem!r} but JPEGImages/ has no image for it")
            names, boxes, diff, n_drop, _ = parse_voc_xml(xml)
            dropped += n_drop
            rows.append((stem, img, names, boxes, diff))
        parsed[split] = rows
    class_names = sorted({n for rows in parsed.values() for r in rows for n in r[2]})
    if not class_names:
        raise DataError(f"voc: no objects in any annotation under {root}")
    index = {n: i for i, n in enumerate(class_names)}
    splits = {
        split: [RawItem(id=f"JPEGImages/{img.name}", image=img, boxes=boxes,
                        labels=np.asarray([index[n] for n in names], dtype=np.int64), difficult=diff)
                for stem, img, names, boxes, diff in rows]
        for split, rows in parsed.items()
    }  # fmt: skip
    notes = [f"dropped {dropped} zero-area boxes"] if dropped else []
    return Source("voc", root, class_names, splits, notes=notes, dropped_boxes=dropped)


def read_pennfudan(root: Path, split_seed: int = 0) -> Source:
    """``images/<name>.jpg`` + ``masks/<name>_mask.png`` (0 background, k = pedestrian k).

    There is no official split: the sorted image list is permuted with ``split_seed`` and cut
    60/20/20 into train/val/test; the run's ``splits.json`` records the ids.
    """
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DataError(f"pennfudan: {root} needs images/ and masks/ folders")
    items = []
    for img in _images_in(img_dir):
        mask = mask_dir / f"{img.stem}_mask.png"
        if not mask.is_file():
            raise DataError(f"pennfudan: no instance mask {mask} for image {img}")
        items.append(RawItem(id=f"images/{img.name}", image=img, mask=mask))
    if len(items) < 3:
        raise DataError(f"pennfudan: {img_dir} holds {len(items)} images, need at least 3 to split")
    order = np.random.default_rng(split_seed).permutation(len(items))
    n_val = max(1, int(round(PENNFUDAN_FRACTIONS[1] * len(items))))
    n_test = max(1, int(round(PENNFUDAN_FRACTIONS[2] * len(items))))
    parts = {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test:n_test + n_val]),
        "train": sorted(order[n_test + n_val:]),
    }
    splits = {k: [items[i] for i in v] for k, v in parts.items()}
    notes = [f"no official split: seeded {PENNFUDAN_FRACTIONS} train/val/test carve, split_seed={split_seed}"]
    return Source("pennfudan", root, ["person"], splits, notes=notes, mask_kind="instance")


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


def decode_item(item: RawItem, src: Source, task: str, size: int) -> Sample:
    """Decode one raw item for ``task`` at canvas ``size``; annotation problems name the file."""
    im, width, height = _open_image(item.image, size)
    lb = letterbox_geometry(width, height, size)
    sample = Sample(id=item.id, image=letterbox_image(im, lb), lb=lb)
    if src.mask_kind == "instance":
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
        ok = (arr < n) | (arr == IGNORE) | ((arr == src.void_value) if src.void_value is not None else False)
        if not ok.all():
            bad = int(arr[~ok][0])
            raise DataError(f"mask {item.mask} has value {bad}, outside classes 0..{n - 1} "
                            f"(void {src.void_value} and {IGNORE} are ignored)")
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


def _cap(items: list[RawItem], cap: int | None, split_seed: int, name: str) -> list[RawItem]:
    """A seeded subset of at most ``cap`` items, kept in file order."""
    if cap is None or len(items) <= cap:
        return items
    salt = {"train": 1, "val": 2, "test": 3}[name]
    keep = sorted(np.random.default_rng([split_seed, salt]).permutation(len(items))[:cap])
    return [items[i] for i in keep]


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
) -> DenseSplits:
    """Read, validate and decode a dense data set; every error is raised before training.

    ``split_seed`` (not the run's seed) carves Penn-Fudan and picks ``max_per_split`` subsets,
    so runs with different training seeds share one test set. ``augment="flip"`` enables random
    horizontal flips on the train split only.
    """
    if task not in TASKS:
        raise DataError(f"task must be one of {TASKS}, got {task!r}")
    if augment not in (None, "none", "flip"):
        raise DataError(f"augment must be none or flip for dense tasks, got {augment!r}")
    if isinstance(img_size, bool) or int(img_size) < 8:
        raise DataError(f"img_size must be an integer >= 8, got {img_size!r}")
    if max_per_split is not None and int(max_per_split) < 1:
        raise DataError(f"max_per_split must be >= 1, got {max_per_split!r}")
    kind, root = parse_spec(spec)
    if task not in KIND_TASKS[kind]:
        raise DataError(f"{kind}: data serves {'/'.join(KIND_TASKS[kind])}, not {task!r} (spec {spec!r})")
    if kind == "camvid":
        src = read_camvid(root)
    elif kind == "voc":
        src = read_voc(root)
    else:
        src = read_pennfudan(root, split_seed)
    class_names = list(src.class_names)
    if kind == "pennfudan" and task == "segment":
        class_names = ["background", "person"]
    workers = max(1, min(8, os.cpu_count() or 1)) if workers is None else max(1, int(workers))
    datasets: dict[str, DenseDataset | None] = {"train": None, "val": None, "test": None}
    sizes = {}
    for name, items in src.splits.items():
        items = _cap(items, max_per_split, split_seed, name)
        with ThreadPoolExecutor(workers) as pool:
            samples = list(pool.map(lambda it: decode_item(it, src, task, int(img_size)), items))
        datasets[name] = DenseDataset(samples, task, mean, std, flip=(augment == "flip" and name == "train"))
        sizes[name] = len(samples)
    info = {
        "spec": spec, "kind": kind, "root": str(root), "img_size": int(img_size),
        "mean": list(mean), "std": list(std), "augment": augment, "max_per_split": max_per_split,
        "split_seed": split_seed, "notes": list(src.notes), "dropped_zero_area_boxes": src.dropped_boxes,
        "letterbox": "top-left, long side = img_size", "ignore_index": IGNORE,
    }  # fmt: skip
    train = datasets["train"]
    assert train is not None
    return DenseSplits(task, train, datasets["val"], datasets["test"], len(class_names), class_names, info)

