"""Run a dense model on one image and draw what it sees: a mask overlay or labelled boxes.

The picture is drawn on the *original* image at its own size (predictions are mapped back
through the letterbox), so what a user looks at is exactly what the metrics scored.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from vistune.data.errors import DataError
from vistune.dense.datasets import letterbox_geometry, letterbox_image, segmentation_to_original
from vistune.dense.model import DenseModel, load_dense


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated colours (golden-ratio hues), stable for a given class index."""
    out = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


@torch.no_grad()
def predict_image(model: DenseModel, image: Image.Image, mean, std, score_threshold: float = 0.3
                  ) -> dict[str, Any]:
    """Predictions for a PIL image, in its own pixel coordinates.

    Segment: ``{"mask": (H, W) int64}``. Detect: ``{"boxes": (N, 4), "scores", "labels"}`` with
    scores >= ``score_threshold``.
    """
    image = image.convert("RGB")
    size = int(model.tuned.model.vistune_info.img_size) if hasattr(model.tuned.model, "vistune_info") else 224
    lb = letterbox_geometry(image.width, image.height, size)
    x = torch.from_numpy(letterbox_image(image, lb)).float().div(255)
    x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    device = next(model.head.parameters()).device
    model.eval()
    out = model(x[None].to(device))
    if model.task == "segment":
        return {"mask": segmentation_to_original(out[0], lb).cpu()}
    det = model.head.task_head.detections(out)[0]
    keep = det["scores"] >= score_threshold
    return {"boxes": lb.boxes_to_original(det["boxes"][keep].cpu()), "scores": det["scores"][keep].cpu(),
            "labels": det["labels"][keep].cpu()}


def draw(image: Image.Image, result: dict[str, Any], class_names: list[str], alpha: float = 0.5) -> Image.Image:
    """An RGB picture: mask colours blended over the image with a legend, or labelled boxes."""
    base = image.convert("RGB")
    colors = palette(len(class_names))
    if "mask" in result:
        mask = result["mask"].numpy()
        lut = np.array(colors + [(0, 0, 0)] * (256 - len(colors)), dtype=np.uint8)
        overlay = Image.fromarray(lut[mask.clip(0, 255).astype(np.uint8)])
        pic = Image.blend(base, overlay, alpha)
        d = ImageDraw.Draw(pic)
        present = [int(c) for c in np.unique(mask) if 0 <= c < len(class_names)]
        for row, c in enumerate(present):  # legend: only classes in the picture
            y = 4 + 14 * row
            d.rectangle([4, y, 14, y + 10], fill=colors[c], outline=(0, 0, 0))
            d.text((18, y - 1), class_names[c], fill=(255, 255, 255), stroke_width=1, stroke_fill=(0, 0, 0))
        return pic
    pic = base.copy()
    d = ImageDraw.Draw(pic)
    width = max(2, round(max(pic.size) / 300))
    for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist()):
        color = colors[int(label) % len(colors)]
        d.rectangle(box, outline=color, width=width)
        name = class_names[int(label)] if int(label) < len(class_names) else str(label)
        d.text((box[0] + 3, box[1] + 2), f"{name} {score:.2f}", fill=color, stroke_width=1, stroke_fill=(0, 0, 0))
    return pic


def predict(tuned_dir_or_file: str | os.PathLike, image_path: str | os.PathLike, out_png: str | os.PathLike,
            *, score_threshold: float = 0.3, device: str = "cpu") -> dict[str, Any]:
    """Load a dense run, predict on ``image_path``, write the drawing to ``out_png``.

    Returns a JSON-able summary: task, output path and, per task, the pixel share of each class
    or the kept boxes (original-image pixels) with their class names and scores.
    """
    model, meta = load_dense(tuned_dir_or_file, device)
    path = Path(image_path)
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"image {path} cannot be decoded ({err})") from None
    info = model.tuned.model.vistune_info
    names = list(meta.get("class_names") or [str(i) for i in range(model.head.cfg.num_classes)])
    result = predict_image(model, image, info.mean, info.std, score_threshold)
    pic = draw(image, result, names)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    pic.save(out)
    summary: dict[str, Any] = {"task": model.task, "image": str(path), "out": str(out)}
    if model.task == "segment":
        counts = torch.bincount(result["mask"].reshape(-1), minlength=len(names)).tolist()
        total = max(1, sum(counts))
        summary["class_fraction"] = {names[c]: counts[c] / total for c in range(len(names)) if counts[c]}
    else:
        summary["detections"] = [
            {"label": names[int(lab)], "score": float(s), "box": [round(v, 1) for v in b]}
            for b, s, lab in zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist())
        ]
    return summary
