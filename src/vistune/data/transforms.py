"""Pixel-level helpers: decode -> 3/1-channel uint8 at a fixed square size,
per-item normalisation, optional light augmentation.

Why uint8 at the final size: the data sets this library targets are small and
the engine often runs on a couple of CPU cores. Decoding + resizing once at
load time and keeping ``uint8`` (4x smaller than float32) makes every later
epoch a tensor index plus one fused normalise, and it lets us find corrupt
files before training starts instead of mid-epoch.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from .errors import DataError

# Modes whose content is a single intensity channel. They stay 1-channel in
# memory (3x cheaper) and are expanded to 3 channels only when an item is read.
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"}


def pil_to_chw(im: Image.Image, size: int) -> np.ndarray:
    """Convert any PIL image to ``uint8`` ``(C, size, size)`` with C in {1, 3}.

    Direct (aspect-distorting) bicubic resize to ``size x size``: this is what
    SPT/NOAH's VTAB-1k protocol does, and it keeps eval deterministic and
    crop-free. Alpha is dropped (like torchvision's ImageFolder loader);
    palette images go through RGBA so their transparency key is honoured.
    High-bit-depth grey (``I;16``, ``I``, ``F``) is rescaled by its own range
    rather than clipped at 255, which would otherwise turn most 16-bit X-rays
    white.
    """
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in _GREY_MODES:
        if mode in ("1", "L", "LA", "La"):
            im = im.convert("L")
        else:
            im = _rescale_to_l(im)
        grey = True
    else:
        if mode != "RGB":
            im = im.convert("RGB")
        grey = False
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    if grey:
        return np.ascontiguousarray(arr[None])
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


#: Rows of a high-bit-depth image rescaled at once: ~2 MB of float64 per band of rows.
_RESCALE_CHUNK_VALUES = 1 << 18


def _rescale_to_l(im: Image.Image) -> Image.Image:
    """``I;16``/``I``/``F`` -> ``L`` by the image's own range, a band of rows at a time.

    Why bands: the whole image as float64 (plus its temporaries) cost ~25 bytes per pixel, so
    a 92 KB 16-bit PNG of 6,300 x 6,300 px took ~1 GB to decode. Each band is read from the
    image's own storage (a crop, native dtype), rescaled in float64 exactly as before (so the
    pixels are bit-identical) and pasted into the result: the extra memory is one ``L`` image
    (1 byte per pixel) and one band.
    """
    w, h = im.size
    rows = max(1, _RESCALE_CHUNK_VALUES // max(1, w))
    lo = hi = None
    for top in range(0, h, rows):
        band = np.asarray(im.crop((0, top, w, min(h, top + rows))))
        b_lo, b_hi = band.min(), band.max()  # NaN (mode F) propagates, as np.min over the whole did
        lo = b_lo if lo is None else np.minimum(lo, b_lo)
        hi = b_hi if hi is None else np.maximum(hi, b_hi)
    lo, hi = float(lo), float(hi)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = Image.new("L", (w, h))
    for top in range(0, h, rows):
        band = np.asarray(im.crop((0, top, w, min(h, top + rows))), dtype=np.float64)
        out.paste(Image.fromarray(((band - lo) * scale).round().astype(np.uint8), mode="L"), (0, top))
    return out


#: Bytes per pixel PIL stores for a decoded image of each mode (2-4 band modes take 4).
_STORED_BPP = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}

#: Extra bytes per pixel :func:`pil_to_chw` allocates at full size on top of the decoded image,
#: by mode: P goes through RGBA then RGB (both alive at once); other colour modes one RGB copy;
#: grey modes one ``L`` copy (``convert`` copies even L -> L).
_CONVERT_BPP = {"RGB": 0, "P": 8, "1": 1, "L": 1, "LA": 1, "La": 1,
                "I": 1, "F": 1, "I;16": 1, "I;16B": 1, "I;16L": 1, "I;16N": 1}


def decode_bytes(mode: str, width: int, height: int, rgb: bool = False) -> int:
    """Peak bytes :func:`pil_to_chw` holds at full size for a ``width x height`` image of
    ``mode``: the decoded pixels plus the conversions it makes before resizing. ``rgb=True``:
    the image is converted to RGB instead (the letterbox path; 4 bytes per pixel unless RGB).

    Known from the header alone (PIL reads size and mode lazily), so a service can refuse an
    image before ``load()`` whose pixel count passes but whose working set would not: memory
    grows with bytes, not pixels (a 16-bit image is 2 bytes per pixel, RGB 4 in PIL).
    """
    extra = (0 if mode == "RGB" else 4) if rgb else _CONVERT_BPP.get(mode, 4)
    per_pixel = _STORED_BPP.get(mode, 4) + extra
    return int(width) * int(height) * per_pixel


def load_image_file(path: Path | BinaryIO, size: int) -> np.ndarray:
    """Decode one image file fully and resize it (see :func:`pil_to_chw`).

    For JPEGs we ask libjpeg for a DCT-domain downscale (``draft``) to the
    smallest scale that is still >= ``size``: a 500x350 photo decoded for a
    112 px model is ~4x faster this way, and the bicubic resize that follows
    does the exact sizing. ``im.load()`` forces a full decode so truncated or
    corrupt files raise here (at load time) rather than during training.
    """
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft(None, (size, size))
        im.load()
        return pil_to_chw(im, size)


def load_image_bytes(data: bytes, size: int) -> np.ndarray:
    """:func:`load_image_file` for an encoded image held in memory (npz JPEG
    bytes, a Hugging Face ``Image`` cell)."""
    return load_image_file(io.BytesIO(data), size)


def verify_image(path: Path | BinaryIO) -> None:
    """Raise if the image cannot be decoded, as cheaply as possible.

    JPEGs are decoded at libjpeg's smallest DCT scale (1/8): the entropy-coded
    data is still read in full, so truncated or corrupt files fail exactly as
    in a full decode, but no full-size pixels and no resize are computed.
    That is what lets lazy mode check 60k files before training in seconds.
    """
    with Image.open(path) as im:
        if im.format == "JPEG":
            im.draft(None, (1, 1))
        im.load()


def check_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validate mean/std early (a typo here silently ruins every run)."""
    m = tuple(float(v) for v in mean)
    s = tuple(float(v) for v in std)
    if len(m) != 3 or len(s) != 3:
        raise DataError(f"mean and std need 3 values each (RGB), got mean={m} std={s}")
    if any(v <= 0 for v in s):
        raise DataError(f"std values must be > 0, got {s}")
    return m, s


class Normalize:
    """uint8 ``(..., 3, H, W)`` -> normalised float32, in one fused step.

    Works on a single item or a whole batch, so an engine that batches the
    cached ``uint8`` tensor itself can normalise per batch.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        m, s = check_norm(mean, std)
        # (x/255 - m) / s == (x - 255 m) / (255 s): one subtraction, one division.
        self.shift = torch.tensor([255.0 * v for v in m]).view(3, 1, 1)
        self.scale = torch.tensor([255.0 * v for v in s]).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # A 1-channel (grey) input broadcasts against the (3, 1, 1) shift,
        # so grey -> 3 channels happens here for free.
        return (x.float() - self.shift) / self.scale


def make_augment(augment: str | None, size: int) -> v2.Compose | None:
    """The *light* training augmentation requested by name, or None.

    ``"flip"``: a mild RandomResizedCrop (scale 0.6-1, ratio 3/4-4/3) of the
    already-resized uint8 image back to ``size``, then a horizontal flip. It
    works on the cached tensor, so it costs one small resample per item and
    never touches the disk. This is the FGVC-style recipe; VTAB-1k protocols
    train without augmentation (``augment=None``).
    """
    if augment is None or augment == "none":
        return None
    if augment == "flip":
        return v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                v2.RandomHorizontalFlip(0.5),
            ]
        )
    raise DataError(f"unknown augment {augment!r}; known: None, 'none', 'flip'")
