"""The feature schema is the contract below both stages: stage 2 imports it and nothing
of stage 1 (but for extracting a single post on the fly), and the old import path
still works for this release."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

import msvse.features

TRAIN = Path(__file__).resolve().parents[2] / "train"


def _extract_imports(path: Path) -> list[tuple[str, int, str]]:
    """(function or '<module>', line, module) of every import of msvse.extract in ``path``."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("msvse.extract"):
                found.append((where, child.lineno, child.module))
            elif isinstance(child, ast.Import):
                found.extend((where, child.lineno, a.name) for a in child.names if a.name.startswith("msvse.extract"))
            visit(child, name)

    visit(tree, "<module>")
    return found


def test_stage_two_imports_nothing_of_stage_one_but_single_post_extraction():
    imports = {f"{p.name}:{where}": module for p in sorted(TRAIN.glob("*.py")) for where, _, module in _extract_imports(p)}
    assert imports, "the check sees imports at all"
    allowed = {"predict.py:extract_features"}  # the on-the-fly extraction of predict_post
    assert set(imports) <= allowed, imports


def test_the_old_import_path_reexports_the_schema():
    import msvse.extract.features as old

    for name in msvse.features.__all__:
        assert getattr(old, name) is getattr(msvse.features, name), name


def test_the_paper_grid_shape_is_resnet152s_at_224_px():
    from msvse.extract.archs import resnet_grid_shape

    assert resnet_grid_shape("resnet152", 224) == msvse.features.PAPER_GRID_SHAPE


def _writer_shard(path: Path, ids: list[str], grids: np.ndarray) -> Path:
    writer = msvse.features.ShardWriter.create(path, ids, kinds=["grid"], config={}, grid_shape=grids.shape[1:])
    writer.write_rows(0, [msvse.features.STATUS_OK] * len(ids), grid=grids)
    return writer.finish()


def test_batch_grids_read_straight_from_the_file_equal_hdf5s_own_read(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 3, 5)).astype(np.float16)
    b = rng.standard_normal((4, 3, 5)).astype(np.float16)
    _writer_shard(tmp_path / "a.h5", [f"a{i}" for i in range(7)], a)  # contiguous: read directly
    msvse.features.write_shard(tmp_path / "b.h5", [f"b{i}" for i in range(4)], [0] * 4, grid=b)  # chunked: HDF5 reads
    store = msvse.features.FeatureStore([tmp_path / "a.h5", tmp_path / "b.h5"], lazy=True)
    places = [(0, 6), (1, 2), (0, 0), (0, 6), (1, 0), (0, 3)]  # any order, shards mixed, a row twice
    expected = np.stack([(a, b)[s][r] for s, r in places])
    got = store.read_grids(places)
    assert got.dtype == np.float16 and np.array_equal(got, expected)
    assert store._raw_grid(0) is not None and store._raw_grid(1) is None  # the two paths were both taken
    eager = msvse.features.FeatureStore([tmp_path / "a.h5", tmp_path / "b.h5"], lazy=False)
    assert np.array_equal(eager.read_grids(places), expected)
    # In a forked worker the store opens descriptors of its own and reads the same.
    parent_fd = store._raw_grid(0)[0]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            ok = np.array_equal(store.read_grids(places), expected) and store._raw_grid(0)[0] != parent_fd
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    os.close(read)
    os.close(write)
    store.close()


def test_a_grid_row_past_the_end_of_a_truncated_shard_is_an_error_naming_the_file(tmp_path):
    grids = np.ones((6, 3, 5), np.float16)
    path = _writer_shard(tmp_path / "a.h5", [f"a{i}" for i in range(6)], grids)
    store = msvse.features.FeatureStore([path], lazy=True)
    assert np.array_equal(store.read_grids([(0, 5)]), grids[5:])
    fd, offset, row_bytes = store._raw_grid(0)
    os.truncate(path, offset + 5 * row_bytes + 7)  # row 5 cut short
    with pytest.raises(msvse.features.FeatureFileError, match=r"a\.h5: grid row 5 is cut short"):
        store.read_grids([(0, 5)])
