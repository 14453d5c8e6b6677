"""HDF5 feature shards, schema v1: the contract between stage 1 and stage 2.

One row per image. File attributes:

- ``format`` = ``"msvse-features"``, ``schema_version`` = 1
- ``kinds``: JSON list, a subset of ``["grid", "objects", "caption"]``
- ``config``: JSON, the resolved extraction config (model names or paths)
- ``msvse_version``

Datasets (N rows):

- ``ids`` (N,) UTF-8: image file name relative to the images folder, e.g. ``1015799.jpg``
- ``status`` (N,) int8: 0 ok, 1 unreadable, 2 missing
- ``grid`` (N, G, C) float16, regions in row-major order
- ``objects/labels`` (N, K) UTF-8, best first, ``""`` padding;
  ``objects/scores`` (N, K) float32; ``objects/boxes`` (N, K, 4) float32 (x1 y1 x2 y2,
  original-image pixels)
- ``caption`` (N,) UTF-8

Rows whose status is not 0 hold zeros and empty strings. :class:`FeatureStore` opens
one or more shards, joins the kinds by id and refuses shards of another format or
schema version, and an id that two shards claim for the same kind.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from msvse import __version__
from msvse.errors import MsvseError

FORMAT = "msvse-features"
SCHEMA_VERSION = 1
KINDS: tuple[str, ...] = ("grid", "objects", "caption")
STATUS_OK, STATUS_UNREADABLE, STATUS_MISSING = 0, 1, 2
STATUS_NAMES = {STATUS_OK: "ok", STATUS_UNREADABLE: "unreadable", STATUS_MISSING: "missing"}
STR_DTYPE = h5py.string_dtype(encoding="utf-8")


class FeatureFileError(MsvseError, ValueError):
    """A shard that is not a readable msvse-features v1 file, or shards that conflict."""


@dataclass(frozen=True)
class ImageFeatures:
    """The features of one image, joined over shards. A kind no shard holds is None;
    ``status`` is the worst status any shard recorded for the image."""

    image: str
    status: int
    grid: np.ndarray | None = None  # (G, C) float32
    labels: tuple[str, ...] | None = None
    scores: np.ndarray | None = None  # (n_labels,) float32
    caption: str | None = None


def _decode(values: Iterable[Any]) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def write_shard(
    path: str | Path,
    ids: Sequence[str],
    status: Sequence[int],
    *,
    grid: np.ndarray | None = None,
    labels: Sequence[Sequence[str]] | None = None,
    scores: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    captions: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Write a complete shard in one go (tests, tools and small sets). The kinds written
    are those given: ``grid``, ``objects`` (``labels`` with optional ``scores`` and
    ``boxes``) and ``caption``."""
    n = len(ids)
    kinds = [k for k, v in (("grid", grid), ("objects", labels), ("caption", captions)) if v is not None]
    with h5py.File(path, "w") as f:
        set_attributes(f, kinds, config or {})
        f.create_dataset("ids", data=np.array(list(ids), dtype=object), dtype=STR_DTYPE)
        f.create_dataset("status", data=np.asarray(status, dtype=np.int8))
        if grid is not None:
            grid = np.asarray(grid, dtype=np.float16)
            assert grid.shape[0] == n and grid.ndim == 3, grid.shape
            f.create_dataset("grid", data=grid, chunks=(1, *grid.shape[1:]))
        if labels is not None:
            k = max([len(row) for row in labels] + [1])
            table = np.array([list(row) + [""] * (k - len(row)) for row in labels] or [[""] * k], dtype=object)[:n]
            f.create_dataset("objects/labels", data=table, dtype=STR_DTYPE)
            if scores is None:
                scores = np.zeros((n, k), np.float32)
            if boxes is None:
                boxes = np.zeros((n, k, 4), np.float32)
            f.create_dataset("objects/scores", data=np.asarray(scores, np.float32))
            f.create_dataset("objects/boxes", data=np.asarray(boxes, np.float32))
        if captions is not None:
            f.create_dataset("caption", data=np.array(list(captions), dtype=object), dtype=STR_DTYPE)


def set_attributes(f: h5py.File, kinds: Sequence[str], config: Mapping[str, Any]) -> None:
    """The file attributes schema v1 requires."""
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["kinds"] = json.dumps(list(kinds))
    f.attrs["config"] = json.dumps(dict(config), sort_keys=True)
    f.attrs["msvse_version"] = __version__


def check_header(f: h5py.File, path: str) -> list[str]:
    """Validate a shard's attributes; return its kinds."""
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT:
        raise FeatureFileError(f"{path}: not an msvse feature file (format attribute is {fmt!r}, expected {FORMAT!r})")
    version = f.attrs.get("schema_version")
    if version is None or int(version) != SCHEMA_VERSION:
        raise FeatureFileError(
            f"{path}: schema_version {version!r} is not supported (this msvse reads {SCHEMA_VERSION}); "
            "re-run msvse-extract with this version"
        )
    try:
        kinds = json.loads(f.attrs.get("kinds", "[]"))
    except (TypeError, json.JSONDecodeError):
        raise FeatureFileError(f"{path}: attribute 'kinds' is not a JSON list") from None
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise FeatureFileError(f"{path}: unknown kind {unknown[0]!r} in attribute 'kinds'")
    for name in ["ids", "status"] + [{"objects": "objects/labels"}.get(k, k) for k in kinds]:
        if name not in f:
            raise FeatureFileError(f"{path}: dataset '{name}' is missing")
    return kinds


def shard_config(path: str | Path) -> dict[str, Any]:
    """The resolved extraction config recorded in a shard."""
    with _open(path) as f:
        check_header(f, str(path))
        return json.loads(f.attrs.get("config", "{}"))


def _open(path: str | Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise FeatureFileError(f"{path}: feature file not found") from None
    except OSError as exc:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({exc})") from None


class FeatureStore:
    """Read-only view over one or more shards, joined by image id.

    All rows are read into memory when opened: a few hundred MB for the Twitter sets
    (8,000 images, 49 x 2048 float16 grids); open only the shards a run needs.
    """

    def __init__(self, paths: Sequence[str | Path]):
        if not paths:
            raise FeatureFileError("no feature files given")
        self.paths = [str(p) for p in paths]
        self._status: dict[str, int] = {}
        self._grid: dict[str, np.ndarray] = {}
        self._labels: dict[str, tuple[str, ...]] = {}
        self._scores: dict[str, np.ndarray] = {}
        self._caption: dict[str, str] = {}
        self._owner: dict[tuple[str, str], str] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.grid_shape: tuple[int, int] | None = None
        for path in self.paths:
            self._load(path)

    @property
    def kinds(self) -> tuple[str, ...]:
        present = {kind for kind, _ in self._owner}
        return tuple(k for k in KINDS if k in present)

    def _claim(self, kind: str, image: str, path: str) -> None:
        other = self._owner.setdefault((kind, image), path)
        if other != path:
            raise FeatureFileError(f"{path}: image {image!r} already has '{kind}' features in {other}")

    def _load(self, path: str) -> None:
        with _open(path) as f:
            kinds = check_header(f, path)
            self.configs[path] = json.loads(f.attrs.get("config", "{}"))
            ids = _decode(f["ids"][()])
            status = f["status"][()].astype(int)
            if len(status) != len(ids):
                raise FeatureFileError(f"{path}: {len(ids)} ids but {len(status)} status values")
            if len(set(ids)) != len(ids):
                raise FeatureFileError(f"{path}: an image id appears twice in the same file")
            for image, st in zip(ids, status):
                if st not in STATUS_NAMES:
                    raise FeatureFileError(f"{path}: image {image!r} has unknown status {st}")
                self._status[image] = max(self._status.get(image, STATUS_OK), int(st))
            if "grid" in kinds:
                grid = f["grid"][()]
                if grid.ndim != 3 or grid.shape[0] != len(ids):
                    raise FeatureFileError(f"{path}: 'grid' has shape {grid.shape}, expected ({len(ids)}, G, C)")
                if self.grid_shape is not None and grid.shape[1:] != self.grid_shape:
                    raise FeatureFileError(f"{path}: grid shape {grid.shape[1:]} differs from {self.grid_shape} in another shard")
                self.grid_shape = tuple(grid.shape[1:])
                for image, row in zip(ids, grid):
                    self._claim("grid", image, path)
                    self._grid[image] = row
            if "objects" in kinds:
                labels = f["objects/labels"][()]
                scores = f["objects/scores"][()] if "objects/scores" in f else np.zeros(labels.shape, np.float32)
                for image, row, srow in zip(ids, labels, scores):
                    self._claim("objects", image, path)
                    names = tuple(x for x in _decode(row) if x)
                    self._labels[image] = names
                    self._scores[image] = np.asarray(srow[: len(names)], np.float32)
            if "caption" in kinds:
                for image, text in zip(ids, _decode(f["caption"][()])):
                    self._claim("caption", image, path)
                    self._caption[image] = text

    def __contains__(self, image: str) -> bool:
        return image in self._status

    def __len__(self) -> int:
        return len(self._status)

    @property
    def ids(self) -> list[str]:
        return sorted(self._status)

    def get(self, image: str) -> ImageFeatures:
        """Features of ``image`` (a file name such as ``1015799.jpg``). Raises KeyError
        for an id no shard holds: callers decide the fallback and count it."""
        status = self._status[image]
        if status != STATUS_OK:
            return ImageFeatures(image, status)
        grid = self._grid.get(image)
        return ImageFeatures(
            image,
            status,
            grid=None if grid is None else grid.astype(np.float32),
            labels=self._labels.get(image),
            scores=self._scores.get(image),
            caption=self._caption.get(image),
        )
