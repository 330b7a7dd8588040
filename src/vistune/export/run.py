"""What every export shares: rebuilding a run, refusing what a format cannot carry, and writing
an output folder atomically with a small JSON that says how to run it without vistune.

:func:`load_run` is the *only* place in this package that turns a run back into a model: it asks
the run's task class (:func:`vistune.tasks.kind_of_run`, :meth:`~vistune.tasks.base.Task.load_model`),
so this package never needs to know which task kinds exist.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistune import __version__
from vistune.backbones import BackboneError, seeded_backbone
from vistune.errors import VistuneError
from vistune.io import write_error
from vistune.tasks import DEFAULT_TASK, get_task, kind_of_run

EXPORT_FORMAT = "vistune.export/1"
SIDECAR = "vistune_export.json"


class ExportError(VistuneError, ValueError):
    """An export or import cannot be done as asked (the message names the file and the reason)."""


def build_backbone(name: str, weights: str | None, img_size: int | None) -> nn.Module:
    """The frozen backbone exactly as training built it (same seed for random init, same weights,
    same post-load fix-ups such as DINOv2's antialias-free position embeddings).

    A backbone that cannot be built (weights file gone, zoo weights not fetchable) is an
    :class:`ExportError` naming the backbone and weights.
    """
    try:
        return seeded_backbone(name, weights, img_size)
    except (VistuneError, ValueError, OSError, RuntimeError) as err:
        label = weights or name
        raise ExportError(f"cannot build backbone {name!r} (weights {label!r}): {err}") from None


@dataclass
class Run:
    """A tuned run rebuilt on CPU, in eval mode: the tuned model, plus the dense model if any."""

    path: Path  # the tuned file
    meta: dict[str, Any]  # the tuned file's metadata
    tuned: Any  # vistune.tuning.TunedModel
    dense: Any = None  # the task's own model around the tuned one (vistune.dense.model.DenseModel)
    head_meta: dict[str, Any] | None = None  # where such a run records its classes (its head file)
    kind: Any = None  # the run's task class (vistune.tasks); None: a classification run

    @property
    def task_class(self) -> Any:
        return self.kind if self.kind is not None else get_task(DEFAULT_TASK)

    @property
    def task(self) -> str:
        return self.task_class.name

    @property
    def method(self) -> str:
        return str(self.meta["method"]["name"])

    @property
    def model(self) -> nn.Module:
        """What maps normalised images to the run's outputs (logits, or the dense head's output)."""
        return self.tuned if self.dense is None else self.dense

    @property
    def class_names(self) -> list[str] | None:
        extra = self.head_meta if self.head_meta is not None else (self.meta.get("extra") or {})
        names = (extra or {}).get("class_names")
        return [str(n) for n in names] if names else None

    @property
    def backbone(self) -> dict[str, Any]:
        return dict(self.meta["backbone"])


def resolve_tuned_path(path: str | os.PathLike) -> tuple[Path, bool]:
    """A run folder or a tuned file → (tuned file, whether its head is the task's own module)."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"run {p}: no such file or folder")
    kind = kind_of_run(p)
    if p.is_dir() and not (p / "tuned.safetensors").is_file():
        raise ExportError(f"run {path}: no tuned.safetensors in this folder")
    return kind.tuned_file(p), kind.own_head_module


def load_run(path: str | os.PathLike, weights: str | None = None) -> Run:
    """Rebuild a run (a run folder, its ``tuned.safetensors``, or a dense run folder) on CPU: the
    run's files say its task kind, and that class rebuilds it (:meth:`Task.load_model`)."""
    resolve_tuned_path(path)  # the one-line refusals of a path that holds no run
    kind = kind_of_run(path)
    try:
        saved = kind.load_model(Path(path), weights, "cpu")
    except (VistuneError, ValueError, OSError, RuntimeError) as err:
        what = "build its backbone" if isinstance(err, BackboneError) else "rebuild it"
        raise ExportError(f"run {path}: cannot {what}: {err}") from None
    own = saved.model if saved.model is not None and saved.model is not saved.tuned else None
    (own if own is not None else saved.tuned).eval()
    return Run(saved.tuned_path, saved.meta, saved.tuned, own, saved.info, kind)


def carriers(run: Run) -> tuple[str, ...]:
    """The formats that can carry this run: the method says (``Method.export_formats``); a dense
    run's head is vistune's own module, which only a traced graph carries."""
    if run.task_class.own_head_module:
        return ("onnx",)
    return run.tuned.method.export_formats()


def refuse(run: Run, fmt: str, why: str) -> ExportError:
    """The one-line refusal: what cannot be exported, why, and which formats can carry it."""
    return ExportError(
        f"cannot export {run.path} (method {run.method!r}, task {run.task}) as {fmt}: {why}; "
        f"formats that carry it: {', '.join(carriers(run))}"
    )


def refuse_dense(run: Run, fmt: str) -> ExportError:
    return ExportError(
        f"cannot export {run.path} as {fmt}: it is a dense ({run.task}) run whose head is vistune's own "
        "module, which timm and PEFT cannot build; formats that carry it: onnx"
    )


def timm_kwargs(model: nn.Module, num_classes: int, img_size: int) -> dict[str, Any]:
    """The ``timm.create_model`` keywords that rebuild this architecture at the run's geometry.

    ``img_size`` only for models that take it (ViTs; CNNs run at any size), ``dynamic_img_size``
    only when the model was built with it.
    """
    kwargs: dict[str, Any] = {"num_classes": int(num_classes)}
    try:
        params = inspect.signature(type(model).__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtin or C classes
        params = {}
    if "img_size" in params:
        kwargs["img_size"] = int(img_size)
    if getattr(model, "dynamic_img_size", False):
        kwargs["dynamic_img_size"] = True
    return kwargs


def sidecar(run: Run, artefact: str, **fields: Any) -> dict[str, Any]:
    """The small JSON written next to every artefact: what it is and how to feed it."""
    bb = run.backbone
    preprocess = run.task_class.preprocess_doc(int(bb["img_size"]))
    out = {
        "format": EXPORT_FORMAT,
        "artefact": artefact,
        "task": run.task,
        "arch": bb["arch"],
        "img_size": int(bb["img_size"]),
        "mean": list(bb["mean"]),
        "std": list(bb["std"]),
        "num_classes": _num_classes(run),
        "class_names": run.class_names,
        "preprocess": preprocess,
        "source": {
            "run": str(run.path.resolve()),
            "method": run.meta["method"],
            "backbone": bb["name"],
            "weights": bb["weights"],
            "fingerprint": bb["fingerprint"],
            "vistune_version": __version__,
        },
    }
    out.update(fields)
    return out


def _num_classes(run: Run) -> int:
    return run.task_class.num_classes_of(run)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def check_out_vs_source(out: str | os.PathLike, source: str | os.PathLike | None) -> None:
    """Refuse an output folder that is, or contains, the run being exported: replacing it would
    delete the run itself (``--tuned runs/r1 --out runs --overwrite`` once left only the export)."""
    if source is None:
        return
    out_r, src = Path(out).resolve(), Path(source).resolve()
    run_dir = src.parent if src.is_file() else src
    if out_r == src or out_r == run_dir or out_r in run_dir.parents:
        raise ExportError(f"output {out} is or contains the run being exported ({source}); choose an --out "
                          "outside the run's folder")


def exported_names(folder: Path) -> set[str]:
    """The names a vistune export wrote into ``folder`` (its sidecar's ``files``, plus the
    sidecar); empty when ``folder`` holds no vistune export. Only plain names count, so a
    tampered sidecar cannot point ``--overwrite`` at anything outside the folder."""
    try:
        data = json.loads((folder / SIDECAR).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT or not isinstance(data.get("files"), list):
        return set()
    names = {SIDECAR}
    for entry in data["files"]:
        name = str(entry).rstrip("/")
        if name and name not in (".", "..") and "/" not in name and "\\" not in name:
            names.add(name)
    return names


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, overwrite: bool = False,
               source: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield an empty temp folder beside ``out``; on success its files are moved into ``out``,
    on any failure it is removed, so an export either lands whole or changes nothing.

    ``overwrite`` replaces only what an earlier vistune export wrote into ``out`` (the files its
    ``vistune_export.json`` lists); anything else there stays, and a new file whose name is taken
    by such a foreign file is refused. The old export's files are moved aside only once the new
    set is complete, and moved back if putting the new set in place fails. ``source`` (the run
    being exported) must not be ``out`` or lie inside it.
    """
    out = Path(out)
    check_out_vs_source(out, source)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output {out} exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        try:
            yield tmp
        except Exception as err:  # a full disk, in the words of torch/safetensors/onnx: one line naming --out
            translated = write_error(err, out)
            if translated is None:
                raise
            raise translated from None
        if not out.exists():
            os.replace(tmp, out)
            return
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, out: Path) -> None:
    """Replace ``out``'s old export files by the complete set in ``new`` (see :func:`staged_dir`)."""
    old = exported_names(out)
    names = sorted(p.name for p in new.iterdir())
    names.sort(key=lambda n: n == SIDECAR)  # the sidecar last: it says what the folder holds
    foreign = [n for n in names if (out / n).exists() and n not in old]
    if foreign:
        raise ExportError(f"output {out} holds {foreign[0]!r}, which no vistune export wrote; --overwrite replaces "
                          "only an earlier export's files: move it away or choose another --out")
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    moved: list[str] = []
    placed: list[str] = []
    try:
        for name in sorted(old):
            if (out / name).exists() or (out / name).is_symlink():
                os.replace(out / name, trash / name)
                moved.append(name)
        for name in names:
            os.replace(new / name, out / name)
            placed.append(name)
    except BaseException:
        for name in placed:  # back to the old set
            target = out / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink(missing_ok=True)
        for name in moved:
            os.replace(trash / name, out / name)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def state_for_file(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors refuses views and shared storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
