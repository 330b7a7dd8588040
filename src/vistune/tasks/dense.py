"""Dense prediction: semantic segmentation and FCOS detection heads on a tuned backbone.

Every method works here: the method's modules and a light dense head train, the backbone stays
frozen. Test numbers are computed in the original images' coordinates (masks at their own
resolution, boxes mapped back through the letterbox) with reference metric code
(:mod:`vistune.dense.metrics`); partial results of each rank's shard are reduced (confusion
matrices summed, detections pooled) so every image counts exactly once.

When the backbone is a fixed function of the image (:meth:`TunedModel.features_are_static`:
linear probing, frozen PVP modules), its multi-level features are computed once per image (and
once more flipped when ``augment=flip``: a frozen backbone maps a flipped image to exactly the
features it would compute each epoch) and the epochs only run the head.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vistune.backbones import backbone_info
from vistune.config import ConfigError, TrainConfig
from vistune.dense.datasets import (
    DenseDataset,
    DenseSplits,
    collate,
    load_dense_data,
    segmentation_to_original,
)
from vistune.dense.features import FeatureExtractor
from vistune.dense.heads import DenseHead, HeadConfig
from vistune.dense.metrics import (
    DetectionMetric,
    SegmentationMetric,
    segmentation_scores,
)
from vistune.dense.model import (
    DenseModel,
    build_dense_model,
    dense_files,
    head_config,
    is_dense_run,
    load_dense,
    read_head_file,
    resolve_run,
)
from vistune.errors import TunedFileError
from vistune.export.onnx_format import DenseGraph
from vistune.io import json_text
from vistune.serve.multitask import class_names, tensor_bytes
from vistune.serve.predict import decode, dense_input, detect_result, segment_result
from vistune.tasks.base import (
    Runtime,
    SavedRun,
    ServedHead,
    Task,
    TaskProbe,
    check_no_dense_fewshot,
    saved_config,
    seed_everything,
)
from vistune.tuning import TunedModel, load_tensors, read_tuned_file


def load_dense_for(cfg: TrainConfig, task: str, model: nn.Module, *, training: bool = True) -> DenseSplits:
    """The run's dense data, letterboxed and normalised as ``model``'s weights expect.

    Options go to the data package as for classification (``trainval`` and ``max_per_split``
    there; ``shots``/``subset``/``imbalance`` refused there with one line). Re-opening a trained
    run (``training=False``) passes no ``subset``: runs written before dense data refused it
    recorded it without using it, and must reload the splits they trained on.
    """
    info = backbone_info(model)
    return load_dense_data(cfg.data, task, img_size=info.img_size, mean=info.mean, std=info.std,
                           augment=cfg.augment, max_per_split=cfg.max_per_split, trainval=cfg.trainval,
                           subset=cfg.subset_sizes() if training else None)


class FeatureCache:
    """Frozen-backbone features per (sample, flipped); each rank computes a shard, all get all."""

    def __init__(self, task: DenseTask, dataset: DenseDataset, flips: tuple[bool, ...]) -> None:
        self.store: dict[bool, list[torch.Tensor]] = {}
        model, rt, bs = task.model, task.rt, task.cfg.batch_size
        model.eval()
        shard = list(range(rt.rank * len(dataset) // rt.world, (rt.rank + 1) * len(dataset) // rt.world))
        with torch.no_grad():
            for flipped in flips:
                per_level: list[list[torch.Tensor]] = []
                for start in range(0, len(shard), bs):
                    x = torch.stack([dataset.item(i, flipped)[0] for i in shard[start: start + bs]])
                    with task.amp():
                        feats = model.features(x.to(rt.device))
                    per_level.append([f.float().cpu() for f in feats])
                parts = rt.gather(per_level)
                chunks = [b for part in parts for b in part]
                self.store[flipped] = [torch.cat([b[lv] for b in chunks]) for lv in range(len(chunks[0]))]

    def gather(self, targets: list[dict[str, Any]], device: torch.device) -> list[torch.Tensor]:
        levels = len(next(iter(self.store.values())))
        return [torch.stack([self.store[t["flipped"]][lv][t["index"]] for t in targets]).to(device)
                for lv in range(levels)]


class DenseTask(Task):
    """``segment`` (primary ``miou``) or ``detect`` (primary ``map50``)."""

    files = ("tuned.safetensors", "dense_head.safetensors", "splits.json")

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        if cfg.imbalance is not None:
            raise ConfigError(f"imbalance is for classification runs only, not task {cls.name!r}")
        if cfg.compile is True:  # auto simply stays eager here
            raise ConfigError(f"compile is for classification runs only (task {cls.name!r} trains eagerly)")
    data: DenseSplits
    model: DenseModel
    use_cache: bool = False

    def setup(self, cfg: TrainConfig, rt: Runtime, out: Path | None, *, data: DenseSplits | None = None,
              model: DenseModel | None = None) -> None:
        """Backbone -> data (letterboxed) -> method -> fresh dense head; ``model`` skips the building."""
        check_no_dense_fewshot(cfg)
        self.cfg, self.rt = cfg, rt
        seed_everything(cfg.seed)
        model_built = model is None
        if model is None:
            backbone = self.build_backbone(cfg)
            self.data = data if data is not None else load_dense_for(cfg, self.name, backbone)
            probe = TaskProbe(self.sensitivity_losses, self.scores_path(cfg, out), cfg.data, cfg.batch_size,
                              f"dense-{self.name}")
            tuned = self.attach_method(cfg, backbone, None, probe, reseed=lambda: seed_everything(cfg.seed))
            model = build_dense_model(tuned, self.name, self.data.num_classes, cfg.head_options)
        else:
            self.data = data if data is not None else load_dense_for(cfg, self.name, model.tuned.model, training=False)
        self.model = model.to(rt.device)
        self.tuned: TunedModel = self.place(model.tuned)
        # evaluation of a loaded model reads the test split without a cache, as training's final test does
        self.use_cache = bool(cfg.cache_features and self.tuned.features_are_static() and model_built)
        self.train_cache = self.val_cache = None
        if self.use_cache:
            t0 = time.perf_counter()
            flips = (False, True) if self.data.train.flip else (False,)
            self.train_cache = FeatureCache(self, self.data.train, flips)
            if self.data.val is not None:
                self.val_cache = FeatureCache(self, self.data.val, (False,))
            self.cache_seconds = time.perf_counter() - t0

    input_style = "letterbox"
    uses_pre_logits = False

    @classmethod
    def run_kind(cls, path: Path) -> str | None:
        if not is_dense_run(path):
            return None
        return str(read_head_file(resolve_run(path)[1])[0].get("task") or "")

    own_head_module = True

    @classmethod
    def preprocess_doc(cls, size: int) -> str:
        return (f"RGB, letterboxed (aspect kept, padded) onto a {size}x{size} canvas, /255, (x - mean) / std, "
                "NCHW float32")

    @classmethod
    def num_classes_of(cls, run: Any) -> int:
        return int(run.dense.head.cfg.num_classes)

    @classmethod
    def load_model(cls, path: Path, weights: str | None, load_device: torch.device | str = "cpu") -> SavedRun:
        model, head_meta = load_dense(path, load_device, weights)
        tuned_path = resolve_run(path)[0]
        return SavedRun(tuned_path, read_tuned_file(tuned_path)[0], model.tuned, None, info=head_meta, model=model)

    @classmethod
    def open_saved(cls, path: Path, data_spec: str | None, weights: str | None, load_device: torch.device | None,
                   **changes: Any) -> SavedRun:
        run = cls.load_model(path, weights, load_device or "cpu")
        recorded = run.recorded
        run.cfg = saved_config(recorded, data=data_spec or recorded.get("data"), shots=None, augment=None,
                               progress=False, **changes)
        return run

    def setup_saved(self, run: SavedRun, rt: Runtime) -> None:
        self.setup(run.cfg, rt, None, model=run.model)

    @classmethod
    def run_files(cls, path: Path) -> list[Path] | None:
        return list(resolve_run(path)) if is_dense_run(path) else None

    @classmethod
    def predict(cls, path: Path, image: Path, out: Path | None, *, top: int = 5,
                score_threshold: float | None = None, device: str = "cpu") -> dict[str, Any]:
        """The drawn prediction (mask overlay or boxes) as ``vistune predict`` has always made it."""
        from vistune.dense.predict import predict

        if out is None:
            raise ConfigError(f"vistune predict: a {cls.name} run draws its prediction: give --out FILE.png")
        return predict(path, image, out, score_threshold=0.3 if score_threshold is None else score_threshold,
                       device=device)

    @classmethod
    def tuned_file(cls, path: Path) -> Path:
        return resolve_run(path)[0]

    @classmethod
    def serve_head(cls, source: Path, tuned_path: Path, meta: dict[str, Any], view: nn.Module,
                   device: torch.device) -> ServedHead:
        head_path = resolve_run(source)[1]
        head_meta, head_tensors = read_head_file(head_path)
        if (meta["backbone"]["fingerprint"] != head_meta.get("backbone_fingerprint")
                or meta["method"] != head_meta.get("method")):
            raise TunedFileError(f"{head_path} was trained with another backbone or method than {tuned_path}")
        cfg = HeadConfig.from_dict(head_meta["head"])
        head = DenseHead(cfg)
        try:
            head.load_state_dict(head_tensors, strict=True)
        except RuntimeError as err:
            raise TunedFileError(f"dense head file of {source} does not fit its recorded config: {err}") from None
        head.to(device).eval()
        return ServedHead(head, class_names(head_meta.get("class_names"), cfg.num_classes), cfg.level_objs(),
                          head_params=sum(p.numel() for p in head.parameters()),
                          file_bytes=tensor_bytes(head_tensors))

    @classmethod
    def serve_input(cls, data: bytes, size: int, mean: tuple, std: tuple, max_pixels: int,
                    max_bytes: int | None) -> tuple[torch.Tensor, Any]:
        return dense_input(decode(data, max_pixels, max_bytes), size, mean, std)

    @classmethod
    def serve_outputs(cls, loaded: Any, pre: torch.Tensor | None, maps: dict[str, torch.Tensor],
                      rows: torch.Tensor, image_hw: tuple[int, int]) -> list[Any]:
        out = loaded.head([maps[lv.module].index_select(0, rows) for lv in loaded.levels], image_hw)
        if isinstance(out, torch.Tensor):
            return [out[j:j + 1] for j in range(len(rows))]
        # detection: per-level tensors are batched, anything else (strides, sizes) is shared
        return [{k: v[j:j + 1] if isinstance(v, torch.Tensor) and k in ("cls", "box", "ctr") else v
                 for k, v in out.items()} for j in range(len(rows))]

    def load_data(self, cfg: TrainConfig, model: nn.Module) -> DenseSplits:
        return load_dense_for(cfg, self.name, model)

    def sensitivity_losses(self, backbone: nn.Module, num_batches: int) -> Iterator[torch.Tensor]:
        """The dense loss through a freshly initialised dense head on the backbone's levels
        (the dense analogue of the reference's fresh classification head), on the first
        ``num_batches`` training batches in file order, without flips."""
        head = DenseHead(head_config(backbone, self.name, self.data.num_classes, self.cfg.head_options))
        head.to(self.rt.device)
        extractor = FeatureExtractor(backbone, head.cfg.level_objs())
        plain = copy.copy(self.data.train)
        plain.flip = False
        loader = DataLoader(plain, batch_size=self.cfg.batch_size, shuffle=False, collate_fn=collate)
        for i, (x, targets) in enumerate(loader):
            if i >= num_batches:
                break
            x = x.to(self.rt.device)
            yield head.loss(head(extractor(x), tuple(x.shape[-2:])), targets)

    # -- training ----------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [self.model]

    def set_mode(self, training: bool) -> None:
        self.model.train(training)
        if self.use_cache:
            self.model.tuned.eval()

    def parameters(self) -> list[tuple[nn.Parameter, bool]]:
        return ([(p, False) for p in self.model.method_parameters() if p.requires_grad]
                + [(p, True) for p in self.model.head.parameters() if p.requires_grad])

    def num_train_batches(self) -> int:
        return -(-len(self.data.train) // self.cfg.batch_size)

    def train_batches(self, epoch: int):
        return self.rt.train_loader(self.data.train, self.cfg.batch_size, seed=self.cfg.seed * 100_003 + epoch,
                                    collate=collate, num_workers=0 if self.use_cache else self.cfg.num_workers)

    def loss(self, batch: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        x, targets = batch
        with self.amp():
            feats = (self.train_cache.gather(targets, self.rt.device) if self.use_cache
                     else self.model.features(x.to(self.rt.device)))
            out = self.model.head(feats, tuple(x.shape[-2:]))
        return self.model.head.loss(out, targets), len(targets), {}

    # -- evaluation --------------------------------------------------------------------------
    def _split(self, split: str) -> DenseDataset | None:
        return {"train": self.data.train, "val": self.data.val, "test": self.data.test}[split]

    def has_split(self, split: str) -> bool:
        return self._split(split) is not None

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        """Metrics of ``split`` in original-image coordinates (see the module docstring)."""
        dataset = self._split(split)
        cache = self.val_cache if split == "val" else None
        self.model.eval()
        plain = copy.copy(dataset)
        plain.flip = False
        k = self.model.head.cfg.num_classes
        seg = SegmentationMetric(k, self.model.head.cfg.ignore_index)
        preds: list[dict[str, torch.Tensor]] = []
        gts: list[dict[str, torch.Tensor]] = []
        for x, targets in self.rt.eval_loader(plain, self.cfg.batch_size, collate=collate):
            with self.amp():
                feats = cache.gather(targets, self.rt.device) if cache is not None else self.model.features(x.to(self.rt.device))
                out = self.model.head(feats, tuple(x.shape[-2:]))
            if self.name == "segment":
                for lg, t in zip(out, targets):
                    s = dataset.samples[t["index"]]
                    seg.update(segmentation_to_original(lg, s.lb).cpu(), torch.from_numpy(s.orig_mask))
                continue
            for d, t in zip(self.model.head.task_head.detections(out), targets):
                s = dataset.samples[t["index"]]
                preds.append({"boxes": s.lb.boxes_to_original(d["boxes"].cpu()), "scores": d["scores"].cpu(),
                              "labels": d["labels"].cpu()})
                gts.append({"boxes": torch.from_numpy(s.orig_boxes), "labels": torch.from_numpy(s.labels),
                            "iscrowd": torch.from_numpy(s.difficult.astype("int64"))})
        if self.name == "segment":
            return segmentation_scores(sum(self.rt.gather(seg.confusion())))
        parts = self.rt.gather((preds, gts))
        metric = DetectionMetric(k)
        metric.update([p for part in parts for p in part[0]], [g for part in parts for g in part[1]])
        res = metric.compute()
        return {**res, "map50": res["map_50"]}

    def metric_fields(self, prefix: str, result: dict[str, Any], final: bool) -> dict[str, Any]:
        if self.name == "segment":
            if not final:
                return {f"{prefix}_miou": result["miou"]}
            return {f"{prefix}_miou": result["miou"], f"{prefix}_per_class_iou": result["per_class_iou"],
                    f"{prefix}_pixel_acc": result["pixel_acc"]}
        if not final:
            return {f"{prefix}_map50": result["map_50"]}
        return {f"{prefix}_map50": result["map_50"], f"{prefix}_map": result["map"],
                f"{prefix}_map75": result["map_75"], f"{prefix}_per_class_ap": result["per_class_ap"]}

    # -- state and outputs --------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"tuned.{k}": v for k, v in self.tuned.tuned_state_dict().items()}
        state.update({f"head.{k}": v for k, v in self.model.head.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], what: str) -> None:
        load_tensors(self.tuned, {k[6:]: v for k, v in state.items() if k.startswith("tuned.")}, what)
        self.model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})

    def describe(self) -> dict[str, Any]:
        report = self.tuned.parameter_report()
        head_params = sum(p.numel() for p in self.model.head.parameters())
        d = self.data
        return {
            "backbone": report["backbone"], "method": report["method"], "options": report["options"],
            "img_size": backbone_info(self.tuned.model).img_size, "class_names": list(d.class_names),
            "tuned_params": report["tuned_params"], "head_params": head_params,
            "trainable_params": report["tuned_params"] + head_params, "backbone_params": report["backbone_params"],
            "tuned_percent": report["tuned_percent"],
            "num_train": len(d.train), "num_val": len(d.val) if d.val is not None else 0,
            "num_test": len(d.test) if d.test is not None else 0, "num_classes": d.num_classes,
            "dropped_zero_area_boxes": d.info.get("dropped_zero_area_boxes", 0),
        }  # fmt: skip

    def output_files(self, extra: dict[str, Any]) -> list[tuple[str, Callable[[Path], None]]]:
        meta = {**extra, "class_names": list(self.data.class_names), "data_info": self.data.info}
        manifest = json_text(self.data.manifest())
        return [*dense_files(self.model, meta), ("splits.json", lambda tmp: tmp.write_text(manifest))]


class SegmentTask(DenseTask):
    name = "segment"
    primary = "miou"
    metric_keys = ("test_miou",)
    report_columns = (("test_miou", "test mIoU"), ("val_miou", "val mIoU"))

    @classmethod
    def export_graph(cls, run: Any, size: int) -> tuple[nn.Module, tuple[str, ...], dict[str, Any]]:
        return DenseGraph(run.dense).eval(), ("logits",), {
            "logits": f"(batch, {run.dense.head.cfg.num_classes}, {size}, {size}) per-pixel class logits at the "
            "input resolution; argmax over dim 1 is the mask on the letterboxed canvas",
        }

    @classmethod
    def serve_result(cls, output: Any, context: Any, loaded: Any, *, top: int,
                     score_threshold: float | None) -> dict[str, Any]:
        return segment_result(output, context, loaded.classes)


class DetectTask(DenseTask):
    name = "detect"
    primary = "map50"
    metric_keys = ("test_map50", "test_map")
    report_columns = (("test_map50", "test mAP50"), ("test_map", "test mAP"), ("val_map50", "val mAP50"))

    @classmethod
    def export_graph(cls, run: Any, size: int) -> tuple[nn.Module, tuple[str, ...], dict[str, Any]]:
        """Decoded FCOS candidates (scores, boxes); the sidecar documents the post-processing."""
        cfg = run.dense.head.cfg
        with torch.no_grad():
            raw = run.dense(torch.zeros(1, 3, size, size))
        counts = torch.bincount(raw["level"], minlength=len(cfg.levels)).tolist()
        doc = {
            "scores": f"(batch, L={sum(counts)}, {cfg.num_classes}) sqrt(sigmoid(class) * sigmoid(centre-ness)) "
            "per location and class",
            "boxes": f"(batch, L={sum(counts)}, 4) x1, y1, x2, y2 in canvas pixels, clamped to the canvas",
            "postprocess": {
                "rule": "per image and level: keep (location, class) with score > score_threshold, at most "
                "candidates_per_level by score; then class-wise NMS over all levels at nms_iou; keep the first "
                "max_detections (this is FCOSHead.detections)",
                "score_threshold": cfg.score_threshold,
                "nms_iou": cfg.nms_iou,
                "max_detections": cfg.max_detections,
                "candidates_per_level": 1000,
                "level_sizes": counts,
                "strides": [float(lv["stride"]) for lv in cfg.levels],
            },
        }
        return DenseGraph(run.dense, detections=True).eval(), ("scores", "boxes"), doc

    @classmethod
    def serve_result(cls, output: Any, context: Any, loaded: Any, *, top: int,
                     score_threshold: float | None) -> dict[str, Any]:
        thr = loaded.score_threshold if score_threshold is None else float(score_threshold)
        return detect_result(output, loaded, context, thr)
