"""The few-shot protocol: K shots per class × seeds × variants, on the full test split.

A *variant* is a method name, optionally with ``+pvp`` (its modules initialised from a
pre-trained module file). Every (variant, K, seed) is an ordinary ``train`` run in its own
folder, so each number in the table can be traced to a metrics.json and a file list.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path
from typing import Any

from vistune.config import ConfigError, TrainConfig
from vistune.data import longtail_counts
from vistune.engine.distributed import init_distributed
from vistune.io import save_figure_atomic, write_json_atomic, write_text_atomic
from vistune.methods import get_method, parse_options
from vistune.workflows.train import train


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    method: str
    pvp: bool


def parse_variants(text: str) -> list[Variant]:
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        method, plus, tag = part.partition("+")
        if plus and tag != "pvp":
            raise ConfigError(f"variant {part!r}: only '+pvp' may follow a method name")
        out.append(Variant(part, method, bool(plus)))
    if not out:
        raise ConfigError("--compare needs at least one variant, e.g. vpt,vpt+pvp,linear")
    return out


def split_options(options: dict[str, Any], method: str) -> dict[str, Any]:
    """``-o rank=4`` applies to every variant; ``-o lora:rank=4`` only to lora variants."""
    out = {}
    for key, value in options.items():
        scope, colon, name = key.partition(":")
        if not colon:
            out[key] = value
        elif scope == method:
            out[name] = value
    return out


def check_variants(variants: list[Variant], pvp_files: dict[str, str], options: dict[str, Any]) -> None:
    """Every variant must be runnable before the first run starts (no half tables)."""
    for v in variants:
        cls = get_method(v.method)
        parse_options(cls, split_options(options, v.method))
        if v.pvp:
            if v.method not in pvp_files:
                raise ConfigError(f"variant {v.label!r} needs a module file: --pvp {v.method}=FILE")
            if not Path(pvp_files[v.method]).is_file():
                raise ConfigError(f"--pvp {v.method}={pvp_files[v.method]}: no such file")


def run_fewshot(
    base: TrainConfig,
    shots: list[int],
    seeds: list[int],
    variants: list[Variant],
    pvp_files: dict[str, str],
    out: str | os.PathLike,
    lr_for: dict[str, float] | None = None,
    *,
    dist: Any = None,
    overwrite: bool = False,
    tracking: Any = None,
) -> dict[str, Any]:
    """Run every (variant, K, seed); write ``fewshot.json``, ``fewshot.md`` and ``fewshot.png``.

    A finished run folder is reused (its metrics.json read back), so a killed protocol resumes
    with the same command; under torchrun every run is data-parallel and rank 0 writes the table.
    """
    check_variants(variants, pvp_files, base.options)
    check_imbalance(base.imbalance, shots)
    dist = dist or init_distributed(base.device)
    out = Path(out)
    runs: list[dict[str, Any]] = []
    for v in variants:
        for k in shots:
            for s in seeds:
                run_dir = out / v.label / f"{k}shot" / f"seed{s}"
                cfg = dataclasses.replace(
                    base,
                    method=v.method,
                    options=split_options(base.options, v.method),
                    shots=k,
                    seed=s,
                    init_from=pvp_files[v.method] if v.pvp else None,
                    lr=(lr_for or {}).get(v.label, (lr_for or {}).get(v.method, base.lr)),
                    out=str(run_dir),
                )
                done = run_dir / "metrics.json"
                if done.is_file() and not overwrite:
                    m = json.loads(done.read_text())
                else:
                    # tracking (--log): one logged run per (variant, K, seed), TensorBoard below tb/<same path>
                    cbs = tracking.callbacks(cfg.to_dict(), str(run_dir.relative_to(out))) if tracking else ()
                    m = train(cfg, overwrite=overwrite, dist=dist, callbacks=cbs)
                runs.append({"variant": v.label, "shots": k, "seed": s, "test_top1": m["test_top1"],
                             "test_balanced_top1": m.get("test_balanced_top1"), "val_top1": m["val_top1"], "tuned_params": m["tuned_params"],
                             "train_seconds": m["train_seconds"], "dir": str(run_dir)})
                if dist.is_main:
                    _write(out, runs, variants, shots)
    return _write(out, runs, variants, shots) if dist.is_main else summarise_result(runs, variants, shots)


def check_imbalance(imbalance: float | None, shots: list[int]) -> None:
    """With ``imbalance`` R, a K-shot run keeps K images of its head class down to ``int(K / R)``
    of its tail class (n_max = K, :func:`vistune.data.loader.longtail_plan`); refuse, before the
    first run, a K whose tail would be empty (that does not depend on the number of classes)."""
    if imbalance is None or imbalance <= 1:
        return

    bad = [k for k in shots if longtail_counts(k, imbalance, 2)[-1] < 1]
    if bad:
        raise ConfigError(f"--imbalance {imbalance:g} with --shots {bad[0]}: the tail class would keep "
                          f"int({bad[0]} * (1/{imbalance:g})) = 0 images; use more shots or a smaller --imbalance")


def summarise_result(runs: list[dict[str, Any]], variants: list[Variant], shots: list[int]) -> dict[str, Any]:
    return {"shots": shots, "variants": [v.label for v in variants], "table": summarise(runs, variants, shots),
            "runs": runs}


def summarise(runs: list[dict[str, Any]], variants: list[Variant], shots: list[int]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for v in variants:
        table[v.label] = {}
        for k in shots:
            accs = [r["test_top1"] for r in runs if r["variant"] == v.label and r["shots"] == k]
            if accs:
                table[v.label][str(k)] = {
                    "mean": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "n": len(accs),
                }
    return table


def markdown(table: dict[str, Any], shots: list[int]) -> str:
    lines = ["| variant | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    for label, row in table.items():
        cells = [f"{row[str(k)]['mean']:.1f} ± {row[str(k)]['std']:.1f}" if str(k) in row else "-" for k in shots]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: dict[str, Any], shots: list[int], path: Path, title: str = "") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, row in table.items():
        ks = [k for k in shots if str(k) in row]
        if not ks:
            continue
        mean = [row[str(k)]["mean"] for k in ks]
        std = [row[str(k)]["std"] for k in ks]
        ax.plot(ks, mean, marker="o", label=label)
        ax.fill_between(ks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title or "few-shot transfer (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)


def _write(out: Path, runs, variants, shots) -> dict[str, Any]:
    result = summarise_result(runs, variants, shots)
    write_json_atomic(out / "fewshot.json", result)
    write_text_atomic(out / "fewshot.md", markdown(result["table"], shots) + "\n")
    plot(result["table"], shots, out / "fewshot.png")
    return result
