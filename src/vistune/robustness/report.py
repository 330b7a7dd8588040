"""The robustness report: ``robustness.json`` (every number), ``robustness.md`` and two pictures.

Summary numbers, and why they are defined so:

* **mCA** (mean corruption accuracy): the mean top-1 over every (corruption, severity) cell.
* **CE / relative mCE**: Hendrycks & Dietterich normalise each corruption's error by AlexNet's,
  which no vistune user has; here the reference is ``--baseline RUN`` evaluated on the same images:
  ``CE_c = Σ_s err_run(c, s) / Σ_s err_baseline(c, s)`` and relative mCE = mean over c (1.0 = as
  robust as the baseline, lower is better). A corruption the baseline never gets wrong has no CE.
* **robust top-1**: the strongest attack (PGD when run, else FGSM) at the largest eps.
* **OOD top-1**: all OOD images pooled (correct / images).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vistune import __version__
from vistune.io import json_text, write_set_atomic
from vistune.precision import machine_info

FORMAT = "vistune.robustness/1"
FILES = ("robustness.md", "corruptions.png", "attacks.png", "robustness.json")


def corruption_summary(part: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """mCA, per-corruption mean accuracy and, against a baseline, CE per corruption and relative mCE."""
    acc = part["accuracy"]
    cells = [c["top1"] for sevs in acc.values() for c in sevs.values()]
    out: dict[str, Any] = {"mca": sum(cells) / len(cells) if cells else None,
                           "per_corruption": {n: sum(c["top1"] for c in s.values()) / len(s) for n, s in acc.items()}}
    if baseline is not None:
        ce = {}
        for name, sevs in acc.items():
            err = sum(100.0 - c["top1"] for c in sevs.values())
            ref = sum(100.0 - baseline["accuracy"][name][k]["top1"] for k in sevs)
            ce[name] = err / ref if ref > 0 else None
        valid = [v for v in ce.values() if v is not None]
        out.update(ce=ce, relative_mce=sum(valid) / len(valid) if valid else None,
                   baseline_mca=corruption_summary(baseline, None)["mca"])
    return out


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The few numbers ``vistune report`` shows as columns."""
    out: dict[str, Any] = {}
    cor = report.get("corruptions")
    if cor:
        out["mca"] = cor["summary"]["mca"]
        if "relative_mce" in cor["summary"]:
            out["relative_mce"] = cor["summary"]["relative_mce"]
    att = report.get("attacks")
    if att and att["accuracy"]:
        name = "pgd" if "pgd" in att["accuracy"] else next(iter(att["accuracy"]))
        label, cellv = max(att["accuracy"][name].items(), key=lambda kv: kv[1]["eps"])
        out.update(robust_top1=cellv["top1"], robust_at=f"{name} eps={label}")
    ood = report.get("ood")
    if ood:
        n = sum(o["n"] for o in ood)
        out["ood_top1"] = 100.0 * sum(o["correct"] for o in ood) / max(n, 1)
    return out


def build_report(s: Any, plan: Any, parts: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Everything into one JSON-able record: settings, the run's identity, each part, the headline."""
    # local: a cycle (vistune.workflows.robustness imports this module at its top)
    from vistune.workflows.robustness import settings_record

    run = plan.run
    report: dict[str, Any] = {
        "format": FORMAT, "vistune_version": __version__, "settings": settings_record(s), "run": run.identity,
        "class_names": run.class_names, "img_size": run.img_size, "num_images": len(plan.positions),
        "precision": run.precision.fields(), "machine": machine_info(), "seconds": round(seconds, 2),
    }
    if "corruptions" in parts:
        cor = dict(parts["corruptions"])
        cor["summary"] = corruption_summary(cor, parts.get("baseline"))
        if "baseline" in parts:
            cor["baseline"] = {"run": plan.baseline.identity, **parts["baseline"]}
        report["corruptions"] = cor
    if "attacks" in parts:
        report["attacks"] = parts["attacks"]
    if "ood" in parts:
        report["ood"] = parts["ood"]
    report["summary"] = headline(report)
    return report


def write_report(out: Path, report: dict[str, Any]) -> list[Path]:
    """robustness.md + the plots + robustness.json (last: it marks a finished report)."""
    text, md = json_text(report), markdown(report)
    writers = [("robustness.md", lambda tmp: tmp.write_text(md))]
    figs = []
    if report.get("corruptions"):
        figs.append(("corruptions.png", corruption_figure(report)))
    if report.get("attacks"):
        figs.append(("attacks.png", attack_figure(report)))
    for name, fig in figs:
        writers.append((name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110)))
    writers.append(("robustness.json", lambda tmp: tmp.write_text(text)))
    try:
        return write_set_atomic(out, writers)
    finally:
        import matplotlib.pyplot as plt

        for _, fig in figs:
            plt.close(fig)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """A human-readable page with every table of the report."""
    run, summ = report["run"], report["summary"]
    about = (f"{run['method']['name']} on {run['backbone']}, data `{run['data']}`, {report['num_images']} test "
             f"images at {report['img_size']} px; eval precision {report['precision']['precision']}; "
             f"{report['seconds']:.0f} s.")
    lines = [f"# Robustness of {run['tuned_file']}", "", about, ""]
    if summ:
        lines += ["| " + " | ".join(summ) + " |", "|" + "---|" * len(summ),
                  "| " + " | ".join(_pct(v) if isinstance(v, float) else str(v) for v in summ.values()) + " |", ""]
    if report.get("corruptions"):
        lines += _corruption_md(report["corruptions"])
    if report.get("attacks"):
        lines += _attack_md(report["attacks"])
    if report.get("ood"):
        lines += _ood_md(report["ood"])
    return "\n".join(lines) + "\n"


def _corruption_md(cor: dict[str, Any]) -> list[str]:
    sevs = sorted({k for s in cor["accuracy"].values() for k in s}, key=int)
    summ = cor["summary"]
    ce = summ.get("ce")
    head = ["corruption", *[f"s{k}" for k in sevs], "mean"] + (["CE"] if ce is not None else [])
    lines = ["## Corruptions (top-1 %)", "", f"clean {_pct(cor['clean']['top1'])}; mCA {_pct(summ['mca'])}"
             + (f"; relative mCE {_pct(summ.get('relative_mce'))} vs baseline (mCA {_pct(summ['baseline_mca'])})"
                if ce is not None else ""), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cells in cor["accuracy"].items():
        row = [name, *[_pct(cells[k]["top1"]) for k in sevs], _pct(summ["per_corruption"][name])]
        if ce is not None:
            row.append(_pct(ce[name]))
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _attack_md(att: dict[str, Any]) -> list[str]:
    labels = sorted({k for a in att["accuracy"].values() for k in a},
                    key=lambda k: next(a[k]["eps"] for a in att["accuracy"].values() if k in a))
    lines = ["## Attacks (L∞, untargeted; robust top-1 %: right both clean and attacked)", "",
             f"clean {_pct(att['clean']['top1'])} on the same images; {att['precision']['precision_reason']}", "",
             "| attack | " + " | ".join(f"eps {k}" for k in labels) + " |", "|---|" + "---|" * len(labels)]
    for name, cells in att["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(_pct(cells[k]["top1"]) if k in cells else "-" for k in labels) + " |")
    return lines + [""]


def _ood_md(ood: list[dict[str, Any]]) -> list[str]:
    head = "| data | top-1 | images | classes kept | dropped classes | dropped images |"
    lines = ["## Other data sets (top-1 %)", "", head, "|---|---|---|---|---|---|"]
    for o in ood:
        lines.append(f"| `{o['data']}` | {_pct(o['top1'])} | {o['n']} | {len(o['kept_classes'])} | "
                     f"{len(o['dropped_classes'])} | {o['dropped_images']} |")
    for o in ood:
        kept = "; ".join(f"{k} → {v}" for k, v in o["kept_classes"].items())
        lines += ["", f"`{o['data']}` kept: {kept}"]
    return lines + [""]


def corruption_figure(report: dict[str, Any]):
    """Small multiples: top-1 vs severity per corruption (severity 0 = clean); baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cor = report["corruptions"]
    names = list(cor["accuracy"])
    cols = min(5, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.0 * rows), sharex=True, sharey=True, squeeze=False)
    series = [("run", cor, "-o")] + ([("baseline", cor["baseline"], "--s")] if cor.get("baseline") else [])
    for ax, name in zip(axes.flat, names):
        for label, part, style in series:
            sevs = sorted(part["accuracy"][name], key=int)
            ax.plot([0, *map(int, sevs)], [part["clean"]["top1"], *[part["accuracy"][name][k]["top1"] for k in sevs]],
                    style, ms=3, label=label)
        ax.set_title(name.replace("_", " "), fontsize=8)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    axes[0][0].set_ylabel("top-1 %")
    if len(series) > 1:
        axes[0][0].legend(fontsize=6)
    fig.supxlabel("severity (0 = clean)", fontsize=9)
    fig.tight_layout()
    return fig


def attack_figure(report: dict[str, Any]):
    """Robust top-1 vs eps (in grey levels /255), one line per attack, clean at eps 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    att = report["attacks"]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, cells in att["accuracy"].items():
        pts = sorted((c["eps"], c["top1"]) for c in cells.values())
        ax.plot([0] + [e * 255 for e, _ in pts], [att["clean"]["top1"]] + [a for _, a in pts], "-o", ms=4,
                label=name.upper())
    ax.set_xlabel("eps (x/255, L∞)")
    ax.set_ylabel("top-1 %")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def robustness_summary(folder: str | os.PathLike) -> dict[str, Any]:
    """The headline of a run folder's robustness report (``robustness.json`` in it or in
    ``robustness/``), for ``vistune report``; {} when there is none or it is unreadable."""
    for path in (Path(folder) / "robustness.json", Path(folder) / "robustness" / "robustness.json"):
        if path.is_file():
            try:
                summary = dict(json.loads(path.read_text()).get("summary") or {})
            except (json.JSONDecodeError, OSError, AttributeError, UnicodeDecodeError, TypeError, ValueError):
                return {}
            if isinstance(summary.get("relative_mce"), float):  # a ratio: the table's 1 decimal is too coarse
                summary["relative_mce"] = f"{summary['relative_mce']:.3f}"
            return summary
    return {}


REPORT_COLUMNS = (("mca", "mCA"), ("relative_mce", "rel. mCE"), ("robust_top1", "robust top-1"),
                  ("ood_top1", "OOD top-1"))


def report_columns(rows: list[dict[str, Any]], base: tuple) -> tuple:
    """``base`` plus the robustness columns that at least one row has."""
    return tuple(base) + tuple(c for c in REPORT_COLUMNS if any(r.get(c[0]) is not None for r in rows))
