"""Run configuration: one dataclass shared by the CLI, YAML files and the Python API.

A YAML file may set any field; an unknown key is an error that names it (a typo must never
silently fall back to a default and produce a different experiment).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vistune.errors import ConfigError
from vistune.tasks import get_task, task_names


def __getattr__(name: str) -> Any:
    if name == "TASKS":  # the old constant, now the task registry's names
        return tuple(task_names())
    raise AttributeError(f"module 'vistune.config' has no attribute {name!r}")


HEAD_INITS = ("random", "zeros", "prototypes")
#: auto = bf16 autocast where the device runs it natively, else fp32 (:mod:`vistune.precision`)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``compile``'s spellings: on/off (true/false in YAML) or auto (:mod:`vistune.engine.autocompile`)
COMPILE_WORDS: dict[str, bool | str] = {"on": True, "true": True, "off": False, "false": False, "auto": "auto"}


@dataclass
class TrainConfig:
    backbone: str = ""
    weights: str | None = None
    img_size: int | None = None
    method: str = "linear"
    options: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    data_root: str | None = None  # tv: specs: where torchvision keeps/downloads files (default ~/.cache/vistune/data)
    image_column: str | None = None  # hf: specs: the image column (default: the first Image feature)
    label_column: str | None = None  # hf: specs: the label column (default: the first ClassLabel)
    shots: int | None = None
    subset: str | None = None  # "800/200": VTAB-1k's train/val sizes drawn from the training pool
    imbalance: float | None = None  # R >= 1: long-tailed train split, n_max*R^(-c/(C-1)) per class (README)
    group_thresholds: tuple[int, ...] = (100, 20)  # many-shot: > first, few-shot: < second training images
    seed: int = 0
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01
    wd: float = 1e-4
    optimizer: str = "sgd"
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    clip_grad: float | None = 1.0
    accum_steps: int = 1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (CUDA); auto: bf16 only where it is native
    compile: bool | str = False  # torch.compile the training forward: false | true | auto (pays back or stays off)
    augment: str | None = None  # None | flip
    trainval: bool = False  # VTAB final protocol: train on train800val200, no val split
    select: str = "last"  # last | best-val : which epoch's weights are tested
    val_every: int = 1  # evaluate val every N epochs (and always after the last)
    eval_test_every: int = 0  # >0: also evaluate test every N epochs (labelled as such)
    checkpoint_every: int = 1
    max_per_split: int | None = None
    cache_features: bool = True  # linear probing: run the frozen backbone once
    init_from: str | None = None  # PVP: a tuned file whose modules initialise this run
    freeze_modules: bool = False  # PVP: keep the initialised modules frozen, train the head only
    head_lr: float | None = None  # the head's learning rate (default: lr)
    head_init: str = "random"  # random (timm's) | zeros | prototypes (normalised class means of the train features)
    task: str = "classify"  # a name of the task registry (vistune.tasks)
    head_options: dict[str, Any] = field(default_factory=dict)  # dense heads: width, levels, ...
    sensitivity: str | None = None  # SPT: a scores file (computed when absent)
    num_workers: int = 0
    device: str = "auto"
    out: str = "runs/run"
    progress: bool = True

    def validate(self) -> None:
        if not self.backbone:
            raise ConfigError("backbone is required (e.g. --backbone dinov2-s14)")
        if not self.data:
            raise ConfigError("data is required (e.g. --data folder:../shared/data/flowers5)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be sgd or adamw, got {self.optimizer!r}")
        if isinstance(self.compile, str) and self.compile.lower() in COMPILE_WORDS:
            self.compile = COMPILE_WORDS[self.compile.lower()]
        if self.compile not in (True, False, "auto"):
            raise ConfigError(f"compile must be on, off or auto, got {self.compile!r}")
        if self.select not in ("last", "best-val"):
            raise ConfigError(f"select must be 'last' or 'best-val', got {self.select!r}")
        for name in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"shots must be >= 1, got {self.shots}")
        for name in ("lr", "wd", "momentum", "warmup_epochs", "min_lr_ratio", "clip_grad", "head_lr"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ConfigError(f"head_lr must be > 0, got {self.head_lr}")
        if self.wd < 0:
            raise ConfigError(f"wd (weight decay) must be >= 0, got {self.wd}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.clip_grad is not None and self.clip_grad < 0:
            raise ConfigError(f"clip_grad must be >= 0 (0 or none turns clipping off), got {self.clip_grad}")
        for name in ("val_every", "checkpoint_every", "eval_test_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.imbalance is not None and not (math.isfinite(self.imbalance) and self.imbalance >= 1):
            raise ConfigError(f"imbalance must be a finite number >= 1 (1 = as is), got {self.imbalance}")
        many_few = tuple(self.group_thresholds)
        if len(many_few) != 2 or many_few[0] < many_few[1] or many_few[1] < 0:
            raise ConfigError("group_thresholds must be MANY,FEW training-image counts with MANY >= FEW >= 0 "
                              f"(e.g. 100,20), got {','.join(map(str, many_few))}")
        if self.max_per_split is not None and self.max_per_split < 1:
            raise ConfigError(f"max_per_split must be >= 1, got {self.max_per_split}")
        if self.subset is not None:
            self.subset_sizes()
        if self.head_init not in HEAD_INITS:
            raise ConfigError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {self.head_init!r}")
        if self.task not in task_names():
            raise ConfigError(f"task must be one of {', '.join(task_names())}, got {self.task!r}")
        get_task(self.task).check_config(self)  # what the task kind refuses (imbalance, compile, ...)
        if not str(self.out).strip():
            raise ConfigError("out must name an output folder, got an empty string")
        if self.img_size is not None and self.img_size < 8:
            raise ConfigError(f"img_size must be >= 8 pixels, got {self.img_size}")

    def subset_sizes(self) -> tuple[int, int] | None:
        """``subset="800/200"`` -> (800, 200)."""
        if self.subset is None:
            return None
        a, sep, b = str(self.subset).partition("/")
        try:
            sizes = (int(a), int(b))
        except ValueError:
            sizes = (0, 0)
        if not sep or min(sizes) < 1:
            raise ConfigError(f"subset must look like TRAIN/VAL sizes, e.g. 800/200, got {self.subset!r}")
        return sizes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


class _DuplicateKey(ValueError):
    pass


def _unique_key_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    Plain YAML keeps the last value silently, so ``lr: 0.1`` further down a long file would
    quietly win over the ``lr: 0.01`` the user is looking at. Built on demand so that importing
    this module stays free of PyYAML.
    """
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:  # an unhashable key: let SafeLoader report it
                    continue
                if first != key_node.start_mark.line + 1:
                    raise _DuplicateKey(
                        f"key {key!r} is given twice (lines {first} and {key_node.start_mark.line + 1}); "
                        "keep one"
                    )
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of TrainConfig keys (``-`` or ``_`` spelling); unknown keys are errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file")
    try:
        with path.open() as fh:  # a stream, so YAML's messages name the file
            data = yaml.load(fh, Loader=_unique_key_loader()) or {}
    except _DuplicateKey as err:
        raise ConfigError(f"config file {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(data).__name__}")
    keys = set(config_keys())
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm not in keys:
            raise ConfigError(
                f"config file {path}: unknown key {key!r}; valid keys: {', '.join(sorted(keys))}"
            )
        out[norm] = value
    if "options" in out and not isinstance(out["options"], dict):
        raise ConfigError(f"config file {path}: 'options' must be a mapping of method options")
    return out


def make_config(file_values: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """File values first, explicit (non-None) overrides on top; then validate."""
    values = dict(file_values or {})
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "options":
            values["options"] = {**values.get("options", {}), **value}
        else:
            values[key] = value
    options = dict(values.get("options") or {})
    if "freeze_modules" in options:  # the 0.1 spelling: an engine setting passed as a method option
        print("vistune: -o freeze_modules is deprecated; use --freeze-modules (config key freeze_modules)",
              file=sys.stderr)
        values["freeze_modules"] = options.pop("freeze_modules")
        values["options"] = options
    types_ = _field_types()
    for key, value in list(values.items()):
        values[key] = _coerce(key, value, types_[key])
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    # local: imports torch; `vistune --help` imports this module
    from vistune.methods.base import coerce_value

    try:
        return coerce_value(value, annotation, none_words=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key {key}={value!r} is invalid ({err})") from None
