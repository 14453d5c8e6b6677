"""Stage 1 as a library: images in, one HDF5 shard out (:func:`extract`), or features
in memory for a handful of images (:func:`extract_in_memory`).

A run: choose the ids (image files in the folder, or those a data set references), take
this shard's share, load the models, then stream fixed batches of rows through them.
DataLoader workers decode and resize while the models run on the device; every batch
is written before the next one is taken. Rows are batched at fixed offsets
(``batch_size`` rows from row 0), so a resumed run recomputes exactly the batches an
uninterrupted one would have, and its file matches that run row for row.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from msvse import io as msvse_io
from msvse.config import to_dict
from msvse.errors import MsvseError
from msvse.twitter import read_posts

from msvse.features import (
    KINDS,
    STATUS_MISSING,
    STATUS_NAMES,
    STATUS_OK,
    STATUS_UNREADABLE,
    FeatureFileError,
    ImageFeatures,
    ShardWriter,
    check_header,
    decode_strings,
    open_shard,
    partial_path,
)

from .config import RUNTIME_ONLY, ExtractConfig
from .images import UnreadableImage, decode_at_sides, decode_image, list_images
from .models import autocast, load_kind, resolve_device

MAX_REPORTED = 20  # unreadable images named on the terminal; the run report lists all
FLOAT16_MAX = float(np.finfo(np.float16).max)  # grids are stored as float16


# --- ids ---------------------------------------------------------------------------------


def parse_kinds(kinds: str | Sequence[str]) -> tuple[str, ...]:
    """Kinds in canonical order from ``"grid,caption"`` or a list."""
    names = [k.strip() for k in (kinds.split(",") if isinstance(kinds, str) else kinds) if k.strip()]
    unknown = [k for k in names if k not in KINDS]
    if unknown or not names:
        raise MsvseError(f"kinds: expected a comma-separated subset of {','.join(KINDS)}, got {','.join(names) or 'nothing'}")
    return tuple(k for k in KINDS if k in names)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    index, sep, count = text.partition("/")
    if not (sep and index.strip().isdigit() and count.strip().isdigit()):
        raise MsvseError(f"shard: expected I/N such as 0/4, got {text!r}")
    i, n = int(index), int(count)
    if n < 1 or i >= n:
        raise MsvseError(f"shard: {text!r} needs N >= 1 and 0 <= I < N")
    return i, n


def select_ids(images_dir: Path, ids_from: Sequence[str | Path] | None = None) -> list[str]:
    """Sorted image ids: every image file in ``images_dir``, or, with ``ids_from``, the
    image files the posts of those data sets reference (existing or not)."""
    if not images_dir.is_dir():
        raise MsvseError(f"{images_dir}: images folder not found")
    if ids_from:
        wanted = {post.image_file for path in ids_from for post in read_posts(path, labelled=False)}
        return sorted(wanted)
    ids = list_images(images_dir)
    if not ids:
        raise MsvseError(f"{images_dir}: no image files in this folder")
    return ids


def shard_ids(ids: Sequence[str], shard: tuple[int, int] | None) -> list[str]:
    """Shard I of N: the I-th of N contiguous, near-equal blocks of the sorted ids, so
    the N shards cover every id exactly once."""
    if shard is None:
        return list(ids)
    i, n = shard
    return list(ids[len(ids) * i // n : len(ids) * (i + 1) // n])


# --- rows: decoding in DataLoader workers --------------------------------------------------


@dataclass
class Row:
    index: int
    status: int
    reason: str = ""
    original_size: tuple[int, int] = (0, 0)  # (width, height), upright
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)


class ImageRows(Dataset):
    """Row ``i`` is image ``paths[i]`` decoded and preprocessed for every model; a file
    that is missing or unreadable yields a row with that status and no inputs.
    ``preprocess`` maps each kind to (its decode side, its preprocessing)."""

    def __init__(self, paths: Sequence[Path], preprocess: dict[str, tuple[int, Any]], *, max_pixels: int):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Row:
        path = self.paths[index]
        if not path.exists():
            return Row(index, STATUS_MISSING, "file not found")
        sides = [side for side, _ in self.preprocess.values()]
        try:
            decoded = decode_at_sides(path, max_pixels=self.max_pixels, sides=sides)
        except UnreadableImage as exc:
            return Row(index, STATUS_UNREADABLE, str(exc))
        inputs = {kind: fn(decoded[side].image) for kind, (side, fn) in self.preprocess.items()}
        return Row(index, STATUS_OK, "", decoded[sides[0]].original_size, inputs)


@dataclass
class Batch:
    rows: list[Row]
    grid: torch.Tensor | None = None  # (n_ok, 3, S, S) uint8
    objects: list[torch.Tensor] | None = None  # n_ok x (3, H, W) uint8
    caption: torch.Tensor | None = None  # (n_ok, 3, H, W) float

    @property
    def ok(self) -> list[Row]:
        return [r for r in self.rows if r.status == STATUS_OK]

    def pin_memory(self) -> Batch:
        pin = lambda t: t.pin_memory() if t is not None else None  # noqa: E731
        return Batch(
            self.rows,
            pin(self.grid),
            [t.pin_memory() for t in self.objects] if self.objects is not None else None,
            pin(self.caption),
        )


def collate(rows: list[Row]) -> Batch:
    ok = [r for r in rows if r.status == STATUS_OK]
    batch = Batch(rows)
    if ok:
        kinds = ok[0].inputs.keys()
        if "grid" in kinds:
            batch.grid = torch.stack([r.inputs["grid"] for r in ok])
        if "objects" in kinds:
            batch.objects = [r.inputs["objects"] for r in ok]
        if "caption" in kinds:
            batch.caption = torch.stack([r.inputs["caption"] for r in ok])
    for r in rows:
        r.inputs = {}  # the batch holds them now; do not send them to the main process twice
    return batch


# --- models --------------------------------------------------------------------------------


class Models:
    """The loaded model of each requested kind, and what the file layout needs from them."""

    def __init__(self, config: ExtractConfig, kinds: Sequence[str], device: torch.device):
        self.config = config
        self.kinds = tuple(kinds)
        self.device = device
        self.by_kind = {kind: load_kind(kind, config, device) for kind in kinds}

    @property
    def preprocess(self) -> dict[str, tuple[int, Any]]:
        return {kind: (m.decode_side, m.preprocess) for kind, m in self.by_kind.items()}

    def layout(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`ShardWriter.create` that depend on the models."""
        out: dict[str, Any] = {}
        if "grid" in self.by_kind:
            out["grid_shape"] = self.by_kind["grid"].shape
        if "objects" in self.by_kind:
            out["max_objects"] = self.config.objects.max_objects
            out["label_bytes"] = max(len(n.encode("utf-8")) for n in self.by_kind["objects"].names)
        if "caption" in self.by_kind:
            out["caption_bytes"] = self.by_kind["caption"].max_bytes
        return out

    def run(self, batch: Batch) -> dict[str, Any]:
        """Features of every row of ``batch`` (zeros and empty strings for rows that are
        not ok), as the keyword arguments of :meth:`ShardWriter.write_rows`."""
        n = len(batch.rows)
        ok = [i for i, r in enumerate(batch.rows) if r.status == STATUS_OK]
        out: dict[str, Any] = {}
        precision = self.config.autocast
        with torch.inference_mode():
            if "grid" in self.by_kind:
                model = self.by_kind["grid"]
                grid = np.zeros((n, *model.shape), np.float32)  # (n, G, C)
                if ok:
                    with autocast(self.device, precision):
                        grid[ok] = model(batch.grid)
                out["grid"] = grid
            if "objects" in self.by_kind:
                k = self.config.objects.max_objects
                labels: list[tuple[str, ...]] = [()] * n
                scores = np.zeros((n, k), np.float32)
                boxes = np.zeros((n, k, 4), np.float32)
                if ok:
                    sizes = [batch.rows[i].original_size for i in ok]
                    for i, det in zip(ok, self.by_kind["objects"](batch.objects, sizes, precision)):
                        labels[i] = det.labels
                        scores[i, : len(det.labels)] = det.scores
                        boxes[i, : len(det.labels)] = det.boxes
                out.update(labels=labels, scores=scores, boxes=boxes)
            if "caption" in self.by_kind:
                captions = [""] * n
                if ok:
                    with autocast(self.device, precision):
                        texts = self.by_kind["caption"](batch.caption)
                    for i, text in zip(ok, texts):
                        captions[i] = text
                out["captions"] = captions
        return out


def check_grid_range(grid: np.ndarray, names: Sequence[str], where: str) -> None:
    """Stop at a grid that float16 cannot hold (a value past 65,504, an inf or a NaN),
    naming the image: stored, it would read back as inf, and training on it would end in
    a NaN loss, hours later. A trained ResNet's features stay far inside the range, so
    such a grid means wrong weights or an overflow under fp16 autocast."""
    finite = np.isfinite(grid).all(axis=(1, 2))
    peak = np.abs(np.where(np.isfinite(grid), grid, 0)).max(axis=(1, 2))
    bad = np.flatnonzero(~finite | (peak > FLOAT16_MAX))
    if len(bad):
        i = int(bad[0])
        what = "inf or NaN values" if not finite[i] else f"values up to {peak[i]:.3g}"
        raise MsvseError(
            f"{where}: the grid of {names[i]} holds {what}, beyond the float16 range (65,504) the shard stores "
            f"({len(bad)} of {len(names)} images in this batch); check extract.grid.weights and extract.grid.arch, "
            "and with extract.autocast: fp16 try bf16 or off"
        )


@functools.lru_cache(maxsize=1)
def _cached_models(config: ExtractConfig, kinds: tuple[str, ...], device: str) -> Models:
    return Models(config, kinds, resolve_device(device))


# --- in memory -------------------------------------------------------------------------------


def extract_in_memory(
    image_paths: Sequence[Path], config: ExtractConfig, kinds: Sequence[str], device: str = "cpu"
) -> list[ImageFeatures]:
    """Features of a few images without writing a file (single-post prediction).

    The grid goes through float16 like a stored shard's, so a model trained on shards
    sees the same numbers (up to the last bit that batch size can change). The loaded models are kept for the next call with the same
    config, kinds and device.
    """
    models = _cached_models(config, parse_kinds(kinds), device)
    paths = [Path(p) for p in image_paths]
    dataset = ImageRows(paths, models.preprocess, max_pixels=config.max_pixels)
    out: list[ImageFeatures] = []
    for start in range(0, len(paths), config.batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + config.batch_size, len(paths)))])
        feats = models.run(batch)
        if "grid" in feats:
            check_grid_range(feats["grid"], [paths[r.index].name for r in batch.rows], "grid model")
        for j, row in enumerate(batch.rows):
            name = paths[row.index].name
            if row.status != STATUS_OK:
                out.append(ImageFeatures(name, row.status))
                continue
            grid = feats.get("grid")
            labels = feats["labels"][j] if "labels" in feats else None
            out.append(
                ImageFeatures(
                    name,
                    STATUS_OK,
                    grid=None if grid is None else grid[j].astype(np.float16).astype(np.float32),
                    labels=labels,
                    scores=feats["scores"][j, : len(labels)].copy() if labels is not None else None,
                    caption=feats["captions"][j] if "captions" in feats else None,
                )
            )
    return out


# --- to a shard -------------------------------------------------------------------------------


def extract(
    images_dir: str | Path,
    out_path: str | Path,
    config: ExtractConfig,
    kinds: str | Sequence[str] = KINDS,
    *,
    ids_from: Sequence[str | Path] | None = None,
    shard: tuple[int, int] | str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Extract ``kinds`` for the images of ``images_dir`` into the shard ``out_path``.

    ``ids_from``: data sets (Twitter format) whose referenced images are the ids; one
    that does not exist gets a status-2 row. ``shard``: ``(I, N)`` or ``"I/N"``, this
    process's share of the sorted ids. ``resume``: continue ``OUT.partial`` left by a
    killed run (started with the same settings) instead of starting over.

    Returns the summary: path, rows, ok, unreadable, missing, written (rows computed by
    this call), seconds (of which load_seconds went to choosing ids and loading the
    models). A report (resolved config, summary, every row that is not ok and why) is
    written beside the shard as ``OUT.json``.
    """
    started = time.monotonic()
    images_dir, out_path = Path(images_dir), Path(out_path)
    kinds = parse_kinds(kinds)
    if isinstance(shard, str):
        shard = parse_shard(shard)
    ids = shard_ids(select_ids(images_dir, ids_from), shard)
    shard_text = f"{shard[0]}/{shard[1]}" if shard else ""
    config_dict = recorded_config(config, kinds)

    if resume and out_path.exists() and not partial_path(out_path).exists():
        _check_same_run(out_path, config_dict, kinds, ids, shard_text)
        return _finish_summary(out_path, 0, time.monotonic() - started, {}, images_dir, config)

    device = resolve_device(config.device)
    models = Models(config, kinds, device)
    load_seconds = time.monotonic() - started
    partial = partial_path(out_path)
    if resume and partial.exists():
        _check_same_run(partial, config_dict, kinds, ids, shard_text)
        writer = ShardWriter.reopen(out_path)
    else:
        if partial.exists():
            partial.unlink()
        try:
            writer = ShardWriter.create(
                out_path, ids, kinds=kinds, config=config_dict, attrs={"shard": shard_text}, **models.layout()
            )
        except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError when closing fails
            raise FeatureFileError(f"{partial}: cannot create the shard ({_os_reason(exc)}); make room and run again") from None
    batches = _pending_batches(writer.status, config.batch_size)
    writer.close()  # reopened after the workers fork: HDF5 handles must not be inherited

    dataset = ImageRows([images_dir / image for image in ids], models.preprocess, max_pixels=config.max_pixels)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=config.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    reasons: dict[int, str] = {}
    written = 0
    iterator: Iterator[Batch] = iter(loader)
    writer = ShardWriter.reopen(out_path)
    try:
        with tqdm(total=sum(len(b) for b in batches), unit="img", desc=out_path.name, disable=not progress) as bar:
            for batch in iterator:
                feats = models.run(batch)
                if "grid" in feats:
                    check_grid_range(feats["grid"], [ids[r.index] for r in batch.rows], str(partial))
                try:
                    writer.write_rows(batch.rows[0].index, [r.status for r in batch.rows], **feats)
                except OSError as exc:
                    raise _write_error(partial, writer, batch, exc) from None
                for r in batch.rows:
                    if r.status != STATUS_OK:
                        reasons[r.index] = r.reason
                        if len(reasons) <= MAX_REPORTED:
                            bar.write(f"{ids[r.index]}: {STATUS_NAMES[r.status]}: {r.reason}")
                written += len(batch.rows)
                bar.update(len(batch.rows))
        try:
            writer.finish()
        except (OSError, RuntimeError) as exc:
            raise FeatureFileError(
                f"{partial}: every row is written but the file cannot be closed and renamed ({_os_reason(exc)}); "
                "make room, then rerun with --resume"
            ) from None
    finally:
        writer.close()
    if len(reasons) > MAX_REPORTED:
        tqdm.write(f"... and {len(reasons) - MAX_REPORTED} more rows not ok; all are listed in {_report_path(out_path)}")
    return _finish_summary(out_path, written, time.monotonic() - started, reasons, images_dir, config, load_seconds, device)


def _os_reason(exc: Exception) -> str:
    # h5py puts HDF5's whole error stack in the message; the errno says it in a few words.
    if getattr(exc, "errno", None):
        return os.strerror(exc.errno)
    found = re.search(r"error message = '([^']+)'", str(exc))
    return found.group(1) if found else str(exc).strip().splitlines()[0]


def _write_error(partial: Path, writer: ShardWriter, batch: Batch, exc: OSError) -> FeatureFileError:
    """A batch that could not be written (a full disk): its rows stay pending, the rows
    before it are kept, and ``--resume`` carries on from there."""
    first, last = batch.rows[0].index, batch.rows[-1].index
    done = int((writer.status >= 0).sum())
    size = partial.stat().st_size / 2**20 if partial.exists() else 0.0
    return FeatureFileError(
        f"{partial}: cannot write rows {first}-{last} ({_os_reason(exc)}); the {done} of {len(writer.status)} rows "
        f"written before are kept. Make room (the finished file takes {size:.1f} MiB), then rerun with --resume"
    )


def recorded_config(config: ExtractConfig, kinds: Sequence[str]) -> dict[str, Any]:
    """The config a shard records: the shared settings and the sections of its own
    kinds (another kind's section does not describe this file, and may change without
    it being rewritten). ``from_dict(ExtractConfig, ...)`` rebuilds it."""
    return {key: value for key, value in to_dict(config).items() if key not in KINDS or key in kinds}


def _pending_batches(status: np.ndarray, batch_size: int) -> list[list[int]]:
    """The fixed batches (rows ``b*B .. b*B+B-1``) that still hold a pending row."""
    n = len(status)
    out = []
    for start in range(0, n, batch_size):
        rows = list(range(start, min(start + batch_size, n)))
        if (status[start : start + batch_size] < 0).any():
            out.append(rows)
    return out


def _check_same_run(path: Path, config: dict[str, Any], kinds: Sequence[str], ids: Sequence[str], shard: str) -> None:
    """A shard is continued only by a run that would have written the same file."""
    import h5py

    with open_shard(path) as f:
        check_header(f, str(path))
        old_config = json.loads(f.attrs.get("config", "{}"))
        old_kinds = json.loads(f.attrs.get("kinds", "[]"))
        old_shard = f.attrs.get("shard", "")
        old_ids = decode_strings(f["ids"][()]) if isinstance(f.get("ids"), h5py.Dataset) else []
    hint = "resume with the same settings, or run without --resume to start over"
    if list(old_kinds) != list(kinds):
        raise MsvseError(f"{path}: holds kinds {','.join(old_kinds)}, this run asks for {','.join(kinds)}; {hint}")
    if str(old_shard) != shard:
        raise MsvseError(f"{path}: was shard {old_shard or 'none'!s}, this run is shard {shard or 'none'}; {hint}")
    for key, old, new in _config_differences(old_config, config):
        raise MsvseError(f"{path}: was written with extract.{key} = {old!r}, this run has {new!r}; {hint}")
    if old_ids != list(ids):
        changed = sorted(set(old_ids) ^ set(ids))
        example = f" (e.g. {changed[0]!r})" if changed else ""
        raise MsvseError(f"{path}: its image ids differ from this run's{example}; {hint}")


def _config_differences(old: Any, new: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    keys = sorted(set(old) | set(new)) if isinstance(old, dict) and isinstance(new, dict) else None
    if keys is None:
        if old != new:
            yield prefix, old, new
        return
    for key in keys:
        if not prefix and key in RUNTIME_ONLY:
            continue
        yield from _config_differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)


def _report_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.stem + ".json") if out_path.suffix else out_path.with_name(out_path.name + ".json")


def _finish_summary(
    out_path: Path,
    written: int,
    seconds: float,
    reasons: dict[int, str],
    images_dir: Path,
    config: ExtractConfig,
    load_seconds: float = 0.0,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Count the finished shard's rows and write its report (with the run's peak memory)."""
    import h5py

    try:
        with h5py.File(out_path, "r") as f:
            status = f["status"][()]
            ids = decode_strings(f["ids"][()])
            config_dict = json.loads(f.attrs["config"])
            kinds = json.loads(f.attrs["kinds"])
    except OSError as exc:
        raise FeatureFileError(f"{out_path}: cannot read the finished shard ({exc})") from None
    problems = []
    for index in np.flatnonzero(status != STATUS_OK):
        reason = reasons.get(int(index))
        if reason is None:
            # A row finished by an earlier, interrupted run: ask the file again.
            reason = _reason(images_dir / ids[index], config, int(status[index]))
        problems.append({"image": ids[index], "status": STATUS_NAMES[int(status[index])], "reason": reason})
    summary = {
        "path": str(out_path),
        "rows": int(len(status)),
        "ok": int((status == STATUS_OK).sum()),
        "unreadable": int((status == STATUS_UNREADABLE).sum()),
        "missing": int((status == STATUS_MISSING).sum()),
        "written": int(written),
        "seconds": round(seconds, 2),
        "load_seconds": round(load_seconds, 2),  # of which loading the models
        "peak_memory": msvse_io.peak_memory(device),
    }
    report = _report_path(out_path)
    try:
        msvse_io.write_resolved_config(report, "extract", config_dict, kinds=kinds, summary=summary, problems=problems)
    except OSError as exc:
        raise FeatureFileError(
            f"{report}: cannot write the run report ({_os_reason(exc)}); {out_path} itself is complete: "
            "make room, then rerun with --resume to write the report"
        ) from None
    return summary


def _reason(path: Path, config: ExtractConfig, status: int) -> str:
    if status == STATUS_MISSING or not path.exists():
        return "file not found"
    try:
        decode_image(path, max_pixels=config.max_pixels)
    except UnreadableImage as exc:
        return str(exc)
    return "unreadable when extracted"


def summary_line(summary: dict[str, Any]) -> str:
    """The one line a run ends with."""
    s = summary
    busy = s["seconds"] - s.get("load_seconds", 0.0)
    rate = s["written"] / busy if busy > 0 else 0.0
    return (
        f"{s['path']}: {s['rows']} rows ({s['ok']} ok, {s['unreadable']} unreadable, {s['missing']} missing); "
        f"{s['written']} written in {s['seconds']:.1f} s ({rate:.1f} images/s after {s.get('load_seconds', 0.0):.1f} s "
        "loading models)"
    )
