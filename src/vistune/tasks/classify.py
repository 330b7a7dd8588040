"""Image classification: a linear head on the tuned backbone's pre-logit features, cross-entropy.

When nothing before the head trains (linear probing, or PVP modules loaded with
``freeze_modules``) and nothing there draws random numbers, the backbone is a fixed function of
the image: its features are computed once per split (sharded over ranks, then gathered) and the
epochs only run the head. That is the engine's feature cache; it is decided by the tuned model's
structure (:meth:`TunedModel.features_are_static`), not by the method's name.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from vistune.backbones import backbone_for_file, backbone_info, classifier
from vistune.config import ConfigError, TrainConfig
from vistune.data import DataSplits, load_data
from vistune.data.errors import DataError
from vistune.data.loader import class_counts
from vistune.engine.autocompile import AutoCompile
from vistune.errors import TunedFileError
from vistune.io import json_text
from vistune.precision import cpu_capability
from vistune.serve.multitask import class_names
from vistune.serve.predict import classify_input, top_k
from vistune.tasks.base import (
    Batches,
    Runtime,
    SavedRun,
    ServedHead,
    Task,
    TaskProbe,
    saved_config,
    seed_everything,
)
from vistune.tuning import (
    TunedModel,
    load_tensors,
    load_tuned,
    read_tuned_file,
    read_tuned_meta,
)

SENSITIVITY_BATCH = 32  # SPT's reference: the first 16 unshuffled batches of 32 training images
#: Logit scale of the prototype head for a feature of average norm (cosine classifiers use 10-30).
PROTOTYPE_SCALE = 10.0


def load_classification_data(cfg: TrainConfig, model: nn.Module, spec: str | None = None, *,
                             shots: int | None | bool = True) -> DataSplits:
    """The data named by ``spec`` (default ``cfg.data``), normalised as ``model``'s weights expect."""
    info = backbone_info(model)
    return load_data(
        spec or cfg.data, img_size=info.img_size, mean=info.mean, std=info.std,
        shots=cfg.shots if shots is True else (shots or None), seed=cfg.seed, augment=cfg.augment,
        trainval=cfg.trainval, max_per_split=cfg.max_per_split, subset=cfg.subset_sizes(), data_root=cfg.data_root,
        image_column=cfg.image_column, label_column=cfg.label_column, imbalance=cfg.imbalance,
    )


class ClassifyTask(Task):
    name = "classify"
    primary = "top1"
    metric_keys = ("val_top1", "test_top1", "test_balanced_top1")
    report_columns = (("test_top1", "test top-1"), ("val_top1", "val top-1"))
    metric_format = ".2f"
    files = ("tuned.safetensors", "splits.json")

    data: DataSplits
    use_cache: bool = False
    #: training images per class of the run (group metrics); None when unknown (``vistune eval`` of
    #: a file that does not record them)
    train_counts: list[int] | None = None
    #: the epoch this process started training at (0, or later when resumed)
    first_epoch: int | None = None

    def setup(self, cfg: TrainConfig, rt: Runtime, out: Path | None, *, data: DataSplits | None = None,
              backbone: nn.Module | None = None, tuned: TunedModel | None = None) -> None:
        """Backbone -> data -> method -> fresh head; ``tuned`` (already loaded) skips the attach."""
        self.cfg, self.rt = cfg, rt
        seed_everything(cfg.seed)
        training = tuned is None
        if training:
            backbone = backbone if backbone is not None else self.build_backbone(cfg)
        model = tuned.model if tuned is not None else backbone
        self.data = data if data is not None else self.load_data(cfg, model)
        # evaluation reloads the data without the run's shots: its train split is not the run's
        self.train_counts = self.count_train_classes() if training else None
        if tuned is None:
            if cfg.init_from:
                check_source_target_disjoint(cfg.init_from, self.data.test)
            probe = TaskProbe(self.sensitivity_losses, self.scores_path(cfg, out), cfg.data, SENSITIVITY_BATCH,
                              self.criterion_name)
            tuned = self.attach_method(cfg, backbone, self.data.num_classes, probe,
                                       reseed=lambda: seed_everything(cfg.seed))
        self.tuned = self.place(tuned)
        self.head = classifier(self.tuned.model)
        self.use_cache = bool(cfg.cache_features and not cfg.augment and self.tuned.features_are_static())
        self._cache: dict[str, TensorDataset] = {}
        if self.use_cache and training:  # evaluation computes the features of its split only
            t0 = time.perf_counter()
            self._features("train")
            if self.data.val is not None:
                self._features("val")
            self.cache_seconds = time.perf_counter() - t0
        if training:
            self.init_head(cfg.head_init)

    @classmethod
    def run_kind(cls, path: Path) -> str | None:
        """Every run has a tuned file: a run no other kind claims is classification-shaped (a tuned
        file with a linear head). Which kind trained it is the task its recorded config names, when
        that is a kind from outside vistune (a subclass of this one, e.g. multi-label): the run is
        then rebuilt by that class, and a process that has not loaded its plugin refuses it in one
        line instead of treating its head as a softmax classifier. Built-in dense kinds have their
        own files and are claimed before this; anything else is classification."""
        from vistune.tasks import REGISTRY

        meta = read_tuned_meta(path / "tuned.safetensors" if path.is_dir() else path) or {}
        extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
        config = extra.get("config") if isinstance(extra.get("config"), dict) else {}
        recorded = config.get("task")
        return recorded if isinstance(recorded, str) and recorded and recorded not in REGISTRY else ClassifyTask.name

    @classmethod
    def run_files(cls, path: Path) -> list[Path] | None:
        return [path / "tuned.safetensors" if path.is_dir() else path]

    @classmethod
    def serve_head(cls, source: Path, tuned_path: Path, meta: dict[str, Any], view: nn.Module,
                   device: torch.device) -> ServedHead:
        num_classes = int(meta["num_classes"])
        if num_classes < 1:
            raise TunedFileError(f"tuned file {tuned_path} has no classification head (num_classes=0) "
                                 "and is not part of a dense run folder")
        return ServedHead(classifier(view), class_names((meta.get("extra") or {}).get("class_names"), num_classes))

    @classmethod
    def load_model(cls, path: Path, weights: str | None, load_device: torch.device | str = "cpu") -> SavedRun:
        tuned_path = path / "tuned.safetensors" if path.is_dir() else path
        meta, _ = read_tuned_file(tuned_path)
        # the recorded weights are a label: a run on a local weights file needs it given again
        tuned = load_tuned(tuned_path, backbone_for_file(meta["backbone"], tuned_path, weights))
        return SavedRun(tuned_path, meta, tuned, None)

    @classmethod
    def open_saved(cls, path: Path, data_spec: str | None, weights: str | None, load_device: torch.device | None,
                   **changes: Any) -> SavedRun:
        run = cls.load_model(path, weights)
        tuned_path, meta, tuned = run.tuned_path, run.meta, run.tuned
        recorded = run.recorded
        spec = data_spec or recorded.get("data")
        if not spec:
            raise ConfigError(f"{tuned_path}: no --data given and the file does not record its data spec")
        cfg = saved_config(recorded, data=spec, shots=None, imbalance=None, augment=None, progress=False,
                           task=cls.name, **changes)
        return SavedRun(tuned_path, meta, tuned, cfg)

    def setup_saved(self, run: SavedRun, rt: Runtime) -> None:
        self.setup(run.cfg, rt, None, tuned=run.tuned)
        self.train_counts = run.extra.get("train_class_counts")  # the run's, for its group metrics
        if self.data.num_classes != run.tuned.num_classes:
            raise ConfigError(f"data {run.cfg.data!r} has {self.data.num_classes} classes, the tuned file "
                              f"{run.tuned.num_classes}")

    @classmethod
    def eval_lines(cls, res: dict[str, Any], split: str) -> list[str]:
        return [f"{split}_{cls.primary}  {res[f'{split}_{cls.primary}']:.2f}  (n={res[f'num_{split}']})"]

    @classmethod
    def export_graph(cls, run: Any, size: int) -> tuple[nn.Module, tuple[str, ...], dict[str, Any]]:
        k = int(run.meta["num_classes"])
        return run.tuned, ("logits",), {"logits": f"(batch, {k}) class logits"}

    @classmethod
    def serve_input(cls, data: bytes, size: int, mean: tuple, std: tuple, max_pixels: int,
                    max_bytes: int | None) -> tuple[torch.Tensor, Any]:
        return classify_input(data, size, mean, std, max_pixels, max_bytes), None

    @classmethod
    def serve_outputs(cls, loaded: Any, pre: torch.Tensor | None, maps: dict[str, torch.Tensor],
                      rows: torch.Tensor, image_hw: tuple[int, int]) -> list[Any]:
        out = loaded.head(pre.index_select(0, rows)).float()
        return [out[j:j + 1] for j in range(len(rows))]

    @classmethod
    def serve_result(cls, output: Any, context: Any, loaded: Any, *, top: int,
                     score_threshold: float | None) -> dict[str, Any]:
        return {"top": top_k(output, loaded.classes, top)}

    @classmethod
    def predict(cls, path: Path, image: Path, out: Path | None, *, top: int = 5,
                score_threshold: float | None = None, device: str = "cpu") -> dict[str, Any]:
        """The run on one image, preprocessed as the server (and eval) does (:meth:`serve_input`),
        answered as the server answers (:meth:`serve_result`: top-k here; a subclass's own form,
        e.g. multi-label's labels over a threshold); ``out`` must be a ``.json`` file."""
        from vistune.engine.distributed import resolve_device
        from vistune.io import write_text_atomic
        from vistune.serve.multitask import class_names
        from vistune.serve.predict import MAX_PIXELS

        dev = resolve_device(device)  # a bad --device is one line before any file is read
        if out is not None and out.suffix.lower() != ".json":
            raise ConfigError(f"vistune predict: a {cls.name} run answers in JSON: --out {out} must end in .json")
        try:
            data = image.read_bytes()
        except OSError as err:
            raise DataError(f"image {image} cannot be read ({err.strerror or err})") from None
        run = cls.load_model(path, None)
        tuned = run.tuned.to(dev).eval()
        info = backbone_info(tuned.model)
        x, context = cls.serve_input(data, info.img_size, tuple(info.mean), tuple(info.std), MAX_PIXELS, None)
        with torch.no_grad():
            logits = tuned(x[None].to(dev)).float().cpu()
        served = ServedHead(classifier(tuned.model), class_names(run.class_names, int(run.meta["num_classes"])))
        res: dict[str, Any] = {"task": cls.name, "image": str(image),
                               **cls.serve_result(logits, context, served, top=top, score_threshold=score_threshold)}
        if out is not None:
            write_text_atomic(out, json_text(res))
            res["out"] = str(out)
        return res

    def load_data(self, cfg: TrainConfig, model: nn.Module) -> DataSplits:
        return load_classification_data(cfg, model)

    def count_train_classes(self) -> list[int] | None:
        """Training images per class (group metrics, metrics.json); None for a kind whose images
        carry several classes."""
        return class_counts(self.data.train.targets, self.data.num_classes)

    @torch.no_grad()
    def init_head(self, mode: str) -> None:
        """``random``: timm's init (as attached). ``zeros``. ``prototypes``: each class's weight is the
        normalised mean of its normalised training features (with the method's modules as they start,
        PVP's pre-trained ones included), scaled so a typical feature gives logits of ±PROTOTYPE_SCALE;
        bias zero — the cosine-classifier start of few-shot learning."""
        if mode == "random":
            return
        if not isinstance(self.head, nn.Linear):
            raise ConfigError(f"head_init={mode} needs a linear head, this model's is {type(self.head).__name__}")
        if self.head.bias is not None:
            self.head.bias.zero_()
        if mode == "zeros":
            self.head.weight.zero_()
            return
        feats, labels = self._features("train", store=self.use_cache).tensors
        normed = nn.functional.normalize(feats.float(), dim=1)
        protos = torch.zeros(self.data.num_classes, normed.shape[1]).index_add_(0, labels.long(), normed)
        protos = nn.functional.normalize(protos, dim=1)
        radius = feats.float().norm(dim=1).mean().clamp_min(1e-6)
        self.head.weight.copy_((protos * (PROTOTYPE_SCALE / radius)).to(self.head.weight))

    def sensitivity_losses(self, model: nn.Module, num_batches: int,
                            batch_size: int = SENSITIVITY_BATCH) -> Iterator[torch.Tensor]:
        """Cross-entropy through a fresh linear head (as the reference re-initialises the head)."""
        head = nn.Linear(int(model.num_features), self.data.num_classes).to(self.rt.device)
        loader = torch.utils.data.DataLoader(self.data.train, batch_size=batch_size, shuffle=False)
        for i, (x, y) in enumerate(loader):
            if i >= num_batches:
                break
            x, y = x.to(self.rt.device), y.to(self.rt.device)
            feats = model.forward_head(model.forward_features(x), pre_logits=True)
            yield self.criterion(head(feats), y)

    #: how :meth:`criterion` is named where SPT records what its sensitivity measured
    criterion_name = "cross-entropy"

    def criterion(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This kind's loss on a batch's logits and targets (a kind with other targets overrides it,
        and SPT's sensitivity pass then measures gradients of that loss)."""
        return nn.functional.cross_entropy(logits, y)

    # -- feature cache -----------------------------------------------------------------------
    def _split(self, split: str) -> Any:
        return {"train": self.data.train, "val": self.data.val, "test": self.data.test}[split]

    @torch.no_grad()
    def _features(self, split: str, store: bool = True) -> TensorDataset:
        """Pre-logit features of a whole split: each rank computes its shard, all ranks get all."""
        if split not in self._cache:
            self.tuned.eval()
            feats, labels = [], []
            for x, y in self.rt.eval_loader(self._split(split), self.cfg.batch_size):
                with self.amp():
                    f = self.tuned.forward_features(x.to(self.rt.device))
                feats.append(f.float().cpu())
                labels.append(y)
            part = (torch.cat(feats) if feats else torch.zeros(0, self.head.in_features),
                    torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
            parts = self.rt.gather(part)
            features = TensorDataset(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            if not store:
                return features
            self._cache[split] = features
        return self._cache[split]

    # -- training ----------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        return [self.tuned]

    def set_mode(self, training: bool) -> None:
        self.tuned.train(training)
        if self.use_cache:
            self.tuned.eval()  # the backbone isn't run; keep everything deterministic

    def parameters(self) -> list[tuple[nn.Parameter, bool]]:
        head = {id(p) for p in self.tuned.head_parameters()}
        return [(p, id(p) in head) for p in self.tuned.parameters() if p.requires_grad]

    def _train_set(self) -> Any:
        return self._features("train") if self.use_cache else self.data.train

    def num_train_batches(self) -> int:
        return len(self._train_loader(0))  # a streamed (wds:) split's step count is its loader's

    def train_batches(self, epoch: int) -> Batches:
        if self.first_epoch is None:  # a resumed run starts later: fewer steps left to repay a compile
            self.first_epoch = epoch
        return self._train_loader(epoch)

    def _train_loader(self, epoch: int) -> Batches:
        return self.rt.train_loader(self._train_set(), self.cfg.batch_size, seed=self.cfg.seed * 100_003 + epoch,
                                    num_workers=0 if self.use_cache else self.cfg.num_workers)

    def _forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The training forward. ``compile`` wraps the tuned model (not the cached-feature head,
        which is one matmul): parameters, hooks and saved files stay the eager model's own, so
        checkpoints, tuned files and eval are unchanged; only the training step gets faster.
        ``compile: auto`` decides from measured step times (:mod:`vistune.engine.autocompile`)."""
        if self.use_cache or self.cfg.compile is False:
            return self.head if self.use_cache else self.tuned
        if self.cfg.compile == "auto":
            return self._auto_compile.forward()
        return self._compiled

    @functools.cached_property
    def _compiled(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return torch.compile(self.tuned)

    @functools.cached_property
    def _auto_compile(self) -> AutoCompile:
        cfg = self.cfg
        key = "|".join(str(v) for v in (
            torch.__version__, self.rt.device.type, cpu_capability(), torch.get_num_threads(), cfg.backbone,
            backbone_info(self.tuned.model).img_size, cfg.method, json.dumps(cfg.options, sort_keys=True, default=str),
            cfg.batch_size, self.precision.name))
        epochs_left = cfg.epochs - (self.first_epoch or 0)
        return AutoCompile(self.tuned, self.num_train_batches() * epochs_left, key, gather=self.rt.gather)

    def _compile_report(self) -> dict[str, Any] | str:
        """How the training forward ran, for metrics.json (``auto``: the decision and its numbers)."""
        if self.cfg.compile == "auto" and not self.use_cache:
            if "_auto_compile" in self.__dict__:
                return self._auto_compile.summary()
            return {"mode": "auto", "decision": "eager", "why": "no training step ran"}
        return "on" if self.cfg.compile is True and not self.use_cache else "off"

    def loss(self, batch: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        x, y = batch[0].to(self.rt.device), batch[1].to(self.rt.device)
        with self.amp():
            logits = self._forward()(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        return loss, len(y), {"correct": float((logits.argmax(1) == y).sum().item())}

    def train_fields(self, stats: dict[str, float], seen: int) -> dict[str, Any]:
        return {"train_top1": 100.0 * stats.get("correct", 0.0) / max(seen, 1)}

    # -- evaluation --------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        return self._split(split) is not None

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, Any]:
        """top-1, per-class top-1 and loss; each rank scores its shard, sums are reduced."""
        self.tuned.eval()
        k = self.data.num_classes
        if self.use_cache:
            dataset, forward = self._features(split), self.head
        else:
            dataset, forward = self._split(split), self.tuned
        correct = torch.zeros(k, dtype=torch.long)
        total = torch.zeros(k, dtype=torch.long)
        loss_sum = 0.0
        for x, y in self.rt.eval_loader(dataset, self.cfg.batch_size):
            x, y = x.to(self.rt.device), y.to(self.rt.device)
            with self.amp():
                logits = forward(x)
            logits = logits.float()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            hit = (logits.argmax(1) == y).cpu()
            y_cpu = y.cpu()
            total += torch.bincount(y_cpu, minlength=k)
            correct += torch.bincount(y_cpu[hit], minlength=k)
        return classification_metrics(self.rt.gather((correct, total, loss_sum)))

    def metric_fields(self, prefix: str, result: dict[str, Any], final: bool) -> dict[str, Any]:
        """top-1, balanced top-1 and loss; in metrics.json also per-class top-1 and, with the
        training counts known, many/medium/few-shot group top-1 (all in percent)."""
        fields = {f"{prefix}_top1": result["top1"], f"{prefix}_balanced_top1": result["balanced_top1"],
                  f"{prefix}_loss": result["loss"]}
        if final:
            fields[f"{prefix}_per_class_top1"] = result["per_class_top1"]
            if self.train_counts is not None:
                groups = group_top1(result["per_class_top1"], self.train_counts, self.cfg.group_thresholds)
                fields.update({f"{prefix}_{g}_top1": v for g, v in groups.items()})
        return fields

    # -- state and outputs --------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tuned.tuned_state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], what: str) -> None:
        load_tensors(self.tuned, state, what)

    def describe(self) -> dict[str, Any]:
        report = self.tuned.parameter_report()
        d = self.data
        return {
            "backbone": report["backbone"], "method": report["method"], "options": report["options"],
            "img_size": backbone_info(self.tuned.model).img_size,
            "tuned_params": report["tuned_params"], "head_params": report["head_params"],
            "trainable_params": report["trainable_params"], "backbone_params": report["backbone_params"],
            "tuned_percent": report["tuned_percent"],
            "num_train": len(d.train), "num_val": len(d.val) if d.val is not None else 0,
            "num_test": len(d.test) if d.test is not None else 0, "num_classes": d.num_classes,
            "class_names": list(d.class_names), "skipped_images": len(d.skipped),
            "imbalance": self.cfg.imbalance, "train_class_counts": self.train_counts,
            "group_thresholds": list(self.cfg.group_thresholds), "compile": self._compile_report(),
        }  # fmt: skip

    def output_files(self, extra: dict[str, Any]) -> list[tuple[str, Callable[[Path], None]]]:
        meta = {**extra, "class_names": list(self.data.class_names), "train_class_counts": self.train_counts}
        manifest = json_text(self.data.manifest())
        return [("tuned.safetensors", lambda tmp: self.tuned.write_tuned(tmp, extra=meta)),
                ("splits.json", lambda tmp: tmp.write_text(manifest))]


def classification_metrics(parts: list[tuple[torch.Tensor, torch.Tensor, float]]) -> dict[str, Any]:
    """Reduce per-rank (correct per class, total per class, loss sum) into the split's metrics.

    Counts are summed over ranks *before* any ratio is taken: a rank's shard of a split holds
    some classes more than others, so averaging per-rank accuracies would weight them wrongly.
    """
    correct = sum(p[0] for p in parts)
    total = sum(p[1] for p in parts)
    loss_sum = sum(p[2] for p in parts)
    n = int(total.sum())
    per_class = [100.0 * c / t if t > 0 else None for c, t in zip(correct.tolist(), total.tolist())]
    return {"top1": 100.0 * int(correct.sum()) / max(n, 1), "loss": loss_sum / max(n, 1),
            "per_class_top1": per_class, "balanced_top1": balanced_top1(per_class), "num": n}


def balanced_top1(per_class: Sequence[float | None]) -> float | None:
    """Mean per-class recall in percent (classes absent from the split, ``None``, are left out).

    Why: on a long-tailed or skewed split plain top-1 is mostly the head classes' accuracy; the
    mean over classes weighs every class alike. None when no class has a sample.
    """
    scored = [v for v in per_class if v is not None]
    return sum(scored) / len(scored) if scored else None


def group_top1(per_class: Sequence[float | None], train_counts: Sequence[int],
               thresholds: Sequence[int] = (100, 20)) -> dict[str, float | None]:
    """Many/medium/few-shot top-1 (percent): the mean per-class top-1 of each group of classes.

    Groups by *training* images per class as Liu et al. 2019 (OLTR) do: many-shot has more than
    ``thresholds[0]``, few-shot fewer than ``thresholds[1]``, medium-shot the rest (both bounds
    included). A group with no class (or none present in the split) is None.
    """
    many, few = thresholds
    members: dict[str, list[float | None]] = {"many": [], "medium": [], "few": []}
    for acc, n in zip(per_class, train_counts):
        members["many" if n > many else "few" if n < few else "medium"].append(acc)
    return {g: balanced_top1(v) for g, v in members.items()}  # each group's mean per-class top-1


def image_hashes(dataset: Any, limit: int | None = None) -> list[str]:
    """Short content hashes of a split's decoded images (same backbone => same resolution), used
    to prove that no PVP source image is a target test image."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [hashlib.sha1(dataset.uint8(i).contiguous().numpy().tobytes()).hexdigest()[:16] for i in range(n)]


def check_source_target_disjoint(module_file: str | Path, target_test: Any) -> None:
    """Refuse to use modules pre-trained on images that are in the target's test split."""
    meta, _ = read_tuned_file(module_file)
    recorded = ((meta.get("extra") or {}).get("pretrain") or {}).get("source_image_hashes")
    if not recorded or target_test is None:
        return
    overlap = set(recorded) & set(image_hashes(target_test))
    if overlap:
        raise TunedFileError(
            f"--init-from {module_file}: {len(overlap)} of the target's test images were in the source "
            "data the modules were pre-trained on; pre-train on data without the target's test split"
        )

