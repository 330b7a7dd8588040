"""Dense metrics, computed by reference libraries rather than by hand.

* Segmentation: a confusion matrix accumulated by ``torchmetrics``' ``MulticlassConfusionMatrix``
  (pixels labelled ``ignore_index`` never count), and IoU_c = TP / (TP + FP + FN) from it.
  A class with no pixel in either the labels or the predictions has no IoU (``None``) and is
  left out of the mean — the usual mIoU convention (and what makes a perfect prediction score
  exactly 1 on a test set that lacks some class). ``MulticlassJaccardIndex`` would score such a
  class 0 and drag the mean down; the tests check that both agree when every class is present.
* Detection: ``torchmetrics.detection.MeanAveragePrecision`` with the pycocotools backend
  (COCO's 101-point interpolated AP; ``map`` = AP@[.50:.95], ``map_50`` = AP@.50). VOC
  "difficult" objects are passed as COCO ``iscrowd``, so detecting them is neither rewarded nor
  punished, which is what VOC evaluation does with them.
"""

from __future__ import annotations

from typing import Any

import torch


class SegmentationMetric:
    """Accumulates ``(pred, target)`` label maps; :meth:`compute` gives mIoU and per-class IoU."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.num_classes = num_classes
        self._cm = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False,
                                            sync_on_compute=False)  # shards are reduced by the task

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``/``target``: integer label maps of the same shape (any leading dims)."""
        self._cm.update(pred.reshape(-1).cpu(), target.reshape(-1).cpu().long())

    def confusion(self) -> torch.Tensor:
        """(K, K) counts, rows = true class, columns = predicted class."""
        return self._cm.compute()

    def compute(self) -> dict[str, Any]:
        return segmentation_scores(self.confusion())


def segmentation_scores(confusion: torch.Tensor) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of a (K, K) confusion matrix (a sum over shards is fine)."""
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    per_class = [float(tp[c] / union[c]) if union[c] > 0 else None for c in range(cm.shape[0])]
    valid = [v for v in per_class if v is not None]
    total = float(cm.sum())
    return {
        "miou": sum(valid) / len(valid) if valid else 0.0,
        "per_class_iou": per_class,
        "pixel_acc": float(tp.sum() / total) if total else 0.0,
        "pixels": int(total),
    }


class DetectionMetric:
    """COCO-style box mAP over ``(predictions, targets)`` lists of per-image dicts."""

    def __init__(self, num_classes: int) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        self.num_classes = num_classes
        self._map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True,
                                         backend="pycocotools", sync_on_compute=False)

    def update(self, preds: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]]) -> None:
        """``preds``: boxes (N,4) xyxy, scores, labels. ``targets``: boxes, labels, optional iscrowd."""
        p = [{"boxes": d["boxes"].detach().float().cpu(), "scores": d["scores"].detach().float().cpu(),
              "labels": d["labels"].detach().long().cpu()} for d in preds]
        t = []
        for d in targets:
            item = {"boxes": d["boxes"].float().cpu(), "labels": d["labels"].long().cpu()}
            if d.get("iscrowd") is not None:
                item["iscrowd"] = d["iscrowd"].long().cpu()
            t.append(item)
        self._map.update(p, t)

    def compute(self) -> dict[str, Any]:
        r = self._map.compute()
        per_class = [None] * self.num_classes
        classes = r.get("classes")
        values = r.get("map_per_class")
        if classes is not None and values is not None:
            cls_list = classes.reshape(-1).tolist()
            val_list = values.reshape(-1).tolist()
            for c, v in zip(cls_list, val_list):
                if 0 <= int(c) < self.num_classes:
                    per_class[int(c)] = None if v < 0 else float(v)
        def num(key: str) -> float:
            v = float(r[key])
            return max(v, 0.0)  # COCO reports -1 when there is nothing to score

        return {"map": num("map"), "map_50": num("map_50"), "map_75": num("map_75"),
                "per_class_ap": per_class}
