"""Synthetic posts, feature shards and randomly initialised encoders, in the real formats.

For the tests and the training benchmark: nothing is downloaded. Encoders are saved
with ``save_pretrained`` (config, safetensors weights, tokenizer), shards with
:func:`msvse.features.write_shard`, posts in the Twitter format, so every
loading path is the one real runs take.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from msvse.features import STATUS_MISSING, STATUS_OK, STATUS_UNREADABLE, write_shard
from msvse.twitter import Post, format_posts

ENTITIES: dict[str, list[tuple[str, ...]]] = {
    "PER": [("George", "Zimmerman"), ("Taylor", "Swift"), ("Obama",), ("Kobe", "Bryant"), ("Adele",)],
    "LOC": [("Paris",), ("London",), ("Texas",), ("New", "York"), ("Boston",)],
    "ORG": [("NASA",), ("Google",), ("Lakers",), ("UN",), ("Apple",)],
    "MISC": [("Olympics",), ("Grammys",), ("iPhone",), ("Christmas",)],
}
FILLER = ["RT", "the", "at", "in", "love", "new", "today", "with", "and", "is", "#news", "!", "wow", "to", "a"]
LABEL_WORDS = ["person", "dog", "car", "building", "tie", "cell phone", "traffic light", "sports ball"]
CAPTION_WORDS = ["a", "man", "woman", "standing", "in", "front", "of", "building", "crowd", "with", "dog", "the"]
# Word pieces so that some words split into several sub-words.
PIECES = ["zim", "##mer", "##man", "bry", "##ant", "##s", "##ing", "##e", "##a", "##o"]


def vocabulary() -> list[str]:
    """Lower-cased WordPiece vocabulary covering the synthetic text."""
    words = {w.lower() for names in ENTITIES.values() for e in names for w in e}
    words |= {w.lower() for w in FILLER} | set(" ".join(LABEL_WORDS).split()) | set(CAPTION_WORDS)
    words |= {"#", "@"}
    words -= {"zimmerman", "bryant", "#news"}
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(words) + ["news"] + PIECES


def synthetic_posts(
    n: int, *, seed: int = 0, prefix: str = "img", min_words: int = 4, max_words: int = 14, long_every: int = 0
) -> list[Post]:
    """``n`` labelled posts with entities of every type; with ``long_every`` = k, every
    k-th post is made long (60-90 words) to exercise windowing."""
    rng = random.Random(seed)
    posts = []
    for i in range(n):
        length = rng.randint(min_words, max_words)
        if long_every and i % long_every == long_every - 1:
            length = rng.randint(60, 90)
        tokens: list[str] = []
        tags: list[str] = []
        while len(tokens) < length:
            if rng.random() < 0.3:
                etype = rng.choice(list(ENTITIES))
                words = rng.choice(ENTITIES[etype])
                tokens.extend(words)
                tags.extend([f"B-{etype}"] + [f"I-{etype}"] * (len(words) - 1))
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
        posts.append(Post(f"{prefix}{i}", tuple(tokens), tuple(tags)))
    return posts


def write_posts(path: str | Path, posts: Sequence[Post]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_posts(posts), encoding="utf-8")
    return path


def write_features(
    folder: str | Path,
    images: Sequence[str],
    *,
    grid_shape: tuple[int, int] = (4, 6),
    seed: int = 0,
    missing: Sequence[str] = (),
    unreadable: Sequence[str] = (),
    config: dict | None = None,
) -> list[Path]:
    """``grid.h5``, ``objects.h5`` and ``caption.h5`` for ``images`` (file names).
    Images in ``missing``/``unreadable`` get that status and empty rows."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    status = [STATUS_MISSING if i in missing else STATUS_UNREADABLE if i in unreadable else STATUS_OK for i in images]
    ok = np.array([s == STATUS_OK for s in status])
    grid = rng.standard_normal((len(images), *grid_shape)).astype(np.float32) * ok[:, None, None]
    labels = [
        list(rng.choice(LABEL_WORDS, size=int(rng.integers(1, 5)))) if good else [] for good in ok
    ]
    captions = [" ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(4, 10)))) if good else "" for good in ok]
    config = config or {"synthetic": True, "seed": seed}
    paths = [folder / "grid.h5", folder / "objects.h5", folder / "caption.h5"]
    write_shard(paths[0], images, status, grid=grid, config=config)
    write_shard(paths[1], images, status, labels=labels, config=config)
    write_shard(paths[2], images, status, captions=captions, config=config)
    return paths


def write_encoder(
    folder: str | Path,
    *,
    family: str = "bert",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 128,
    seed: int = 0,
) -> Path:
    """A randomly initialised encoder and its tokenizer, saved with ``save_pretrained``.
    ``family``: ``bert`` (WordPiece) or ``roberta`` (byte-level BPE)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer, RobertaConfig, RobertaModel, RobertaTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    torch.manual_seed(seed)
    sizes = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden,
    )
    if family == "bert":
        vocab = vocabulary()
        tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
        model = BertModel(BertConfig(vocab_size=len(vocab), max_position_embeddings=max_positions, **sizes))
    elif family == "roberta":
        from tokenizers import pre_tokenizers

        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        merges = [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("Ġ", "a"), ("Ġ", "i"), ("Ġi", "n")]
        tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + alphabet + ["".join(m) for m in merges]
        vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
        tokenizer = RobertaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True)
        config = RobertaConfig(
            vocab_size=len(vocab),
            max_position_embeddings=max_positions + 2,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            type_vocab_size=1,
            **sizes,
        )
        model = RobertaModel(config)
    else:
        raise ValueError(f"unknown encoder family {family!r}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
