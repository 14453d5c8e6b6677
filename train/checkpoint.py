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

The resume state of a run (``resume/``, see :func:`save_resume_state`) is written the
same way after every epoch, also without pickle:

    resume/
      state.json           epoch, best dev F1 and epoch, history, world size, the config,
                           and the optimizer's and scheduler's state with every tensor
                           replaced by a reference into state.safetensors
      model.safetensors    the weights at the end of that epoch
      state.safetensors    the optimizer's tensors and each rank's RNG states (uint8)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from msvse.config import from_dict, to_dict
from msvse.errors import MsvseError
from msvse.features import check_header
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

    def fill(tmp: Path) -> None:
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

    return write_dir(folder, fill)


# --------------------------------------------------------------------------- whole directories


def write_dir(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """Let ``fill`` write a temporary directory beside ``folder``, flush it to disk,
    then put it in ``folder``'s place. A kill at any moment leaves the old directory or
    the new one: between the two renames only ``.NAME.old`` exists, and
    :func:`recover_dir` puts it back. A write that fails (a full disk) is a
    :class:`CheckpointError` naming ``folder``, and the old directory stays."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(folder)
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    old = folder.with_name(f".{folder.name}.old")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would outlive the rename
    try:
        try:
            fill(tmp)
            _fsync_tree(tmp)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(
                f"{folder}: cannot write ({_reason(exc)}); the previous version, if any, is kept"
            ) from None
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def recover_dir(folder: str | Path) -> None:
    """Undo a replacement that a kill interrupted between its two renames."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and old.is_dir():
        old.rename(folder)


def _fsync_tree(folder: Path) -> None:
    # The renames must not reach the disk before the files do (power loss, not only kills).
    for path in [p for p in folder.rglob("*") if p.is_file()] + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


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
    recover_dir(folder)
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
    try:
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(folder / "encoder"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'encoder'}: not a readable encoder config ({_reason(exc)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'tokenizer'}: not a readable tokenizer ({_reason(exc)})") from None
    grid_shape = tuple(info["grid_shape"]) if info.get("grid_shape") else None
    model = build_model(config, encoder, grid_shape)
    load_weights(model, folder / "model.safetensors", "the model its config describes")
    model.to(device).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, config=config, info=info, features=features)


def load_weights(model: torch.nn.Module, path: Path, what: str, device: str = "cpu") -> None:
    """Load a safetensors file into ``model``; an unreadable file, or weights that do
    not fit ``what``, is a :class:`CheckpointError` naming the file."""
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=device)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_reason(exc)})") from None
    if missing or unexpected:
        names = (list(missing) + list(unexpected))[:3]
        raise CheckpointError(
            f"{path}: weights do not fit {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {', '.join(names)})"
        )


# --------------------------------------------------------------------------- resume state

RESUME_FILES = ("state.json", "model.safetensors", "state.safetensors")


@dataclass
class ResumeState:
    """What :func:`read_resume_state` found: ``info`` is state.json, ``tensors`` every
    tensor of state.safetensors (the weights stay on disk until :meth:`restore`)."""

    folder: Path
    info: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def rng(self, rank: int) -> dict[str, torch.Tensor]:
        prefix = f"rng.{rank}."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *, rank: int, device: torch.device) -> None:
        """Put the weights, the optimizer, the scheduler and this rank's RNGs back as
        they were when the state was written. The RNGs go last: building the objects
        above may draw from them."""
        load_weights(model, self.folder / "model.safetensors", "this run's model", device=str(device))
        for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
            try:
                target.load_state_dict(_attach(self.info[name], self.tensors, self.folder))
            except (KeyError, ValueError, TypeError) as exc:
                raise CheckpointError(f"{self.folder / 'state.json'}: the {name} state does not fit this run ({exc})") from None
        rng = self.rng(rank)
        if not {"python", "numpy", "scalars", "torch"} <= rng.keys():
            raise CheckpointError(f"{self.folder / 'state.safetensors'}: no random-number state for rank {rank}")
        set_rng_state(rng, device)


def save_resume_state(
    folder: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    config: TrainConfig,
    progress: Mapping[str, Any],
    rng: Iterable[Mapping[str, torch.Tensor]],
) -> Path:
    """Write everything a run needs to go on exactly as if it had not stopped.
    ``progress``: JSON (epoch, best score, history); ``rng``: :func:`rng_state` of
    every rank, in rank order."""
    rng = list(rng)

    def fill(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        optimizer_json = _detach(optimizer.state_dict(), "optimizer", tensors)
        scheduler_json = _detach(scheduler.state_dict(), "scheduler", tensors)
        for rank, states in enumerate(rng):
            for name, tensor in states.items():
                tensors[f"rng.{rank}.{name}"] = tensor.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "state.safetensors"))
        info = {
            "stage": "train",
            **progress,
            "world_size": len(rng),
            "config": to_dict(config),
            "optimizer": optimizer_json,
            "scheduler": scheduler_json,
            **provenance(),
        }
        write_json_atomic(tmp / "state.json", info)

    return write_dir(folder, fill)


def read_resume_state(folder: str | Path) -> ResumeState:
    """The resume state in ``folder``; a missing or unreadable file is named."""
    folder = Path(folder)
    recover_dir(folder)
    for name in RESUME_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: resume file '{name}' is missing")
    info = _read_json(folder, "state.json")
    for key in ("epoch", "best_f1", "best_epoch", "history", "world_size", "config", "optimizer", "scheduler"):
        if key not in info:
            raise CheckpointError(f"{folder / 'state.json'}: key '{key}' is missing")
    try:
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{folder / 'state.safetensors'}: not a readable safetensors file ({_reason(exc)})") from None
    return ResumeState(folder, info, tensors)


# Optimizer and scheduler states are nested dicts, lists and tuples of numbers and
# tensors, with integer keys: in JSON a dict becomes {"dict": [[key, value], ...]}, a
# tuple {"tuple": [...]}, a tensor {"tensor": NAME} (its data in state.safetensors).


def _detach(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(obj, Mapping):
        return {"dict": [[k, _detach(v, f"{name}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [_detach(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_detach(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{name}: a {type(obj).__name__} cannot be stored without pickle")


def _attach(obj: Any, tensors: Mapping[str, torch.Tensor], folder: Path) -> Any:
    if isinstance(obj, list):
        return [_attach(v, tensors, folder) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "tensor" in obj:
        if obj["tensor"] not in tensors:
            raise CheckpointError(f"{folder / 'state.safetensors'}: tensor '{obj['tensor']}' is missing")
        return tensors[obj["tensor"]]
    if "tuple" in obj:
        return tuple(_attach(v, tensors, folder) for v in obj["tuple"])
    return {k: _attach(v, tensors, folder) for k, v in obj["dict"]}


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random-number generators as tensors: the Mersenne Twister words
    of Python (624 + position) and NumPy (624), and torch's CPU (and CUDA) states, as
    uint8; the scalars beside them (Python's cached Gaussian; NumPy's position and
    cached Gaussian) as float64, which holds each exactly."""
    version, words, gauss = random.getstate()
    assert version == 3, version
    kind, np_words, pos, has_gauss, cached = np.random.get_state()
    assert kind == "MT19937", kind
    state = {
        "python": torch.from_numpy(np.asarray(words, np.uint32).view(np.uint8).copy()),
        "numpy": torch.from_numpy(np.asarray(np_words, np.uint32).view(np.uint8).copy()),
        "scalars": torch.tensor([gauss is not None, gauss or 0.0, pos, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Inverse of :func:`rng_state`."""
    words = tuple(int(w) for w in state["python"].numpy().view(np.uint32))
    has_py_gauss, py_gauss, pos, has_gauss, cached = state["scalars"].tolist()
    random.setstate((3, words, py_gauss if has_py_gauss else None))
    np.random.set_state(("MT19937", state["numpy"].numpy().view(np.uint32).copy(), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
