"""Training: the loss falls, every ablation trains, train() writes its files and scores
the test set once, NaN stops the run, bad configs name their key."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from msvse.errors import ConfigError
from msvse.features import write_shard
from msvse.train import trainer
from msvse.train.cli import train_main
from msvse.train.config import load_config
from msvse.train.trainer import TrainingDiverged, make_optimizer, train
from msvse.twitter import read_posts


def _step(parts, items, optimizer):
    batch = parts.collator(items)
    out = parts.model(batch)
    optimizer.zero_grad()
    out.loss.backward()
    optimizer.step()
    return out


def test_loss_falls_over_a_few_steps(parts_for):
    parts = parts_for(model={"dropout": 0.0})
    parts.model.train()
    optimizer = make_optimizer(parts.model, parts.cfg)
    items = parts.train.items[:8]
    losses = [_step(parts, items, optimizer).loss.item() for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_step_under_bf16_autocast(parts_for):
    # The CUDA path trains under bf16 autocast; CPU autocast runs the same dtype logic.
    parts = parts_for()
    parts.model.train()
    optimizer = make_optimizer(parts.model, parts.cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = parts.model(parts.collator(parts.train.items[:4]))
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    out.loss.backward()
    optimizer.step()
    parts.model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = parts.model.predict(parts.collator(parts.valid.items[:2]))
    assert [len(r) for r in rows] == [len(it.pieces) for it in parts.valid.items[:2]]


ABLATIONS = {
    "full": {},
    "no self-attention": {"self_attention": False},
    "no similarity": {"similarity": False},
    "no self-attention, no similarity": {"self_attention": False, "similarity": False},
    "no multi-task decoder": {"multitask_decoder": False},
    "no visual classifier": {"visual_classifier": False},
    "no consistency": {"consistency": False},
    "joint none": {"joint_input": "none"},
    "joint labels": {"joint_input": "labels"},
    "joint labels+caption": {"joint_input": "labels+caption"},
    "grid only": {"prefix_scales": ["grid"]},
    "grid+labels": {"prefix_scales": ["grid", "labels"]},
    "grid+caption": {"prefix_scales": ["grid", "caption"]},
    "labels only": {"prefix_scales": ["labels"]},
    "caption only": {"prefix_scales": ["caption"]},
    "no prefix": {"prefix": False},
    "no prefix, no classifier": {"prefix": False, "visual_classifier": False},
    "text only": {"text_only": True},
    "BERT-CRF": {"text_only": True, "multitask_decoder": False},
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_trains_a_step(name, parts_for):
    settings = ABLATIONS[name]
    parts = parts_for(ablation=settings)
    ab = parts.cfg.ablation
    parts.model.train()
    optimizer = make_optimizer(parts.model, parts.cfg)
    before = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    out = _step(parts, parts.train.items[:6], optimizer)
    assert math.isfinite(out.loss.item())
    expected = {"text"} if ab.text_only else {"text", "multimodal"}
    expected |= {"kl"} if ab.consistency and not ab.text_only else set()
    expected |= {"visual"} if ab.visual_classifier and not ab.text_only else set()
    assert set(out.losses) == expected
    assert parts.model.decoder.tasks == ((2, 5, 7, 11) if ab.multitask_decoder else (11,))
    assert hasattr(parts.model, "mapping") == (ab.prefix and not ab.text_only)
    changed = {n for n, p in parts.model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("encoder.") for n in changed)
    if ab.prefix and not ab.text_only:
        assert any(n.startswith("mapping.") for n in changed), "the prefix generator learns"
    parts.model.eval()
    assert [len(r) for r in parts.model.predict(parts.collator(parts.valid.items[:3]))] == [
        len(it.pieces) for it in parts.valid.items[:3]
    ]


def test_train_writes_its_outputs_and_scores_test_once(config_for, corpus, monkeypatch):
    cfg = config_for(optim={"epochs": 2})
    calls = []
    original = trainer.evaluate

    def spy(model, dataset, *args, **kwargs):
        calls.append(dataset.posts[0].image_id[:2])
        return original(model, dataset, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", spy)
    metrics = train(cfg)
    assert calls.count("te") == 1 and calls[-1] == "te", calls  # test: once, at the very end
    assert calls.count("dv") == 3  # each epoch, then once more with the reloaded best checkpoint
    out = cfg.out
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for split in ("dev", "test"):
        assert set(saved[split]["per_type"]) == {"PER", "LOC", "ORG", "MISC"}
        assert {"precision", "recall", "f1", "gold", "predicted", "correct"} <= set(saved[split])
    assert saved["test"]["gold"] == sum(1 for p in read_posts(corpus.test) for _ in __import__("msvse.twitter").twitter.entities(p.tags))
    assert saved["inputs"]["train"]["no_image"] == 3 and saved["inputs"]["train"]["missing"] == 1
    rows = list(csv.DictReader((out / "plots" / "epochs.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    best = max(range(2), key=lambda i: (float(rows[i]["dev_f1"]), -i))
    assert saved["best_epoch"] == best + 1
    # The reloaded best checkpoint scores dev exactly as it did when it was saved.
    assert saved["dev"]["f1"] == pytest.approx(float(rows[best]["dev_f1"]), abs=1e-6)
    predicted = read_posts(out / "predictions" / "test.txt")
    assert [p.tokens for p in predicted] == [p.tokens for p in read_posts(corpus.test)]
    assert (out / "model" / "model.safetensors").exists()
    resolved = json.loads((out / "train_config.json").read_text())
    assert resolved["stage"] == "train" and resolved["config"]["optim"]["epochs"] == 2


def test_a_nan_loss_stops_the_run(config_for, corpus, tmp_path):
    images = [p.image_file for p in read_posts(corpus.train) + read_posts(corpus.valid) + read_posts(corpus.test)]
    grid = np.full((len(images), 4, 6), np.inf, np.float32)
    bad = tmp_path / "inf_grid.h5"
    write_shard(bad, images, [0] * len(images), grid=grid)
    cfg = config_for(data={"features": [str(bad)]}, ablation={"prefix_scales": ["grid"], "joint_input": "none"})
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step 1 .*optim.lr"):
        train(cfg)


def _params(tmp_path, section):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": section}), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "section, message",
    [
        ({"optim": {"lr_encodr": 1e-5}}, r"train.optim.lr_encodr: unknown key"),
        ({"ablation": {"prefix": False, "joint_input": "none"}}, r"train.ablation: prefix is false and joint_input is 'none'"),
        ({"ablation": {"prefix_scales": []}}, r"train.ablation.prefix_scales: length must be >= 1"),
        ({"ablation": {"prefix_scales": ["grid", "grid"]}}, r"train.ablation: prefix_scales: a scale is named twice"),
        ({"ablation": {"joint_input": "pixels"}}, r"train.ablation.joint_input: expected one of"),
        ({"model": {"prefix_length": 0}}, r"train.model.prefix_length: value must be >= 1"),
    ],
)
def test_bad_train_config_names_the_key(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_params(tmp_path, section))


def test_features_lacking_a_needed_kind_name_the_setting(config_for, corpus):
    grid_only = [p for p in corpus.features if p.name == "grid.h5"]
    cfg = config_for(data={"features": [str(p) for p in grid_only]})
    with pytest.raises(ConfigError, match=r"ablation.prefix_scales: uses 'labels', but none of the feature files"):
        train(cfg)


def test_an_encoder_that_cannot_be_loaded_is_named(config_for, tmp_path):
    cfg = config_for(tmp_path / "no-such-encoder")
    with pytest.raises(ConfigError, match=r"model.encoder: cannot load the encoder '.*no-such-encoder'.*save_pretrained"):
        train(cfg)


def test_msvse_train_cli_runs_and_reports_errors_in_one_line(config_for, tmp_path):
    from msvse.config import to_dict

    cfg = to_dict(config_for())
    params = _params(tmp_path, cfg)
    result = CliRunner().invoke(train_main, ["--params", str(params), "--set", "optim.epochs=1", "--set", "ablation.consistency=false"])
    assert result.exit_code == 0, result.output
    assert "best epoch 1" in result.output
    resolved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert resolved["config"]["ablation"]["consistency"] is False
    bad = CliRunner().invoke(train_main, ["--params", str(params), "--set", "optim.epochz=1"])
    assert bad.exit_code == 2
    assert "train.optim.epochz: unknown key" in bad.output and "Traceback" not in bad.output


def test_count_params_builds_bert_base_size_without_downloading(tmp_path):
    result = CliRunner().invoke(train_main, ["--count-params", "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 0, result.output
    total = int(result.output.split("total")[1].split()[0].replace(",", ""))
    assert 118e6 < total < 120.5e6  # paper: 119.27 M
    assert "encoder" in result.output and "109,482,240" in result.output  # BertModel(BertConfig())
