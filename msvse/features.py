"""HDF5 feature shards, schema v1: the contract between stage 1 and stage 2.

Stage 1 (``msvse.extract``) writes shards with :class:`ShardWriter`; stage 2
(``msvse.train``) reads them with :class:`FeatureStore`. Both import this module and
neither imports the other.

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

String datasets may be variable-length (:func:`write_shard`) or fixed-width UTF-8
(:class:`ShardWriter`); readers treat both alike.

Crash safety (:class:`ShardWriter`): a shard under construction is ``NAME.partial``
beside its final path. All its datasets are allocated in full when it is created
(contiguous rows, so one image is one read), so later writes only fill raw bytes and
never touch the file's structure: a process killed at any moment leaves a file that
opens. Every row starts with status -1 (pending); a batch's features are written and
flushed before its status, so a row is never marked done before its features are on
disk. When no row is pending the file is renamed to its final name.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from msvse import __version__
from msvse.errors import MsvseError
from msvse.io import atomic_path

FORMAT = "msvse-features"
SCHEMA_VERSION = 1
KINDS: tuple[str, ...] = ("grid", "objects", "caption")
STATUS_OK, STATUS_UNREADABLE, STATUS_MISSING = 0, 1, 2
STATUS_PENDING = -1  # only in a NAME.partial file: the row is not written yet
STATUS_NAMES = {STATUS_OK: "ok", STATUS_UNREADABLE: "unreadable", STATUS_MISSING: "missing"}
STR_DTYPE = h5py.string_dtype(encoding="utf-8")
#: (G, C) of the paper's grids: ResNet-152's last convolution map at 224 px, 7 x 7
#: regions of 2048 channels (a test checks it against the architecture).
PAPER_GRID_SHAPE: tuple[int, int] = (7 * 7, 2048)

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "KINDS",
    "STATUS_OK",
    "STATUS_UNREADABLE",
    "STATUS_MISSING",
    "STATUS_PENDING",
    "STATUS_NAMES",
    "STR_DTYPE",
    "PAPER_GRID_SHAPE",
    "FeatureFileError",
    "ImageFeatures",
    "FeatureStore",
    "ShardWriter",
    "write_shard",
    "set_attributes",
    "check_header",
    "shard_config",
    "open_shard",
    "decode_strings",
    "partial_path",
    "fixed_utf8",
    "encode_fixed",
]


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


def decode_strings(values: Iterable[Any]) -> list[str]:
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
    if isinstance(version, np.generic):
        version = version.item()  # HDF5 gives numpy scalars, whose repr is np.int64(2)
    if not isinstance(version, int) or version != SCHEMA_VERSION:
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
    with open_shard(path) as f:
        check_header(f, str(path))
        return json.loads(f.attrs.get("config", "{}"))


def open_shard(path: str | Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise FeatureFileError(f"{path}: feature file not found") from None
    except OSError as exc:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({exc})") from None


class FeatureStore:
    """Read-only view over one or more shards, joined by image id.

    Opening reads only each shard's ids and status and builds an index: per image, its
    worst status and, per kind, the shard and row holding it (a dict entry and a few
    array cells per image). Features are read from the shards when asked for:
    :meth:`get` for one image, :meth:`read_grids` for a batch. HDF5 handles (and file
    descriptors) are opened on first use and reopened in a forked DataLoader worker,
    whose inherited ones are not its own.

    ``lazy=False`` also reads every feature into memory when the store opens (about
    1.6 GB of grids for the Twitter sets: 8,000 images of 49 x 2048 float16); use it
    for small sets that are read many times.
    """

    def __init__(self, paths: Sequence[str | Path], *, lazy: bool = False):
        if not paths:
            raise FeatureFileError("no feature files given")
        self.paths = [str(p) for p in paths]
        self.lazy = lazy
        self._handles: dict[int, h5py.File] = {}
        self._raw: dict[int, tuple[int, int, int] | None] = {}  # shard -> (fd, grid offset, row bytes)
        self._pid = os.getpid()
        self._memory: dict[tuple[int, str], np.ndarray] = {}  # eager: (shard, dataset) -> rows
        self._index: dict[str, int] = {}  # image -> position in the arrays below
        status: list[int] = []
        where: dict[str, tuple[list[int], list[int]]] = {k: ([], []) for k in KINDS}  # kind -> (shard, row)
        self.configs: dict[str, dict[str, Any]] = {}
        self.grid_shape: tuple[int, int] | None = None
        self._kinds: set[str] = set()
        self._with_scores: set[int] = set()  # shards whose objects carry scores
        for shard, path in enumerate(self.paths):
            self._load(shard, path, status, where)
        self._status = np.asarray(status, np.int8)
        self._where = {k: (np.asarray(s, np.int16), np.asarray(r, np.int32)) for k, (s, r) in where.items()}

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if k in self._kinds)

    def _load(self, shard: int, path: str, status: list[int], where: dict[str, tuple[list[int], list[int]]]) -> None:
        with open_shard(path) as f:
            kinds = check_header(f, path)
            self.configs[path] = json.loads(f.attrs.get("config", "{}"))
            ids = decode_strings(f["ids"][()])
            rows_status = f["status"][()].astype(int)
            if len(rows_status) != len(ids):
                raise FeatureFileError(f"{path}: {len(ids)} ids but {len(rows_status)} status values")
            if len(set(ids)) != len(ids):
                raise FeatureFileError(f"{path}: an image id appears twice in the same file")
            if (rows_status == STATUS_PENDING).any():
                raise FeatureFileError(
                    f"{path}: an unfinished extraction ({int((rows_status == STATUS_PENDING).sum())} rows pending); "
                    "complete it with msvse-extract --resume"
                )
            if "grid" in kinds:
                shape = f["grid"].shape
                if len(shape) != 3 or shape[0] != len(ids):
                    raise FeatureFileError(f"{path}: 'grid' has shape {shape}, expected ({len(ids)}, G, C)")
                if self.grid_shape is not None and shape[1:] != self.grid_shape:
                    raise FeatureFileError(f"{path}: grid shape {shape[1:]} differs from {self.grid_shape} in another shard")
                self.grid_shape = tuple(shape[1:])
            for row, (image, st) in enumerate(zip(ids, rows_status)):
                if st not in STATUS_NAMES:
                    raise FeatureFileError(f"{path}: image {image!r} has unknown status {st}")
                i = self._index.setdefault(image, len(status))
                if i == len(status):
                    status.append(STATUS_OK)
                    for s, r in where.values():
                        s.append(-1)
                        r.append(-1)
                status[i] = max(status[i], int(st))
                for kind in kinds:
                    s, r = where[kind]
                    if s[i] >= 0:
                        raise FeatureFileError(f"{path}: image {image!r} already has '{kind}' features in {self.paths[s[i]]}")
                    s[i], r[i] = shard, row
            self._kinds.update(kinds)
            if "objects" in kinds and "objects/scores" in f:
                self._with_scores.add(shard)
            if not self.lazy:
                for kind in kinds:
                    for name in _DATASETS[kind]:
                        if name in f:
                            self._memory[(shard, name)] = f[name][()]

    def __contains__(self, image: str) -> bool:
        return image in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def ids(self) -> list[str]:
        return sorted(self._index)

    def status(self, image: str) -> int:
        """The worst status any shard recorded for ``image`` (KeyError if none holds it)."""
        return int(self._status[self._index[image]])

    def locate(self, kind: str, image: str) -> tuple[int, int] | None:
        """(shard, row) of ``image``'s ``kind`` features, or None when no shard has them."""
        shards, rows = self._where[kind]
        i = self._index[image]
        return None if shards[i] < 0 else (int(shards[i]), int(rows[i]))

    def _dataset(self, shard: int, name: str) -> h5py.Dataset | np.ndarray:
        if (shard, name) in self._memory:
            return self._memory[(shard, name)]
        self._check_process()
        if shard not in self._handles:
            self._handles[shard] = open_shard(self.paths[shard])
        return self._handles[shard][name]

    def _check_process(self) -> None:
        if self._pid != os.getpid():  # a forked worker: the parent's HDF5 handles and descriptors are not ours
            self._handles, self._raw, self._pid = {}, {}, os.getpid()

    def _raw_grid(self, shard: int) -> tuple[int, int, int] | None:
        """(file descriptor, byte offset, bytes per row) of the shard's grid when its rows
        can be read straight from the file: stored contiguously (as :class:`ShardWriter`
        writes it), unfiltered, little-endian float16. None otherwise (chunked, as
        :func:`write_shard` stores it, or held in memory): then HDF5 reads it."""
        self._check_process()
        if shard in self._raw:
            return self._raw[shard]
        raw = None
        ds = self._dataset(shard, "grid")
        if isinstance(ds, h5py.Dataset) and ds.dtype == np.dtype("<f2") and len(ds):
            plist = ds.id.get_create_plist()
            offset = ds.id.get_offset()
            if (plist.get_layout() == h5py.h5d.CONTIGUOUS and plist.get_nfilters() == 0
                    and plist.get_external_count() == 0 and offset is not None):  # fmt: skip
                row_bytes = int(np.prod(ds.shape[1:])) * 2
                fd = os.open(self.paths[shard], os.O_RDONLY)
                # The offset is HDF5's own; one row read both ways confirms it before use.
                probe = np.empty(ds.shape[1:], np.float16)
                row = len(ds) // 2
                if os.preadv(fd, [probe], offset + row * row_bytes) == row_bytes and np.array_equal(
                    probe, ds[row], equal_nan=True
                ):
                    raw = (fd, offset, row_bytes)
                else:
                    os.close(fd)
        self._raw[shard] = raw
        return raw

    def get(self, image: str) -> ImageFeatures:
        """Features of ``image`` (a file name such as ``1015799.jpg``). Raises KeyError
        for an id no shard holds: callers decide the fallback and count it."""
        status = self.status(image)
        if status != STATUS_OK:
            return ImageFeatures(image, status)
        grid = labels = scores = caption = None
        if (at := self.locate("grid", image)) is not None:
            grid = np.asarray(self._dataset(at[0], "grid")[at[1]], np.float32)
        if (at := self.locate("objects", image)) is not None:
            labels = tuple(x for x in decode_strings(self._dataset(at[0], "objects/labels")[at[1]]) if x)
            if at[0] in self._with_scores:
                scores = np.asarray(self._dataset(at[0], "objects/scores")[at[1]][: len(labels)], np.float32)
            else:
                scores = np.zeros(len(labels), np.float32)
        if (at := self.locate("caption", image)) is not None:
            caption = decode_strings([self._dataset(at[0], "caption")[at[1]]])[0]
        return ImageFeatures(image, status, grid=grid, labels=labels, scores=scores, caption=caption)

    def read_grids(self, places: Sequence[tuple[int, int]]) -> np.ndarray:
        """The float16 grids (n, G, C) at ``places`` ((shard, row) pairs, as
        :meth:`locate` gives), in that order. A contiguous grid (:class:`ShardWriter`'s)
        is read row by row straight into the result (``preadv`` at the row's offset: no
        HDF5 selection, no copy); otherwise one HDF5 read of the sorted unique rows per
        shard."""
        assert self.grid_shape is not None, "no shard holds grids"
        out = np.empty((len(places), *self.grid_shape), np.float16)
        by_shard: dict[int, list[int]] = {}
        for j, (shard, row) in enumerate(places):
            raw = self._raw_grid(shard) if self.lazy else None
            if raw is not None:
                fd, offset, row_bytes = raw
                if os.preadv(fd, [out[j]], offset + row * row_bytes) != row_bytes:
                    raise FeatureFileError(f"{self.paths[shard]}: grid row {row} is cut short (the file is truncated)")
            else:
                by_shard.setdefault(shard, []).append(row)
        for shard, rows in by_shard.items():
            unique = np.unique(rows)  # sorted
            block = np.asarray(self._dataset(shard, "grid")[unique], np.float16)  # (u, G, C)
            pick = {int(r): k for k, r in enumerate(unique)}
            for j, (s, row) in enumerate(places):
                if s == shard:
                    out[j] = block[pick[row]]
        return out

    def text_rows(self, kind: str) -> Iterator[tuple[int, list[tuple[str, ...]] | list[str]]]:
        """Every row of the ``objects`` labels (tuples of names, best first) or of the
        ``caption`` texts, shard by shard: (shard, rows in the shard's order)."""
        name = {"objects": "objects/labels", "caption": "caption"}[kind]
        for shard in sorted({int(s) for s in self._where[kind][0] if s >= 0}):
            values = self._dataset(shard, name)[()]
            if kind == "objects":
                yield shard, [tuple(x for x in decode_strings(row) if x) for row in values]
            else:
                yield shard, decode_strings(values)

    def __del__(self) -> None:  # the descriptors go with the store, not at the process's end
        if getattr(self, "_pid", None) == os.getpid():
            for raw in getattr(self, "_raw", {}).values():
                if raw is not None:
                    with contextlib.suppress(OSError):
                        os.close(raw[0])

    def close(self) -> None:
        """Close the shards the store holds open (reopened if used again)."""
        if self._pid == os.getpid():
            for raw in self._raw.values():
                if raw is not None:
                    os.close(raw[0])
        for f in self._handles.values():
            f.close()
        self._handles, self._raw = {}, {}


#: The datasets of each kind, as read into memory by an eager store.
_DATASETS: dict[str, tuple[str, ...]] = {
    "grid": ("grid",),
    "objects": ("objects/labels", "objects/scores"),
    "caption": ("caption",),
}


def partial_path(path: str | Path) -> Path:
    """Where the shard that will become ``path`` is built."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def fixed_utf8(width: int) -> np.dtype:
    """A fixed-width UTF-8 string type of ``width`` bytes (at least 1)."""
    return h5py.string_dtype("utf-8", max(1, int(width)))


def encode_fixed(texts: Sequence[str] | np.ndarray, dtype: np.dtype) -> np.ndarray:
    """UTF-8 bytes for a fixed-width string dataset; a text longer than the width is a bug."""
    width = dtype.itemsize
    raw = np.asarray([t.encode("utf-8") for t in np.asarray(texts, dtype=object).ravel()], dtype=object)
    too_long = [t for t in raw if len(t) > width]
    assert not too_long, f"string of {len(too_long[0])} bytes exceeds the field width {width}"
    return raw.astype(dtype).reshape(np.shape(texts))


class ShardWriter:
    """Fills a shard batch by batch, crash-safe and resumable (see the module docstring).

    :meth:`create` allocates ``NAME.partial`` for ``ids`` (the setup itself is written to
    a temporary file and renamed, so a partial file is always complete in structure);
    :meth:`reopen` continues one. :meth:`write_rows` stores consecutive rows;
    :meth:`finish` renames the file once no row is pending.
    """

    def __init__(self, path: Path, f: h5py.File):
        self.path = path  # the final path
        self.file = f
        self.kinds: list[str] = json.loads(f.attrs["kinds"])
        self.status: np.ndarray = f["status"][()]

    @property
    def pending(self) -> np.ndarray:
        """Indices of the rows not written yet."""
        return np.flatnonzero(self.status == STATUS_PENDING)

    @classmethod
    def create(
        cls,
        path: str | Path,
        ids: Sequence[str],
        *,
        kinds: Sequence[str],
        config: Mapping[str, Any],
        grid_shape: tuple[int, int] | None = None,
        max_objects: int = 0,
        label_bytes: int = 0,
        caption_bytes: int = 0,
        attrs: Mapping[str, Any] | None = None,
    ) -> ShardWriter:
        path = Path(path)
        n = len(ids)
        with atomic_path(partial_path(path)) as tmp:
            with h5py.File(tmp, "w") as f:
                set_attributes(f, kinds, config)
                for key, value in (attrs or {}).items():
                    f.attrs[key] = value
                f.create_dataset("ids", data=np.array(list(ids), dtype=object), dtype=STR_DTYPE)
                _allocate(f, "status", (n,), np.int8)[...] = STATUS_PENDING
                if "grid" in kinds:
                    assert grid_shape is not None
                    _allocate(f, "grid", (n, *grid_shape), np.float16)
                if "objects" in kinds:
                    assert max_objects > 0
                    _allocate(f, "objects/labels", (n, max_objects), fixed_utf8(label_bytes))
                    _allocate(f, "objects/scores", (n, max_objects), np.float32)
                    _allocate(f, "objects/boxes", (n, max_objects, 4), np.float32)
                if "caption" in kinds:
                    _allocate(f, "caption", (n,), fixed_utf8(caption_bytes))
        return cls.reopen(path)

    @classmethod
    def reopen(cls, path: str | Path) -> ShardWriter:
        path = Path(path)
        partial = partial_path(path)
        try:
            f = _open_unbuffered(partial)
        except OSError as exc:
            raise FeatureFileError(f"{partial}: cannot reopen the unfinished shard ({exc})") from None
        try:
            check_header(f, str(partial))
            return cls(path, f)
        except BaseException:
            f.close()
            raise

    def write_rows(
        self,
        start: int,
        status: Sequence[int],
        *,
        grid: np.ndarray | None = None,
        labels: Sequence[Sequence[str]] | None = None,
        scores: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        captions: Sequence[str] | None = None,
    ) -> None:
        """Write rows ``start .. start + len(status) - 1``: features first, then status."""
        f = self.file
        stop = start + len(status)
        rows = slice(start, stop)
        if "grid" in self.kinds:
            f["grid"][rows] = np.asarray(grid, dtype=np.float16)
        if "objects" in self.kinds:
            table = f["objects/labels"]
            k = table.shape[1]
            padded = [list(row)[:k] + [""] * (k - len(row)) for row in labels]
            table[rows] = encode_fixed(np.array(padded, dtype=object).reshape(len(status), k), table.dtype)
            f["objects/scores"][rows] = np.asarray(scores, dtype=np.float32)
            f["objects/boxes"][rows] = np.asarray(boxes, dtype=np.float32)
        if "caption" in self.kinds:
            f["caption"][rows] = encode_fixed(list(captions), f["caption"].dtype)
        f.flush()
        values = np.asarray(status, dtype=np.int8)
        assert ((values >= STATUS_OK) & (values <= STATUS_MISSING)).all(), values
        f["status"][rows] = values
        f.flush()
        self.status[rows] = values

    def finish(self) -> Path:
        """Close the file and give it its final name; every row must be written."""
        assert not len(self.pending), f"{len(self.pending)} rows still pending"
        self.close()
        partial = partial_path(self.path)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename must not reach the disk before the rows do
        finally:
            os.close(fd)
        os.replace(partial, self.path)
        return self.path

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def _open_unbuffered(path: Path) -> h5py.File:
    """Open for writing with HDF5's sieve buffer off. With it on, a dataset's last
    write may wait in the buffer until the dataset handle closes, and a failure then
    (a full disk) is only printed, not raised: the status written after it would mark
    rows done whose features never reached the file. Off, every write goes straight
    to the file and a failure raises in :meth:`ShardWriter.write_rows`."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_sieve_buf_size(0)
    return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl))


def _allocate(f: h5py.File, name: str, shape: tuple[int, ...], dtype: Any) -> h5py.Dataset:
    # Early allocation without a fill: the file reaches its full size (sparse, so unwritten
    # rows read as zeros) and no later write changes its structure.
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)
