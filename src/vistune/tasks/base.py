"""What a task is: everything that differs between training jobs, behind one interface.

The engine's loop (``vistune/engine/loop.py``) trains *any* task the same way: accumulation,
bf16, clipping, warm-up + cosine, selection on val, one test evaluation, checkpoints, resume,
logs, data parallelism. What it does not know is what a batch means. That is a :class:`Task`:

=====================  ===============================================================
``setup``              backbone -> data -> method (its ``prepare`` hook called with this
                       task's loss) -> head/neck; everything on the run's device
``parameters``         the trainable parameters, each marked head or not (head lr)
``train_batches``      one epoch of ``(local batch | None, global batch size)``
``loss``               mean loss over a local batch, its sample count, additive stats
``evaluate``           metrics of a split, sharded over ranks and reduced (primary key)
``state_dict``         the trainable tensors (checkpoints, best-on-val snapshots)
``describe``           numbers for metrics.json (parameter counts, split sizes, classes)
``output_files``       the files written beside metrics.json, as one set
=====================  ===============================================================

Tasks never import the engine: distributed helpers arrive as the ``rt`` (:class:`Runtime`)
object the engine passes to :meth:`Task.setup`, so a task can be run and tested alone.

Tasks: ``classify`` (:mod:`.classify`), ``segment`` / ``detect`` (:mod:`.dense`) and
``multisource`` (PVP stage 1, one head per source, :mod:`.multisource`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from vistune.backbones import seeded_backbone, set_fused_attention
from vistune.config import ConfigError, TrainConfig, config_keys, make_config
from vistune.errors import TunedFileError
from vistune.methods import get_method
from vistune.precision import Precision, resolve_precision
from vistune.tuning import TunedModel, attach, attach_from_file


def seed_everything(seed: int) -> None:
    """Seed every RNG a run draws from (torch, numpy, Python)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Batches(Protocol):
    """One epoch of ``(local batch | None, global batch size)``; ``len()`` is its step count (the
    same on every rank: the LR schedule and the gradient collectives depend on it)."""

    def __iter__(self) -> Iterator[tuple[Any, int]]: ...

    def __len__(self) -> int: ...


class Runtime(Protocol):
    """The engine's side of a task: device, rank, collectives and rank-aware loaders."""

    device: torch.device
    rank: int
    world: int

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...

    def gather(self, obj: Any) -> list[Any]: ...

    def train_loader(self, dataset: Any, batch_size: int, *, seed: int, collate: Callable | None = None,
                     num_workers: int = 0) -> Batches: ...

    def eval_loader(self, dataset: Any, batch_size: int, *, collate: Callable | None = None,
                    num_workers: int = 0) -> Iterable[Any]: ...


class TaskProbe:
    """What a method's ``prepare`` hook may ask of the task it is about to train for.

    ``losses(model, n)`` yields the task's loss on its first ``n`` training batches in file order
    (no augmentation), computed through a freshly initialised throw-away head on ``model`` —
    SPT's sensitivity pass is Σ (∂L/∂w)² over exactly these. ``scores_path`` is where data-
    dependent preparation caches its result (``--sensitivity`` or ``OUT/sensitivity.safetensors``).
    """

    def __init__(self, losses: Callable[[nn.Module, int], Iterator[torch.Tensor]], scores_path: Path | None,
                 data_label: str, batch_size: int, loss_name: str) -> None:
        self.losses = losses
        self.scores_path = scores_path
        self.data_label = data_label
        self.batch_size = batch_size
        self.loss_name = loss_name


def tuned_file_of(source: str | os.PathLike) -> Path:
    """A tuned file, or the ``tuned.safetensors`` inside a run folder."""
    p = Path(source)
    if p.is_dir():
        f = p / "tuned.safetensors"
        if not f.is_file():
            raise TunedFileError(f"{p}: no tuned.safetensors in this folder (is it a `vistune train` output?)")
        return f
    if not p.is_file():
        raise TunedFileError(f"tuned file {p}: no such file or folder")
    return p


def saved_config(values: dict[str, Any] | None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a run's recorded config (keys this version does not know are dropped)."""
    known = set(config_keys())
    base = {k: v for k, v in (values or {}).items() if k in known}
    base.update(overrides)
    return make_config(base)


def trained_precision(meta: dict[str, Any], recorded: dict[str, Any]) -> str | None:
    """The precision a run really trained in: recorded beside its config since ``auto`` existed;
    before, the config's own value was always a resolved one (fp32 or bf16)."""
    value = meta.get("precision") or recorded.get("precision")
    return value if value in ("fp32", "bf16", "fp16") else None


@dataclasses.dataclass
class SavedRun:
    """A saved run rebuilt from its files by its task class (:meth:`Task.open_saved`): the model,
    the tuned file's metadata, the run config that reloads its data, and ``info`` — the metadata
    where the run recorded its config, class names and precision (a classification tuned file's
    ``extra``, a dense run's head file)."""

    tuned_path: Path
    meta: dict[str, Any]
    tuned: Any  # vistune.tuning.TunedModel
    cfg: TrainConfig | None  # None when only the model was rebuilt (Task.load_model)
    info: dict[str, Any] | None = None
    model: Any = None  # what the task evaluates (the DenseModel of a dense run; else the tuned model)

    @property
    def extra(self) -> dict[str, Any]:
        return self.meta.get("extra") or {}

    @property
    def recorded(self) -> dict[str, Any]:
        return self.run_info.get("config") or {}

    @property
    def run_info(self) -> dict[str, Any]:
        return self.info if self.info is not None else self.extra

    @property
    def class_names(self) -> list[str] | None:
        return self.run_info.get("class_names")

    @property
    def trained_precision(self) -> str | None:
        return trained_precision(self.run_info, self.recorded)


class ServedHead:
    """What a server needs of a saved run beyond its tuned backbone (see :meth:`Task.serve_head`)."""

    def __init__(self, head: nn.Module, classes: list[str], levels: list[Any] | None = None,
                 head_params: int | None = None, file_bytes: int = 0) -> None:
        self.head = head
        self.classes = classes
        self.levels = levels or []  # feature levels its head reads (dense: vistune.dense.features.Level)
        self.head_params = head_params  # None: the tuned model's parameter report counts the head
        self.file_bytes = file_bytes  # tensor bytes of the head's own file(s)


class Task:
    """Base class; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    #: metric selected on (higher is better); metrics.json then has ``val_<primary>``/``test_<primary>``
    primary: ClassVar[str] = ""
    #: the direction of ``primary`` (a sweep's study maximises or minimises it)
    higher_is_better: ClassVar[bool] = True
    #: the headline metrics of metrics.json, as ``vistune train`` prints them after a run
    metric_keys: ClassVar[tuple[str, ...]] = ()
    #: ``vistune report``'s columns for this kind: (metrics.json key, title)
    report_columns: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: how its metric values print (percentages to 2 places, fractions to 4)
    metric_format: ClassVar[str] = ".4f"
    #: files this task writes beside metrics.json (``--overwrite`` removes exactly these)
    files: ClassVar[tuple[str, ...]] = ()

    cfg: TrainConfig
    rt: Runtime
    tuned: TunedModel
    cache_seconds: float = 0.0
    _precision: Precision | None = None

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        """Refuse, in one ConfigError line, settings this task kind has no meaning for (called by
        :meth:`TrainConfig.validate`, so a YAML file fails before anything loads)."""

    # -- a saved run: which kind it is, and its head for serving --------------------------------
    @classmethod
    def run_kind(cls, path: Path) -> str | None:
        """The task name of the saved run at ``path`` (a run folder or one of its files) when its
        files are of this class's family, else None. :func:`vistune.tasks.kind_of_run` asks every
        registered kind, the default kind (whose files every run has) last."""
        return None

    @classmethod
    def run_files(cls, path: Path) -> list[Path] | None:
        """The files of the saved run at ``path`` if it looks like one of this class's family, found
        from names alone (nothing is read: a server confines them to its task root first); the
        tuned file first. :func:`vistune.tasks.files_of_run` asks every kind, the default last."""
        return None

    @classmethod
    def tuned_file(cls, path: Path) -> Path:
        """The tuned file of the saved run at ``path`` (the file itself, or the one in its folder)."""
        return tuned_file_of(path)

    @classmethod
    def serve_head(cls, source: Path, tuned_path: Path, meta: dict[str, Any], view: nn.Module,
                   device: torch.device) -> ServedHead:
        """The head a server runs for the saved run at ``source`` on ``view`` (the tuned backbone
        rebuilt from ``tuned_path``, whose metadata is ``meta``), refused in one TunedFileError line
        when the run's files do not fit together."""
        raise NotImplementedError

    @classmethod
    def load_model(cls, path: Path, weights: str | None, load_device: torch.device | str = "cpu") -> SavedRun:
        """The saved run at ``path`` rebuilt as a model only (``cfg`` None): what export needs, and
        the first half of :meth:`open_saved`."""
        raise NotImplementedError

    @classmethod
    def open_saved(cls, path: Path, data_spec: str | None, weights: str | None, load_device: torch.device | None,
                   **changes: Any) -> SavedRun:
        """The saved run at ``path`` rebuilt (``weights``: the backbone weights file of a run trained
        on a local one) with the config that reloads its own splits: the data spec defaults to the
        recorded one and nothing that only shapes training (shots, augmentation) applies again; a dense
        model is built on ``load_device``;
        ``changes`` override the recorded config (batch size, device)."""
        raise NotImplementedError

    def setup_saved(self, run: SavedRun, rt: Runtime) -> None:
        """:meth:`setup` for evaluation around a run :meth:`open_saved` rebuilt."""
        raise NotImplementedError

    # -- export ---------------------------------------------------------------------------------
    #: the head is vistune's own module (timm and PEFT cannot rebuild it; only a traced graph carries it)
    own_head_module: ClassVar[bool] = False

    @classmethod
    def preprocess_doc(cls, size: int) -> str:
        """How an export's user must prepare an image (the export's sidecar says it)."""
        return f"RGB, bicubic resize to {size}x{size} (no crop), /255, (x - mean) / std, NCHW float32"

    @classmethod
    def num_classes_of(cls, run: Any) -> int:
        """The class count of a rebuilt run (:class:`vistune.export.run.Run`)."""
        return int(run.meta["num_classes"])

    @classmethod
    def export_graph(cls, run: Any, size: int) -> tuple[nn.Module, tuple[str, ...], dict[str, Any]]:
        """The module an ONNX export traces for ``run`` (:class:`vistune.export.run.Run`, rebuilt on
        CPU), its output names, and each output's documentation for the export's sidecar."""
        raise NotImplementedError

    # -- serving: one image -> JSON (classmethods: a server holds loaded heads, not set-up tasks) --
    #: how a server prepares an upload for this kind; kinds of one style share one decode
    input_style: ClassVar[str] = "resize"
    #: whether this kind's head reads the backbone's pooled pre-logits (else only its level maps)
    uses_pre_logits: ClassVar[bool] = True

    @classmethod
    def serve_input(cls, data: bytes, size: int, mean: tuple, std: tuple, max_pixels: int,
                    max_bytes: int | None) -> tuple[torch.Tensor, Any]:
        """An upload -> ``(3, S, S)`` input exactly as evaluation preprocessed it, and the context
        :meth:`serve_result` needs to map the output back to the upload's pixels (or None)."""
        raise NotImplementedError

    @classmethod
    def serve_outputs(cls, loaded: Any, pre: torch.Tensor | None, maps: dict[str, torch.Tensor],
                      rows: torch.Tensor, image_hw: tuple[int, int]) -> list[Any]:
        """This kind's head (``loaded.head``) on ``rows`` of a shared backbone pass: one output per row.
        ``pre``: pooled pre-logits; ``maps``: level maps by module name (``loaded.levels``)."""
        raise NotImplementedError

    @classmethod
    def serve_result(cls, output: Any, context: Any, loaded: Any, *, top: int,
                     score_threshold: float | None) -> dict[str, Any]:
        """One row's output -> the JSON fields the service returns for it (beside task/kind/method)."""
        raise NotImplementedError

    @classmethod
    def predict(cls, path: Path, image: Path, out: Path | None, *, top: int = 5,
                score_threshold: float | None = None, device: str = "cpu") -> dict[str, Any]:
        """``vistune predict``: the saved run at ``path`` on one image file -> a JSON-able answer
        (written to ``out`` when given; the key ``out`` then names what was written).

        Why on the task class: what a prediction looks like (top-k classes, labels over a
        threshold, a drawn mask) is the kind's business, so the command never asks which kind
        it holds. A kind without one-image predictions refuses in one line."""
        raise ConfigError(f"vistune predict: task kind {cls.name!r} does not define a prediction on one image")

    @classmethod
    def eval_lines(cls, res: dict[str, Any], split: str) -> list[str]:
        """``vistune eval``'s plain-text answer for ``res`` (:func:`evaluate_run`'s dict)."""
        return [f"{k}  {format(v, cls.metric_format)}" for k, v in res.items() if isinstance(v, float)]

    # -- building ----------------------------------------------------------------------------
    def setup(self, cfg: TrainConfig, rt: Runtime, out: Path | None) -> None:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def precision(self) -> Precision:
        """The run's precision, resolved once on its device (``auto``: bf16 only where native)."""
        if self._precision is None:
            self._precision = resolve_precision(self.cfg.precision, self.device)
        return self._precision

    def use_precision(self, precision: Precision) -> None:
        """Fix the precision before :meth:`setup` (``vistune eval`` keeps the one the run trained in)."""
        self._precision = precision

    def amp(self) -> contextlib.AbstractContextManager:
        """Autocast around forward passes in bf16/fp16 runs (losses stay fp32)."""
        return self.precision.autocast(self.device.type)

    def build_backbone(self, cfg: TrainConfig) -> nn.Module:
        return seeded_backbone(cfg.backbone, weights=cfg.weights, img_size=cfg.img_size)

    def load_data(self, cfg: TrainConfig, model: nn.Module) -> Any:
        """The run's splits, read as ``model`` (the backbone) expects its input: what :meth:`setup`
        loads, exposed so a multi-run workflow checks the data once before its first run."""
        raise NotImplementedError

    def attach_method(self, cfg: TrainConfig, backbone: nn.Module, num_classes: int | None,
                      probe: TaskProbe | None, reseed: Callable[[], None] | None = None) -> TunedModel:
        """Attach ``cfg.method``: from a pre-trained module file (PVP) or fresh after its prepare hook.

        The engine never asks which method it is: every method class has ``prepare`` (a no-op
        unless the method needs data, as SPT does). In a distributed job rank 0 prepares first
        (it may write a file the others then read).
        """
        options = dict(cfg.options)
        if cfg.init_from:
            if reseed:
                reseed()
            tuned = attach_from_file(backbone, cfg.method, cfg.init_from, num_classes or 0, options)
        else:
            cls = get_method(cfg.method)
            if probe is not None:
                if self.rt.is_main:
                    options = cls.prepare(backbone, options, probe)
                    self.rt.barrier()
                else:
                    self.rt.barrier()
                    options = cls.prepare(backbone, options, probe)
            if reseed:
                reseed()
            tuned = attach(backbone, cfg.method, num_classes=num_classes, **options)
        if cfg.freeze_modules:
            for p in tuned.tuned_parameters(include_head=False):
                p.requires_grad_(False)
        return tuned

    def place(self, tuned: TunedModel) -> TunedModel:
        """The tuned model on the run's device, set up for speed without changing what it computes
        beyond float rounding: in bf16/fp16 runs its frozen Linear/Conv weights are stored in that
        dtype (bit-identical under autocast; saves a cast per step and half their memory), and on CPU
        attention runs the explicit path (:func:`vistune.backbones.set_fused_attention`). Training
        and ``vistune eval`` both come through here, so eval reproduces the run exactly."""
        tuned = tuned.to(self.rt.device)
        if self.precision.dtype is not None:
            tuned.cast_frozen_matmul_weights(self.precision.dtype)
        if self.rt.device.type == "cpu":  # CPU flash-attention backward is slow at ViT sequence lengths
            set_fused_attention(tuned.model, False)
        return tuned

    def scores_path(self, cfg: TrainConfig, out: Path | None) -> Path | None:
        if cfg.sensitivity:
            return Path(cfg.sensitivity)
        return None if out is None else Path(out) / "sensitivity.safetensors"

    # -- training ----------------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        """The modules whose train/eval mode the loop switches (the tuned model, heads)."""
        raise NotImplementedError

    def set_mode(self, training: bool) -> None:
        for m in self.modules():
            m.train(training)

    def parameters(self) -> list[tuple[nn.Parameter, bool]]:
        """Trainable parameters in a stable order, each with ``is_head`` (it gets ``head_lr``)."""
        raise NotImplementedError

    def num_train_batches(self) -> int:
        raise NotImplementedError

    def train_batches(self, epoch: int) -> Iterable[tuple[Any, int]]:
        raise NotImplementedError

    def loss(self, batch: Any) -> tuple[torch.Tensor, int, dict[str, float]]:
        raise NotImplementedError

    def train_fields(self, stats: dict[str, float], seen: int) -> dict[str, Any]:
        """Extra per-epoch log fields from the summed ``stats`` of :meth:`loss`."""
        return {}

    # -- evaluation --------------------------------------------------------------------------
    def has_split(self, split: str) -> bool:
        raise NotImplementedError

    def evaluate(self, split: str) -> dict[str, Any]:
        """Reduced metrics of ``split`` (every rank gets the same dict; contains ``primary``)."""
        raise NotImplementedError

    def metric_fields(self, prefix: str, result: dict[str, Any], final: bool) -> dict[str, Any]:
        """How a result appears in the log (``final=False``) or metrics.json (``final=True``)."""
        raise NotImplementedError

    # -- state and outputs --------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor], what: str) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def output_files(self, extra: dict[str, Any]) -> list[tuple[str, Callable[[Path], None]]]:
        raise NotImplementedError


def clone_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in tensors.items()}


def check_no_dense_fewshot(cfg: TrainConfig) -> None:
    if cfg.shots is not None:
        raise ConfigError("shots (few-shot sampling) is defined for classification only, not for dense tasks")
