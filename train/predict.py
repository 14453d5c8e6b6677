"""Applying a trained checkpoint to new posts.

- :func:`predict_file`: a Twitter-format file plus its feature shards -> the same file
  with predicted tags. Inputs go through the reader and the feature checks training uses.
- :func:`predict_post`: one image and one sentence; stage-1 extraction runs on the fly
  with the extraction settings the checkpoint recorded, and the entities come back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msvse.errors import ConfigError, MsvseError
from msvse.features import STATUS_NAMES, FeatureStore, ImageFeatures
from msvse.io import write_text_atomic
from msvse.train.checkpoint import Checkpoint, load_checkpoint
from msvse.train.data import Collator, FeatureLookup, MemoryFeatures, build_dataset, check_kinds
from msvse.train.trainer import make_text_encoder, predict_dataset, resolve_device
from msvse.twitter import Post, entities, format_posts, read_posts

log = logging.getLogger("msvse.train")


class Predictor:
    """A loaded checkpoint, ready to tag posts."""

    def __init__(self, model_dir: str | Path, device: str = "auto", batch_size: int = 64):
        self.device = resolve_device(device)
        self.checkpoint: Checkpoint = load_checkpoint(model_dir, device=str(self.device))
        self.config = self.checkpoint.config
        self.ablation = self.config.ablation
        self.grid_shape = self.checkpoint.model.grid_shape
        self.text = make_text_encoder(self.config, self.checkpoint.tokenizer, int(self.checkpoint.info["max_length"]))
        self.collator = Collator(self.text, self.ablation, self.grid_shape)
        self.batch_size = batch_size

    @property
    def kinds(self) -> list[str]:
        """Feature kinds the model reads."""
        return list(self.ablation.needed_kinds)

    def tag(self, posts: Sequence[Post], features: FeatureLookup | None) -> tuple[list[list[str]], dict[str, int]]:
        """Predicted tags per post, and the no-image report."""
        dataset = build_dataset(posts, self.text, self.ablation, features, self.grid_shape)
        rows = predict_dataset(
            self.checkpoint.model, dataset, self.collator, self.device, batch_size=self.batch_size, bf16=self.config.optim.bf16
        )
        return rows, dataset.report.as_dict()

    def open_store(self, paths: Sequence[str | Path]) -> FeatureStore | None:
        """The shards for a data file, checked like training's: the kinds the model
        needs, the grid size it was trained on, and the extraction settings."""
        if not self.kinds:
            return None
        if not paths:
            raise ConfigError(
                f"--features: this model reads {', '.join(self.kinds)} features; give the shard(s) with --features"
            )
        store = FeatureStore([str(p) for p in paths])
        check_kinds(self.ablation, store.kinds, store.paths)
        if "grid" in self.kinds and store.grid_shape != self.grid_shape:
            raise ConfigError(
                f"--features: grid features are {store.grid_shape}, but the model was trained on {self.grid_shape}"
            )
        trained = {json.dumps(r["config"], sort_keys=True) for r in self.checkpoint.features.get("shards", [])}
        given = {json.dumps(c, sort_keys=True) for c in store.configs.values()}
        if trained and given - trained:
            log.warning("the feature files were extracted with settings that differ from those the model was trained on")
        return store


def predict_file(
    model_dir: str | Path,
    data: str | Path,
    features: Sequence[str | Path],
    out: str | Path,
    *,
    device: str = "auto",
    batch_size: int = 64,
) -> dict[str, int]:
    """Tag every post of ``data`` and write them to ``out`` in the Twitter format.
    Returns the no-image report."""
    predictor = Predictor(model_dir, device=device, batch_size=batch_size)
    posts = read_posts(data, labelled=False)
    store = predictor.open_store(features)
    rows, report = predictor.tag(posts, store)
    write_text_atomic(out, format_posts(posts, rows))
    return report


def extract_features(predictor: Predictor, image: str | Path, device: str) -> ImageFeatures:
    """Stage-1 features of one image, extracted now with the settings recorded in the
    checkpoint (one extraction per distinct recorded config)."""
    from msvse.config import from_dict
    from msvse.extract.config import ExtractConfig
    from msvse.extract.run import extract_in_memory

    shards = predictor.checkpoint.features.get("shards", [])
    by_config: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for kind in predictor.kinds:
        record = next((r for r in shards if kind in r["kinds"]), None)
        if record is None:
            raise MsvseError(f"{kind!r} features: the checkpoint records no extraction settings for them")
        key = json.dumps(record["config"], sort_keys=True)
        by_config.setdefault(key, (record["config"], []))[1].append(kind)
    merged: dict[str, Any] = {"status": 0}
    for config_dict, kinds in by_config.values():
        config = from_dict(ExtractConfig, config_dict, source="checkpoint features.json", prefix="config")
        found = extract_in_memory([Path(image)], config, kinds, device)[0]
        merged["status"] = max(merged["status"], found.status)
        for name in ("grid", "labels", "scores", "caption"):
            if getattr(found, name) is not None:
                merged[name] = getattr(found, name)
    return ImageFeatures(image=Path(image).name, **merged)


def predict_post(model_dir: str | Path, image: str | Path, text: str, *, device: str = "auto") -> dict[str, Any]:
    """Entities of one post (``text`` split on whitespace) with its image."""
    tokens = tuple(text.split())
    if not tokens:
        raise ConfigError("--text: no words to tag")
    predictor = Predictor(model_dir, device=device, batch_size=1)
    post = Post(image_id=Path(image).name, tokens=tokens, tags=("O",) * len(tokens), source="--text", line=1)
    status = "ok"
    lookup = None
    if predictor.kinds:
        found = extract_features(predictor, image, str(predictor.device))
        found = dataclasses.replace(found, image=post.image_file)
        status = STATUS_NAMES.get(found.status, str(found.status))
        if status != "ok":
            log.warning("image %s is %s: tagging the text with a no-image input", image, status)
        lookup = MemoryFeatures([found])
    rows, _ = predictor.tag([post], lookup)
    tags = rows[0]
    return {
        "image": str(image),
        "image_status": status,
        "tokens": list(tokens),
        "tags": tags,
        "entities": [
            {"type": e.type, "text": " ".join(tokens[e.start : e.end]), "start": e.start, "end": e.end}
            for e in entities(tags)
        ],
    }

