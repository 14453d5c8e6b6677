"""Fixtures for the stage-0 tests: small demo data sets and tiny models in tmp dirs."""

from __future__ import annotations

import dataclasses
import os

import pytest

# Tiny models are built locally; a test must never try the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from msvse.pipeline.demo import DemoConfig, generate_demo  # noqa: E402


def make_small_demo(out_dir, **changes) -> DemoConfig:
    """A demo config small enough for a unit test (a few dozen 64-pixel images)."""
    base = DemoConfig(
        out_dir=str(out_dir),
        train_posts=40,
        valid_posts=12,
        test_posts=12,
        missing_image_rate=0.1,
        image_size=64,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
def small_demo():
    """``small_demo(out_dir, **changes)``: a small DemoConfig writing to ``out_dir``."""
    return make_small_demo


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory):
    """The default demo data set (params defaults), generated once per module."""
    cfg = DemoConfig(out_dir=str(tmp_path_factory.mktemp("full") / "demo"))
    return cfg, generate_demo(cfg)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny models built from a small demo set, with a few steps of caption fitting."""
    from msvse.pipeline.tiny import TinyBlip, TinyConfig, build_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    demo = make_small_demo(root / "demo", image_size=224)
    generate_demo(demo)
    cfg = TinyConfig(
        data_dir=demo.out_dir,
        out_dir=str(root / "models"),
        blip=TinyBlip(fit_steps=2, fit_batch_size=4),
    )
    files = build_tiny_models(cfg)
    return cfg, files
