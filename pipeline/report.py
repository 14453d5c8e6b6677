"""The report stage: pictures and a short score file from one training run.

Reads the run folder ``msvse-train`` wrote (``metrics.json``, ``plots/epochs.csv``) and
writes into ``out_dir``:

=======================  ===============================================================
``learning_curves.png``  train loss and dev precision / recall / F1 per epoch, the best
                         epoch (the checkpoint that was tested) marked
``per_type_f1.png``      F1 per entity type and micro overall, dev and test side by side
``per_type_dev.csv``     the bars' numbers, one file per split, for ``dvc plots``
``per_type_test.csv``
``scores.json``          micro P/R/F1 and per-type F1 in percent, dev and test: the few
                         numbers ``dvc exp show`` should list, next to the full
                         ``metrics.json``
``report.json``          resolved config and provenance
=======================  ===============================================================

The same inputs give byte-identical CSV and JSON score files (no timestamps in them), so
DVC sees an unchanged report when the run did not change.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msvse.config import to_dict
from msvse.errors import MsvseError
from msvse.io import atomic_path, write_json_atomic, write_resolved_config, write_text_atomic
from msvse.twitter import ENTITY_TYPES

SPLITS = ("dev", "test")
OVERALL = "overall"


@dataclass(frozen=True)
class ReportConfig:
    """The ``report`` section of ``params.yaml``."""

    run: str = "runs/demo"  # the run folder msvse-train wrote (its train.output)
    out_dir: str = "reports"  # the folder dvc.yaml lists the report's outputs in
    title: str = "MSVSE"  # heads both pictures


class ReportError(MsvseError):
    """The run folder lacks a file the report needs, or holds a malformed one."""


# --------------------------------------------------------------------------- reading


def read_metrics(path: Path) -> dict[str, Any]:
    """``metrics.json`` of a run, checked for the dev and test scores the report draws."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path}: not found; msvse-train writes it at the end of a run (train.output)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not a metrics JSON file ({exc})") from None
    for split in SPLITS:
        scores = data.get(split) if isinstance(data, dict) else None
        if not isinstance(scores, dict) or not isinstance(scores.get("per_type"), dict):
            raise ReportError(f"{path}: no '{split}' scores with 'per_type' in it; was it written by msvse-train?")
        for key in ("precision", "recall", "f1"):
            if not isinstance(scores.get(key), (int, float)):
                raise ReportError(f"{path}: {split}.{key} is missing or not a number")
    return data


def read_epochs(path: Path) -> list[dict[str, float]]:
    """Rows of ``plots/epochs.csv`` as numbers (epoch, train_loss, dev_precision, ...)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: not found; msvse-train writes it after every epoch") from None
    rows = []
    for line, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        try:
            rows.append({key: float(value) for key, value in row.items() if key is not None})
        except (TypeError, ValueError):
            raise ReportError(f"{path}:{line}: expected numbers in every column") from None
    needed = {"epoch", "train_loss", "dev_precision", "dev_recall", "dev_f1"}
    if not rows or not needed <= rows[0].keys():
        raise ReportError(f"{path}: expected a header with {', '.join(sorted(needed))} and one row per epoch")
    return rows


# --------------------------------------------------------------------------- numbers


def pct(value: float) -> float:
    return round(100.0 * float(value), 2)


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The short score file: per split micro P/R/F1 and per-type F1, in percent."""
    out: dict[str, Any] = {}
    for split in SPLITS:
        s = metrics[split]
        row = {"f1": pct(s["f1"]), "precision": pct(s["precision"]), "recall": pct(s["recall"])}
        for etype in ENTITY_TYPES:
            row[etype] = pct(s["per_type"].get(etype, {}).get("f1", 0.0))
        out[split] = row
    if "best_epoch" in metrics:
        out["best_epoch"] = metrics["best_epoch"]
    return out


def per_type_rows(metrics: dict[str, Any], split: str) -> list[dict[str, Any]]:
    s = metrics[split]
    rows = []
    for etype in (*ENTITY_TYPES, OVERALL):
        r = s if etype == OVERALL else s["per_type"].get(etype, {})
        rows.append(
            {
                "type": etype,
                "f1": pct(r.get("f1", 0.0)),
                "precision": pct(r.get("precision", 0.0)),
                "recall": pct(r.get("recall", 0.0)),
                "gold": int(r.get("gold", 0)),
            }
        )
    return rows


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# --------------------------------------------------------------------------- pictures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def draw_learning_curves(epochs: list[dict[str, float]], best_epoch: int | None, title: str, path: Path) -> None:
    plt = _pyplot()
    x = [int(r["epoch"]) for r in epochs]
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    loss = [r["train_loss"] for r in epochs]
    ax_loss.plot(x, loss, marker="o", color="tab:red")
    if min(loss) > 0 and max(loss) / min(loss) > 20:
        ax_loss.set_yscale("log")  # the first epoch's loss would flatten the rest
    ax_loss.set(title="train loss (eq 25), epoch mean", xlabel="epoch", ylabel="loss")
    for key, style in (("dev_f1", "-o"), ("dev_precision", "--"), ("dev_recall", ":")):
        ax_dev.plot(x, [100 * r[key] for r in epochs], style, label=key.replace("dev_", ""))
    ax_dev.set(title="dev scores per epoch", xlabel="epoch", ylabel="%", ylim=(0, 100))
    for ax in (ax_loss, ax_dev):
        ax.grid(alpha=0.3)
        ax.set_xticks(x if len(x) <= 15 else x[:: math.ceil(len(x) / 15)])
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1)
    if best_epoch:
        ax_dev.annotate(f"best epoch {best_epoch}", (best_epoch, 4), ha="center", fontsize=8, color="grey",
                        backgroundcolor="white")
    ax_dev.legend(loc="center right")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def draw_per_type(metrics: dict[str, Any], title: str, path: Path) -> None:
    plt = _pyplot()
    names = [*ENTITY_TYPES, OVERALL]
    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    width = 0.38
    for i, (split, color) in enumerate(zip(SPLITS, ("tab:blue", "tab:orange"))):
        rows = {r["type"]: r for r in per_type_rows(metrics, split)}
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        values = [rows[n]["f1"] for n in names]
        bars = ax.bar(xs, values, width, label=split, color=color)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8, padding=2)
    gold = {r["type"]: r["gold"] for r in per_type_rows(metrics, "test")}
    ax.set_xticks(range(len(names)), [f"{'micro' if n == OVERALL else n}\n{gold[n]} in test" for n in names])
    ax.set(ylabel="F1 (%)", ylim=(0, 109), title=f"{title}: F1 per entity type (best epoch's checkpoint)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    plt = _pyplot()
    with atomic_path(path) as tmp:
        # No date in the file: the same run gives the same picture.
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


# --------------------------------------------------------------------------- driver


def write_report(cfg: ReportConfig) -> dict[str, Any]:
    """Write the report of the run ``cfg.run`` into ``cfg.out_dir``; return the short scores."""
    run, out = Path(cfg.run), Path(cfg.out_dir)
    metrics = read_metrics(run / "metrics.json")
    epochs = read_epochs(run / "plots" / "epochs.csv")
    scores = summary(metrics)
    out.mkdir(parents=True, exist_ok=True)
    draw_learning_curves(epochs, metrics.get("best_epoch"), cfg.title, out / "learning_curves.png")
    draw_per_type(metrics, cfg.title, out / "per_type_f1.png")
    for split in SPLITS:
        write_text_atomic(out / f"per_type_{split}.csv", _csv(per_type_rows(metrics, split)))
    write_json_atomic(out / "scores.json", scores)
    write_resolved_config(out / "report.json", "report", to_dict(cfg))
    return scores


def format_summary(scores: dict[str, Any]) -> str:
    """Test and dev F1 per type, in percent, as a small table."""
    head = f"{'':<6}" + "".join(f"{n:>8}" for n in (*ENTITY_TYPES, "micro"))
    lines = [head]
    for split in SPLITS:
        s = scores[split]
        lines.append(f"{split:<6}" + "".join(f"{s[n]:>8.2f}" for n in ENTITY_TYPES) + f"{s['f1']:>8.2f}")
    return "\n".join(lines)
