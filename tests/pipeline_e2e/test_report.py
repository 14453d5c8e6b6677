"""The report stage on a run folder written here: pictures, per-type CSVs, scores in
percent, and clear errors for a run that is not there."""

from __future__ import annotations

import json

import pytest

from msvse.pipeline.report import ReportConfig, ReportError, format_summary, write_report
from msvse.twitter import ENTITY_TYPES


def _scores(f1: float) -> dict:
    row = {"precision": f1, "recall": f1, "f1": f1, "gold": 10, "predicted": 10, "correct": round(10 * f1)}
    return {**row, "gold": 40, "per_type": {t: dict(row) for t in ENTITY_TYPES}}


def _run(folder, epochs=3):
    (folder / "plots").mkdir(parents=True)
    metrics = {"best_epoch": 2, "epochs": epochs, "dev": _scores(0.9), "test": _scores(0.8765)}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    lines = ["epoch,train_loss,dev_precision,dev_recall,dev_f1,train_seconds,dev_seconds,data_wait"]
    lines += [f"{e},{10 / e},0.{e},0.{e},0.{e},1.0,0.1,0.01" for e in range(1, epochs + 1)]
    (folder / "plots" / "epochs.csv").write_text("\n".join(lines) + "\n")


def test_report_writes_pictures_csvs_and_percent_scores(tmp_path):
    _run(tmp_path / "run")
    cfg = ReportConfig(run=str(tmp_path / "run"), out_dir=str(tmp_path / "out"), title="t")
    scores = write_report(cfg)
    assert scores["test"]["f1"] == 87.65 and scores["dev"]["PER"] == 90.0 and scores["best_epoch"] == 2
    out = tmp_path / "out"
    assert json.loads((out / "scores.json").read_text()) == scores
    for name in ("learning_curves.png", "per_type_f1.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    rows = (out / "per_type_test.csv").read_text().splitlines()
    assert rows[0] == "type,f1,precision,recall,gold"
    assert [r.split(",")[0] for r in rows[1:]] == [*ENTITY_TYPES, "overall"]
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".csv", ".png") or p.name == "scores.json"}
    write_report(cfg)
    assert first == {n: (out / n).read_bytes() for n in first}  # same run, same files
    assert "87.65" in format_summary(scores).splitlines()[2]


def test_a_missing_or_broken_run_is_named(tmp_path):
    cfg = ReportConfig(run=str(tmp_path / "nowhere"), out_dir=str(tmp_path / "out"))
    with pytest.raises(ReportError, match=r"nowhere/metrics.json: not found; msvse-train writes it"):
        write_report(cfg)
    _run(tmp_path / "run")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"dev": {"f1": 1}}))
    with pytest.raises(ReportError, match=r"metrics.json: no 'dev' scores with 'per_type'"):
        write_report(ReportConfig(run=str(tmp_path / "run"), out_dir=str(tmp_path / "out")))
    _run(tmp_path / "run2")
    (tmp_path / "run2" / "plots" / "epochs.csv").write_text("epoch,train_loss\n1,abc\n")
    with pytest.raises(ReportError, match=r"epochs.csv:2: expected numbers"):
        write_report(ReportConfig(run=str(tmp_path / "run2"), out_dir=str(tmp_path / "out")))
