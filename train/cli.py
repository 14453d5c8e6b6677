"""``msvse-train``, ``msvse-eval``, ``msvse-predict``: thin wrappers over the library."""

from __future__ import annotations

import json
import logging
import os

import click

from msvse.cliutil import key_values, user_errors


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _overrides(pairs: tuple[str, ...]) -> dict[str, object]:
    return key_values(pairs, "optim.epochs=3")


@click.command()
@click.option("--params", "params", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="Params file; its `train` section is read.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a key of the train section, e.g. --set optim.epochs=3 --set ablation.prefix=false.")
@click.option("--resume", is_flag=True,
              help="Continue the run in `output` from its last complete epoch (after a kill or a full disk); "
                   "with nothing to continue, start from scratch.")
@click.option("--count-params", is_flag=True,
              help="Print the parameter count of the full model at bert-base-uncased size "
                   "(random init, nothing downloaded; ablations from --params if it exists) and exit.")
@click.version_option(package_name="msvse")
@user_errors
def train_main(params: str, sets: tuple[str, ...], resume: bool, count_params: bool) -> None:
    """Train MSVSE from the `train` section of a params file; writes the run folder
    (model/, metrics.json, plots/epochs.csv, predictions/) named by `output`.
    Under torchrun, each process trains one DistributedDataParallel replica."""
    from pathlib import Path

    from msvse.train.config import TrainConfig, load_config

    _setup_logging()
    if count_params:
        from msvse.train.trainer import paper_size_model, parameter_report

        cfg = load_config(params, _overrides(sets)) if Path(params).exists() else TrainConfig()
        report = parameter_report(paper_size_model(cfg))
        for name, n in report.items():
            click.echo(f"{name:<40}{n:>14,}")
        click.echo(f"total: {report['total'] / 1e6:.2f} M parameters (paper, Table 7: 119.27 M)")
        return
    from msvse.train.trainer import train

    metrics = train(load_config(params, _overrides(sets)), resume=resume)
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return  # under torchrun, one summary line for the job
    click.echo(
        f"best epoch {metrics['best_epoch']}: dev F1 {100 * metrics['dev']['f1']:.2f}, "
        f"test F1 {100 * metrics['test']['f1']:.2f}"
    )


@click.command()
@click.argument("gold", type=click.Path(dir_okay=False))
@click.argument("pred", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON (fractions, with counts).")
@user_errors
def eval_main(gold: str, pred: str, as_json: bool) -> None:
    """Score PRED against GOLD (both Twitter format, same posts and tokens): entity
    precision, recall and F1 per type and micro overall, conlleval counting."""
    from msvse.train.metrics import evaluate_files, format_scores

    scores = evaluate_files(gold, pred)
    click.echo(json.dumps(scores, indent=2) if as_json else format_scores(scores))


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Checkpoint directory.")
@click.option("--data", type=click.Path(dir_okay=False), help="Posts to tag (Twitter format; tags optional).")
@click.option("--features", multiple=True, type=click.Path(dir_okay=False), help="Feature shard(s) for --data.")
@click.option("--out", type=click.Path(dir_okay=False), help="Where --data's tagged posts go.")
@click.option("--image", type=click.Path(dir_okay=False), help="One image: extracted now with the checkpoint's settings.")
@click.option("--text", help="The post's text for --image (split on whitespace).")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@user_errors
def predict_main(model_dir, data, features, out, image, text, device, batch_size) -> None:
    """Tag posts with a trained model: a data file plus its shards (--data, --features,
    --out), or one post (--image, --text), whose entities are printed as JSON."""
    from msvse.train.predict import predict_file, predict_post

    _setup_logging()
    if (data is None) == (image is None):
        raise click.UsageError("give either --data (with --features and --out) or --image with --text")
    if data is not None:
        if out is None:
            raise click.UsageError("--data needs --out")
        report = predict_file(model_dir, data, features, out, device=device, batch_size=batch_size)
        click.echo(
            f"wrote {out}: {report['posts']} posts; no image for {report['no_image']} "
            f"(missing {report['missing']}, unreadable {report['unreadable']}, "
            f"not in features {report['not_in_features']})",
            err=True,
        )
        return
    if text is None:
        raise click.UsageError("--image needs --text")
    click.echo(json.dumps(predict_post(model_dir, image, text, device=device), indent=2, ensure_ascii=False))
