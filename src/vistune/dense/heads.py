"""Light, trainable dense heads over frozen multi-scale features.

Everything here is small on purpose: the point of the task is the *tuning method* on a frozen
backbone, so the head must be cheap enough that comparing methods compares methods.

* :class:`Neck` — per level a 1x1 lateral conv to ``width`` channels, the ViT simple-pyramid
  resampling (bilinear up, 2x2 max-pool down, as ViTDet), an FPN top-down pass (coarse maps
  added into finer ones) and a 3x3 conv + GroupNorm + ReLU per level. GroupNorm, not BatchNorm:
  dense batches on a CPU are 2-8 images, and BatchNorm statistics at that size are noise.
* :class:`SegHead` — Panoptic-FPN-style fusion: every level upsampled to the finest one and
  summed, a 3x3 conv, a 1x1 classifier; logits are upsampled to the input size. Loss: cross
  entropy with ``ignore_index``.
* :class:`FCOSHead` — anchor-free detection (Tian et al., FCOS) on the coarser levels: a shared
  2-conv class tower and 2-conv box tower, per-location class logits (sigmoid focal loss),
  distances to the four box sides (``ReLU(scale_l * t) * stride``, GIoU loss) and centre-ness
  (BCE). Locations are assigned to boxes by FCOS's rules: inside the box's centre region
  (radius 1.5 strides), the box's largest side-distance within the level's range, and the
  smallest such box wins. Inference: score = sqrt(class prob x centre-ness), top-k per level,
  class-wise NMS (``torchvision.ops.batched_nms``).

The losses and target assignment are written here (short and readable) instead of borrowed
from torchvision's detection models, whose heads assume their own anchor/transform plumbing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

from vistune.dense.features import Level

IGNORE = 255


@dataclass
class HeadConfig:
    """Plain data describing a head; stored in the head file so it rebuilds exactly."""

    task: str  # segment | detect
    num_classes: int
    levels: list[dict[str, Any]] = field(default_factory=list)  # Level.to_dict() per level
    width: int = 64
    det_levels: int = 3  # detection keeps the coarsest ``det_levels`` default levels
    score_threshold: float = 0.05
    nms_iou: float = 0.6
    max_detections: int = 100
    ignore_index: int = IGNORE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def level_objs(self) -> list[Level]:
        return [Level.from_dict(d) for d in self.levels]


def _gn(width: int) -> nn.GroupNorm:
    groups = math.gcd(width, 8) or 1
    return nn.GroupNorm(groups, width)


def _conv_block(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), _gn(width), nn.ReLU(inplace=True))


def _resample(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return x
    if scale > 1.0:
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    factor = int(round(1.0 / scale))
    return F.max_pool2d(x, kernel_size=factor, stride=factor, ceil_mode=True)


class Neck(nn.Module):
    """Lateral 1x1 -> (ViT) resample -> FPN top-down -> 3x3 conv per level; all ``width`` wide."""

    def __init__(self, levels: list[Level], width: int) -> None:
        super().__init__()
        self.scales = [lv.scale for lv in levels]
        self.lateral = nn.ModuleList(nn.Conv2d(lv.channels, width, 1) for lv in levels)
        self.output = nn.ModuleList(_conv_block(width) for _ in levels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [_resample(conv(f), s) for conv, f, s in zip(self.lateral, feats, self.scales)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        return [conv(p) for conv, p in zip(self.output, lat)]


class SegHead(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        w = cfg.width
        self.fuse = _conv_block(w)
        self.classifier = nn.Conv2d(w, cfg.num_classes, 1)
        self.ignore_index = cfg.ignore_index

    def forward(self, pyramid: list[torch.Tensor], image_size: tuple[int, int]) -> torch.Tensor:
        size = pyramid[0].shape[-2:]
        fused = pyramid[0]
        for p in pyramid[1:]:
            fused = fused + F.interpolate(p, size=size, mode="bilinear", align_corners=False)
        logits = self.classifier(self.fuse(fused))
        return F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)

    def loss(self, logits: torch.Tensor, targets: list[dict[str, Any]]) -> torch.Tensor:
        mask = torch.stack([t["mask"] for t in targets]).to(logits.device)
        if (mask != self.ignore_index).sum() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), mask, ignore_index=self.ignore_index)


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class FCOSHead(nn.Module):
    """FCOS on every level it is given (by default the coarsest three: strides ~8-32)."""

    def __init__(self, cfg: HeadConfig, strides: list[float]) -> None:
        super().__init__()
        w, k = cfg.width, cfg.num_classes
        self.cfg = cfg
        self.strides = list(strides)
        self.cls_tower = nn.Sequential(_conv_block(w), _conv_block(w))
        self.box_tower = nn.Sequential(_conv_block(w), _conv_block(w))
        self.cls_logits = nn.Conv2d(w, k, 3, padding=1)
        self.box_pred = nn.Conv2d(w, 4, 3, padding=1)
        self.centerness = nn.Conv2d(w, 1, 3, padding=1)
        self.scales = nn.ModuleList(_Scale() for _ in strides)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - 0.01) / 0.01))  # prior p = 0.01
        nn.init.normal_(self.box_pred.weight, std=0.01)
        nn.init.constant_(self.box_pred.bias, 1.0)  # boxes start ~1 stride from each side
        # Size ranges per level (FCOS: 0-64, 64-128, ... at strides 8, 16, ...; i.e. 8 strides).
        self.ranges = [(0.0 if i == 0 else 8.0 * strides[i - 1], math.inf if i == len(strides) - 1 else 8.0 * s)
                       for i, s in enumerate(strides)]

    def forward(self, pyramid: list[torch.Tensor], image_size: tuple[int, int]) -> dict[str, Any]:
        feats = pyramid
        cls, box, ctr, points, strides, level_id = [], [], [], [], [], []
        for li, f in enumerate(feats):
            b, _, h, w = f.shape
            ct = self.cls_tower(f)
            bt = self.box_tower(f)
            # per-level strides from the actual map size (ViT/14 strides are not powers of two)
            sy, sx = image_size[0] / h, image_size[1] / w
            stride = self.strides[li]
            cls.append(self.cls_logits(ct).flatten(2).transpose(1, 2))
            box.append((F.relu(self.scales[li](self.box_pred(bt))) * stride).flatten(2).transpose(1, 2))
            ctr.append(self.centerness(bt).flatten(2).transpose(1, 2))
            ys = (torch.arange(h, device=f.device, dtype=torch.float32) + 0.5) * sy
            xs = (torch.arange(w, device=f.device, dtype=torch.float32) + 0.5) * sx
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
            strides.append(torch.full((h * w,), stride, device=f.device))
            level_id.append(torch.full((h * w,), li, device=f.device, dtype=torch.long))
        return {
            "cls": torch.cat(cls, 1).float(),  # (B, L, K)
            "box": torch.cat(box, 1).float(),  # (B, L, 4) ltrb distances in pixels
            "ctr": torch.cat(ctr, 1).float().squeeze(-1),  # (B, L)
            "points": torch.cat(points),  # (L, 2)
            "strides": torch.cat(strides),
            "level": torch.cat(level_id),
            "image_size": image_size,
        }

    # -- training --------------------------------------------------------------------
    def assign(self, out: dict[str, Any], boxes: torch.Tensor, labels: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per location: class index (-1 = background) and its box (L, 4)."""
        points, strides, level = out["points"], out["strides"], out["level"]
        n = points.shape[0]
        if boxes.numel() == 0:
            return torch.full((n,), -1, dtype=torch.long, device=points.device), points.new_zeros(n, 4)
        px, py = points[:, 0:1], points[:, 1:2]  # (L, 1)
        x1, y1, x2, y2 = (boxes[:, i][None] for i in range(4))  # (1, G)
        ltrb = torch.stack([px - x1, py - y1, x2 - px, y2 - py], dim=2)  # (L, G, 4)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        r = 1.5 * strides[:, None]
        in_center = ((px > torch.maximum(x1, cx - r)) & (px < torch.minimum(x2, cx + r))
                     & (py > torch.maximum(y1, cy - r)) & (py < torch.minimum(y2, cy + r)))
        max_side = ltrb.max(dim=2).values
        lo = torch.tensor([self.ranges[i][0] for i in range(len(self.ranges))], device=points.device)[level]
        hi = torch.tensor([self.ranges[i][1] for i in range(len(self.ranges))], device=points.device)[level]
        in_range = (max_side >= lo[:, None]) & (max_side <= hi[:, None])
        area = ((x2 - x1) * (y2 - y1)).expand(n, -1)
        cand = in_center & in_range & (ltrb.min(dim=2).values > 0)
        area = torch.where(cand, area, torch.full_like(area, math.inf))
        best_area, best = area.min(dim=1)
        cls = torch.where(torch.isfinite(best_area), labels[best], torch.full_like(labels[best], -1))
        return cls, boxes[best]

    def loss(self, out: dict[str, Any], targets: list[dict[str, Any]]) -> torch.Tensor:
        cls_t, box_t = [], []
        for t in targets:
            c, b = self.assign(out, t["boxes"].to(out["points"].device), t["labels"].to(out["points"].device))
            cls_t.append(c)
            box_t.append(b)
        cls_t = torch.stack(cls_t)  # (B, L)
        box_t = torch.stack(box_t)  # (B, L, 4)
        pos = cls_t >= 0
        num_pos = max(1.0, float(pos.sum()))
        onehot = torch.zeros_like(out["cls"])
        onehot[pos] = F.one_hot(cls_t[pos], onehot.shape[-1]).to(onehot.dtype)
        loss_cls = sigmoid_focal_loss(out["cls"], onehot, alpha=0.25, gamma=2.0, reduction="sum") / num_pos
        if not pos.any():
            return loss_cls + out["box"].sum() * 0.0 + out["ctr"].sum() * 0.0
        points = out["points"][None].expand(pos.shape[0], -1, -1)[pos]
        pred = _decode(points, out["box"][pos])
        gt = box_t[pos]
        ltrb = torch.cat([points - gt[:, :2], gt[:, 2:] - points], dim=1)
        lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
        ctr_t = torch.sqrt((lr.min(1).values / lr.max(1).values).clamp(min=0)
                           * (tb.min(1).values / tb.max(1).values).clamp(min=0))
        loss_box = (generalized_box_iou_loss(pred, gt, reduction="none") * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(out["ctr"][pos], ctr_t, reduction="sum") / num_pos
        return loss_cls + loss_box + loss_ctr

    # -- inference -------------------------------------------------------------------
    @torch.no_grad()
    def detections(self, out: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        """Per image: ``boxes`` (N, 4) in canvas pixels, ``scores``, ``labels``; after NMS."""
        h_img, w_img = out["image_size"]
        results = []
        scores_all = torch.sqrt(out["cls"].sigmoid() * out["ctr"].sigmoid()[..., None])  # (B, L, K)
        for b in range(scores_all.shape[0]):
            boxes_l, scores_l, labels_l = [], [], []
            for li in range(len(self.strides)):
                sel = out["level"] == li
                s = scores_all[b][sel]  # (Ll, K)
                keep = s > self.cfg.score_threshold
                cand = keep.nonzero()
                if cand.numel() == 0:
                    continue
                vals = s[keep]
                if vals.numel() > 1000:
                    vals, top = vals.topk(1000)
                    cand = cand[top]
                loc, lab = cand[:, 0], cand[:, 1]
                pts = out["points"][sel][loc]
                bx = _decode(pts, out["box"][b][sel][loc])
                boxes_l.append(bx)
                scores_l.append(vals)
                labels_l.append(lab)
            if not boxes_l:
                z = out["cls"].new_zeros
                results.append({"boxes": z(0, 4), "scores": z(0), "labels": torch.zeros(0, dtype=torch.long)})
                continue
            boxes = torch.cat(boxes_l)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w_img)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h_img)
            scores, labels = torch.cat(scores_l), torch.cat(labels_l)
            keep = batched_nms(boxes, scores, labels, self.cfg.nms_iou)[: self.cfg.max_detections]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results


def _decode(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    return torch.cat([points - ltrb[:, :2], points + ltrb[:, 2:]], dim=1)


class DenseHead(nn.Module):
    """Neck + task head: ``feature maps -> logits (segment) | raw FCOS outputs (detect)``."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        if cfg.task not in ("segment", "detect"):
            raise ValueError(f"head task must be 'segment' or 'detect', got {cfg.task!r}")
        if cfg.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {cfg.num_classes}")
        levels = cfg.level_objs()
        if not levels:
            raise ValueError("a dense head needs at least one feature level")
        self.cfg = cfg
        self.neck = Neck(levels, cfg.width)
        if cfg.task == "segment":
            self.task_head: nn.Module = SegHead(cfg)
        else:
            self.task_head = FCOSHead(cfg, [lv.stride for lv in levels])

    def forward(self, feats: list[torch.Tensor], image_size: tuple[int, int]) -> Any:
        return self.task_head(self.neck(feats), image_size)

    def loss(self, out: Any, targets: list[dict[str, Any]]) -> torch.Tensor:
        return self.task_head.loss(out, targets)
