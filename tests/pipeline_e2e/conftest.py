"""Fixtures for the pipeline tests: the repository's dvc.yaml and params.yaml, shrunk and
copied into a scratch DVC project in ``tmp_path``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Tiny models are built locally; a test must never try the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin/: dvc and the msvse-* stage commands
CODE_DIRS = ("pipeline", "extract", "train", "msvse")  # dvc.yaml lists their files as dependencies

# The demo, a few dozen posts and one epoch: every stage runs, in well under a minute.
SMALL = {
    "demo": {"train_posts": 32, "valid_posts": 12, "test_posts": 12, "missing_image_rate": 0.05},
    "tiny": {"vocab_size": 600, "blip": {"fit_steps": 2, "fit_batch_size": 8}},
    "extract": {"batch_size": 8, "num_workers": 0, "objects": {"min_size": 128, "max_size": 128}},
    "train": {"optim": {"epochs": 1, "batch_size": 8}},
}


def merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``dvc ARGS`` in ``project`` with the venv's commands first on PATH."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def small_project(tmp_path_factory) -> Path:
    """A DVC project (no git) holding the repository's dvc.yaml, the stages' code and a
    shrunk params.yaml; nothing run yet."""
    project = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    for name in CODE_DIRS:
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    (project / "params.yaml").write_text(yaml.safe_dump(merge(params, SMALL), sort_keys=False), encoding="utf-8")
    dvc(project, "init", "--no-scm", "-q")
    return project
