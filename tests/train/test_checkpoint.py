"""Checkpoints: a directory of JSON, a tokenizer and safetensors; reloads predict the same."""

from __future__ import annotations

import pickle
import shutil

import pytest
import torch

from msvse.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from msvse.train.trainer import make_optimizer, make_text_encoder


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_save_load_round_trip_predicts_identically(family, parts_for, bert_dir, roberta_dir, tmp_path, monkeypatch):
    parts = parts_for(bert_dir if family == "bert" else roberta_dir)
    parts.model.train()
    optimizer = make_optimizer(parts.model, parts.cfg)
    loss = parts.model(parts.collator(parts.train.items[:8])).loss
    loss.backward()
    optimizer.step()  # weights that differ from any initialisation
    parts.model.eval()
    batch = parts.collator(parts.valid.items)
    before = parts.model(batch, compute_loss=False).emissions
    tags_before = parts.model.predict(batch)
    save_checkpoint(tmp_path / "model", parts.model, parts.tokenizer, parts.cfg, max_length=parts.text.max_length, features=[])

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = load_checkpoint(tmp_path / "model")
    text = make_text_encoder(loaded.config, loaded.tokenizer, int(loaded.info["max_length"]))
    words = [parts.valid.posts[i].tokens for i in range(3)]
    assert text.word_pieces(words) == parts.text.word_pieces(words)
    assert loaded.config == parts.cfg
    after = loaded.model(batch, compute_loss=False).emissions
    assert torch.equal(before, after)
    assert loaded.model.predict(batch) == tags_before
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in (tmp_path / "model").rglob("*"))


@pytest.mark.parametrize("name", ["model.safetensors", "model.json", "encoder/config.json", "tokenizer", "labels.json"])
def test_a_missing_checkpoint_file_is_named(trained, tmp_path, name):
    copy = tmp_path / "model"
    shutil.copytree(trained.out / "model", copy)
    target = copy / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint file '{name}' is missing"):
        load_checkpoint(copy)


def test_weights_that_do_not_fit_the_config_are_refused(trained, tmp_path):
    import json

    copy = tmp_path / "model"
    shutil.copytree(trained.out / "model", copy)
    recorded = json.loads((copy / "config.json").read_text())
    recorded["config"]["ablation"]["multitask_decoder"] = False
    (copy / "config.json").write_text(json.dumps(recorded))
    with pytest.raises(CheckpointError, match="weights do not fit the model"):
        load_checkpoint(copy)
