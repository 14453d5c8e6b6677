"""Fixtures for the reliability suite: a tiny corpus, tiny encoders and params files in
tmp paths, and a way to run the real commands in child processes (killed ones too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from msvse.train import synthetic  # noqa: E402

BIN = Path(sys.executable).parent


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **extra}


def run(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """A command in a child process; its output is kept for the assertions."""
    return subprocess.run(args, env=child_env(**env), capture_output=True, text=True, timeout=timeout)


def script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def torch_threads():
    """Runs in this process (fixtures included) set optim.threads; later tests, which
    compare in-process and child-process results bit for bit, must find torch's thread
    count as it was before this folder's tests."""
    yield
    torch.set_num_threads(THREADS)


@dataclass
class Corpus:
    train: Path
    valid: Path
    test: Path
    features: list[Path]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """32 train posts (no long ones: 32 windows, which 2 processes share evenly), 8 dev,
    8 test, and shards for every image."""
    root = tmp_path_factory.mktemp("corpus")
    train = synthetic.synthetic_posts(32, seed=11, prefix="tr")
    valid = synthetic.synthetic_posts(8, seed=12, prefix="dv")
    test = synthetic.synthetic_posts(8, seed=13, prefix="te")
    paths = [synthetic.write_posts(root / f"{n}.txt", p) for n, p in (("train", train), ("valid", valid), ("test", test))]
    features = synthetic.write_features(root / "features", [p.image_file for p in train + valid + test])
    return Corpus(*paths, features)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT with its usual dropout (0.1), so resumed runs must restore the RNGs."""
    return synthetic.write_encoder(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def bert_no_dropout(tmp_path_factory) -> Path:
    """The same tiny BERT with dropout off inside the encoder (its config's
    hidden_dropout_prob and attention_probs_dropout_prob), for runs that must agree
    across process counts: each process draws its own dropout masks."""
    folder = synthetic.write_encoder(tmp_path_factory.mktemp("bert_no_dropout"))
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def train_section(corpus: Corpus, encoder: Path, output: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """The train section of a params file for the tiny corpus, CPU, one thread."""
    section: dict[str, Any] = {
        "data": {
            "train": str(corpus.train),
            "valid": str(corpus.valid),
            "test": str(corpus.test),
            "features": [str(p) for p in corpus.features],
        },
        "model": {"encoder": str(encoder), "label_tokens": 8, "caption_tokens": 12, "max_length": 40},
        "optim": {"epochs": 2, "batch_size": 8, "lr_encoder": 1e-3, "lr_heads": 1e-3, "device": "cpu", "threads": 1},
        "output": str(output),
    }
    for name, values in sections.items():
        section.setdefault(name, {}).update(values)
    return section


def write_params(path: Path, section: dict[str, Any], stage: str = "train") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({stage: section}), encoding="utf-8")
    return path


class Tools:
    """The helpers above, for test modules (which cannot import this conftest)."""

    bin = BIN
    run = staticmethod(run)
    script = staticmethod(script)
    train_section = staticmethod(train_section)
    write_params = staticmethod(write_params)


@pytest.fixture(scope="session")
def tools() -> type[Tools]:
    return Tools
