"""``msvse-pipeline``: the stage-0 commands that ``dvc.yaml`` runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click

from msvse.cliutil import key_values, user_errors
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
    """Pipeline glue: the demo data set, the tiny offline models, the data check, the report,
    and the dry run of a paper pipeline at its real sizes."""


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


@main.command("report")
@PARAMS_OPTION
@user_errors
def report_cmd(params_path: str) -> None:
    """Draw a training run's learning curves and per-type F1 (section `report`): PNGs,
    per-type CSVs for dvc plots, and scores.json (percent) for dvc metrics."""
    from msvse.pipeline.report import ReportConfig, format_summary, write_report

    cfg = load_section(params_path, "report", ReportConfig)
    scores = write_report(cfg)
    click.echo(f"report of {cfg.run} in {cfg.out_dir} (F1, %):\n{format_summary(scores)}")


@main.command("check-data")
@PARAMS_OPTION
@user_errors
def check_data_cmd(params_path: str) -> None:
    """Check that a real-data pipeline can run: the detector backend of `extract.objects`
    imports (detectron2 is built from source) and the data set of section `data` is in
    place (the three text files and the images). Writes <data.features>/data_check.json,
    or says, one line per problem, what is missing and how to fix it."""
    from msvse.config import read_yaml
    from msvse.extract.config import ExtractConfig
    from msvse.pipeline.check import DataConfig, check_pipeline, summary_line

    cfg = load_section(params_path, "data", DataConfig)
    # Only a pipeline with an extract section has a detector to check.
    extract = load_section(params_path, "extract", ExtractConfig) if "extract" in read_yaml(params_path) else ExtractConfig()
    click.echo(summary_line(check_pipeline(cfg, extract.objects)))


@main.command("dry-run")
@click.argument("pipeline_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Scratch folder (new or empty), kept afterwards. Default: a temporary folder, removed at the end.")
@click.option("--posts", type=click.IntRange(min=8), default=None,
              help="Training posts (default: train.optim.batch_size, one full batch); dev and test get an eighth each.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Change a key of the pipeline's params.yaml for the dry run, as dvc exp run -S does, "
                   "e.g. --set extract.objects.backend=torchvision.")
@user_errors
def dry_run_cmd(pipeline_dir: Path, out: Path | None, posts: int | None, sets: tuple[str, ...]) -> None:
    """Run the paper pipeline in PIPELINE_DIR (its dvc.yaml, its params) on a few synthetic
    posts and images, with every model at its real architecture and size but random
    weights (nothing is downloaded), for one epoch; print per stage the time, the peak
    memory (and GPU memory on CUDA), the shards' bytes per image, the checkpoint's size
    and the parameter count."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built here
    from transformers.utils import logging as hf_logging

    from msvse.pipeline.dryrun import dry_run, format_report, temporary_scratch

    hf_logging.disable_progress_bar()
    scratch = out if out is not None else temporary_scratch()
    try:
        report = dry_run(pipeline_dir, scratch, posts=posts, sets=key_values(sets, "extract.objects.backend=torchvision"),
                         echo=click.echo)  # fmt: skip
    finally:
        if out is None:
            shutil.rmtree(scratch, ignore_errors=True)
    click.echo("")
    click.echo(format_report(report) + ("" if out is not None else " -- removed now; keep it with --out DIR"))
