"""The token cache and per-batch feature reads: the same items as tokenizing in memory,
reused across runs, rebuilt when an input or the tokenizer changes; batches built in
DataLoader workers equal batches built in-process."""

from __future__ import annotations

import json
import mmap
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from msvse.features import FeatureStore
from msvse.train import synthetic
from msvse.train.data import build_dataset
from msvse.train.tokens import TokenCache
from msvse.twitter import read_posts


def _entries(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if (p / "meta.json").exists()} if root.exists() else set()


def _file_backed(array: np.ndarray) -> bool:
    base = array
    while getattr(base, "base", None) is not None:
        base = base.base
    return isinstance(base, mmap.mmap)


def _same_items(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a.items, b.items):
        assert (x.post, x.start, x.end, x.pieces, x.tags, x.types) == (y.post, y.start, y.end, y.pieces, y.tags, y.types)
        if x.visual is None:
            assert y.visual is None
            continue
        vx, vy = x.visual, y.visual
        assert (vx.label_ids, vx.caption_ids, vx.has_image, vx.reason) == (vy.label_ids, vy.caption_ids, vy.has_image, vy.reason)
        if vx.grid is None:
            assert vy.grid is None
        else:
            np.testing.assert_array_equal(vx.grid, vy.grid)


def test_a_cached_dataset_equals_one_tokenized_in_memory(parts_for, corpus, tmp_path):
    parts = parts_for()
    store = FeatureStore(corpus.features, lazy=True)
    root = tmp_path / "cache"
    in_memory = build_dataset(read_posts(corpus.train), parts.text, parts.cfg.ablation, store, store.grid_shape)
    cold = build_dataset(corpus.train, parts.text, parts.cfg.ablation, store, store.grid_shape, cache=TokenCache(root))
    made = _entries(root)
    assert {name.split("-")[0] for name in made} == {"posts", "labels", "caption"}
    warm = build_dataset(corpus.train, parts.text, parts.cfg.ablation, store, store.grid_shape, cache=TokenCache(root))
    assert _entries(root) == made, "a warm run writes nothing"
    assert _file_backed(warm.tokens.pieces), "a warm run maps the cache, it does not load it"
    for other in (cold, warm):
        _same_items(in_memory, other)
        assert other.report == in_memory.report
        assert list(other.posts) == list(in_memory.posts)
    meta = json.loads((root / next(n for n in made if n.startswith("posts"))).joinpath("meta.json").read_text())
    assert meta["posts"] == 48 and meta["source"] == str(corpus.train)


def test_changing_a_data_file_or_the_tokenizer_rebuilds_the_cache(parts_for, corpus, tmp_path, roberta_dir):
    root = tmp_path / "cache"
    train = tmp_path / "train.txt"
    shutil.copy(corpus.train, train)
    parts = parts_for()
    store = FeatureStore(corpus.features, lazy=True)
    first = build_dataset(train, parts.text, parts.cfg.ablation, store, store.grid_shape, cache=TokenCache(root))
    before = _entries(root)

    # One token changed in the file: a new posts entry, and the dataset sees the change.
    text = train.read_text()
    train.write_text(text.replace("\n", "\nwow\tO\n", 1))
    changed = build_dataset(train, parts.text, parts.cfg.ablation, store, store.grid_shape, cache=TokenCache(root))
    added = _entries(root) - before
    assert [n.split("-")[0] for n in added] == ["posts"], "the labels and captions did not change"
    assert len(changed.posts[0].tokens) == len(first.posts[0].tokens) + 1
    assert changed.posts[0].tokens[0] == "wow"

    # Another tokenizer: every entry is rebuilt under new keys.
    other = parts_for(roberta_dir)
    n = len(_entries(root))
    rebuilt = build_dataset(train, other.text, other.cfg.ablation, store, store.grid_shape, cache=TokenCache(root))
    assert len(_entries(root)) == n + 3
    _same_items(rebuilt, build_dataset(read_posts(train), other.text, other.cfg.ablation, store, store.grid_shape))


def test_a_settings_change_that_moves_windows_rebuilds_the_posts(parts_for, corpus, tmp_path):
    root = tmp_path / "cache"
    a = parts_for(model={"max_length": 40})
    b = parts_for(model={"max_length": 24})
    store = FeatureStore(corpus.features, lazy=True)
    da = build_dataset(corpus.train, a.text, a.cfg.ablation, store, store.grid_shape, cache=TokenCache(root))
    db = build_dataset(corpus.train, b.text, b.cfg.ablation, store, store.grid_shape, cache=TokenCache(root))
    assert len(db) > len(da), "a smaller budget splits more posts into windows"
    assert len([n for n in _entries(root) if n.startswith("posts")]) == 2


def test_an_interrupted_build_leaves_no_entry(parts_for, corpus, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    parts = parts_for()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(corpus.train, parts.text, parts.cfg.ablation, None, None, cache=TokenCache(root))
    assert _entries(root) == set()
    assert list(root.iterdir()) == [], "the temporary folder is gone too"


def test_batches_from_two_workers_equal_in_process_batches(parts_for):
    from msvse.train.trainer import make_loader

    parts = parts_for(optim={"batch_size": 5})
    dataset = parts.train
    in_process = list(make_loader(dataset, parts.collator, 5, shuffle=True, seed=3, workers=0))
    workers = list(make_loader(dataset, parts.collator, 5, shuffle=True, seed=3, workers=2))
    assert len(in_process) == len(workers) > 4
    for a, b in zip(in_process, workers):
        for name in ("text_ids", "text_mask", "crf_mask", "tags", "types", "joint_ids", "joint_visual", "grid", "label_ids", "caption_ids", "has_image"):
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(x, y), name
        assert [(i.post, i.start) for i in a.items] == [(i.post, i.start) for i in b.items]


def test_batches_built_ahead_in_process_are_the_loaders_own_and_its_errors_reach_the_caller(parts_for):
    import threading

    from msvse.train.trainer import batches_ahead, make_loader

    parts = parts_for(optim={"batch_size": 5})
    loader = make_loader(parts.train, parts.collator, 5, shuffle=True, seed=3, workers=0)
    loader.sampler.set_epoch(2)
    start = torch.get_rng_state()
    plain = list(loader)
    after = torch.get_rng_state()
    torch.set_rng_state(start)
    ahead = list(batches_ahead(loader))
    assert torch.equal(torch.get_rng_state(), after)  # the same draws from the global stream as the loader's own
    assert [[(i.post, i.start) for i in b.items] for b in ahead] == [[(i.post, i.start) for i in b.items] for b in plain]
    assert all(torch.equal(a.text_ids, b.text_ids) and torch.equal(a.grid, b.grid) for a, b in zip(ahead, plain))

    builders = []

    def collate(items):
        builders.append(threading.current_thread().name)
        if len(builders) == 3:
            raise ValueError("the third batch is broken")
        return parts.collator(items)

    broken = make_loader(parts.train, collate, 5, shuffle=False, seed=3, workers=0)
    got = []
    with pytest.raises(ValueError, match="third batch"):
        for batch in batches_ahead(broken):
            got.append(batch)
    assert len(got) == 2 and all(name.startswith("msvse-batches") for name in builders)


def test_a_batch_reads_each_shard_once_in_sorted_rows(parts_for, monkeypatch):
    parts = parts_for()
    store = parts.store
    calls = []
    original = store.read_grids

    def spy(places):
        calls.append(list(places))
        return original(places)

    monkeypatch.setattr(store, "read_grids", spy)
    items = parts.train.__getitems__([7, 3, 20, 3])
    assert len(calls) == 1, "one read for the whole batch"
    assert len(items) == 4 and items[1].post == items[3].post
    reference = [store.get(parts.train.posts[it.post].image_file).grid for it in items]
    for item, grid in zip(items, reference):
        if item.visual.grid is None:
            assert grid is None or item.visual.reason
        else:
            np.testing.assert_array_equal(item.visual.grid.astype(np.float32), grid)


def test_the_training_set_holds_no_python_posts(parts_for):
    parts = parts_for()
    dataset = parts.train
    assert not any(isinstance(v, list) and v and hasattr(v[0], "tokens") for v in vars(dataset).values())
    assert isinstance(dataset.tokens.pieces, np.ndarray)


def test_synthetic_posts_round_trip_through_the_cache_arrays(parts_for, tmp_path):
    posts = synthetic.synthetic_posts(30, seed=9, prefix="rt", long_every=7)
    path = synthetic.write_posts(tmp_path / "posts.txt", posts)
    parts = parts_for()
    dataset = build_dataset(path, parts.text, parts.cfg.ablation, None, None, cache=TokenCache(tmp_path / "c"))
    assert [(p.image_id, p.tokens, p.tags) for p in dataset.posts] == [(p.image_id, p.tokens, p.tags) for p in posts]


def test_evaluating_leaves_the_global_random_state_alone(parts_for):
    """Dropout draws from torch's global generator; prediction between epochs must not
    advance it, or training after the first dev pass would change."""
    from msvse.train.trainer import predict_dataset

    parts = parts_for()
    before = torch.random.get_rng_state()
    predict_dataset(parts.model, parts.valid, parts.collator, torch.device("cpu"), batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), before)
