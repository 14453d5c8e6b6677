"""FeatureStore(lazy=True): the same features as the eager store, grids read per image
from the shard (also in forked DataLoader workers), so memory need not hold them all."""

from __future__ import annotations

import numpy as np
import torch

from msvse.features import FeatureStore


def _same(a, b) -> None:
    assert (a.image, a.status, a.labels, a.caption) == (b.image, b.status, b.labels, b.caption)
    if a.grid is None:
        assert b.grid is None
    else:
        assert a.grid.dtype == b.grid.dtype == np.float32
        np.testing.assert_array_equal(a.grid, b.grid)


def test_lazy_and_eager_stores_agree(corpus):
    eager, lazy = FeatureStore(corpus.features), FeatureStore(corpus.features, lazy=True)
    assert (lazy.ids, lazy.kinds, lazy.grid_shape) == (eager.ids, eager.kinds, eager.grid_shape)
    for image in eager.ids:
        _same(eager.get(image), lazy.get(image))
    lazy.close()
    _same(eager.get(eager.ids[0]), lazy.get(eager.ids[0]))  # reopened on demand


class Grids(torch.utils.data.Dataset):
    def __init__(self, store: FeatureStore):
        self.store = store
        self.ids = store.ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.store.get(self.ids[i]).grid)


def test_a_lazy_store_reads_in_forked_workers(corpus):
    eager, lazy = FeatureStore(corpus.features), FeatureStore(corpus.features, lazy=True)
    lazy.get(lazy.ids[0])  # a handle open in the parent before the workers fork
    loader = torch.utils.data.DataLoader(Grids(lazy), batch_size=5, num_workers=2, multiprocessing_context="fork")
    grids = torch.cat(list(loader))
    expected = np.stack([eager.get(image).grid for image in eager.ids])
    np.testing.assert_array_equal(grids.numpy(), expected)
