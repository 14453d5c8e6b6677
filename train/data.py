"""Posts joined with stage-1 features, tokenized for the encoder, batched for the model.

Three promises, each tested:

- **No image is ever borrowed.** A post whose image is absent from the shards, or
  recorded there as missing or unreadable, gets an explicit no-image input (zero grid,
  no labels, empty caption); an image that lacks one of the needed kinds gets zeros or
  empty text for that kind only. Every such post is counted by reason
  (:class:`NoImageReport`), logged at start and written to the run's JSON.
- **No word is ever dropped.** Only the first sub-word of a word carries its tag (the
  others are left out of the CRF and the loss); a word the tokenizer turns into zero
  sub-words (a no-break space, an emoji variation selector) is given the unknown token,
  so it still has a position and a prediction.
- **No word is ever cut.** A post longer than the encoder's limit (special tokens and
  the caption or labels of the joint input included) is split into consecutive windows;
  :func:`reassemble` joins their predictions so scoring sees every gold word.

Batches are padded to their longest item, not to a fixed length.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from msvse.errors import ConfigError
from msvse.features import STATUS_MISSING, STATUS_OK, STATUS_UNREADABLE, ImageFeatures
from msvse.train.config import SCALE_KIND, Ablation
from msvse.train.tokens import TokenCache, TokenizedPosts, tokenize_posts, tokenizer_fingerprint
from msvse.twitter import TAGS, Post, image_file

log = logging.getLogger("msvse.train")

#: The NER label space of eqs 19-23: the 9 BIO tags plus the [CLS] and [SEP] positions
#: the CRF also runs over (the sequence's first and last special tokens).
CLS_TAG, SEP_TAG = "[CLS]", "[SEP]"
TAG_LABELS: tuple[str, ...] = TAGS + (CLS_TAG, SEP_TAG)
TAG_INDEX: dict[str, int] = {t: i for i, t in enumerate(TAG_LABELS)}

NO_IMAGE_REASONS: dict[str, str] = {
    "not_in_features": "image id absent from every feature file",
    "missing": "image file missing at extraction",
    "unreadable": "image file unreadable at extraction",
    "partial": "image present but a needed feature kind absent (zeros for that kind only)",
}


class FeatureLookup(Protocol):
    """What the dataset needs from features: :class:`~msvse.features.FeatureStore`
    or :class:`MemoryFeatures`."""

    grid_shape: tuple[int, int] | None

    def __contains__(self, image: str) -> bool: ...

    def status(self, image: str) -> int: ...

    def locate(self, kind: str, image: str) -> tuple[int, int] | None: ...

    def read_grids(self, places: Sequence[tuple[int, int]]) -> np.ndarray: ...

    def text_rows(self, kind: str) -> Iterator[tuple[int, list]]: ...


class MemoryFeatures:
    """Features held in memory (single-post prediction), keyed by image file name;
    the same lookups as a :class:`~msvse.features.FeatureStore` with one shard."""

    def __init__(self, features: Sequence[ImageFeatures]):
        self._rows = list(features)
        self._by_image = {f.image: i for i, f in enumerate(self._rows)}
        grids = [f.grid for f in self._rows if f.grid is not None]
        self.grid_shape = tuple(grids[0].shape) if grids else None

    def __contains__(self, image: str) -> bool:
        return image in self._by_image

    def get(self, image: str) -> ImageFeatures:
        return self._rows[self._by_image[image]]

    def status(self, image: str) -> int:
        return self.get(image).status

    def locate(self, kind: str, image: str) -> tuple[int, int] | None:
        f = self.get(image)
        value = {"grid": f.grid, "objects": f.labels, "caption": f.caption}[kind]
        return None if value is None else (0, self._by_image[image])

    def read_grids(self, places: Sequence[tuple[int, int]]) -> np.ndarray:
        return np.stack([np.asarray(self._rows[row].grid, np.float16) for _, row in places])

    def text_rows(self, kind: str) -> Iterator[tuple[int, list]]:
        if kind == "objects":
            yield 0, [f.labels or () for f in self._rows]
        else:
            yield 0, [f.caption or "" for f in self._rows]


# --------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class Template:
    """Where the tokenizer puts its special tokens, read from the tokenizer itself
    (BERT: ``[CLS] A [SEP] B [SEP]``; RoBERTa/XLM-R: ``<s> A </s></s> B </s>``)."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    pair_before: tuple[int, ...]
    pair_middle: tuple[int, ...]
    pair_after: tuple[int, ...]
    # Token type of each part of a pair: before, A, middle, B, after.
    pair_types: tuple[tuple[int, ...], int, tuple[int, ...], int, tuple[int, ...]]

    @classmethod
    def of(cls, tokenizer) -> Template:
        unk = tokenizer.unk_token
        if unk is None:
            raise ConfigError("model.encoder: the tokenizer has no unknown token, which empty words need")
        single = tokenizer([unk], is_split_into_words=True)
        pair = tokenizer([unk], [unk], is_split_into_words=True)
        s_ids, s_seq = single["input_ids"], single.sequence_ids()
        p_ids, p_seq = pair["input_ids"], pair.sequence_ids()
        types = pair.get("token_type_ids") or [0] * len(p_ids)
        i = s_seq.index(0)
        a, b = p_seq.index(0), p_seq.index(1)
        if i == 0 or i == len(s_ids) - 1:
            raise ConfigError(
                "model.encoder: the tokenizer adds no start and end special tokens; "
                "the CRF runs over them, so a BERT-family tokenizer is needed"
            )
        return cls(
            before=tuple(s_ids[:i]),
            after=tuple(s_ids[i + 1 :]),
            pair_before=tuple(p_ids[:a]),
            pair_middle=tuple(p_ids[a + 1 : b]),
            pair_after=tuple(p_ids[b + 1 :]),
            pair_types=(tuple(types[:a]), types[a], tuple(types[a + 1 : b]), types[b], tuple(types[b + 1 :])),
        )

    @property
    def single_specials(self) -> int:
        return len(self.before) + len(self.after)

    @property
    def pair_specials(self) -> int:
        return len(self.pair_before) + len(self.pair_middle) + len(self.pair_after)


class TextEncoder:
    """The encoder's tokenizer applied the way the model needs it: sub-words per word,
    label and caption pieces, and the sentence budget that sets the windows.

    ``max_length`` is the longest sequence the encoder takes. The sentence budget is what
    is left for sentence sub-words in the longest sequence the model builds: the joint
    input with its special tokens and the largest caption and labels it may carry.
    """

    def __init__(
        self,
        tokenizer,
        *,
        max_length: int,
        label_tokens: int,
        caption_tokens: int,
        joint_input: str,
        distinct_labels: bool = True,
    ):
        self.tokenizer = tokenizer
        self.distinct_labels = distinct_labels
        self.template = Template.of(tokenizer)
        self.unk_id = tokenizer.unk_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_length = max_length
        self.label_tokens = label_tokens
        self.caption_tokens = caption_tokens
        self.joint_input = joint_input
        specials = self.template.single_specials
        self.label_content = label_tokens - specials
        self.caption_content = caption_tokens - specials
        if self.label_content < 1:
            raise ConfigError(f"model.label_tokens: {label_tokens} leaves no room beside {specials} special tokens")
        if self.caption_content < 1:
            raise ConfigError(f"model.caption_tokens: {caption_tokens} leaves no room beside {specials} special tokens")
        joint_extra = 0
        if "labels" in joint_input:
            joint_extra += self.label_content
        if "caption" in joint_input:
            joint_extra += self.caption_content
        joint_specials = self.template.pair_specials if joint_input != "none" else specials
        self.budget = min(max_length - specials, max_length - joint_specials - joint_extra)
        for name, size in (("label_tokens", label_tokens), ("caption_tokens", caption_tokens)):
            if size > max_length:
                raise ConfigError(f"model.{name}: {size} exceeds the encoder's limit of {max_length} tokens")
        if self.budget < 1:
            raise ConfigError(
                f"model.max_length: {max_length} tokens leave no room for the sentence beside the joint input "
                f"({joint_extra} caption/label tokens, {joint_specials} special tokens); "
                "raise it or lower model.caption_tokens / model.label_tokens"
            )

    def word_pieces(self, sentences: Sequence[Sequence[str]]) -> list[list[list[int]]]:
        """Sub-word ids of every word of every sentence; a word with none gets ``[unk]``."""
        out: list[list[list[int]]] = []
        nonempty = [list(s) for s in sentences if s]
        encoded = self.tokenizer(nonempty, is_split_into_words=True, add_special_tokens=False) if nonempty else None
        k = 0
        for words in sentences:
            pieces: list[list[int]] = [[] for _ in words]
            if words:
                ids = encoded["input_ids"][k]
                for token_id, w in zip(ids, encoded.word_ids(k)):
                    if w is not None:
                        pieces[w].append(token_id)
                k += 1
            out.append([p if p else [self.unk_id] for p in pieces])
        return out

    def text_ids(self, text: str, limit: int) -> list[int]:
        """Sub-word ids of free text (caption, label words), cut to ``limit``."""
        if not text.strip():
            return []
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][:limit]

    def label_text(self, labels: Sequence[str]) -> str:
        """The text of the visual labels C, given best first as the shard stores them.
        With ``distinct_labels`` each class name appears once, at its best detection
        (the paper's Fig. 1 lists distinct names: "chair, hair, handrail, steeple");
        else every detection's name, duplicates included."""
        words = list(dict.fromkeys(labels)) if self.distinct_labels else list(labels)
        return " ".join(words)

    def label_ids(self, labels: Sequence[str]) -> list[int]:
        """Sub-word ids of the visual labels C (:meth:`label_text`), cut to the slots."""
        return self.text_ids(self.label_text(labels), self.label_content)

    @functools.cached_property
    def settings(self) -> dict[str, Any]:
        """Everything besides the input that decides this encoder's token output: the
        key of the token cache's entries."""
        return {
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "budget": self.budget,
            "unk": self.unk_id,
            "distinct_labels": self.distinct_labels,
        }

    def windows(self, pieces: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """Consecutive word ranges whose sub-words fit the sentence budget. A single word
        longer than the budget gets a window of its own (its sub-words are cut there;
        only its first one carries the tag)."""
        if not pieces:
            return [(0, 0)]
        spans: list[tuple[int, int]] = []
        start, used = 0, 0
        for i, p in enumerate(pieces):
            n = min(len(p), self.budget)
            if used + n > self.budget and i > start:
                spans.append((start, i))
                start, used = i, 0
            used += n
        spans.append((start, len(pieces)))
        return spans


# --------------------------------------------------------------------------- dataset


@dataclass
class Visual:
    """What the model sees of one image: grid (or None for zeros), label-word and
    caption sub-word ids (without special tokens)."""

    grid: np.ndarray | None  # (G, C) float16, as stored in the shards
    label_ids: list[int]
    caption_ids: list[int]
    has_image: bool
    reason: str = ""  # a NO_IMAGE_REASONS key, or "" when every needed kind is there


@dataclass
class Item:
    """One window of one post: the unit of a batch."""

    post: int
    start: int
    end: int
    pieces: list[list[int]]
    tags: list[int]
    types: tuple[float, ...]  # L^E of the whole post (eq 17)
    visual: Visual | None


@dataclass
class NoImageReport:
    """Posts that got a no-image (or partly empty) input, by reason."""

    posts: int = 0
    windows: int = 0
    not_in_features: int = 0
    missing: int = 0
    unreadable: int = 0
    partial: int = 0

    @property
    def no_image(self) -> int:
        return self.not_in_features + self.missing + self.unreadable

    def as_dict(self) -> dict[str, int]:
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row["no_image"] = self.no_image
        return row

    def line(self, name: str) -> str:
        reasons = ", ".join(f"{getattr(self, r)} {r.replace('_', ' ')}" for r in NO_IMAGE_REASONS)
        return (
            f"{name}: {self.posts} posts, {self.windows} windows; "
            f"no image for {self.no_image} posts, partial features for {self.partial} ({reasons})"
        )


#: Reason codes of the visual index: "" (every needed kind there), then NO_IMAGE_REASONS.
REASON_CODES: tuple[str, ...] = ("",) + tuple(NO_IMAGE_REASONS)


class VisualIndex:
    """Where the features of each image of a data set are, not the features: per
    image, its no-image reason, the shard and row of its grid, and the rows of its
    tokenized labels and caption (in the token cache, one table per shard). Grids
    are read when a batch is built (:meth:`PostDataset.__getitems__`)."""

    def __init__(
        self,
        images: list[str],
        features: FeatureLookup | None,
        kinds: Mapping[str, str],
        text: TextEncoder,
        cache: TokenCache,
    ):
        n = len(images)
        self.features = features
        self.reason = np.zeros(n, np.int8)
        self.grid = np.full((n, 2), -1, np.int32)  # (shard, row)
        self.labels = np.full((n, 2), -1, np.int32)  # (shard, row) in self.tables["objects"]
        self.caption = np.full((n, 2), -1, np.int32)
        self.tables: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {"objects": {}, "caption": {}}
        code = {r: i for i, r in enumerate(REASON_CODES)}
        for i, image in enumerate(images):
            if features is None or image not in features:
                self.reason[i] = code["not_in_features"]
                continue
            status = features.status(image)
            if status in (STATUS_MISSING, STATUS_UNREADABLE):
                self.reason[i] = code["missing" if status == STATUS_MISSING else "unreadable"]
                continue
            assert status == STATUS_OK, status
            partial = False
            for kind, column in (("grid", self.grid), ("objects", self.labels), ("caption", self.caption)):
                if kind in kinds:
                    at = features.locate(kind, image)
                    partial |= at is None
                    if at is not None:
                        column[i] = at
            self.reason[i] = code["partial"] if partial else 0
        for kind, limit in (("objects", text.label_content), ("caption", text.caption_content)):
            if kind in kinds and features is not None:
                wanted = set(self.labels[:, 0] if kind == "objects" else self.caption[:, 0]) - {-1}
                for shard, rows in features.text_rows(kind):
                    if shard in wanted:
                        texts = [text.label_text(r) for r in rows] if kind == "objects" else list(rows)
                        self.tables[kind][shard] = cache.rows(
                            "labels" if kind == "objects" else "caption", texts, text.tokenizer, limit, text.settings
                        )

    def visual(self, i: int, grid: np.ndarray | None) -> Visual:
        reason = REASON_CODES[self.reason[i]]
        if reason in ("not_in_features", "missing", "unreadable"):
            return Visual(None, [], [], has_image=False, reason=reason)
        return Visual(grid, self._ids("objects", self.labels[i]), self._ids("caption", self.caption[i]), True, reason)

    def _ids(self, kind: str, at: np.ndarray) -> list[int]:
        if at[0] < 0:
            return []
        offsets, ids = self.tables[kind][int(at[0])]
        return ids[offsets[at[1]] : offsets[at[1] + 1]].tolist()


class PostDataset(Dataset):
    """The windows of a data set's posts. It holds the tokenized posts (memory-mapped
    from the token cache) and a :class:`VisualIndex`; an :class:`Item` is built when
    asked for, its grid read from its shard then, so memory does not grow with the
    features. ``__getitems__`` builds a whole batch with one grid read per shard
    (DataLoader calls it, in its workers when there are any)."""

    def __init__(self, tokens: TokenizedPosts, images: np.ndarray, visuals: VisualIndex | None, report: NoImageReport, budget: int):
        self.tokens = tokens
        self.images = images  # (P,) int32: the post's image in ``visuals``
        self.visuals = visuals
        self.report = report
        self.budget = budget

    @property
    def posts(self) -> _Posts:
        """The posts, as the reader gives them (decoded one at a time)."""
        return _Posts(self.tokens)

    @property
    def items(self) -> _Items:
        """The windows as :class:`Item` s (built one at a time)."""
        return _Items(self)

    @property
    def windows(self) -> np.ndarray:
        """(N, 3) int32: post, first word, end word of each window."""
        return self.tokens.windows

    def __len__(self) -> int:
        return len(self.tokens.windows)

    def __getitem__(self, i: int) -> Item:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        grids: dict[int, np.ndarray] = {}
        if self.visuals is not None and self.visuals.features is not None:
            images = sorted({int(self.images[self.tokens.windows[i][0]]) for i in indices})
            with_grid = [j for j in images if self.visuals.grid[j, 0] >= 0]
            if with_grid:
                block = self.visuals.features.read_grids([tuple(int(x) for x in self.visuals.grid[j]) for j in with_grid])
                grids = dict(zip(with_grid, block))
        return [self._item(int(i), grids) for i in indices]

    def _item(self, i: int, grids: Mapping[int, np.ndarray]) -> Item:
        p, start, end = (int(x) for x in self.tokens.windows[i])
        first = int(self.tokens.post_words[p])
        visual = None
        if self.visuals is not None:
            image = int(self.images[p])
            visual = self.visuals.visual(image, grids.get(image))
        return Item(
            post=p,
            start=start,
            end=end,
            pieces=self.tokens.word_ids(p, start, end, self.budget),
            tags=self.tokens.tags[first + start : first + end].tolist(),
            types=tuple(float(x) for x in self.tokens.types[p]),
            visual=visual,
        )

    def window_cost(self, i: int) -> int:
        """Sub-words in window ``i``: what predicting it costs."""
        return self.tokens.window_pieces(i, self.budget)

    def post_lengths(self) -> np.ndarray:
        """(P,) words per post."""
        return np.diff(self.tokens.post_words)


class _Posts(Sequence):
    def __init__(self, tokens: TokenizedPosts):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.tokens.post(i, TAG_LABELS)


class _Items(Sequence):
    def __init__(self, dataset: PostDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.dataset.__getitems__(list(range(*i.indices(len(self)))))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.dataset[i]

    def __iter__(self):
        for start in range(0, len(self), 256):
            yield from self.dataset.__getitems__(list(range(start, min(start + 256, len(self)))))


def build_dataset(
    posts: str | Path | Sequence[Post],
    text: TextEncoder,
    ablation: Ablation,
    features: FeatureLookup | None,
    grid_shape: tuple[int, int] | None = None,
    cache: TokenCache | None = None,
) -> PostDataset:
    """The windows of ``posts`` (a Twitter-format file, or posts in memory) with an
    index of their images' features (a no-image input where there is none, counted in
    the report). A file's tokens come from ``cache`` when it has them, else they are
    computed and, with a cache root, kept there."""
    cache = cache or TokenCache(None)
    if isinstance(posts, (str, Path)):
        tokens, _ = cache.posts(posts, text, TAG_INDEX, text.settings)
    else:
        tokens = tokenize_posts(posts, text, TAG_INDEX, source=posts[0].source if len(posts) else "")
    kinds = ablation.needed_kinds
    report = NoImageReport(posts=len(tokens), windows=len(tokens.windows))
    image_names: dict[str, int] = {}
    images = np.asarray(
        [image_names.setdefault(image_file(raw.decode("utf-8")), len(image_names)) for raw in tokens.image_ids], np.int32
    )
    visuals = None
    if kinds:
        if features is not None and "grid" in kinds and grid_shape is not None:
            stored = features.grid_shape
            if stored is not None and tuple(stored) != tuple(grid_shape):
                example = next((im for im in image_names if im in features and features.locate("grid", im)), "?")
                raise ConfigError(f"data.features: image {example!r} has a {tuple(stored)} grid, expected {grid_shape}")
        visuals = VisualIndex(list(image_names), features, kinds, text, cache)
        counts = np.bincount(visuals.reason[images], minlength=len(REASON_CODES))
        for code, reason in enumerate(REASON_CODES):
            if reason:
                setattr(report, reason, int(counts[code]))
    return PostDataset(tokens, images, visuals, report, text.budget)


def check_kinds(ablation: Ablation, available: Sequence[str], paths: Sequence[str]) -> None:
    """Every feature kind the settings need is in some shard, else the key that needs it."""
    for kind, key in ablation.needed_kinds.items():
        if kind not in available:
            scale = next(s for s, k in SCALE_KIND.items() if k == kind)
            raise ConfigError(
                f"{key}: uses '{scale}', but none of the feature files ({', '.join(paths) or 'none given'}) "
                f"holds '{kind}' features; add one to data.features or change {key}"
            )


def reassemble(dataset: PostDataset, window_tags: Sequence[Sequence[str]]) -> list[list[str]]:
    """Join per-window predictions (in dataset window order) back into one row per post."""
    windows = dataset.windows
    lengths = dataset.post_lengths()
    rows: list[list[str]] = [[] for _ in range(len(lengths))]
    for i in np.lexsort((windows[:, 1], windows[:, 0])):
        p, start, end = (int(x) for x in windows[i])
        assert len(rows[p]) == start, (p, start)
        assert len(window_tags[i]) == end - start
        rows[p].extend(window_tags[i])
    for p, row in enumerate(rows):
        assert len(row) == lengths[p], p
    return rows


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Tensors of one batch. Sequence lengths are those of the batch's longest item.

    ``*_index`` pick, for each CRF position ([CLS], the first sub-word of each word,
    the closing [SEP]), its row in the text-only and in the joint sequence.
    """

    text_ids: torch.Tensor  # (B, Ls)
    text_mask: torch.Tensor  # (B, Ls) bool
    text_types: torch.Tensor  # (B, Ls)
    text_index: torch.Tensor  # (B, T)
    crf_mask: torch.Tensor  # (B, T) bool: [CLS], words, [SEP]
    word_mask: torch.Tensor  # (B, T) bool: words only
    tags: torch.Tensor  # (B, T)
    types: torch.Tensor  # (B, 4) float, L^E
    joint_ids: torch.Tensor | None = None  # (B, Lj)
    joint_mask: torch.Tensor | None = None
    joint_types: torch.Tensor | None = None
    joint_index: torch.Tensor | None = None  # (B, T)
    joint_visual: torch.Tensor | None = None  # (B, Lj) bool: caption/label positions (H^v)
    grid: torch.Tensor | None = None  # (B, G, C) float16
    label_ids: torch.Tensor | None = None  # (B, Lo)
    label_mask: torch.Tensor | None = None
    caption_ids: torch.Tensor | None = None  # (B, Ld)
    caption_mask: torch.Tensor | None = None
    has_image: torch.Tensor | None = None  # (B,) bool
    items: list[Item] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return Batch(**moved)

    def __len__(self) -> int:
        return self.text_ids.shape[0]


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Rows padded with ``value`` to the longest row: (B, longest)."""
    out = np.full((len(rows), max([len(r) for r in rows] + [1])), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


class Collator:
    """Turns items into a :class:`Batch` for a model with the given settings."""

    def __init__(self, text: TextEncoder, ablation: Ablation, grid_shape: tuple[int, int] | None):
        self.text = text
        self.ablation = ablation
        self.grid_shape = grid_shape

    def __call__(self, items: Sequence[Item]) -> Batch:
        t = self.text.template
        pad = self.text.pad_id
        ab = self.ablation
        text_rows, text_index, tags_rows, crf_len = [], [], [], []
        for item in items:
            flat, firsts = _flatten(item.pieces, len(t.before))
            row = list(t.before) + flat + list(t.after)
            text_rows.append(row)
            text_index.append([0] + firsts + [len(row) - 1])
            tags_rows.append([TAG_INDEX[CLS_TAG]] + item.tags + [TAG_INDEX[SEP_TAG]])
            crf_len.append(len(item.pieces) + 2)
        text_ids = _pad(text_rows, pad)
        crf_mask = _lengths_mask(tags_rows)
        word_mask = crf_mask.clone()
        word_mask[:, 0] = False
        word_mask[torch.arange(len(items)), torch.as_tensor(crf_len) - 1] = False
        batch = Batch(
            text_ids=text_ids,
            text_mask=_lengths_mask(text_rows),
            text_types=torch.zeros_like(text_ids),
            text_index=_pad(text_index, 0),
            crf_mask=crf_mask,
            word_mask=word_mask,
            tags=_pad(tags_rows, 0),
            types=torch.tensor([item.types for item in items], dtype=torch.float32),
            items=list(items),
        )
        if ab.text_only:
            return batch
        visuals = [item.visual for item in items]
        assert all(v is not None for v in visuals)
        joint_rows, joint_types, joint_index, joint_visual = [], [], [], []
        for item, v in zip(items, visuals):
            flat, _ = _flatten(item.pieces, 0)
            if ab.joint_input == "none":
                row = list(t.before) + flat + list(t.after)
                type_row = [0] * len(row)
                offset = len(t.before)
                visual_span = (0, 0)
            else:
                extra = (v.label_ids if "labels" in ab.joint_input else []) + (
                    v.caption_ids if "caption" in ab.joint_input else []
                )
                before, a_type, middle, b_type, after = t.pair_types
                row = list(t.pair_before) + extra + list(t.pair_middle) + flat + list(t.pair_after)
                type_row = list(before) + [a_type] * len(extra) + list(middle) + [b_type] * len(flat) + list(after)
                offset = len(t.pair_before) + len(extra) + len(t.pair_middle)
                visual_span = (len(t.pair_before), len(t.pair_before) + len(extra))
            _, firsts = _flatten(item.pieces, offset)
            joint_rows.append(row)
            joint_types.append(type_row)
            joint_index.append([0] + firsts + [len(row) - 1])
            mask = [False] * len(row)
            mask[visual_span[0] : visual_span[1]] = [True] * (visual_span[1] - visual_span[0])
            joint_visual.append(mask)
        batch.joint_ids = _pad(joint_rows, pad)
        batch.joint_mask = _lengths_mask(joint_rows)
        batch.joint_types = _pad(joint_types, 0)
        batch.joint_index = _pad(joint_index, 0)
        batch.joint_visual = _pad([[int(x) for x in m] for m in joint_visual], 0).bool()
        batch.has_image = torch.tensor([v.has_image for v in visuals])
        scales = ab.routes.filtered
        if "grid" in scales:
            assert self.grid_shape is not None
            grid = np.zeros((len(items), *self.grid_shape), np.float16)
            for i, v in enumerate(visuals):
                if v.grid is not None:
                    grid[i] = v.grid
            batch.grid = torch.from_numpy(grid)
        if "labels" in scales:
            rows = [list(t.before) + v.label_ids + list(t.after) for v in visuals]
            batch.label_ids, batch.label_mask = _pad(rows, pad), _lengths_mask(rows)
        if "caption" in scales:
            rows = [list(t.before) + v.caption_ids + list(t.after) for v in visuals]
            batch.caption_ids, batch.caption_mask = _pad(rows, pad), _lengths_mask(rows)
        return batch


def _flatten(pieces: Sequence[Sequence[int]], offset: int) -> tuple[list[int], list[int]]:
    flat: list[int] = []
    firsts: list[int] = []
    for p in pieces:
        firsts.append(offset + len(flat))
        flat.extend(p)
    return flat, firsts


def _lengths_mask(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    lengths = torch.tensor([len(r) for r in rows])
    n = max(int(lengths.max()), 1)
    return torch.arange(n)[None, :] < lengths[:, None]
