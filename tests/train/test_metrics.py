"""Scoring equals seqeval (conlleval counting) on the edge cases; msvse-eval checks alignment."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from seqeval.metrics import f1_score, precision_score, recall_score

from msvse.train.cli import eval_main
from msvse.train.metrics import score
from msvse.twitter import Post, entities, format_posts

CASES = {
    "orphan I-": (
        [["O", "I-PER", "I-PER", "O"], ["I-LOC"]],
        [["O", "B-PER", "I-PER", "O"], ["B-LOC"]],
    ),
    "type change inside a span": (
        [["B-PER", "I-PER", "I-ORG", "O"], ["B-LOC", "I-MISC"]],
        [["B-PER", "I-PER", "B-ORG", "O"], ["B-LOC", "I-LOC"]],
    ),
    "empty posts": (
        [[], ["B-ORG"], [], ["O", "B-MISC"]],
        [[], ["B-ORG"], [], ["O", "O"]],
    ),
    "no entities at all": ([["O", "O"], []], [["O", "O"], []]),
    "only predicted entities": ([["O", "O"]], [["B-PER", "O"]]),
    "adjacent B-": ([["B-PER", "B-PER", "I-PER"]], [["B-PER", "I-PER", "I-PER"]]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_score_equals_seqeval_default_mode(name):
    gold, pred = CASES[name]
    s = score(gold, pred)
    assert s["precision"] == pytest.approx(precision_score(gold, pred, zero_division=0))
    assert s["recall"] == pytest.approx(recall_score(gold, pred, zero_division=0))
    assert s["f1"] == pytest.approx(f1_score(gold, pred, zero_division=0))
    # Counts agree with the project's own conlleval counter.
    assert s["gold"] == sum(len(entities(row)) for row in gold)
    assert s["predicted"] == sum(len(entities(row)) for row in pred)
    for etype, row in s["per_type"].items():
        assert row["gold"] == sum(1 for r in gold for e in entities(r) if e.type == etype)


def test_orphan_i_and_type_change_count_as_conlleval_does():
    gold, pred = CASES["orphan I-"]
    assert score(gold, pred)["f1"] == 1.0  # I-PER I-PER is one PER entity, like B-PER I-PER
    s = score(*CASES["type change inside a span"])
    # Gold PER, ORG (the type change starts it), LOC, MISC; the predicted LOC runs one token long.
    assert (s["gold"], s["predicted"], s["correct"]) == (4, 3, 2)


def _write(tmp_path, name, posts):
    path = tmp_path / name
    path.write_text(format_posts(posts), encoding="utf-8")
    return path


def test_msvse_eval_prints_seqeval_scores(tmp_path):
    gold = [Post("1", ("George", "Zimmerman", "in", "Paris"), ("B-PER", "I-PER", "O", "B-LOC")), Post("2", (), ())]
    pred = [Post("1", gold[0].tokens, ("B-PER", "I-PER", "O", "O")), Post("2", (), ())]
    g, p = _write(tmp_path, "gold.txt", gold), _write(tmp_path, "pred.txt", pred)
    result = CliRunner().invoke(eval_main, [str(g), str(p), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["precision"] == 1.0 and data["recall"] == 0.5
    assert data["per_type"]["LOC"]["gold"] == 1 and data["per_type"]["LOC"]["correct"] == 0
    table = CliRunner().invoke(eval_main, [str(g), str(p)])
    assert "overall" in table.output and "66.67" in table.output


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda posts: [posts[0], Post("2", ("other",), ("O",))], r"pred.txt:\d+: post IMGID:2 .*tokens"),
        (lambda posts: [posts[0], Post("9", ("b",), ("O",))], r"pred.txt:\d+: post IMGID:9 differs .*IMGID:2"),
        (lambda posts: posts[:1], r"pred.txt: has 1 posts .*IMGID:2"),
    ],
    ids=["tokens", "image id", "missing post"],
)
def test_msvse_eval_names_the_first_mismatching_post(tmp_path, change, message):
    gold = [Post("1", ("a",), ("O",)), Post("2", ("b",), ("B-PER",))]
    g = _write(tmp_path, "gold.txt", gold)
    p = _write(tmp_path, "pred.txt", change(gold))
    result = CliRunner().invoke(eval_main, [str(g), str(p)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    import re

    assert re.search(message, result.output), result.output
