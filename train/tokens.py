"""Tokenized inputs, built once and kept on disk: the token cache.

Tokenizing is the slow part of a run's start (every post's words, every image's labels
and caption), and it gives the same result every time for the same input. So the
result is written once as flat numpy arrays and opened memory-mapped by every later
run and every torchrun rank: a data set of millions of posts costs page cache, not
resident memory.

Each entry is a folder under the cache root named by a SHA-256 key of everything its
contents depend on: the input's bytes (a posts file; the label or caption rows of one
shard), the tokenizer (its full serialised form, vocabulary included), the settings
that shape the result (sentence budget, label and caption slots, distinct labels) and
:data:`CACHE_VERSION`. Change any of them and the key changes, so a stale entry is never
read; it just stays until removed (``rm -rf`` the root is always safe). An entry is built
in a temporary folder and renamed into place whole, so a killed run leaves no half entry
and concurrent builders (torchrun ranks) end with one.

Layout of a posts entry (``posts-<key>/``), P posts, W words, S sub-words, N windows::

    meta.json        source file, counts, the key's inputs
    post_words.npy   int64 (P+1,)  first word of post p is post_words[p]
    post_lines.npy   int32 (P,)    line of the post's IMGID in the source file
    image_ids.npy    S  (P,)       the post's image id, UTF-8
    types.npy        uint8 (P, 4)  L^E: which of PER, LOC, ORG, MISC the post contains
    word_chars.npy   int64 (W+1,)  word w is chars[word_chars[w]:word_chars[w+1]]
    chars.npy        uint8 (C,)    the words' UTF-8 bytes, concatenated
    tags.npy         int8 (W,)     tag id of each word (TAG_LABELS order)
    word_pieces.npy  int64 (W+1,)  word w's sub-words are pieces[word_pieces[w]:word_pieces[w+1]]
    pieces.npy       int32 (S,)    sub-word ids (a word with none has the unknown token)
    windows.npy      int32 (N, 3)  post, first word, end word of each window

A visual-text entry (``labels-<key>/`` or ``caption-<key>/``) holds the sub-word ids of
every row of one shard's labels or captions, R rows::

    offsets.npy      int64 (R+1,)  row r is ids[offsets[r]:offsets[r+1]]
    ids.npy          int32 (T,)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msvse.io import current_umask
from msvse.twitter import ENTITY_TYPES, Post, entities, iter_posts, read_text

log = logging.getLogger("msvse.train")

#: Bumped whenever the layout or the way an entry is computed changes.
CACHE_VERSION = 1
_CHUNK = 4096  # posts or rows tokenized per tokenizer call


def _sha256(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything that decides the tokenizer's output: its class and its
    full serialised form (vocabulary, normaliser, pre-tokeniser), or its vocabulary and
    special tokens where it has no serialised backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str)
    extra = json.dumps({"add_prefix_space": getattr(tokenizer, "add_prefix_space", None)})
    return _sha256(type(tokenizer).__name__, body, specials, extra)


@dataclass
class TokenizedPosts:
    """One posts file, tokenized (see the module docstring for the arrays)."""

    source: str
    post_words: np.ndarray
    post_lines: np.ndarray
    image_ids: np.ndarray
    types: np.ndarray
    word_chars: np.ndarray
    chars: np.ndarray
    tags: np.ndarray
    word_pieces: np.ndarray
    pieces: np.ndarray
    windows: np.ndarray

    def __len__(self) -> int:
        return len(self.post_lines)

    def words(self, p: int) -> tuple[int, int]:
        return int(self.post_words[p]), int(self.post_words[p + 1])

    def post(self, p: int, tag_labels: Sequence[str]) -> Post:
        """Post ``p`` as the reader gives it."""
        first, end = self.words(p)
        bounds = self.word_chars[first : end + 1]
        raw = bytes(self.chars[bounds[0] : bounds[-1]])
        tokens = tuple(raw[a - bounds[0] : b - bounds[0]].decode("utf-8") for a, b in zip(bounds[:-1], bounds[1:]))
        tags = tuple(tag_labels[t] for t in self.tags[first:end])
        return Post(self.image_ids[p].decode("utf-8"), tokens, tags, self.source, int(self.post_lines[p]))

    def word_ids(self, p: int, start: int, end: int, limit: int) -> list[list[int]]:
        """Sub-word ids of words ``start:end`` of post ``p``, each cut to ``limit``."""
        first = int(self.post_words[p])
        bounds = self.word_pieces[first + start : first + end + 1].tolist()
        flat = self.pieces[bounds[0] : bounds[-1]].tolist()  # one slice per window, then plain lists
        base = bounds[0]
        return [flat[a - base : min(b, a + limit) - base] for a, b in zip(bounds[:-1], bounds[1:])]

    def window_pieces(self, i: int, limit: int) -> int:
        """Sub-words in window ``i`` (each word's cut to ``limit``): its cost."""
        p, start, end = (int(x) for x in self.windows[i])
        first = int(self.post_words[p])
        counts = np.diff(self.word_pieces[first + start : first + end + 1])
        return int(np.minimum(counts, limit).sum())


_POST_ARRAYS = ("post_words", "post_lines", "image_ids", "types", "word_chars", "chars", "tags", "word_pieces", "pieces", "windows")


def tokenize_posts(posts: Iterable[Post], text: Any, tag_index: dict[str, int], source: str = "") -> TokenizedPosts:
    """Tokenize ``posts`` into the arrays of a posts entry, in memory. ``text`` is the
    run's :class:`~msvse.train.data.TextEncoder`; posts are tokenized a chunk at a time
    into flat typed buffers, so no list of all posts is ever built."""
    post_words, post_lines, windows = array("q", [0]), array("i"), array("i")
    word_chars, tags, word_pieces, pieces = array("q", [0]), array("b"), array("q", [0]), array("i")
    chars = bytearray()
    image_ids: list[bytes] = []
    types = bytearray()
    chunk: list[Post] = []

    def flush() -> None:
        for post, words in zip(chunk, text.word_pieces([p.tokens for p in chunk])):
            p = len(post_lines)
            for start, end in text.windows(words):
                windows.extend((p, start, end))
            post_lines.append(post.line)
            image_ids.append(post.image_id.encode("utf-8"))
            present = {e.type for e in entities(post.tags)}
            types.extend(t in present for t in ENTITY_TYPES)
            for token, tag, ids in zip(post.tokens, post.tags, words):
                chars.extend(token.encode("utf-8"))
                word_chars.append(len(chars))
                tags.append(tag_index[tag])
                pieces.extend(ids)
                word_pieces.append(len(pieces))
            post_words.append(len(tags))
        chunk.clear()

    for post in posts:
        chunk.append(post)
        if len(chunk) == _CHUNK:
            flush()
    flush()
    width = max([len(i) for i in image_ids] + [1])
    return TokenizedPosts(
        source=source,
        post_words=np.frombuffer(post_words, np.int64),
        post_lines=np.frombuffer(post_lines, np.int32),
        image_ids=np.asarray(image_ids, dtype=f"S{width}"),
        types=np.frombuffer(bytes(types), np.uint8).reshape(-1, len(ENTITY_TYPES)),
        word_chars=np.frombuffer(word_chars, np.int64),
        chars=np.frombuffer(bytes(chars), np.uint8),
        tags=np.frombuffer(tags, np.int8),
        word_pieces=np.frombuffer(word_pieces, np.int64),
        pieces=np.frombuffer(pieces, np.int32),
        windows=np.frombuffer(windows, np.int32).reshape(-1, 3),
    )


def tokenize_rows(rows: Sequence[str], tokenizer: Any, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-word ids of free-text rows (label words, captions), each cut to ``limit``:
    (offsets (R+1,), ids (T,)), one tokenizer call per chunk of rows."""
    offsets, ids = [0], []
    for start in range(0, len(rows), _CHUNK):
        chunk = [r if r.strip() else "" for r in rows[start : start + _CHUNK]]
        encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else []
        for row in encoded:
            row = row[:limit]
            ids.append(np.asarray(row, np.int32))
            offsets.append(offsets[-1] + len(row))
    return np.asarray(offsets, np.int64), (np.concatenate(ids) if ids else np.zeros(0, np.int32))


class TokenCache:
    """The cache root; ``None`` as root keeps everything in memory (nothing written)."""

    def __init__(self, root: str | Path | None):
        self.root = None if root is None else Path(root)

    def posts(self, path: str | Path, text: Any, tag_index: dict[str, int], settings: dict[str, Any]) -> tuple[TokenizedPosts, bool]:
        """The tokenized posts of a Twitter-format file, and whether the cache had them.
        ``settings``: what else shapes the result (sentence budget, tokenizer digest)."""
        raw = read_text(path)
        key = _sha256(str(CACHE_VERSION), "posts", raw, json.dumps(settings, sort_keys=True))
        folder = None if self.root is None else self.root / f"posts-{key[:32]}"
        if folder is not None and (folder / "meta.json").exists():
            return _open_posts(folder, str(path)), True
        tokenized = tokenize_posts(iter_posts(raw, str(path)), text, tag_index, str(path))
        del raw
        if len(tokenized) == 0:
            from msvse.errors import DataFormatError

            raise DataFormatError(str(path), None, "no posts found (a post starts with an 'IMGID:' line)")
        if folder is None:
            return tokenized, False
        meta = {"version": CACHE_VERSION, "source": str(path), "posts": len(tokenized), "settings": settings}
        self._write(folder, {name: getattr(tokenized, name) for name in _POST_ARRAYS}, meta)
        return _open_posts(folder, str(path)), False

    def rows(self, kind: str, rows: Sequence[str], tokenizer: Any, limit: int, settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, ids) of one shard's label or caption rows (see :func:`tokenize_rows`)."""
        key = _sha256(str(CACHE_VERSION), kind, "\x1f".join(rows), str(len(rows)), str(limit), json.dumps(settings, sort_keys=True))
        folder = None if self.root is None else self.root / f"{kind}-{key[:32]}"
        if folder is not None and (folder / "meta.json").exists():
            return _map(folder / "offsets.npy"), _map(folder / "ids.npy")
        offsets, ids = tokenize_rows(rows, tokenizer, limit)
        if folder is None:
            return offsets, ids
        self._write(folder, {"offsets": offsets, "ids": ids}, {"version": CACHE_VERSION, "kind": kind, "rows": len(rows)})
        return _map(folder / "offsets.npy"), _map(folder / "ids.npy")

    def _write(self, folder: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would shut out a shared cache's other users
        try:
            for name, values in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(values))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            try:
                os.rename(tmp, folder)
            except OSError:
                if not (folder / "meta.json").exists():  # not another builder's finished entry
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("token cache: wrote %s", folder.name)


def _map(path: Path) -> np.ndarray:
    """A cached array, memory-mapped read-only. Returned as a plain ndarray view of the
    map (slicing an ``np.memmap`` builds a memmap object each time, which per-item
    reads would pay for on every batch)."""
    return np.asarray(np.load(path, mmap_mode="r"))


def _open_posts(folder: Path, source: str) -> TokenizedPosts:
    arrays = {name: _map(folder / f"{name}.npy") for name in _POST_ARRAYS}
    return TokenizedPosts(source=source, **arrays)
