"""``vistune robustness``: a tuned classification run under corruptions, attacks and other data sets.

The run is rebuilt from its tuned file and data spec exactly as ``vistune eval`` does (the same
helpers), and evaluated on its test split, capped by ``max_images`` with a seeded, class-
stratified choice that depends only on the split's labels, so every run on the same data is
scored on the same images. Corruptions act on the ``uint8`` image at the model's input size,
before normalisation; attacks see ``[0, 1]`` pixels with the normalisation inside the model.

Work is split into *cells* (clean; one corruption at one severity; one attack at one eps; one OOD
set). Each finished cell is one JSON file under ``OUT/cells/`` (atomic), stamped with everything
its number depends on, so a killed run resumes without redoing finished cells and a changed
setting recomputes only what it changes. The report (``robustness.json``, ``robustness.md``, the
plots) is written as one set at the end, ``robustness.json`` last.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vistune.backbones import backbone_info
from vistune.config import ConfigError
from vistune.data.fewshot import class_orders, proportional_quota
from vistune.engine.distributed import resolve_device
from vistune.io import write_atomic, write_json_atomic
from vistune.precision import Precision, resolve_precision
from vistune.robustness.attacks import (
    INSTALL_HINT,
    PixelModel,
    art_classifier,
    attack_batch,
    make_attack,
    pgd_alpha,
    predict,
)
from vistune.robustness.corruptions import (
    RobustnessError,
    corrupt,
    image_seed,
    implementation,
    load_imagecorruptions,
)
from vistune.robustness.ood import check_map_sources, read_class_map, select_ood
from vistune.robustness.report import build_report, write_report
from vistune.tasks import kind_of_run
from vistune.tasks.classify import ClassifyTask, load_classification_data
from vistune.workflows.train import (
    check_class_names,
    open_classification_run,
    trained_precision,
    with_changes,
)

#: Stream tag of the ``max_images`` choice (distinct from the loader's carving and capping tags).
PURPOSE_ROBUSTNESS = 7
CELLS = "cells"


@dataclass
class RobustnessSettings:
    """Everything one ``vistune robustness`` call does; validated by the CLI's parsers."""

    tuned: str
    out: str
    data: str | None = None
    corruptions: list[str] = field(default_factory=list)
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    attacks: list[str] = field(default_factory=list)
    eps: list[float] = field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255])
    pgd_steps: int = 10
    pgd_alpha: float | None = None
    ood: list[str] = field(default_factory=list)
    class_map: str | None = None
    baseline: str | None = None
    max_images: int | None = None
    batch_size: int = 64
    device: str = "auto"
    precision: str = "auto"
    attack_precision: str = "fp32"
    workers: int = 2
    seed: int = 0
    weights: str | None = None
    verbose: bool = True
    #: a folder of corrupted images shared between runs (see :func:`cached_images`)
    image_cache: str | None = None


@dataclass
class LoadedRun:
    """A rebuilt run: the model, its test images (uint8, model size) and what identifies it."""

    model: torch.nn.Module
    test: Any  # ImageDataset
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    img_size: int
    spec: str
    identity: dict[str, Any]
    precision: Precision
    cfg: Any


def load_run(path: str, data_spec: str | None, device: torch.device, weights: str | None,
             precision: str) -> LoadedRun:
    """Rebuild a classification run from its tuned file and data, as ``evaluate_run`` does."""
    run = open_classification_run(path, data_spec, weights, device=str(device))
    tuned_path, meta, tuned, cfg = run.tuned_path, run.meta, run.tuned, run.cfg
    extra, recorded, spec = run.extra, run.recorded, cfg.data
    data = load_classification_data(cfg, tuned.model)
    check_class_names(extra.get("class_names"), list(data.class_names), spec, False)
    if data.num_classes != tuned.num_classes:
        raise ConfigError(f"data {spec!r} has {data.num_classes} classes, the tuned file {tuned.num_classes}")
    if data.test is None:
        raise ConfigError(f"data {spec!r} has no test split")
    info = backbone_info(tuned.model)
    identity = {"tuned_file": str(tuned_path), "tuned_sha256": _sha256(tuned_path),
                "backbone": meta["backbone"].get("name"), "backbone_fingerprint": meta["backbone"].get("fingerprint"),
                "method": meta.get("method"), "data": spec}
    prec = resolve_precision(precision, device, prefer=trained_precision(extra, recorded))
    return LoadedRun(tuned.to(device).eval(), data.test, list(data.class_names), tuple(info.mean), tuple(info.std),
                     int(info.img_size), spec, identity, prec, cfg)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def select_images(labels: Sequence[int], max_images: int | None, seed: int = 0) -> list[int]:
    """Positions of at most ``max_images`` images, class-proportional, seeded; all when no cap.

    The seed is fixed (not ``--seed``, which draws the corruption noise and PGD's start), so the
    choice depends on the split's labels alone and every run on the same data sees the same images.
    """
    if max_images is None or max_images >= len(labels):
        return list(range(len(labels)))
    quota = proportional_quota(Counter(int(y) for y in labels), max_images)
    orders = class_orders([int(y) for y in labels], seed, PURPOSE_ROBUSTNESS)
    return sorted(p for c, n in quota.items() for p in orders.get(c, [])[:n])


class Images(Dataset):
    """Selected images of a split as ``(uint8 (3, H, W), label)``, corrupted on access when asked.

    Items are produced in DataLoader workers (the corruption is the CPU-bound part); each item's
    corruption is seeded from its id, so workers, batch size and order never change a byte.
    """

    def __init__(self, split: Any, positions: Sequence[int], labels: Sequence[int] | None = None,
                 corruption: tuple[str, int] | None = None, seed: int = 0) -> None:
        self.split, self.positions = split, list(positions)
        self.labels = list(labels) if labels is not None else [split.targets[p] for p in self.positions]
        self.corruption, self.seed = corruption, seed

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        p = self.positions[i]
        x = self.split.uint8(p)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        if self.corruption is not None:
            name, severity = self.corruption
            seed = image_seed(self.seed, name, severity, self.split.ids[p])
            x = torch.from_numpy(corrupt(x.numpy(), name, severity, seed))
        return x.contiguous(), self.labels[i]


class ArrayImages(Dataset):
    """Images already made (uint8 (N, 3, H, W)) with their labels: a cached corruption."""

    def __init__(self, array: np.ndarray, labels: Sequence[int]) -> None:
        self.array, self.labels = array, list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.array[i])), self.labels[i]  # a copy: the cache is read-only


def cached_images(cache: str | None, images: Images, stamp: dict[str, Any], workers: int,
                  batch_size: int) -> Dataset:
    """``images``, made once per cache folder and read back by every later run on the same images.

    Comparing methods means stressing many runs on the *same* corrupted images; making them is
    the costly part (tens of seconds per corruption and severity at 64 px, far more than the
    forward passes), so a shared ``--image-cache DIR`` pays it once. The key holds everything the
    bytes depend on (data spec, image size, which images, corruption, severity, seed, the
    implementation's version); the file is written to a temporary name and renamed, so a killed
    run or two runs at once never leave a partial file behind.
    """
    if cache is None:
        return images
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = Path(cache) / f"{key}.npy"
    if path.is_file():
        try:
            array = np.load(path, mmap_mode="r")
            if array.shape[0] == len(images):
                return ArrayImages(array, images.labels)
        except (OSError, ValueError):
            pass  # unreadable: made again below
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers)
    array = np.concatenate([x.numpy() for x, _ in loader]) if len(images) else np.zeros((0, 3, 1, 1), np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to the temp name
            np.save(f, array)

    write_atomic(path, write)
    return ArrayImages(array, images.labels)


@torch.no_grad()
def accuracy(run: LoadedRun, images: Images, batch_size: int, workers: int) -> dict[str, Any]:
    """top-1 of ``run`` on ``images`` (normalised as in training, the eval precision's autocast)."""
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers)
    device = next(run.model.parameters()).device
    mean = torch.tensor(run.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(run.std, device=device).view(1, 3, 1, 1) * 255
    correct = n = 0
    for x, y in loader:
        x = (x.to(device).float() - mean) / std
        with run.precision.autocast(device.type):
            logits = run.model(x)
        correct += int((logits.float().argmax(1).cpu() == y).sum())
        n += len(y)
    return {"correct": correct, "n": n, "top1": 100.0 * correct / max(n, 1)}


def cell(out: Path, name: str, stamp: dict[str, Any], compute: Callable[[], dict[str, Any]],
         verbose: bool) -> dict[str, Any]:
    """One cell: reused when its file exists with the same stamp, else computed and written."""
    path = out / CELLS / f"{name}.json"
    key = hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("stamp_sha256") == key:
                return old["result"]
        except (json.JSONDecodeError, AttributeError, KeyError):
            pass  # a damaged cell is recomputed
    t0 = time.perf_counter()
    result = compute()
    result["seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(path, {"cell": name, "stamp": stamp, "stamp_sha256": key, "result": result})
    if verbose:
        print(f"{name}: top-1 {result.get('top1', float('nan')):.2f} ({result.get('n')} images, "
              f"{result['seconds']:.1f} s)", flush=True)
    return result


def eps_label(eps: float) -> str:
    """``8/255`` when eps is a whole number of grey levels, else the number."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.6g}"


def settings_record(s: RobustnessSettings) -> dict[str, Any]:
    return {k: v for k, v in asdict(s).items() if k not in ("verbose", "workers", "out", "image_cache")}


def check_out(out: Path) -> None:
    """OUT must be a folder or absent; an existing file (or a file in its path) is refused now."""
    for parent in [out, *out.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise RobustnessError(f"--out {out}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK):
                raise RobustnessError(f"--out {out}: {parent} is not writable")
            return


def cache_key(identity: dict[str, Any], positions: Sequence[int], ids: Sequence[str]) -> dict[str, Any]:
    """What every cell of one model on one selection depends on."""
    chosen = hashlib.sha256("\n".join(ids[p] for p in positions).encode()).hexdigest()
    return {**{k: identity[k] for k in ("tuned_sha256", "data")}, "images_sha256": chosen, "n": len(positions)}


@dataclass
class Plan:
    """Everything checked and loaded before the first file is written."""

    run: LoadedRun
    positions: list[int]
    baseline: LoadedRun | None = None
    baseline_positions: list[int] | None = None
    ood: list[tuple[str, Any, Any]] = field(default_factory=list)  # (spec, split, OodSelection)
    class_map: dict[str, str] | None = None


def prepare(s: RobustnessSettings) -> Plan:
    """Validate and load everything (runs, data, optional packages); writes nothing."""
    if not (s.corruptions or s.attacks or s.ood):
        raise RobustnessError("nothing to do: give --corruptions, --attack and/or --ood")
    if s.class_map and not s.ood:
        raise RobustnessError("--class-map maps the classes of --ood data sets: give --ood too")
    if s.baseline and not s.corruptions:
        raise RobustnessError("--baseline is the reference of the corruption error: give --corruptions too")
    kind = kind_of_run(s.tuned)
    if not issubclass(kind, ClassifyTask):
        what = "--attack" if s.attacks else "vistune robustness"
        raise RobustnessError(f"{what} works on classification runs; {s.tuned} is a {kind.name} run")
    check_out(Path(s.out))
    device = resolve_device(s.device)
    if s.corruptions:
        load_imagecorruptions()
    if s.attacks:
        resolve_precision(s.attack_precision, device)
        _import_art()
    run = load_run(s.tuned, s.data, device, s.weights, s.precision)
    if s.corruptions and run.img_size < 32:
        raise RobustnessError(f"corruptions need images of at least 32 px; {s.tuned} sees {run.img_size} px")
    plan = Plan(run, select_images(run.test.targets, s.max_images))  # not --seed: every run, same images
    if s.baseline:
        plan.baseline = load_run(s.baseline, run.spec, device, None, s.precision)
        plan.baseline_positions = _same_images(plan.baseline.test, run.test, plan.positions, s.baseline)
    if s.ood:
        _prepare_ood(s, plan)
    return plan


def _import_art() -> None:
    try:
        import art.attacks.evasion  # noqa: F401
    except ImportError as err:
        raise RobustnessError(f"--attack needs the adversarial-robustness-toolbox package ({err}); "
                              f"{INSTALL_HINT}") from None


def _same_images(split: Any, ref: Any, positions: Sequence[int], what: str) -> list[int]:
    """The baseline's positions of the images chosen for the run (same ids), or an error."""
    where = {sid: i for i, sid in enumerate(split.ids)}
    missing = [ref.ids[p] for p in positions if ref.ids[p] not in where]
    if missing:
        raise RobustnessError(f"--baseline {what}: its test split lacks {len(missing)} of the chosen images "
                              f"(e.g. {missing[0]}); the baseline must use the same data and split")
    return [where[ref.ids[p]] for p in positions]


def _prepare_ood(s: RobustnessSettings, plan: Plan) -> None:
    run = plan.run
    if s.class_map:
        plan.class_map = read_class_map(s.class_map, run.class_names)
    loaded = []
    for spec in s.ood:
        cfg = with_changes(run.cfg, data=spec, max_per_split=None, subset=None, trainval=False,
                           image_column=None, label_column=None)
        data = load_classification_data(cfg, run.model.model, shots=False)
        if data.test is None:
            raise RobustnessError(f"--ood {spec!r} has no test split")
        loaded.append((spec, data))
    if plan.class_map:
        check_map_sources(plan.class_map, [d.class_names for _, d in loaded], s.class_map)
    for spec, data in loaded:
        sel = select_ood(data.test.targets, data.class_names, run.class_names, plan.class_map)
        if not sel.positions:
            raise RobustnessError(f"--ood {spec!r}: none of its classes is a class of the run"
                                  f"{'' if plan.class_map else ' (give --class-map to map its names)'}")
        keep = select_images(sel.labels, s.max_images)
        sel.positions, sel.labels = [sel.positions[i] for i in keep], [sel.labels[i] for i in keep]
        plan.ood.append((spec, data.test, sel))


def corruption_cells(s: RobustnessSettings, run: LoadedRun, positions: list[int], prefix: str = "") -> dict:
    """Clean and every (corruption, severity) accuracy of ``run`` on ``positions``."""
    out, base = Path(s.out), cache_key(run.identity, positions, run.test.ids)
    base = {**base, "precision": run.precision.name, "seed": s.seed, "implementation": implementation()}
    clean = cell(out, f"{prefix}clean", {**base, "cell": "clean"},
                 lambda: accuracy(run, Images(run.test, positions), s.batch_size, 0), s.verbose)
    table: dict[str, dict[str, Any]] = {}
    for name in s.corruptions:
        for sev in s.severities:
            images = Images(run.test, positions, corruption=(name, sev), seed=s.seed)
            made = {"data": run.spec, "img_size": run.img_size, "images_sha256": base["images_sha256"],
                    "corruption": name, "severity": sev, "seed": s.seed, "implementation": base["implementation"]}

            def compute(images=images, made=made) -> dict[str, Any]:
                ready = cached_images(s.image_cache, images, made, s.workers, s.batch_size)
                return accuracy(run, ready, s.batch_size, 0 if ready is not images else s.workers)

            table.setdefault(name, {})[str(sev)] = cell(
                out, f"{prefix}corruption-{name}-{sev}", {**base, "cell": "corruption", "name": name, "severity": sev},
                compute, s.verbose)
    return {"clean": clean, "accuracy": table}


def attack_cells(s: RobustnessSettings, run: LoadedRun, positions: list[int]) -> dict:
    """Clean and robust accuracy (per attack and eps) on the same images, in ``attack_precision``."""
    device = next(run.model.parameters()).device
    prec = resolve_precision(s.attack_precision, device)
    model = PixelModel(run.model, run.mean, run.std, lambda: prec.autocast(device.type)).to(device).eval()
    images = Images(run.test, positions)

    def batches():  # made on demand: all images at once could be GBs at 224 px
        for j in range(0, len(images), s.batch_size):
            yield torch.utils.data.default_collate([images[i] for i in range(j, min(j + s.batch_size, len(images)))])

    out = Path(s.out)
    base = {**cache_key(run.identity, positions, run.test.ids), "precision": prec.name, "seed": s.seed,
            "batch_size": s.batch_size, "art": version("adversarial-robustness-toolbox")}  # batch: PGD's start

    def clean() -> dict[str, Any]:
        ok = [int(v) for x, y in batches() for v in (predict(model, x.float() / 255, device) == y).tolist()]
        return {"correct": sum(ok), "n": len(ok), "top1": 100.0 * sum(ok) / max(len(ok), 1), "ok": ok}

    clean_res = cell(out, "attack-clean", {**base, "cell": "attack-clean"}, clean, s.verbose)
    estimator = art_classifier(model, len(run.class_names), run.img_size, device)
    table: dict[str, dict[str, Any]] = {}
    for name in s.attacks:
        for eps in s.eps:
            steps = s.pgd_steps if name == "pgd" else 1
            alpha = pgd_alpha(eps, steps, s.pgd_alpha) if name == "pgd" else eps
            stamp = {**base, "cell": "attack", "name": name, "eps": eps, "steps": steps, "alpha": alpha}

            def robust(name=name, eps=eps) -> dict[str, Any]:
                attack = make_attack(name, estimator, eps, s.pgd_steps, s.pgd_alpha, s.batch_size)
                return _robust_accuracy(model, attack, batches(), clean_res["ok"], device, s.seed, name, eps)

            res = cell(out, f"attack-{name}-{eps:.8f}", stamp, robust, s.verbose)
            table.setdefault(name, {})[eps_label(eps)] = {**res, "eps": eps, "steps": steps, "alpha": alpha}
    return {"clean": {k: v for k, v in clean_res.items() if k != "ok"}, "accuracy": table,
            "precision": prec.fields()}


def _robust_accuracy(model: Any, attack: Any, batches: Iterable, clean_ok: list[int], device: torch.device,
                     seed: int, name: str, eps: float) -> dict[str, Any]:
    correct = n = 0
    for b, (x, y) in enumerate(batches):
        adv = attack_batch(attack, x, y, image_seed(seed, name, b, f"{eps:.8f}"))
        hit = (predict(model, adv, device) == y).tolist()
        correct += sum(int(h and clean_ok[n + i]) for i, h in enumerate(hit))
        n += len(y)
    return {"correct": correct, "n": n, "top1": 100.0 * correct / max(n, 1)}


def ood_cells(s: RobustnessSettings, plan: Plan) -> list[dict[str, Any]]:
    """Accuracy of the run on each OOD set's images of its classes, with what was kept and dropped."""
    run, results = plan.run, []
    for spec, split, sel in plan.ood:
        ids = hashlib.sha256("\n".join(split.ids[p] for p in sel.positions).encode()).hexdigest()
        stamp = {"tuned_sha256": run.identity["tuned_sha256"], "ood": spec, "images_sha256": ids,
                 "labels": hashlib.sha256(str(sel.labels).encode()).hexdigest(), "precision": run.precision.name}
        res = cell(Path(s.out), f"ood-{hashlib.sha256(spec.encode()).hexdigest()[:12]}", stamp,
                   lambda split=split, sel=sel: accuracy(run, Images(split, sel.positions, sel.labels),
                                                         s.batch_size, 0), s.verbose)
        per_class = Counter(run.class_names[y] for y in sel.labels)
        results.append({"data": spec, **res, "kept_classes": sel.kept_classes, "dropped_classes": sel.dropped_classes,
                        "dropped_images": sel.dropped_images, "images_per_run_class": dict(sorted(per_class.items()))})
    return results


def run_robustness(s: RobustnessSettings) -> dict[str, Any]:
    """Check, load, evaluate every cell (reusing finished ones), then write the report as one set."""
    t0 = time.perf_counter()
    plan = prepare(s)
    Path(s.out).mkdir(parents=True, exist_ok=True)
    parts: dict[str, Any] = {}
    if s.corruptions:
        parts["corruptions"] = corruption_cells(s, plan.run, plan.positions)
        if plan.baseline is not None:
            parts["baseline"] = corruption_cells(s, plan.baseline, plan.baseline_positions or [], "baseline-")
    if s.attacks:
        parts["attacks"] = attack_cells(s, plan.run, plan.positions)
    if plan.ood:
        parts["ood"] = ood_cells(s, plan)
    report = build_report(s, plan, parts, time.perf_counter() - t0)
    write_report(Path(s.out), report)
    return report
