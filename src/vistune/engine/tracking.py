"""Experiment tracking: ``--log tensorboard`` and ``--log mlflow`` as ordinary loop callbacks.

Why callbacks and not a config key: where a run is *watched* from is not part of what it
computes, so it stays out of :class:`~vistune.config.TrainConfig` (a sweep resumed with another
``--log`` is the same experiment). The CLI builds one :class:`Tracking` per command, checks it
before anything is written (a missing package or an unreachable MLflow server is one line and
exit 2), and asks it for the callbacks of each run a workflow trains.

What is logged, with the same names in both backends. Steps are optimizer steps counted from the
start of the run (``(epoch - 1) * steps_per_epoch + step``), so per-step and per-epoch curves
share one x axis and TensorBoard can drop a resumed run's re-run steps (``purge_step``):

* ``train/loss`` (the sample-weighted mean over the step's micro-batches) and ``train/lr`` per step
  (the rate after the step, i.e. the next step's, as the progress bar shows it);
* ``epoch/<key>`` per epoch for every number of the epoch's ``log.jsonl`` record (``val_top1``,
  ``train_loss``, ``img_per_s``...), at the epoch's last step;
* ``final/<key>`` once, for every number of ``metrics.json`` (``test_top1``, ``val_top1``...);
* the run config (and a sweep trial's searched values as ``searched.<key>``) as hyper-parameters;
* MLflow only: ``metrics.json`` and the model file (``tuned.safetensors``, ``dense_head`` or
  ``modules``) as artefacts, once they are on disk.

Only rank 0 logs: the loop gives other ranks no callbacks, and :func:`~vistune.engine.callbacks.ending`
(which logs the artefacts) runs on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from vistune.engine.callbacks import Callback, FitState
from vistune.errors import VistuneError

#: Backend name -> (module that must import, pip extra that provides it).
BACKENDS = {"tensorboard": ("tensorboard", "tracking"), "mlflow": ("mlflow", "tracking")}
#: Model files a run may write; those that exist are MLflow artefacts next to metrics.json.
MODEL_FILES = ("tuned.safetensors", "dense_head.safetensors", "modules.safetensors")
#: Seconds an http(s) MLflow server gets to answer the start-up check.
CHECK_TIMEOUT_S = 5


class TrackingError(VistuneError):
    """A ``--log`` backend cannot be used (package missing, tracking URI unreachable)."""


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A run config as flat ``key -> scalar`` pairs (``options.rank``): both backends'
    hyper-parameter tables take scalars only. Numbers and booleans stay themselves (TensorBoard
    sorts and plots them as numbers); ``None`` and lists become text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(str(v) for v in value)
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


#: ``metrics.json`` numbers logged as ``final/<key>``: results and costs (the config is in the params).
FINAL_PREFIXES = ("val_", "test_", "best_val_", "final_train_loss")
FINAL_COSTS = ("tuned_params", "head_params", "tuned_percent", "train_seconds", "train_img_per_s", "peak_memory_mb")


def final_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``metrics.json`` that say how the run came out (the config values it
    repeats, such as ``lr`` or ``epochs``, are already hyper-parameters)."""
    return {k: v for k, v in numbers(metrics).items() if k.startswith(FINAL_PREFIXES) or k in FINAL_COSTS}


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite real numbers of a record (booleans, text, nested tables and NaN left out)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _global_step(state: FitState) -> int:
    return (state.epoch - 1) * state.steps_per_epoch + state.step


class _StepMeans:
    """Per-step mean loss over micro-batches: ``on_batch_end`` runs once per micro-batch, after
    the optimizer step when that micro-batch completed one (``state.step`` has moved then)."""

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.loss = 0.0
        self.samples = 0

    def start(self, state: FitState) -> None:
        self.key, self.loss, self.samples = (state.epoch, state.step), 0.0, 0

    def add(self, state: FitState, loss: float, samples: int) -> float | None:
        """The completed step's mean loss when this micro-batch completed one, else None."""
        self.loss += loss * samples
        self.samples += samples
        key = (state.epoch, state.step)
        if key == self.key:
            return None
        self.key = key
        mean = self.loss / max(self.samples, 1)
        self.loss, self.samples = 0.0, 0
        return mean


class _ScalarLog(Callback):
    """What both backends share: one mean loss and the learning rate per optimizer step, sent
    through the backend's own ``_metric``."""

    steps: _StepMeans
    last_step: int = 0

    def _metric(self, key: str, value: float, step: int) -> None:
        raise NotImplementedError

    def on_epoch_start(self, state: FitState, num_batches: int) -> None:
        self.steps.start(state)

    def on_batch_end(self, state: FitState, loss: float, samples: int, lr: float) -> None:
        mean = self.steps.add(state, loss, samples)
        if mean is not None:
            step = self.last_step = _global_step(state)
            self._metric("train/loss", mean, step)
            self._metric("train/lr", lr, step)


class TensorBoardLog(_ScalarLog):
    """Event files in ``log_dir`` (TensorBoard's SummaryWriter); hyper-parameters via the HPARAMS plugin."""

    def __init__(self, log_dir: Path, config: dict[str, Any], searched: dict[str, Any] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.params = {**flat_params(config), **flat_params(searched or {}, "searched.")}
        self.writer: Any = None
        self.steps = _StepMeans()
        self.last_step = 0

    def on_fit_start(self, state: FitState) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        resumed = state.epoch * state.steps_per_epoch  # steps done before a resume: later ones run again
        # purge_step: a resumed run's re-run steps (or an overwritten run's old ones) replace the earlier events
        self.writer = SummaryWriter(str(self.log_dir), purge_step=resumed + 1)
        metric_names = {f"final/val_{state.primary}": 0.0, f"final/test_{state.primary}": 0.0}
        exp, ssi, self._sei = hparams(self.params, metric_names)
        for summary in (exp, ssi):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(self.params, indent=1) + "\n```")

    def _metric(self, key: str, value: float, step: int) -> None:
        self.writer.add_scalar(key, value, step)

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
        step = self.last_step = _global_step(state)
        for key, value in numbers(record).items():
            if key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, step)
        self.writer.flush()

    def on_fit_end(self, state: FitState, metrics: dict[str, Any]) -> None:
        for key, value in final_numbers(metrics).items():
            self.writer.add_scalar(f"final/{key}", value, self.last_step)

    def on_run_end(self, out: Path | None, error: BaseException | None) -> None:
        if self.writer is None:
            return
        if error is None:
            self.writer.file_writer.add_summary(self._sei)  # the HPARAMS plugin's "status: success"
        self.writer.close()
        self.writer = None


class MLflowLog(_ScalarLog):
    """One MLflow run per training run, through ``MlflowClient`` (no global "active run", so a
    sweep's trial runs nest under its parent by tag and worker processes need no shared state).

    Step metrics are buffered and sent once per epoch in batches: one request per step would
    slow a run against a remote server for nothing a per-epoch flush loses.

    The server is checked before the run starts; should it fail later, logging stops with one
    warning and training goes on (hours of training are not lost to a dashboard outage; the
    run's own files hold every number). A run that cannot be created is a :class:`TrackingError`.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, config: dict[str, Any], *,
                 searched: dict[str, Any] | None = None, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None) -> None:
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.params = {**flat_params(config), **flat_params(searched or {}, "searched.")}
        self.parent_run_id = parent_run_id
        self.tags = dict(tags or {})
        self.client: Any = None
        self.run_id: str | None = None
        self.pending: list[Any] = []
        self.steps = _StepMeans()
        self.last_step = 0
        self.broken = False

    def on_fit_start(self, state: FitState) -> None:
        from mlflow.entities import Param

        tags = {**self.tags, **({"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {})}
        if state.epoch:
            tags["vistune.resumed_after_epoch"] = str(state.epoch)
        try:
            self.client = mlflow_client(self.uri)
            experiment_id = experiment_id_for(self.client, self.experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
            items = [Param(k, str(v)[:6000]) for k, v in self.params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i: i + 100])
        except Exception as err:  # noqa: BLE001 - store and server errors come in many types
            raise TrackingError(f"--log mlflow: cannot start a run in {self.uri} (experiment {self.experiment!r}): "
                                f"{_reason(err)}") from None
        for record in state.history:  # a resumed run: the epochs before the checkpoint, so its curves are whole
            self._epoch_metrics(record, record["epoch"] * state.steps_per_epoch)
        self._flush()

    def _send(self, call: Any) -> None:
        """Run one client call; after a failure, warn once and send nothing more."""
        if self.broken:
            return
        try:
            call()
        except Exception as err:  # noqa: BLE001 - see the class docstring
            self.broken = True
            print(f"vistune: warning: MLflow logging to {self.uri} stopped ({_reason(err)}); training goes on, "
                  "the run's files hold its numbers", file=sys.stderr)

    def _metric(self, key: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        self.pending.append(Metric(key, value, int(time.time() * 1000), step))

    def _flush(self) -> None:
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), 1000):  # MLflow takes at most 1000 metrics per batch
            self._send(lambda part=pending[i: i + 1000]: self.client.log_batch(self.run_id, metrics=part))

    def _epoch_metrics(self, record: dict[str, Any], step: int) -> None:
        for key, value in numbers(record).items():
            if key != "epoch":
                self._metric(f"epoch/{key}", value, step)

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
        self.last_step = _global_step(state)
        self._epoch_metrics(record, self.last_step)
        self._flush()

    def on_fit_end(self, state: FitState, metrics: dict[str, Any]) -> None:
        for key, value in final_numbers(metrics).items():
            self._metric(f"final/{key}", value, self.last_step)
        self._flush()

    def on_run_end(self, out: Path | None, error: BaseException | None) -> None:
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        if error is not None:
            self.pending = []
            pruned = type(error).__name__ in ("TrialPruned", "KeyboardInterrupt", "StopFit")
            self._send(lambda: self.client.set_terminated(run_id, "KILLED" if pruned else "FAILED"))
            return
        if out is not None:
            for name in ("metrics.json", *MODEL_FILES):
                if (out / name).is_file():
                    self._send(lambda path=str(out / name): self.client.log_artifact(run_id, path))
        self._send(lambda: self.client.set_terminated(run_id, "FINISHED"))


# ------------------------------------------------------------------------------------------------
# MLflow helpers


def _is_file_uri(uri: str) -> bool:
    """``file:...`` or a plain path (MLflow's own reading of a URI without a scheme)."""
    return uri.startswith("file:") or (":" not in uri and uri != "databricks")


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``. MLflow 3 refuses its file store unless told it is wanted;
    a ``file:`` URI here is the user's (or our default's) explicit choice, so it is allowed."""
    if _is_file_uri(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def experiment_id_for(client: Any, name: str) -> str:
    """The experiment's id, created on first use (another worker may create it at the same time)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created meanwhile by a parallel worker: read it back
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def check_mlflow_uri(uri: str) -> None:
    """Refuse a tracking URI the run could not log to, before anything is written.

    A ``file:`` store is only checked for its place (the store creates its folders on first use,
    which must not happen before the run starts); any other URI (http(s), sqlite, databricks) is
    asked for one experiment with a short timeout and no retries.
    """
    if _is_file_uri(uri):
        path = Path(uri.removeprefix("file://") if uri.startswith("file://") else uri.removeprefix("file:"))
        if path.exists() and not path.is_dir():
            raise TrackingError(f"--mlflow-uri {uri}: {path} exists and is not a folder")
        return
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")}
    os.environ.update(MLFLOW_HTTP_REQUEST_TIMEOUT=str(CHECK_TIMEOUT_S), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    try:
        mlflow_client(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - connection, auth and scheme errors come in many types
        raise TrackingError(f"--mlflow-uri {uri}: cannot reach the tracking server ({_reason(err)}); the run "
                            "did not start") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reason(err: BaseException) -> str:
    """The useful end of a client error: the OS's words (``[Errno 111] Connection refused``) when
    the connection failed, else the message, cut to a line."""
    text = " ".join(str(err).split())
    found = re.search(r"\[Errno -?\d+\] [^'\")\]]+|timed out|Read timed out", text)
    if found:
        return found.group(0).strip()
    return text if len(text) <= 200 else text[:200] + "..."


# ------------------------------------------------------------------------------------------------
# What the CLI builds


@dataclasses.dataclass
class Tracking:
    """The ``--log`` choices of one command, resolved: where each backend writes.

    ``root`` is the workflow's output folder (a run's, a sweep's, a few-shot protocol's); each
    run asks :meth:`callbacks` with its place below it (``trials/<config>``, ``final/seed0``).
    """

    backends: tuple[str, ...]
    root: Path
    tb_dir: Path
    mlflow_uri: str
    experiment: str = "vistune"
    parent_run_id: str | None = None

    def callbacks(self, config: dict[str, Any], sub: str = "", *, run_name: str | None = None,
                  searched: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> list[Callback]:
        """The callbacks of one run: TensorBoard writes to ``tb_dir/sub``, MLflow makes a run
        named ``run_name`` (default ``sub`` or the output folder's name)."""
        cbs: list[Callback] = []
        if "tensorboard" in self.backends:
            cbs.append(TensorBoardLog(self.tb_dir / sub if sub else self.tb_dir, config, searched))
        if "mlflow" in self.backends:
            name = run_name or sub or self.root.name
            cbs.append(MLflowLog(self.mlflow_uri, self.experiment, name, config, searched=searched,
                                 parent_run_id=self.parent_run_id,
                                 tags={"vistune.out": str(self.root / sub if sub else self.root), **(tags or {})}))
        return cbs


def build_tracking(backends: list[str] | None, out: str | os.PathLike | None, *, log_dir: str | None = None,
                   mlflow_uri: str | None = None, experiment: str | None = None) -> Tracking | None:
    """Check ``--log`` choices and resolve their places; None when nothing is to be logged.

    Every refusal is a :class:`TrackingError` raised before the run creates anything: a
    backend whose package is missing names the extra to install; an MLflow URI that does not
    answer is named with the reason.
    """
    chosen = tuple(dict.fromkeys(backends or ()))
    for flag, value, backend in (("--log-dir", log_dir, "tensorboard"), ("--mlflow-uri", mlflow_uri, "mlflow"),
                                 ("--mlflow-experiment", experiment, "mlflow")):
        if value and backend not in chosen:  # a place given for a backend not asked for: a typo, most likely
            raise TrackingError(f"{flag} {value} is for --log {backend}, which was not given")
    if not chosen:
        return None
    for name in chosen:
        if name not in BACKENDS:
            raise TrackingError(f"--log {name!r}: use tensorboard or mlflow")
        module, extra = BACKENDS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise TrackingError(f"--log {name} needs the {module} package: pip install 'vistune[{extra}]'") from None
    if out is None:
        raise TrackingError("--log needs --out (the logs go below it unless --log-dir / --mlflow-uri say where)")
    root = Path(out)
    uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or (root.resolve() / "mlruns").as_uri()
    if "mlflow" in chosen:
        check_mlflow_uri(uri)
    tb_dir = Path(log_dir) if log_dir else root / "tb"
    if "tensorboard" in chosen and tb_dir.exists() and not tb_dir.is_dir():
        raise TrackingError(f"--log-dir {tb_dir} exists and is not a folder")
    return Tracking(chosen, root, tb_dir, uri, experiment or "vistune")


# ------------------------------------------------------------------------------------------------
# Sweeps: one parent MLflow run, trial and final runs nested under it


def _parent_key(tracking: Tracking) -> str:
    return f"mlflow_parent_run {tracking.mlflow_uri} {tracking.experiment}"


def for_sweep(tracking: Tracking | None, study: Any, name: str, *, worker: bool) -> Tracking | None:
    """``tracking`` with the sweep's parent MLflow run set (created once, then found again).

    The parent's id lives in the study's user attributes, so a resumed sweep, ``--jobs``
    worker processes and other machines on the same ``--storage`` all nest under one run.
    """
    if tracking is None or "mlflow" not in tracking.backends:
        return tracking
    client = mlflow_client(tracking.mlflow_uri)
    key = _parent_key(tracking)
    run_id = study.user_attrs.get(key)
    if run_id is not None:
        try:
            client.get_run(run_id)
        except Exception:  # noqa: BLE001 - deleted, or another store: start a new parent
            run_id = None
    if run_id is None:
        if worker:  # the first process creates it before starting workers; without it, log flat
            return tracking
        experiment_id = experiment_id_for(client, tracking.experiment)
        run_id = client.create_run(experiment_id, run_name=name, tags={"vistune.out": str(tracking.root),
                                                                        "vistune.kind": "sweep"}).info.run_id
        study.set_user_attr(key, run_id)
    elif not worker:
        client.update_run(run_id, status="RUNNING")
    return dataclasses.replace(tracking, parent_run_id=run_id)


def finish_sweep(tracking: Tracking | None, result: dict[str, Any], files: list[Path]) -> None:
    """The sweep's own numbers (best val, the final mean ± std) and files on its parent run."""
    if tracking is None or tracking.parent_run_id is None:
        return
    client = mlflow_client(tracking.mlflow_uri)
    run_id = tracking.parent_run_id
    best, final = result.get("best") or {}, result.get("final") or {}
    values = {"best_val": best.get("val"), "final_mean": final.get("mean"), "final_std": final.get("std")}
    for key, value in numbers(values).items():
        client.log_metric(run_id, key, value)
    for key, value in (best.get("params") or {}).items():
        client.set_tag(run_id, f"best.{key}", str(value))
    for path in files:
        if path.is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")


def fail_sweep(tracking: Tracking | None) -> None:
    """Mark the sweep's parent run FAILED (the sweep stopped with an error); never raises, so the
    sweep's own error is the one reported."""
    if tracking is None or tracking.parent_run_id is None:
        return
    try:
        mlflow_client(tracking.mlflow_uri).set_terminated(tracking.parent_run_id, "FAILED")
    except Exception:  # noqa: BLE001
        pass


__all__ = ["MLflowLog", "TensorBoardLog", "Tracking", "TrackingError", "build_tracking"]
