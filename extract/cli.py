"""``msvse-extract``: the three visual scales of a folder of images into an HDF5 shard."""

from __future__ import annotations

from pathlib import Path

import click

from msvse.cliutil import user_errors
from msvse.config import from_dict, load_section

from .config import ExtractConfig
from msvse.features import KINDS
from .run import extract, parse_kinds, parse_shard, summary_line


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--params", "params", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="params file whose 'extract' section chooses the models (default: the real models).")
@click.option("--kinds", default=",".join(KINDS), show_default=True, help="Comma-separated kinds to extract.")
@click.option("--ids-from", "ids_from", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Extract exactly the images this data set references (repeatable).")
@click.option("--shard", default=None, metavar="I/N", help="Extract shard I of N of the sorted ids (0 <= I < N).")
@click.option("--resume", is_flag=True, help="Complete the unfinished OUT.partial of an interrupted run.")
@click.option("--batch-size", type=int, default=None, help="Override extract.batch_size.")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:K (overrides extract.device).")
@user_errors
def main(images, out, params, kinds, ids_from, shard, resume, batch_size, device):
    """Extract ResNet grids, Mask R-CNN labels and captions of the images in IMAGES into
    the HDF5 shard OUT (schema v1). Ends with one summary line."""
    overrides = {k: v for k, v in (("batch_size", batch_size), ("device", device)) if v is not None}
    if params is not None:
        config = load_section(params, "extract", ExtractConfig, overrides=overrides)
    else:
        config = from_dict(ExtractConfig, overrides, source="command line")
    kinds = parse_kinds(kinds)
    if "caption" in kinds:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own bar is the one to watch
    summary = extract(
        images,
        out,
        config,
        kinds,
        ids_from=list(ids_from),
        shard=parse_shard(shard) if shard else None,
        resume=resume,
    )
    click.echo(summary_line(summary))
