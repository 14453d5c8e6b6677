"""The demo pipeline end to end under DVC, on a shrunk configuration: every stage runs,
the metrics have their structure, a second run does nothing, and a caption setting
reaches only the stages after it."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from msvse.twitter import ENTITY_TYPES

from .conftest import dvc

SCORE_KEYS = {"precision", "recall", "f1"}
ALL_STAGES = {"demo", "tiny_models", "extract_grid", "extract_objects", "extract_caption", "train", "report"}


def ran(output: str) -> set[str]:
    """Stages a ``dvc repro`` output says it ran (or would run, with --dry)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def reproduced(small_project):
    result = dvc(small_project, "repro")
    return small_project, result.stdout + result.stderr


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_the_metrics(reproduced):
    project, output = reproduced
    assert ran(output) == ALL_STAGES
    metrics = json.loads((project / "runs/demo/metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["best_epoch"] == 1
    for split in ("dev", "test"):
        scores = metrics[split]
        assert SCORE_KEYS <= scores.keys()
        assert set(scores["per_type"]) >= set(ENTITY_TYPES)
        for etype in ENTITY_TYPES:
            row = scores["per_type"][etype]
            assert SCORE_KEYS <= row.keys() and all(0.0 <= row[k] <= 1.0 for k in SCORE_KEYS)
            assert row["gold"] >= row["correct"] >= 0
        assert scores["gold"] == sum(r["gold"] for r in scores["per_type"].values()) > 0
    # The demo's missing images reach training as no-image posts, counted per split.
    assert sum(metrics["inputs"][s]["no_image"] for s in ("train", "valid", "test")) > 0

    short = json.loads((project / "reports/scores.json").read_text())
    for split in ("dev", "test"):
        assert set(short[split]) == SCORE_KEYS | set(ENTITY_TYPES)
        assert short[split]["f1"] == round(100 * metrics[split]["f1"], 2)
    for name in ("learning_curves.png", "per_type_f1.png"):
        assert (project / "reports" / name).read_bytes().startswith(b"\x89PNG")
    rows = (project / "reports/per_type_test.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["type", "f1"] and len(rows) == 1 + len(ENTITY_TYPES) + 1


@pytest.mark.slow
def test_a_second_repro_does_nothing(reproduced):
    project, _ = reproduced
    output = dvc(project, "repro").stdout
    assert ran(output) == set()
    assert "up to date" in dvc(project, "status").stdout


@pytest.mark.slow
def test_metrics_and_plots_show(reproduced, tmp_path):
    project, _ = reproduced
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    files = next(iter(shown.values()))["data"]
    assert files["runs/demo/metrics.json"]["data"]["test"]["per_type"]["PER"].keys() >= SCORE_KEYS
    assert files["reports/scores.json"]["data"]["test"].keys() >= SCORE_KEYS
    dvc(project, "plots", "show", "--out", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    for title in ("Train loss per epoch", "Dev scores per epoch", "F1 per entity type"):
        assert title in page


@pytest.mark.slow
def test_a_caption_setting_reaches_only_caption_train_and_report(reproduced):
    project, _ = reproduced
    path = project / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    params["extract"]["caption"]["max_new_tokens"] += 1
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = dvc(project, "status").stdout
        assert set(re.findall(r"^(\w+):$", status, flags=re.M)) == {"extract_caption"}
        # The new captions change caption.h5, which training reads, and so the report.
        assert ran(dvc(project, "repro").stdout) == {"extract_caption", "train", "report"}
    finally:
        path.write_text(original)  # last test of the module: the project is not used again
