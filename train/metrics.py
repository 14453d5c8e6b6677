"""Entity-level scores the way every published Twitter-2015/2017 number is scored.

seqeval's default mode, which counts entities the conlleval way: an ``I-T`` with no
``B-T`` before it starts an entity, a change of type inside a span starts a new one.
Every number is taken from seqeval's return values (``classification_report`` with
``output_dict=True`` for precision, recall and F1; ``get_entities`` for the counts),
never parsed from printed text.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from seqeval.metrics import classification_report
from seqeval.metrics.sequence_labeling import get_entities

from msvse.errors import DataFormatError
from msvse.twitter import ENTITY_TYPES, Post, read_posts


def score(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Precision, recall and F1 (fractions) micro overall and per type, with the gold,
    predicted and correct entity counts. ``gold`` and ``pred`` are tag rows per post."""
    gold = [list(row) for row in gold]
    pred = [list(row) for row in pred]
    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred)):
        raise ValueError("gold and predicted tags differ in shape")
    with warnings.catch_warnings():
        # seqeval warns about empty averages when a set has no entities; the zeros stand.
        warnings.simplefilter("ignore")
        report = classification_report(gold, pred, output_dict=True, zero_division=0)
    gold_sets = _entity_sets(gold)
    pred_sets = _entity_sets(pred)
    types = list(ENTITY_TYPES) + sorted((set(gold_sets) | set(pred_sets)) - set(ENTITY_TYPES))
    per_type = {}
    for t in types:
        row = report.get(t, {})
        g, p = gold_sets.get(t, set()), pred_sets.get(t, set())
        per_type[t] = {
            "precision": float(row.get("precision", 0.0)),
            "recall": float(row.get("recall", 0.0)),
            "f1": float(row.get("f1-score", 0.0)),
            "gold": len(g),
            "predicted": len(p),
            "correct": len(g & p),
        }
    micro = report["micro avg"]
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "gold": sum(r["gold"] for r in per_type.values()),
        "predicted": sum(r["predicted"] for r in per_type.values()),
        "correct": sum(r["correct"] for r in per_type.values()),
        "per_type": per_type,
    }


def _entity_sets(rows: list[list[str]]) -> dict[str, set[tuple[int, int]]]:
    found: dict[str, set[tuple[int, int]]] = {}
    for etype, start, end in get_entities(rows):
        found.setdefault(etype, set()).add((start, end))
    return found


def format_scores(scores: dict, title: str = "") -> str:
    """A small table in percent, for people (files get the JSON)."""
    lines = [title] if title else []
    lines.append(f"{'type':<8}{'P':>8}{'R':>8}{'F1':>8}{'gold':>8}{'pred':>8}{'correct':>9}")
    rows = list(scores["per_type"].items()) + [("overall", scores)]
    for name, r in rows:
        lines.append(
            f"{name:<8}{100 * r['precision']:>8.2f}{100 * r['recall']:>8.2f}{100 * r['f1']:>8.2f}"
            f"{r['gold']:>8}{r['predicted']:>8}{r['correct']:>9}"
        )
    return "\n".join(lines)


def check_aligned(gold: Sequence[Post], pred: Sequence[Post], gold_path: str, pred_path: str) -> None:
    """Prediction posts must be the gold posts, in order, with the same tokens; the
    first post that differs is named with its file, line and image id."""
    for g, p in zip(gold, pred):
        if g.image_id != p.image_id or g.tokens != p.tokens:
            what = "image id" if g.image_id != p.image_id else "tokens"
            raise DataFormatError(
                pred_path,
                p.line,
                f"post IMGID:{p.image_id} differs from gold post IMGID:{g.image_id} "
                f"({gold_path}:{g.line}) in its {what}",
            )
    if len(gold) != len(pred):
        shorter, n = (pred_path, len(pred)) if len(pred) < len(gold) else (gold_path, len(gold))
        extra = gold[n] if len(gold) > n else pred[n]
        raise DataFormatError(
            shorter,
            None,
            f"has {n} posts but the other file has more; first unmatched post IMGID:{extra.image_id} "
            f"at {extra.source}:{extra.line}",
        )


def evaluate_files(gold_path: str | Path, pred_path: str | Path) -> dict:
    """Score a prediction file against gold, both in the Twitter format."""
    gold = read_posts(gold_path)
    pred = read_posts(pred_path)
    check_aligned(gold, pred, str(gold_path), str(pred_path))
    return score([p.tags for p in gold], [p.tags for p in pred])


def to_json(scores: dict) -> str:
    return json.dumps(scores, indent=2)
