"""Fixtures for stage 2: tiny encoders saved with save_pretrained, synthetic posts in the
Twitter format and feature shards written with write_shard, all under tmp paths."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from msvse.config import from_dict  # noqa: E402
from msvse.train import synthetic  # noqa: E402
from msvse.train.config import TrainConfig  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine
    the threads' synchronisation costs more than the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return synthetic.write_encoder(tmp_path_factory.mktemp("bert"), family="bert")


@pytest.fixture(scope="session")
def roberta_dir(tmp_path_factory) -> Path:
    return synthetic.write_encoder(tmp_path_factory.mktemp("roberta"), family="roberta")


@dataclass
class Corpus:
    root: Path
    train: Path
    valid: Path
    test: Path
    features: list[Path]
    missing: str  # an image recorded as missing
    unreadable: str  # an image recorded as unreadable
    absent: str  # an image no shard holds


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """48 train posts (every 12th one long), 12 dev, 12 test; shards for all images but
    one, with one image missing and one unreadable."""
    root = tmp_path_factory.mktemp("corpus")
    train = synthetic.synthetic_posts(48, seed=1, prefix="tr", long_every=12)
    valid = synthetic.synthetic_posts(12, seed=2, prefix="dv")
    test = synthetic.synthetic_posts(12, seed=3, prefix="te")
    paths = [synthetic.write_posts(root / f"{n}.txt", p) for n, p in (("train", train), ("valid", valid), ("test", test))]
    images = [p.image_file for p in train + valid + test]
    absent, missing, unreadable = images[0], images[1], images[2]
    features = synthetic.write_features(
        root / "features", [i for i in images if i != absent], missing=[missing], unreadable=[unreadable]
    )
    return Corpus(root, *paths, features, missing, unreadable, absent)


def make_config(corpus: Corpus, encoder: Path, out: Path, **sections: dict[str, Any]) -> TrainConfig:
    """A real TrainConfig shrunk for CPU tests; ``sections`` override per section."""
    data: dict[str, Any] = {
        "data": {
            "train": str(corpus.train),
            "valid": str(corpus.valid),
            "test": str(corpus.test),
            "features": [str(p) for p in corpus.features],
            "token_cache": str(out.parent / "token-cache"),
        },
        "model": {"encoder": str(encoder), "label_tokens": 8, "caption_tokens": 12, "max_length": 40},
        "optim": {"epochs": 1, "batch_size": 8, "lr_encoder": 1e-3, "lr_heads": 1e-3, "device": "cpu"},
        "output": str(out),
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    return from_dict(TrainConfig, data, source="<test>", prefix="train")


@pytest.fixture
def config_for(corpus, bert_dir, tmp_path):
    def build(encoder: Path | None = None, **sections: dict[str, Any]) -> TrainConfig:
        return make_config(corpus, encoder or bert_dir, tmp_path / "run", **sections)

    return build


@dataclass
class Parts:
    """What train() builds, for tests that drive the pieces themselves."""

    cfg: TrainConfig
    tokenizer: Any
    model: Any
    text: Any
    collator: Any
    train: Any
    valid: Any
    store: Any


@pytest.fixture
def parts_for(config_for):
    from msvse.train.data import Collator, build_dataset
    from msvse.train.model import build_model
    from msvse.train.trainer import load_encoder, make_text_encoder, max_length, open_features, seed_everything
    from msvse.twitter import read_posts

    def build(encoder: Path | None = None, **sections: dict[str, Any]) -> Parts:
        cfg = config_for(encoder, **sections)
        seed_everything(cfg.optim.seed)
        tokenizer, enc = load_encoder(cfg.model.encoder)
        store = open_features(cfg)
        grid_shape = store.grid_shape if store is not None and "grid" in cfg.ablation.scales else None
        text = make_text_encoder(cfg, tokenizer, max_length(cfg, tokenizer, enc))
        train = build_dataset(read_posts(cfg.data.train), text, cfg.ablation, store, grid_shape)
        valid = build_dataset(read_posts(cfg.data.valid), text, cfg.ablation, store, grid_shape)
        model = build_model(cfg, enc, grid_shape)
        return Parts(cfg, tokenizer, model, text, Collator(text, cfg.ablation, grid_shape), train, valid, store)

    return build


@pytest.fixture(scope="session")
def trained(corpus, bert_dir, tmp_path_factory) -> TrainConfig:
    """One epoch of the full model on the corpus; its run folder holds a checkpoint."""
    from msvse.train.trainer import train

    cfg = make_config(corpus, bert_dir, tmp_path_factory.mktemp("trained") / "run")
    train(cfg)
    return cfg
