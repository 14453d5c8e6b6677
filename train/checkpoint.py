"""Checkpoints: a directory that rebuilds the trained model without unpickling anything.

    model/
      config.json          resolved train config + provenance (what trained it)
      model.json           what the network was built with: grid shape, label map, encoder limit
      labels.json          the 11-tag label map (index -> tag)
      features.json        the feature shards' extraction configs and kinds (for msvse-predict)
      encoder/config.json  the encoder's transformers config
      tokenizer/           the tokenizer (save_pretrained)
      model.safetensors    every weight, the encoder's included

A missing file is a :class:`CheckpointError` naming it. The directory is written beside
its final place and renamed over it, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
from safetensors.torch import load_model, save_model

from msvse.config import from_dict, to_dict
from msvse.errors import MsvseError
from msvse.extract.features import check_header
from msvse.io import provenance, write_json_atomic
from msvse.train.config import TrainConfig
from msvse.train.data import TAG_LABELS
from msvse.train.model import MsvseModel, build_model

FILES = ("config.json", "model.json", "labels.json", "features.json", "encoder/config.json", "model.safetensors")


class CheckpointError(MsvseError, ValueError):
    """A checkpoint directory that is incomplete or was written for another label map."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode), its tokenizer and what built it."""

    model: MsvseModel
    tokenizer: Any
    config: TrainConfig
    info: dict[str, Any]
    features: dict[str, Any]


def shard_records(paths: list[str]) -> list[dict[str, Any]]:
    """Kinds and extraction config of each feature shard, as a checkpoint records them."""
    records = []
    for path in paths:
        with h5py.File(path, "r") as f:
            kinds = check_header(f, path)
            config = json.loads(f.attrs.get("config", "{}"))
        records.append({"path": str(path), "kinds": kinds, "config": config})
    return records


def save_checkpoint(
    folder: str | Path,
    model: MsvseModel,
    tokenizer: Any,
    config: TrainConfig,
    *,
    max_length: int,
    features: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` and all it needs to be rebuilt into ``folder`` (replaced whole)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "encoder").mkdir()
        model.encoder.config.to_json_file(tmp / "encoder" / "config.json")
        tokenizer.save_pretrained(tmp / "tokenizer")
        save_model(model, str(tmp / "model.safetensors"))
        write_json_atomic(tmp / "config.json", {"stage": "train", "config": to_dict(config), **provenance()})
        write_json_atomic(
            tmp / "model.json",
            {
                "grid_shape": list(model.grid_shape) if model.grid_shape else None,
                "max_length": max_length,
                "tags": list(TAG_LABELS),
                **(extra or {}),
            },
        )
        write_json_atomic(tmp / "labels.json", {str(i): t for i, t in enumerate(TAG_LABELS)})
        write_json_atomic(tmp / "features.json", {"shards": features})
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def _read_json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: checkpoint file '{name}' is missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / name}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def load_checkpoint(folder: str | Path, device: str = "cpu") -> Checkpoint:
    """Rebuild the model of a checkpoint directory: configs from JSON, weights from
    safetensors, tokenizer from its own folder. Nothing is unpickled."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint directory not found")
    for name in FILES + ("tokenizer",):
        if not (folder / name).exists():
            raise CheckpointError(f"{folder}: checkpoint file '{name}' is missing")
    recorded = _read_json(folder, "config.json")
    info = _read_json(folder, "model.json")
    labels = _read_json(folder, "labels.json")
    features = _read_json(folder, "features.json")
    if [labels[str(i)] for i in range(len(labels))] != list(TAG_LABELS):
        raise CheckpointError(f"{folder / 'labels.json'}: label map differs from this msvse's {list(TAG_LABELS)}")
    config = from_dict(TrainConfig, recorded.get("config"), source=str(folder / "config.json"), prefix="config")
    encoder_config = AutoConfig.from_pretrained(folder / "encoder")
    encoder = AutoModel.from_config(encoder_config)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    grid_shape = tuple(info["grid_shape"]) if info.get("grid_shape") else None
    model = build_model(config, encoder, grid_shape)
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    if missing or unexpected:
        names = (list(missing) + list(unexpected))[:3]
        raise CheckpointError(
            f"{folder / 'model.safetensors'}: weights do not fit the model its config describes "
            f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {', '.join(names)})"
        )
    model.to(device).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, info=info, features=features)
