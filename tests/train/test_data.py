"""Data: no image borrowed, no word dropped, no word cut, batches padded to their longest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msvse.features import FeatureStore, write_shard
from msvse.train.config import Ablation
from msvse.train.data import TAG_INDEX, build_dataset, reassemble
from msvse.train.trainer import predict_dataset
from msvse.twitter import Post, read_posts

EMPTY_WORDS = ("RT", "\u00a0", "George", "\ufe0f", "Zimmerman", "\u200b")


def test_words_with_no_subwords_get_the_unknown_token(parts_for):
    parts = parts_for()
    pieces = parts.text.word_pieces([EMPTY_WORDS, (), ("Paris",)])
    assert [len(p) > 0 for p in pieces[0]] == [True] * len(EMPTY_WORDS)
    unk = parts.tokenizer.unk_token_id
    assert pieces[0][1] == [unk] and pieces[0][3] == [unk] and pieces[0][5] == [unk]
    assert len(pieces[0][4]) == 3  # zim ##mer ##man: one word, three sub-words
    assert pieces[1] == []


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_every_word_gets_a_prediction(family, parts_for, bert_dir, roberta_dir):
    parts = parts_for(bert_dir if family == "bert" else roberta_dir)
    posts = [
        Post("tr3", EMPTY_WORDS, ("O", "O", "B-PER", "O", "I-PER", "O")),
        Post("tr4", (), ()),  # an empty post is a post too
        Post("tr5", ("\u00a0",), ("O",)),
    ]
    dataset = build_dataset(posts, parts.text, parts.cfg.ablation, parts.store, parts.store.grid_shape)
    parts.model.eval()
    rows = predict_dataset(parts.model, dataset, parts.collator, torch.device("cpu"), batch_size=2)
    assert [len(r) for r in rows] == [len(p.tokens) for p in posts]
    assert all(t in TAG_INDEX and t not in ("[CLS]", "[SEP]") for r in rows for t in r)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_long_posts_are_windowed_and_lose_no_words(family, parts_for, bert_dir, roberta_dir):
    parts = parts_for(bert_dir if family == "bert" else roberta_dir)
    dataset = parts.train
    long_posts = [i for i, p in enumerate(dataset.posts) if len(p.tokens) >= 60]
    assert long_posts, "the corpus has long posts"
    windows = [it for it in dataset.items if it.post == long_posts[0]]
    assert len(windows) > 1
    assert windows[0].start == 0 and windows[-1].end == len(dataset.posts[long_posts[0]].tokens)
    # Gold tags of the windows, joined, are the post's tags: nothing cut, nothing doubled.
    joined = reassemble(dataset, [[tag for tag in _tags(it)] for it in dataset.items])
    assert joined == [list(p.tags) for p in dataset.posts]
    # Every sequence the model builds fits the encoder.
    batch = parts.collator(windows)
    assert batch.text_ids.shape[1] <= parts.text.max_length
    assert batch.joint_ids.shape[1] <= parts.text.max_length
    parts.model.eval()
    rows = predict_dataset(parts.model, dataset, parts.collator, torch.device("cpu"), batch_size=8)
    assert [len(r) for r in rows] == [len(p.tokens) for p in dataset.posts]


def _tags(item) -> list[str]:
    names = {i: t for t, i in TAG_INDEX.items()}
    return [names[i] for i in item.tags]


def test_a_word_longer_than_the_budget_gets_its_own_window(parts_for, roberta_dir):
    parts = parts_for(roberta_dir)
    word = "x" * (parts.text.budget + 10)  # byte-level BPE: one sub-word per character here
    posts = [Post("tr6", ("a", word, "b"), ("O", "B-MISC", "O"))]
    dataset = build_dataset(posts, parts.text, parts.cfg.ablation, parts.store, parts.store.grid_shape)
    spans = [(it.start, it.end) for it in dataset.items]
    assert spans == [(0, 1), (1, 2), (2, 3)]
    assert len(dataset.items[1].pieces[0]) == parts.text.budget
    parts.model.eval()
    rows = predict_dataset(parts.model, dataset, parts.collator, torch.device("cpu"), batch_size=4)
    assert len(rows[0]) == 3


def test_no_image_input_is_explicit_and_counted(parts_for, corpus):
    parts = parts_for()
    report = parts.train.report
    assert (report.not_in_features, report.missing, report.unreadable, report.partial) == (1, 1, 1, 0)
    assert report.no_image == 3 and report.posts == 48
    store = FeatureStore(corpus.features)
    by_image = {}
    for item in parts.train.items:
        by_image.setdefault(parts.train.posts[item.post].image_file, item)
    batch = parts.collator([by_image[corpus.absent], by_image[corpus.missing], by_image[corpus.unreadable], by_image["tr5.jpg"]])
    assert batch.has_image.tolist() == [False, False, False, True]
    assert torch.count_nonzero(batch.grid[:3]) == 0
    # Labels and caption are the special tokens only: no words borrowed from anywhere.
    specials = len(parts.text.template.before) + len(parts.text.template.after)
    assert batch.caption_mask[:3].sum(1).tolist() == [specials] * 3
    assert batch.label_mask[:3].sum(1).tolist() == [specials] * 3
    # A post with an image gets exactly its own image's grid.
    expected = store.get("tr5.jpg").grid
    assert np.allclose(batch.grid[3].numpy(), expected)


def test_an_image_lacking_one_kind_is_counted_partial(parts_for, tmp_path):
    parts = parts_for()
    images = ["p0.jpg", "p1.jpg"]
    grid = tmp_path / "grid.h5"
    caption = tmp_path / "caption.h5"
    objects = tmp_path / "objects.h5"
    write_shard(grid, images, [0, 0], grid=np.ones((2, 4, 6), np.float32))
    write_shard(objects, images, [0, 0], labels=[["dog"], ["car"]])
    write_shard(caption, images[:1], [0], captions=["a dog"])
    store = FeatureStore([grid, objects, caption])
    posts = [Post("p0", ("a",), ("O",)), Post("p1", ("b",), ("O",))]
    dataset = build_dataset(posts, parts.text, Ablation(), store, (4, 6))
    assert dataset.report.partial == 1 and dataset.report.no_image == 0
    assert dataset.items[1].visual.caption_ids == [] and dataset.items[1].visual.has_image


def test_batches_are_padded_to_their_longest_item(parts_for):
    parts = parts_for()
    short = sorted(parts.train.items, key=lambda it: sum(len(p) for p in it.pieces))[:4]
    batch = parts.collator(short)
    longest = max(sum(len(p) for p in it.pieces) for it in short) + 2
    assert batch.text_ids.shape[1] == longest < parts.text.max_length
    assert batch.crf_mask.shape[1] == max(len(it.pieces) for it in short) + 2


def test_roberta_template_is_read_from_the_tokenizer(parts_for, roberta_dir):
    parts = parts_for(roberta_dir)
    t = parts.text.template
    tok = parts.tokenizer
    assert t.before == (tok.cls_token_id,) and t.after == (tok.sep_token_id,)
    assert t.pair_middle == (tok.sep_token_id, tok.sep_token_id)
    batch = parts.collator(parts.train.items[3:5])
    # CRF positions: [CLS] first, closing [SEP] last, first sub-words between.
    for i, item in enumerate(parts.train.items[3:5]):
        n = len(item.pieces) + 2
        idx = batch.joint_index[i, :n]
        assert batch.joint_ids[i, idx[0]] == tok.cls_token_id
        assert batch.joint_ids[i, idx[n - 1]] == tok.sep_token_id
        assert int(batch.joint_mask[i].sum()) - 1 == int(idx[n - 1])


def test_data_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("IMGID:1\nParis\tB-TOWN\n", encoding="utf-8")
    with pytest.raises(Exception, match=r"bad.txt:2: unknown tag 'B-TOWN'"):
        read_posts(path)
