"""``msvse-data``: look at data sets in the Twitter format."""

from __future__ import annotations

import json

import click

from msvse.cliutil import user_errors
from msvse.twitter import ENTITY_TYPES, read_posts, stats


@click.group()
@click.version_option(package_name="msvse")
def data_cli() -> None:
    """Inspect Twitter-format MNER data (IMGID lines, token<TAB>tag, blank lines)."""


@data_cli.command("stats")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object keyed by file.")
@user_errors
def stats_cmd(files: tuple[str, ...], as_json: bool) -> None:
    """Posts, tokens and entities per type of each FILE, counted the conlleval way
    (an I- tag with no B- before it starts an entity)."""
    rows = {path: stats(read_posts(path)) for path in files}
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    columns = ["posts", "tokens", *ENTITY_TYPES, "entities"]
    width = max(len("file"), *(len(p) for p in rows))
    click.echo(f"{'file':<{width}}  " + "  ".join(f"{c:>8}" for c in columns))
    for path, row in rows.items():
        click.echo(f"{path:<{width}}  " + "  ".join(f"{row[c]:>8}" for c in columns))


@data_cli.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@user_errors
def check_cmd(files: tuple[str, ...]) -> None:
    """Read each FILE with the same checks training uses; print one line per file."""
    for path in files:
        posts = read_posts(path)
        click.echo(f"{path}: ok, {len(posts)} posts")
