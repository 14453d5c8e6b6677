"""The Twitter-2015/2017 MNER text format: reading, writing, entity counting.

The format (shared by UMT, HVPNeT, MKGformer and RpBERT) is also how users bring
their own data::

    IMGID:1015799          starts a post; its image is 1015799.jpg
    RT<TAB>O               one token and its BIO tag per line
    George<TAB>B-PER
    Zimmerman<TAB>I-PER
                           a blank line ends the post

Tags are ``O``, ``B-T`` and ``I-T`` for T in PER, LOC, ORG, MISC; Twitter-2015's
``OTHER`` is read as ``MISC``. The reader copes with what real files contain (CRLF line
endings, a UTF-8 byte-order mark, a missing final blank line, trailing whitespace) and
rejects, with the file and line, what would otherwise turn into a wrong result.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from msvse.errors import DataFormatError

ENTITY_TYPES: tuple[str, ...] = ("PER", "LOC", "ORG", "MISC")
TAGS: tuple[str, ...] = ("O",) + tuple(f"{p}-{t}" for t in ENTITY_TYPES for p in ("B", "I"))
TYPE_ALIASES = {"OTHER": "MISC"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Post:
    """One post: its image id, tokens and tags, and where it starts in its file."""

    image_id: str
    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    source: str = ""
    line: int = 0

    @property
    def image_file(self) -> str:
        return image_file(self.image_id)


@dataclass(frozen=True)
class Entity:
    type: str
    start: int  # first token
    end: int  # one past the last token


def image_file(image_id: str) -> str:
    """The image file name of an id: ``1015799`` -> ``1015799.jpg``; an id that already
    ends in an image extension is taken as the file name."""
    if image_id.lower().endswith(IMAGE_EXTENSIONS):
        return image_id
    return f"{image_id}.jpg"


def check_image_id(image_id: str) -> str | None:
    """Why ``image_id`` is not acceptable, or None. An id must name a file directly
    inside the images folder: no separators, no ``..``, nothing hidden or empty."""
    if not image_id:
        return "empty image id"
    if "/" in image_id or "\\" in image_id:
        return f"image id {image_id!r} contains a path separator"
    if ".." in image_id:
        return f"image id {image_id!r} contains '..'"
    if image_id.startswith("."):
        return f"image id {image_id!r} starts with '.'"
    if any(ord(c) < 32 for c in image_id) or ":" in image_id:
        return f"image id {image_id!r} contains a control character or ':'"
    return None


def normalize_tag(tag: str) -> str | None:
    """The canonical form of a tag (``B-OTHER`` -> ``B-MISC``), or None if unknown."""
    if tag == "O":
        return tag
    prefix, sep, etype = tag.partition("-")
    if not sep or prefix not in ("B", "I"):
        return None
    etype = TYPE_ALIASES.get(etype, etype)
    if etype not in ENTITY_TYPES:
        return None
    return f"{prefix}-{etype}"


def parse_posts(text: str, source: str = "<text>", *, labelled: bool = True) -> list[Post]:
    """Parse the Twitter format from a string. With ``labelled=False`` a token line may
    omit its tab and tag (it is then tagged ``O``), for unlabelled data."""
    return list(iter_posts(text, source, labelled=labelled))


def iter_posts(text: str, source: str = "<text>", *, labelled: bool = True) -> Iterator[Post]:
    """The posts of :func:`parse_posts`, one at a time (a large file is never held as
    a list of posts)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    image_id: str | None = None
    start = 0
    tokens: list[str] = []
    tags: list[str] = []
    number = 0
    for number, raw in enumerate(io.StringIO(text, newline="\n"), start=1):
        line = raw.rstrip("\n").rstrip(" \t\r\f\v")
        if not line or line.startswith("IMGID:"):
            if image_id is not None:
                yield Post(image_id, tuple(tokens), tuple(tags), source, start)
            image_id, tokens, tags = None, [], []
            if not line:
                continue
            image_id = line[len("IMGID:"):].strip()
            problem = check_image_id(image_id)
            if problem:
                raise DataFormatError(source, number, problem)
            start = number
            continue
        if image_id is None:
            raise DataFormatError(source, number, "token line outside a post: a post must start with an 'IMGID:' line")
        token, tab, tag = line.partition("\t")
        if not tab:
            if labelled:
                raise DataFormatError(source, number, f"expected 'token<TAB>tag', found no tab in {line!r}")
            tag = "O"
        if not token:
            # A token may be a no-break space (Twitter-2015 has one); only an empty one is an error.
            raise DataFormatError(source, number, "empty token before the tab")
        canonical = normalize_tag(tag.strip())
        if canonical is None:
            known = ", ".join(TAGS)
            raise DataFormatError(source, number, f"unknown tag {tag.strip()!r} (known: {known}; OTHER reads as MISC)")
        tokens.append(token)
        tags.append(canonical)
    if image_id is not None:
        yield Post(image_id, tuple(tokens), tuple(tags), source, start)


def read_text(path: str | Path) -> str:
    """A data file's text; a missing, unreadable or non-UTF-8 file is a
    :class:`DataFormatError` naming it (and the line of the first bad byte)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataFormatError(str(path), None, "file not found") from None
    except IsADirectoryError:
        raise DataFormatError(str(path), None, "is a directory, expected a data file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(str(path), line, f"not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def read_posts(path: str | Path, *, labelled: bool = True) -> list[Post]:
    """Read a Twitter-format file. Errors name the file and line."""
    posts = parse_posts(read_text(path), str(path), labelled=labelled)
    if not posts:
        raise DataFormatError(str(path), None, "no posts found (a post starts with an 'IMGID:' line)")
    return posts


def format_posts(posts: Iterable[Post], tags: Iterable[Sequence[str]] | None = None) -> str:
    """Write posts in the Twitter format, with their own tags or the given ones."""
    out: list[str] = []
    tag_rows = iter(tags) if tags is not None else None
    for post in posts:
        row = list(next(tag_rows)) if tag_rows is not None else list(post.tags)
        if len(row) != len(post.tokens):
            raise ValueError(f"post {post.image_id}: {len(post.tokens)} tokens but {len(row)} tags")
        out.append(f"IMGID:{post.image_id}\n")
        out.extend(f"{tok}\t{tag}\n" for tok, tag in zip(post.tokens, row))
        out.append("\n")
    return "".join(out)


def entities(tags: Sequence[str]) -> list[Entity]:
    """Entities the conlleval way (seqeval's default): a chunk starts at ``B-T``, or at
    ``I-T`` when the previous tag is not of type T; it ends before ``O``, before any
    ``B-`` and before a tag of another type."""
    found: list[Entity] = []
    current: str | None = None
    start = 0
    for i, tag in enumerate(tags):
        prefix, _, etype = tag.partition("-")
        begins = prefix == "B" or (prefix == "I" and etype != current)
        if current is not None and (tag == "O" or begins):
            found.append(Entity(current, start, i))
            current = None
        if begins:
            current, start = etype, i
    if current is not None:
        found.append(Entity(current, start, len(tags)))
    return found


def stats(posts: Sequence[Post]) -> dict[str, int]:
    """Posts, tokens and entities (per type and in all) of a data set."""
    counts: Counter[str] = Counter()
    for post in posts:
        for ent in entities(post.tags):
            counts[ent.type] += 1
    row = {"posts": len(posts), "tokens": sum(len(p.tokens) for p in posts)}
    row.update({t: counts[t] for t in ENTITY_TYPES})
    row["entities"] = sum(counts[t] for t in ENTITY_TYPES)
    return row
