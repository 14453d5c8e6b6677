"""A disk that fills up: the command stops with one line naming the file, what is on
disk stays resumable and never looks complete, and --resume (once there is room)
finishes with the file an uninterrupted run writes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from msvse.config import from_dict
from msvse.extract.archs import build_resnet
from msvse.extract.cli import main as extract_main
from msvse.extract.config import ExtractConfig
from msvse.features import STATUS_PENDING, ShardWriter, partial_path
from msvse.extract.run import extract
from msvse.train import checkpoint
from msvse.train.checkpoint import read_resume_state
from msvse.train.cli import train_main

N_IMAGES = 30


@pytest.fixture(scope="module")
def grid_setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """30 photos, params for a grid-only extraction with a tiny ResNet-18 state dict,
    and the shard an uninterrupted run writes: (images, params, straight shard)."""
    root = tmp_path_factory.mktemp("disk")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((48, 40), Image.Resampling.BICUBIC).save(images / f"{1000 + i}.jpg")
    torch.manual_seed(0)
    weights = root / "resnet18.pth"
    torch.save(build_resnet("resnet18").state_dict(), weights)
    section = {"grid": {"arch": "resnet18", "weights": str(weights), "image_size": 64},
               "batch_size": 4, "num_workers": 0, "device": "cpu"}  # fmt: skip
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"extract": section}))
    straight = root / "straight.h5"
    extract(images, straight, from_dict(ExtractConfig, section), ["grid"], progress=False)
    return images, params, straight


def _rows(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: f[name][()] for name in ("ids", "status", "grid")}


def _check_partial(partial: Path, straight: Path) -> int:
    """Rows marked done hold the uninterrupted run's features; the others are pending.
    Returns how many are done."""
    got, want = _rows(partial), _rows(straight)
    done = got["status"] != STATUS_PENDING
    assert list(got["ids"]) == list(want["ids"])
    np.testing.assert_array_equal(got["status"][done], want["status"][done])
    np.testing.assert_array_equal(got["grid"][done], want["grid"][done])
    return int(done.sum())


def _resume_elsewhere(partial: Path, images: Path, params: Path, tmp_path: Path, straight: Path) -> None:
    """Move the partial file to a disk with room and finish it there."""
    roomy = tmp_path / "roomy"
    roomy.mkdir()
    shutil.copy(partial, roomy / partial.name)
    out = roomy / partial.name.removesuffix(".partial")
    result = CliRunner().invoke(extract_main, [str(images), str(out), "--params", str(params), "--kinds", "grid", "--resume"])
    assert result.exit_code == 0, result.output
    assert not partial_path(out).exists()
    for name, values in _rows(out).items():
        np.testing.assert_array_equal(values, _rows(straight)[name], err_msg=name)


@pytest.fixture
def small_disk(tmp_path, request):
    """A tmpfs of ``request.param`` bytes (needs root and mount; skipped elsewhere): a
    real full disk."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    name = f"msvse-test-{uuid.uuid4().hex[:8]}"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", name, str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", [64 * 1024], indirect=True)
def test_extraction_onto_a_disk_that_fills_up(small_disk, grid_setup, tmp_path, tools):
    """The shard (30 rows of 4 x 512 float16 and their ids: about 130 KB) cannot fit in
    64 KiB. HDF5 would otherwise hold a failed write back and only print the error
    when the dataset closes; the status written after it would then mark rows done
    whose features never reached the disk."""
    images, params, straight = grid_setup
    out = small_disk / "grid.h5"
    result = tools.run([str(tools.bin / "msvse-extract"), str(images), str(out), "--params", str(params), "--kinds", "grid"])
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"Error: {partial_path(out)}: cannot write rows ") and "No space left on device" in line
    assert "then rerun with --resume" in line and "Traceback" not in result.stderr
    assert not out.exists()
    done = _check_partial(partial_path(out), straight)
    assert 0 < done < N_IMAGES
    _resume_elsewhere(partial_path(out), images, params, tmp_path, straight)


@pytest.mark.parametrize("small_disk", [8 * 1024], indirect=True)
def test_a_disk_too_full_to_create_the_shard(small_disk, grid_setup, tools):
    images, params, _ = grid_setup
    out = small_disk / "grid.h5"
    result = tools.run([str(tools.bin / "msvse-extract"), str(images), str(out), "--params", str(params), "--kinds", "grid"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == f"Error: {partial_path(out)}: cannot create the shard (No space left on device); make room and run again"
    assert not list(small_disk.iterdir()), "no partial or temporary file is left"


def test_a_write_failing_mid_run_leaves_a_resumable_partial(grid_setup, tmp_path, monkeypatch):
    """The same on any machine: the writer's third batch fails as a full disk fails."""
    images, params, straight = grid_setup
    out = tmp_path / "grid.h5"
    write_rows = ShardWriter.write_rows
    calls = []

    def full_disk(self, start, status, **kwargs):
        calls.append(start)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: ... errno = 28)")
        return write_rows(self, start, status, **kwargs)

    monkeypatch.setattr(ShardWriter, "write_rows", full_disk)
    result = CliRunner().invoke(extract_main, [str(images), str(out), "--params", str(params), "--kinds", "grid"])
    assert result.exit_code == 2, result.output
    assert (f"{partial_path(out)}: cannot write rows 8-11 (No space left on device); the 8 of 30 rows written before "
            "are kept. Make room") in result.output  # fmt: skip
    assert not out.exists() and _check_partial(partial_path(out), straight) == 8
    monkeypatch.setattr(ShardWriter, "write_rows", write_rows)
    _resume_elsewhere(partial_path(out), images, params, tmp_path, straight)


def test_training_onto_a_full_disk_keeps_the_last_complete_epoch(corpus, bert_dir, tmp_path, tools, monkeypatch):
    """Epoch 2's resume state cannot be written: the run stops naming it, epoch 1's
    state stays whole, and --resume then ends where an uninterrupted run ends."""
    straight = tmp_path / "straight"
    params = tools.write_params(tmp_path / "straight.yaml", tools.train_section(corpus, bert_dir, straight))
    assert CliRunner().invoke(train_main, ["--params", str(params)]).exit_code == 0

    run = tmp_path / "run"
    params = tools.write_params(tmp_path / "params.yaml", tools.train_section(corpus, bert_dir, run))
    save_file = checkpoint.save_file
    calls = []

    def full_disk(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    result = CliRunner().invoke(train_main, ["--params", str(params)])
    assert result.exit_code == 2, result.output
    assert f"Error: {run / 'resume'}: cannot write (No space left on device); the previous version, if any, is kept" in result.output
    assert read_resume_state(run / "resume").info["epoch"] == 1
    assert not list(run.glob(".resume.*")), "no temporary folder left behind"
    assert not (run / "metrics.json").exists()

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    result = CliRunner().invoke(train_main, ["--params", str(params), "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "metrics.json").read_text()) == json.loads((straight / "metrics.json").read_text())
