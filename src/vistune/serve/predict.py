"""Images in, JSON out: the preprocessing eval uses, and predictions a page can draw.

Preprocessing is the one the task was evaluated with, by calling the same functions:
classification tasks get ``vistune.data``'s direct bicubic resize to the backbone's square size
(with the JPEG draft decode the data loaders use) and its :class:`~vistune.data.transforms.Normalize`;
dense tasks get the letterbox of ``vistune predict`` (aspect kept, zero padding) and its
normalisation, and their masks and boxes are mapped back to the uploaded image's own pixels.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vistune.data.transforms import Normalize, decode_bytes, pil_to_chw
from vistune.dense.datasets import (
    letterbox_geometry,
    letterbox_image,
    segmentation_to_original,
)
from vistune.dense.predict import palette
from vistune.serve.multitask import MultiTaskModel, ServeError, Task, UnknownTaskError
from vistune.tasks import get_task

#: Decoded images larger than this are refused (PIL's own bomb limit is ~179 Mpx).
MAX_PIXELS = 40_000_000
#: ... and so are images whose decode would hold more than this many bytes at full size (the
#: decoded pixels plus the conversions preprocessing makes; see ``decode_bytes``). Memory grows
#: with bytes, not pixels: a 6,300 x 6,300 16-bit PNG of 92 KB passes the pixel limit.
MAX_DECODE_BYTES = 128 * 2**20


class BadImageError(ServeError):
    """The upload is not an image vistune can decode."""


class ImageTooLargeError(ServeError):
    """The upload decodes to more pixels or bytes than the service accepts."""


@dataclass
class Sample:
    """One (image, task) pair, preprocessed for that task."""

    task: str
    x: torch.Tensor  # (3, S, S) float32
    letterbox: Any = None  # the kind's serve_input context (dense: vistune.dense.datasets.Letterbox)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image with its header read (size and mode known), nothing decoded yet."""
    if not data:
        raise BadImageError("the upload is empty")
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadImageError(f"the upload is not an image PIL can read ({type(err).__name__})") from None
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f"the image has more than {max_pixels:,} pixels") from None
    if im.width * im.height > max_pixels:
        raise ImageTooLargeError(f"the image is {im.width}x{im.height}, more than {max_pixels:,} pixels")
    if im.width < 1 or im.height < 1:
        raise BadImageError(f"the image is {im.width}x{im.height}")
    return im


def _check_bytes(im: Image.Image, max_bytes: int | None, rgb: bool) -> None:
    """Refuse, before ``load()``, an image whose decode would hold more than ``max_bytes``."""
    need = decode_bytes(im.mode, im.width, im.height, rgb=rgb)
    if max_bytes is not None and need > max_bytes:
        raise ImageTooLargeError(
            f"the image ({im.width}x{im.height}, mode {im.mode}) needs {need / 2**20:,.0f} MB to decode, "
            f"more than the {max_bytes / 2**20:,.0f} MB this service allows per image")


def decode(data: bytes, max_pixels: int = MAX_PIXELS, max_bytes: int | None = MAX_DECODE_BYTES) -> Image.Image:
    """The full-resolution image (checked: decodes completely, not too many pixels, and its
    conversion to RGB fits ``max_bytes``)."""
    im = _open(data, max_pixels)
    _check_bytes(im, max_bytes, rgb=True)
    try:
        im.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise BadImageError(f"the image cannot be decoded ({err})") from None
    return im


def classify_input(data: bytes, size: int, mean, std, max_pixels: int = MAX_PIXELS,
                   max_bytes: int | None = MAX_DECODE_BYTES) -> torch.Tensor:
    """``(3, S, S)``: exactly what the data loaders give the model for this file at eval time."""
    im = _open(data, max_pixels)
    try:
        if im.format == "JPEG":
            im.draft(None, (size, size))  # what load_image_file does for data-set JPEGs
    except (OSError, ValueError, SyntaxError) as err:
        raise BadImageError(f"the image cannot be decoded ({err})") from None
    _check_bytes(im, max_bytes, rgb=False)  # after the draft: what will really be decoded
    try:
        im.load()
        arr = pil_to_chw(im, size)
    except (OSError, ValueError, SyntaxError) as err:
        raise BadImageError(f"the image cannot be decoded ({err})") from None
    if not arr.flags.writeable:
        arr = arr.copy()  # torch warns on read-only arrays (the normalised result is a new tensor anyway)
    return Normalize(mean, std)(torch.from_numpy(arr))


def dense_input(image: Image.Image, size: int, mean, std) -> tuple[torch.Tensor, Any]:
    """``(3, S, S)`` letterboxed as ``vistune predict`` does, and the letterbox geometry."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert copies even RGB -> RGB
    lb = letterbox_geometry(rgb.width, rgb.height, size)
    x = torch.from_numpy(letterbox_image(rgb, lb)).float().div(255)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return x, lb


def prepare(model: MultiTaskModel, data: bytes, tasks: list[str] | None = None,
            max_pixels: int = MAX_PIXELS, max_bytes: int | None = MAX_DECODE_BYTES) -> list[Sample]:
    """One image for ``tasks`` (default: every loaded task) -> one :class:`Sample` per task.

    The image is decoded once per input style of the named tasks' kinds (resize, letterbox), one
    after the other: at most one full-size decode is alive at a time, so a call's peak is
    ``decode_bytes`` of the upload (bounded by ``max_bytes``).
    """
    loaded = model.tasks
    names = list(loaded) if tasks is None else list(dict.fromkeys(tasks))
    if not names:
        raise UnknownTaskError("no task is loaded" if not loaded else "no task was named")
    for t in names:
        if t not in loaded:
            raise UnknownTaskError(f"no task {t!r} is loaded (loaded: {', '.join(loaded) or 'none'})")
    info = model.info
    size, mean, std = int(info.img_size), tuple(info.mean), tuple(info.std)
    prepared: dict[str, tuple[torch.Tensor, Any]] = {}  # input style -> (x, context): one decode per style
    samples = []
    for t in names:
        kind = get_task(loaded[t].kind)
        if kind.input_style not in prepared:
            prepared[kind.input_style] = kind.serve_input(data, size, mean, std, max_pixels, max_bytes)
        samples.append(Sample(t, *prepared[kind.input_style]))
    return samples


# ------------------------------------------------------------------------------------------------
# Outputs -> JSON


def _hex(c: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c)


def _png_b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def top_k(logits: torch.Tensor, classes: list[str], k: int) -> list[dict[str, Any]]:
    probs = torch.softmax(logits.float().reshape(-1), dim=0)
    vals, idx = probs.topk(min(int(k), probs.numel()))
    return [{"label": classes[i], "index": int(i), "prob": float(v)} for v, i in zip(vals.tolist(), idx.tolist())]


def segment_result(logits: torch.Tensor, lb: Any, classes: list[str], alpha: int = 140) -> dict[str, Any]:
    """Label map in the upload's pixels: PNG of class indices, a coloured RGBA overlay, class shares."""
    mask = segmentation_to_original(logits[0].float(), lb).cpu().numpy()
    colors = palette(len(classes))
    counts = np.bincount(mask.reshape(-1), minlength=len(classes))
    total = max(1, int(counts.sum()))
    lut = np.zeros((max(256, len(classes)), 4), dtype=np.uint8)
    lut[: len(classes), :3] = np.array(colors, dtype=np.uint8).reshape(-1, 3)
    lut[: len(classes), 3] = alpha
    overlay = Image.fromarray(lut[mask], mode="RGBA")
    out: dict[str, Any] = {
        "width": int(lb.width),
        "height": int(lb.height),
        "overlay_png": _png_b64(overlay),
        "fractions": [{"label": classes[c], "index": c, "fraction": float(counts[c]) / total, "color": _hex(colors[c])}
                      for c in np.argsort(-counts).tolist() if counts[c] > 0],
    }
    if len(classes) <= 256:
        out["mask_png"] = _png_b64(Image.fromarray(mask.astype(np.uint8), mode="L"))
    return out


def detect_result(raw: dict[str, Any], task: Task, lb: Any, threshold: float) -> dict[str, Any]:
    """Boxes (x1, y1, x2, y2) in the upload's pixels with labels and scores, as ``vistune predict``."""
    det = task.head.task_head.detections(raw)[0]
    keep = det["scores"] >= threshold
    boxes = lb.boxes_to_original(det["boxes"][keep].float().cpu())
    colors = palette(len(task.classes))
    out = []
    for box, score, label in zip(boxes.tolist(), det["scores"][keep].tolist(), det["labels"][keep].tolist()):
        label = int(label)
        out.append({"label": task.classes[label] if label < len(task.classes) else str(label), "index": label,
                    "score": float(score), "box": [round(float(v), 1) for v in box],
                    "color": _hex(colors[label % len(colors)])})
    return {"width": int(lb.width), "height": int(lb.height), "threshold": float(threshold), "boxes": out}


def finish(model: MultiTaskModel, sample: Sample, output: Any, *, top: int = 5,
           score_threshold: float | None = None) -> dict[str, Any]:
    """A task's raw output for one sample -> the JSON the service returns."""
    task = model.tasks[sample.task]
    res: dict[str, Any] = {"task": task.name, "kind": task.kind, "method": task.method}
    res.update(get_task(task.kind).serve_result(output, sample.letterbox, task, top=top,
                                                 score_threshold=score_threshold))
    return res


def predict(model: MultiTaskModel, data: bytes, tasks: list[str] | None = None, *, top: int = 5,
            score_threshold: float | None = None) -> dict[str, dict[str, Any]]:
    """One image (file bytes) through ``tasks`` (default all) in one batch: ``{task: result}``.

    In-process use: no decode byte limit (the HTTP service sets one; the pixel limit stays)."""
    samples = prepare(model, data, tasks, max_bytes=None)
    outputs = model.forward(torch.stack([s.x for s in samples]), [s.task for s in samples])
    return {s.task: finish(model, s, o, top=top, score_threshold=score_threshold) for s, o in zip(samples, outputs)}
