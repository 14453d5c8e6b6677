"""``msvse-pipeline``: the stage-0 commands that ``dvc.yaml`` runs."""

from __future__ import annotations

import json
import os

import click

from msvse.cliutil import user_errors
from msvse.config import load_section

PARAMS_OPTION = click.option(
    "--params",
    "params_path",
    default="params.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Params file; the command reads only its own section.",
)


@click.group()
@click.version_option(package_name="msvse")
def main() -> None:
    """Stage 0 of the pipeline: the demo data set and the tiny offline models."""


@main.command("demo")
@PARAMS_OPTION
@user_errors
def demo_cmd(params_path: str) -> None:
    """Write the demo data set (section `demo`): train/valid/test.txt in the Twitter
    format, images/<id>.jpg, scenes.tsv and the resolved config."""
    from msvse.pipeline.demo import DemoConfig, generate_demo

    cfg = load_section(params_path, "demo", DemoConfig)
    summary = generate_demo(cfg)
    click.echo(f"demo data in {cfg.out_dir}: " + json.dumps(summary))


@main.command("tiny-models")
@PARAMS_OPTION
@user_errors
def tiny_models_cmd(params_path: str) -> None:
    """Build the tiny offline models (section `tiny`): WordPiece tokenizer, BERT, BLIP
    captioner, ResNet-18 and Mask R-CNN state dicts, and manifest.json."""
    # Everything is built locally; never reach for the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    from msvse.pipeline.tiny import TinyConfig, build_tiny_models

    hf_logging.disable_progress_bar()
    cfg = load_section(params_path, "tiny", TinyConfig)
    files = build_tiny_models(cfg)
    click.echo(f"tiny models in {cfg.out_dir}: " + ", ".join(files))
