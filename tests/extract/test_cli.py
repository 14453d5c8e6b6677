"""msvse-extract as a user runs it, including runs killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from msvse.config import from_dict, load_section
from msvse.extract.cli import main
from msvse.extract.config import ExtractConfig
from msvse.features import partial_path
from msvse.extract.run import extract

# Runs the real command in a child process that kills itself with SIGKILL just before
# its Nth write to an HDF5 dataset: a crash at a chosen point between two writes.
KILL_AT_WRITE = """
import os, signal, sys
import h5py
from msvse.extract.cli import main

limit = int(os.environ["KILL_AT_WRITE"])
count = 0
write = h5py.Dataset.__setitem__

def counted(self, key, value):
    global count
    count += 1
    if count == limit:
        os.kill(os.getpid(), signal.SIGKILL)
    return write(self, key, value)

h5py.Dataset.__setitem__ = counted
main(sys.argv[1:])
"""
RUN = "import sys; from msvse.extract.cli import main; main(sys.argv[1:])"


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def read_all(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: f.attrs[k] for k in f.attrs}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def assert_same_file(a, b) -> None:
    da, db = read_all(a), read_all(b)
    assert da.keys() == db.keys()
    for key in da:
        if key == "attrs":
            assert da[key].keys() == db[key].keys()
            for name in da[key]:
                assert da[key][name] == db[key][name], name
        else:
            np.testing.assert_array_equal(da[key], db[key], err_msg=key)


def test_cli_extracts_and_prints_one_summary_line(tmp_path, photos, params_file):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "feats" / "grid.h5"
    result = CliRunner().invoke(main, [str(photos), str(out), "--params", str(params_file), "--kinds", "grid",
                                       "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"{out}: 8 rows (7 ok, 1 unreadable, 0 missing); 8 written in ")
    assert last.endswith("s loading models)") and "images/s after" in last
    with h5py.File(out) as f:
        assert list(f) == ["grid", "ids", "status"]
        recorded = json.loads(f.attrs["config"])
        assert recorded["batch_size"] == 4 and "grid" in recorded and "objects" not in recorded and "caption" not in recorded
        assert from_dict(ExtractConfig, recorded).grid.arch == "resnet18"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--shard", "2/2"], "Error: shard"),
        (["--kinds", "grid,masks"], "Error: kinds"),
        (["--batch-size", "0"], "batch_size"),
        (["--device", "tpu"], "device: expected auto, cpu, cuda or cuda:K"),
        (["--ids-from", "nope.txt"], "nope.txt: file not found"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, photos, params_file, args, words):
    result = CliRunner().invoke(main, [str(photos), str(tmp_path / "x.h5"), "--params", str(params_file), *args])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output


def test_cli_bad_params_and_folders(tmp_path, photos, tiny_section):
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"extract": {**tiny_section, "grid": {"arch": "resnet18", "weigths": "x"}}}))
    result = CliRunner().invoke(main, [str(photos), str(tmp_path / "x.h5"), "--params", str(params)])
    assert result.exit_code == 2 and "extract.grid.weigths: unknown key" in result.output
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"extract": tiny_section}))
    result = CliRunner().invoke(main, [str(tmp_path / "nope"), str(tmp_path / "x.h5"), "--params", str(good)])
    assert result.exit_code == 2 and "images folder not found" in result.output


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory, photo_maker, odd_maker):
    folder = tmp_path_factory.mktemp("many")
    for i in range(10):
        photo_maker(folder / f"{200 + i}.jpg", 50 + i, size=(70 + 5 * i, 50 + 3 * i))
    odd = tmp_path_factory.mktemp("odd")
    odd_maker(odd)
    for name in ("empty.jpg", "text.jpg", "rotated.jpg"):
        (odd / name).rename(folder / name)
    return folder


@pytest.fixture(scope="module")
def module_params(tmp_path_factory, tiny_section):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump({"extract": tiny_section}))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory, many_photos, module_params):
    """The uninterrupted run every killed-and-resumed run must equal."""
    path = tmp_path_factory.mktemp("straight") / "straight.h5"
    extract(many_photos, path, load_section(module_params, "extract", ExtractConfig), progress=False)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [7, 16])
def test_killed_run_resumes_to_the_straight_file(tmp_path, many_photos, module_params, straight, kill_at):
    """Writes per batch: grid, labels, scores, boxes, caption, then status (6), after
    one write at setup. Killing before write 7 leaves a batch whose features are written
    but not marked done; before write 16, a batch half written."""
    out = tmp_path / "killed.h5"
    args = [str(many_photos), str(out), "--params", str(module_params)]
    env = {**child_env(), "KILL_AT_WRITE": str(kill_at)}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_WRITE, *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and partial_path(out).exists()
    config = load_section(module_params, "extract", ExtractConfig)
    pending = 13 - config.batch_size * ((kill_at - 2) // 6)  # rows of the batches not finished
    with h5py.File(partial_path(out), "r") as f:
        assert (f["status"][()] == -1).sum() == pending

    summary = extract(many_photos, out, config, resume=True, progress=False)
    assert summary["rows"] == 13 and summary["written"] == pending
    assert not partial_path(out).exists()
    assert_same_file(out, straight)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path, many_photos, module_params, straight):
    """The plain command, killed from outside once some rows are on disk."""
    out = tmp_path / "out.h5"
    args = [str(many_photos), str(out), "--params", str(module_params)]
    child = subprocess.Popen([sys.executable, "-c", RUN, *args], env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    deadline = time.monotonic() + 120
    try:
        while done == 0 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
            try:
                with h5py.File(partial_path(out), "r", locking=False) as f:
                    done = int((f["status"][()] >= 0).sum())
            except (OSError, KeyError):
                continue
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 0 < done < 13 and not out.exists()
    resumed = subprocess.run([sys.executable, "-c", RUN, *args, "--resume"], env=child_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_file(out, straight)
