"""Multi-label classification as a vistune plugin: a task kind and its data reader, with no edit to vistune.

An image may show several things at once (a street scene: road, car, pedestrian, sign). The head
gives one logit per label, trained with binary cross-entropy on multi-hot targets; a label is
predicted present when its sigmoid probability is at least 0.5. The run is selected on **mAP**
(the mean over labels of average precision, the area under each label's precision/recall steps;
labels with no positive image in the split have no AP and are skipped, and counted), and also
reports per-label F1 at threshold 0.5 and their mean, macro-F1.

Data: ``mlcamvid:DIR``, a folder in vistune's ``camvid:`` layout (``{train,val,test}/*.jpg`` and
``{split}annot/*.png`` class-index masks, optional ``classes.txt``). An image's labels are the
classes covering at least ``MIN_FRACTION`` (0.5 %) of its pixels: a real multi-label target from
segmentation masks, with no extra annotation (why this reader and not a CSV of labels: CamVid is
the real data at hand, and every index-mask data set becomes a multi-label one for free).

Use it from the command line (``--plugin`` imports this file; its ``@register_task`` and
``register_reader`` make ``multilabel`` and ``mlcamvid:`` known; a package would declare
``multilabel = my_pkg.multilabel:MultiLabelTask`` in its ``vistune.tasks`` entry points)::

    vistune --plugin examples/multilabel.py train --task multilabel --data mlcamvid:DIR \\
        --backbone test_vit --img-size 32 --method lora --out runs/ml
    vistune --plugin examples/multilabel.py eval --tuned runs/ml
    vistune --plugin examples/multilabel.py predict --tuned runs/ml --image street.jpg

The class derives vistune's classification task: backbone, method, linear head on the pooled
features, the feature cache for frozen backbones, saving, rebuilding, serving and export all come
from there; this file only says what differs: the targets, the loss, the metrics and the answers.
A saved run needs no marker of its own: its tuned file records the run config, whose ``task`` names
this kind, and vistune rebuilds it with whatever class is registered under that name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from vistune.backbones import backbone_info
from vistune.config import ConfigError, TrainConfig
from vistune.data import DataError, Reader, ReadOptions, register_reader, select_dense
from vistune.data.dense import read_camvid
from vistune.data.sources import RawSplit, SourceData
from vistune.data.transforms import Normalize, make_augment
from vistune.io import json_text
from vistune.tasks import register_task
from vistune.tasks.classify import ClassifyTask

#: A class is one of an image's labels when it covers at least this share of the image's pixels.
MIN_FRACTION = 0.005
#: Probability at or above which a label counts as predicted (F1, served and predicted answers).
THRESHOLD = 0.5


# ------------------------------------------------------------------------------------- metrics

def average_precision(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Average precision of one label: sum over score thresholds of (recall step) x precision.

    Tied scores form one threshold (one step), as scikit-learn's ``average_precision_score``
    does, so the value does not depend on how ties happen to be ordered. None when the label
    has no positive (its AP is undefined; the caller skips and counts it)."""
    positives = np.asarray(positives, dtype=np.float64)
    n_pos = positives.sum()
    if n_pos == 0:
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s, y = np.asarray(scores, dtype=np.float64)[order], positives[order]
    tp, fp = np.cumsum(y), np.cumsum(1.0 - y)
    ends = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last row of each run of equal scores
    precision = tp[ends] / (tp[ends] + fp[ends])
    recall = tp[ends] / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_scores(probs: np.ndarray, targets: np.ndarray, threshold: float = THRESHOLD) -> list[float | None]:
    """Per-label F1 of ``probs >= threshold``: 2TP / (2TP + FP + FN); None for a label that is
    neither present nor predicted anywhere in the split (F1 is 0/0 there, not 0 or 1)."""
    pred = np.asarray(probs) >= threshold
    true = np.asarray(targets) > 0.5
    tp = (pred & true).sum(0)
    denom = 2 * tp + (pred & ~true).sum(0) + (~pred & true).sum(0)
    return [float(2 * t / d) if d else None for t, d in zip(tp.tolist(), denom.tolist())]


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor, threshold: float = THRESHOLD) -> dict[str, Any]:
    """A split's metrics from all its logits ``(N, K)`` and multi-hot targets ``(N, K)``: mAP
    over labels with a positive, the count of labels without one, per-label AP and F1,
    macro-F1 (over labels whose F1 is defined) and the mean BCE loss."""
    logits, targets = logits.float(), targets.float()
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"multilabel_metrics: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "must both be (N, K)")
    probs, y = torch.sigmoid(logits).numpy(), targets.numpy()
    # ranked by logit: the same order as the probability, without float32's saturated ties at 1.0
    ap = [average_precision(logits[:, k].numpy(), y[:, k]) for k in range(y.shape[1])]
    f1 = f1_scores(probs, y, threshold)
    scored_ap, scored_f1 = [v for v in ap if v is not None], [v for v in f1 if v is not None]
    n = int(y.shape[0])
    loss = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum").item()
    return {"map": float(np.mean(scored_ap)) if scored_ap else float("nan"), "ap": ap,
            "labels_without_positives": sum(v is None for v in ap), "f1": f1,
            "macro_f1": float(np.mean(scored_f1)) if scored_f1 else float("nan"),
            "loss": loss / max(n * y.shape[1], 1), "num": n}


# ---------------------------------------------------------------------------------------- data

def labels_in_mask(mask: Path, num_classes: int, min_fraction: float = MIN_FRACTION) -> list[int]:
    """The classes covering at least ``min_fraction`` of the mask's pixels (void and 255 are no class)."""
    try:
        with Image.open(mask) as im:
            values = np.asarray(im.convert("L") if im.mode not in ("L", "P") else im).reshape(-1)
    except (OSError, ValueError) as err:
        raise DataError(f"mlcamvid: mask {mask} cannot be decoded ({err})") from None
    counts = np.bincount(values, minlength=256)
    bad = [int(v) for v in np.nonzero(counts[num_classes + 1:255])[0] + num_classes + 1]
    if bad:
        raise DataError(f"mlcamvid: mask {mask} holds value {bad[0]}, outside the {num_classes} classes "
                        f"(0..{num_classes - 1}, void {num_classes}, 255)")
    return [c for c in range(num_classes) if counts[c] >= min_fraction * values.size]


def read_mlcamvid(arg: str | None, opts: ReadOptions) -> SourceData:
    """vistune's ``camvid:`` reader (layout, class names, error lines), then each image's labels
    from its mask: ids stay the relative image paths, targets become sorted label indices."""
    src = read_camvid(arg or "")
    k = len(src.class_names)
    splits = {name: RawSplit(raw.ids, raw.labels, [labels_in_mask(item.mask, k) for item in raw.targets or []])
              for name, raw in src.splits.items()}
    note = f"labels: classes covering >= {MIN_FRACTION:.1%} of an image's mask pixels"
    return dataclasses.replace(src, kind="mlcamvid", splits=splits, notes=[*src.notes, note])


MLCAMVID = register_reader("mlcamvid", Reader(
    read_mlcamvid, "mlcamvid:DIR  (multilabel: camvid layout; an image's labels are the classes covering >= "
    f"{MIN_FRACTION:.1%} of its mask)", tasks=("multilabel",)))


class MultiLabelSet(Dataset):
    """One split, decoded once: items are ``(FloatTensor[3, S, S] normalised, FloatTensor[K] multi-hot)``."""

    def __init__(self, ids: list[str], labels: list[list[int]], images: torch.Tensor, num_classes: int,
                 normalize: Normalize, augment: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self.ids, self.labels, self.images = ids, labels, images
        self.targets = torch.zeros(len(ids), num_classes)
        for row, present in enumerate(labels):
            self.targets[row, present] = 1.0
        self.normalize, self.augment = normalize, augment

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[index]
        if self.augment is not None:
            x = self.augment(x)
        return self.normalize(x), self.targets[index]


@dataclasses.dataclass
class MultiLabelData:
    """The three splits and what reproduces them (written as the run's ``splits.json``)."""

    train: MultiLabelSet
    val: MultiLabelSet | None
    test: MultiLabelSet | None
    class_names: list[str]
    info: dict[str, Any]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def manifest(self) -> dict[str, Any]:
        splits = {}
        for name in ("train", "val", "test"):
            ds = getattr(self, name)
            splits[name] = None if ds is None else {
                "size": len(ds), "label_counts": ds.targets.sum(0).long().tolist(), "ids": list(ds.ids),
                "labels": [list(v) for v in ds.labels]}
        return {**self.info, "format": "multilabel.data/1", "task": MultiLabelTask.name,
                "num_classes": self.num_classes, "class_names": list(self.class_names), "splits": splits}


def load_multilabel_data(cfg: TrainConfig, model: nn.Module) -> MultiLabelData:
    """The run's splits through vistune's own selection (:func:`vistune.data.select_dense`: the spec
    registry, the reader's task check, ``max_per_split`` and ``trainval``), decoded as classification
    decodes (direct bicubic resize to the backbone's size) and normalised as its weights expect."""
    info = backbone_info(model)
    sel = select_dense(cfg.data, MultiLabelTask.name, max_per_split=cfg.max_per_split, trainval=cfg.trainval,
                       shots=cfg.shots, subset=cfg.subset_sizes(), imbalance=cfg.imbalance)
    src, size = sel.src, int(info.img_size)
    normalize = Normalize(info.mean, info.std)
    sets: dict[str, MultiLabelSet | None] = dict.fromkeys(("train", "val", "test"))
    for name, raw in sel.splits.items():
        arrays = []
        for sid in raw.ids:
            try:
                arrays.append(torch.from_numpy(np.ascontiguousarray(src.source.load(sid, size))))
            except (OSError, ValueError, SyntaxError) as err:
                raise DataError(f"{src.kind}: image {src.source.describe(sid)} cannot be decoded ({err})") from None
        images = torch.stack(arrays) if arrays else torch.zeros(0, 3, size, size, dtype=torch.uint8)
        augment = make_augment(cfg.augment, size) if name == "train" else None
        sets[name] = MultiLabelSet(list(raw.ids), [list(t) for t in raw.targets or []], images,
                                   len(src.class_names), normalize, augment)
    train = sets["train"]
    assert train is not None  # every layout has one (the reader refuses otherwise)
    return MultiLabelData(train, sets["val"], sets["test"], list(src.class_names), {
        "spec": cfg.data, "kind": src.kind, "root": src.root, "img_size": size, "mean": list(info.mean),
        "std": list(info.std), "max_per_split": cfg.max_per_split, "trainval": bool(cfg.trainval),
        "augment": cfg.augment, "notes": sel.notes, "min_fraction": MIN_FRACTION})


# ---------------------------------------------------------------------------------------- task

class SigmoidGraph(nn.Module):
    """The exported graph: the tuned model's logits through a sigmoid (per-label probabilities)."""

    def __init__(self, tuned: nn.Module) -> None:
        super().__init__()
        self.tuned = tuned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.tuned(x))


@register_task
class MultiLabelTask(ClassifyTask):
    """several labels per image: sigmoid head, BCE, mAP and per-label F1 (plugin examples/multilabel.py)."""

    name = "multilabel"
    primary = "map"
    higher_is_better = True
    metric_keys = ("val_map", "test_map", "test_macro_f1")
    report_columns = (("test_map", "test mAP"), ("test_macro_f1", "test macro-F1"), ("val_map", "val mAP"))
    metric_format = ".4f"
    files = ("tuned.safetensors", "splits.json")

    data: MultiLabelData  # type: ignore[assignment]

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        """Sampling by class (shots, imbalance, VTAB's subset) and prototype heads need one class per image."""
        for key in ("shots", "imbalance", "subset"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"{key} needs one class per image; task {cls.name!r} has several")
        if cfg.head_init == "prototypes":
            raise ConfigError(f"head_init=prototypes needs one class per image; task {cls.name!r} has several")

    def count_train_classes(self) -> None:
        return None  # an image holds several labels: no per-class image count

    def load_data(self, cfg: TrainConfig, model: nn.Module) -> MultiLabelData:  # type: ignore[override]
        return load_multilabel_data(cfg, model)

    # -- training -----------------------------------------------------------------------------
    criterion_name = "binary cross-entropy"

    def criterion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """BCE on multi-hot targets (also what SPT's sensitivity pass measures for this kind)."""
        return nn.functional.binary_cross_entropy_with_logits(logits, y.float())

    def loss(self, batch: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        x, y = batch[0].to(self.rt.device), batch[1].to(self.rt.device).float()
        with self.amp():
            logits = self._forward()(x)
        if logits.shape != y.shape:
            raise ValueError(f"multilabel: logits {tuple(logits.shape)} do not match targets {tuple(y.shape)}")
        loss = nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        return loss, len(y), {"label_hits": float(((logits >= 0) == (y > 0.5)).sum().item())}

    def train_fields(self, stats: dict[str, float], seen: int) -> dict[str, Any]:
        return {"train_label_accuracy": stats.get("label_hits", 0.0) / max(seen * self.data.num_classes, 1)}

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        """Each rank scores its shard; the logits are gathered (AP needs every score of a label)."""
        self.tuned.eval()
        if self.use_cache:
            dataset, forward = self._features(split), self.head
        else:
            dataset, forward = self._split(split), self.tuned
        k = self.data.num_classes
        logits, targets = [torch.zeros(0, k)], [torch.zeros(0, k)]
        for x, y in self.rt.eval_loader(dataset, self.cfg.batch_size):
            with self.amp():
                out = forward(x.to(self.rt.device))
            logits.append(out.float().cpu())
            targets.append(y.float().cpu())
        parts = self.rt.gather((torch.cat(logits), torch.cat(targets)))
        return multilabel_metrics(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def metric_fields(self, prefix: str, result: dict[str, Any], final: bool) -> dict[str, Any]:
        """mAP, macro-F1 and loss; in metrics.json also per-label AP and F1 (by class name) and how
        many labels had no positive in the split."""
        fields = {f"{prefix}_map": result["map"], f"{prefix}_macro_f1": result["macro_f1"],
                  f"{prefix}_loss": result["loss"]}
        if final:
            names = self.data.class_names
            fields[f"{prefix}_ap_per_label"] = dict(zip(names, result["ap"]))
            fields[f"{prefix}_f1_per_label"] = dict(zip(names, result["f1"]))
            fields[f"{prefix}_labels_without_positives"] = result["labels_without_positives"]
        return fields

    @classmethod
    def eval_lines(cls, res: dict[str, Any], split: str) -> list[str]:
        skipped = res[f"{split}_labels_without_positives"]
        n = res[f"num_{split}"]
        first = f"{split}_map  {res[f'{split}_map']:.4f}  (n={n}, {skipped} labels without positives skipped)"
        return [first, f"{split}_macro_f1  {res[f'{split}_macro_f1']:.4f}  (threshold {THRESHOLD})"]

    # -- outputs ------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        out = super().describe()
        for key in ("imbalance", "train_class_counts", "group_thresholds"):
            out.pop(key, None)
        out["train_label_counts"] = dict(zip(self.data.class_names, self.data.train.targets.sum(0).long().tolist()))
        out["threshold"] = THRESHOLD
        return out

    def output_files(self, extra: dict[str, Any]) -> list[tuple[str, Callable[[Path], None]]]:
        meta = {**extra, "class_names": list(self.data.class_names), "threshold": THRESHOLD}
        manifest = json_text(self.data.manifest())
        return [("tuned.safetensors", lambda tmp: self.tuned.write_tuned(tmp, extra=meta)),
                ("splits.json", lambda tmp: tmp.write_text(manifest))]

    # -- export and serving -------------------------------------------------------------------
    @classmethod
    def export_graph(cls, run: Any, size: int) -> tuple[nn.Module, tuple[str, ...], dict[str, Any]]:
        k = int(run.meta["num_classes"])
        return SigmoidGraph(run.tuned), ("probabilities",), {
            "probabilities": f"(batch, {k}) per-label probabilities (sigmoid); a label is present at >= {THRESHOLD}"}

    @classmethod
    def serve_result(cls, output: Any, context: Any, loaded: Any, *, top: int,
                     score_threshold: float | None) -> dict[str, Any]:
        """Every label's probability and the labels at or above the threshold (``score_threshold``,
        else 0.5), most probable first."""
        probs = torch.sigmoid(output.float().reshape(-1)).tolist()
        threshold = THRESHOLD if score_threshold is None else float(score_threshold)
        present = sorted((i for i, p in enumerate(probs) if p >= threshold), key=lambda i: -probs[i])
        return {"threshold": threshold,
                "labels": [{"label": loaded.classes[i], "index": i, "prob": probs[i]} for i in present],
                "probabilities": dict(zip(loaded.classes, probs))}
