"""extract() end to end on tiny models: schema v1, bad input, ids, shards, resume."""

from __future__ import annotations

import dataclasses
import json
import os

import h5py
import numpy as np
import pytest

from msvse.config import to_dict
from msvse.errors import MsvseError
from msvse.features import (
    FORMAT,
    SCHEMA_VERSION,
    STATUS_MISSING,
    STATUS_OK,
    FeatureFileError,
    FeatureStore,
    partial_path,
)
from msvse.extract.run import extract, extract_in_memory, parse_shard, select_ids, shard_ids


def read_all(path) -> dict:
    """Every dataset and attribute of a shard, strings decoded."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                if h5py.check_string_dtype(obj.dtype):
                    data = obj.asstr()[()]
                out[name] = data

        f.visititems(visit)
    return out


def assert_same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "attrs":
            assert a[key] == b[key]
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_schema_v1(tmp_path, photos, tiny_config):
    out = tmp_path / "f.h5"
    photos.joinpath("bad.jpg").write_text("not a JPEG")
    summary = extract(photos, out, tiny_config, progress=False)
    assert summary == {**summary, "rows": 8, "ok": 7, "unreadable": 1, "missing": 0, "written": 8}
    assert not partial_path(out).exists()

    data = read_all(out)
    attrs = data["attrs"]
    assert attrs["format"] == FORMAT and int(attrs["schema_version"]) == SCHEMA_VERSION
    assert json.loads(attrs["kinds"]) == ["grid", "objects", "caption"]
    assert json.loads(attrs["config"]) == to_dict(tiny_config)
    assert attrs["msvse_version"]
    ids = list(data["ids"])
    assert ids == sorted(["bad.jpg"] + [f"{100 + i}.jpg" for i in range(7)])  # no .txt, .DS_Store, ._*
    n, k = 8, tiny_config.objects.max_objects
    with h5py.File(out, "r") as f:
        assert f["status"].dtype == np.int8 and f["grid"].dtype == np.float16
        assert f["grid"].shape == (n, 4, 512)  # 64 px -> 2 x 2 regions of ResNet-18's 512 channels
        assert f["objects/labels"].shape == (n, k) and h5py.check_string_dtype(f["objects/labels"].dtype).encoding == "utf-8"
        assert f["objects/scores"].shape == (n, k) and f["objects/scores"].dtype == np.float32
        assert f["objects/boxes"].shape == (n, k, 4) and f["objects/boxes"].dtype == np.float32
        assert f["caption"].shape == (n,) and h5py.check_string_dtype(f["caption"].dtype).encoding == "utf-8"
        assert h5py.check_string_dtype(f["ids"].dtype).encoding == "utf-8"
    bad = ids.index("bad.jpg")
    assert data["status"][bad] == 1 and (data["status"][np.arange(n) != bad] == 0).all()
    assert not data["grid"][bad].any() and not data["objects/scores"][bad].any() and not data["objects/boxes"][bad].any()
    assert set(data["objects/labels"][bad]) == {""} and data["caption"][bad] == ""
    good = [i for i in range(n) if i != bad]
    assert all(np.abs(data["grid"][i]).sum() > 0 for i in good)
    for i in good:  # labels best first, padding after the last one
        labels = list(data["objects/labels"][i])
        m = sum(1 for x in labels if x)
        assert all(labels[:m]) and not any(labels[m:])
        assert (np.diff(data["objects/scores"][i][:m]) <= 0).all() and not data["objects/scores"][i][m:].any()

    store = FeatureStore([out])
    assert store.kinds == ("grid", "objects", "caption") and store.grid_shape == (4, 512)
    feat = store.get("100.jpg")
    assert feat.status == STATUS_OK and feat.grid.dtype == np.float32 and isinstance(feat.caption, str)
    assert store.get("bad.jpg").grid is None

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["stage"] == "extract" and report["summary"]["unreadable"] == 1
    assert report["problems"] == [{"image": "bad.jpg", "status": "unreadable", "reason": report["problems"][0]["reason"]}]
    assert "not a readable image" in report["problems"][0]["reason"]


def test_every_bad_input_gets_its_row(tmp_path, odd_images, odd_expected, tiny_config):
    out = tmp_path / "odd.h5"
    summary = extract(odd_images, out, tiny_config, ["grid", "caption"], progress=False)
    data = read_all(out)
    assert dict(zip(data["ids"], data["status"].tolist())) == odd_expected
    assert summary["unreadable"] == sum(1 for s in odd_expected.values() if s == 1)
    assert summary["ok"] == sum(1 for s in odd_expected.values() if s == 0)
    reasons = {p["image"]: p["reason"] for p in json.loads(out.with_suffix(".json").read_text())["problems"]}
    assert reasons["empty.jpg"] == "empty file" and "over the limit" in reasons["bomb.png"]


def test_ids_from_a_data_set_with_a_missing_image(tmp_path, photos, tiny_config):
    data_file = tmp_path / "train.txt"
    data_file.write_text("IMGID:101\nRT\tO\n\nIMGID:999\nGeorge\tB-PER\n\nIMGID:103\nhi\tO\n\n")
    other = tmp_path / "test.txt"
    other.write_text("IMGID:101\nagain\tO\n")
    out = tmp_path / "ids.h5"
    summary = extract(photos, out, tiny_config, ["caption"], ids_from=[data_file, other], progress=False)
    data = read_all(out)
    assert list(data["ids"]) == ["101.jpg", "103.jpg", "999.jpg"]
    assert data["status"].tolist() == [STATUS_OK, STATUS_OK, STATUS_MISSING]
    assert summary["missing"] == 1 and data["caption"][2] == ""
    assert FeatureStore([out]).get("999.jpg").status == STATUS_MISSING


def test_two_shards_together_equal_the_unsharded_run(tmp_path, photos, odd_images, tiny_config):
    for path in odd_images.iterdir():  # a mix of good and bad rows in both shards
        path.rename(photos / path.name)
    whole = tmp_path / "all.h5"
    extract(photos, whole, tiny_config, progress=False)
    parts = [tmp_path / f"part{i}.h5" for i in range(2)]
    for i, part in enumerate(parts):
        extract(photos, part, tiny_config, shard=f"{i}/2", progress=False)
    ids = [read_all(p)["ids"] for p in parts]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) and len(ids[1])
    one, two = FeatureStore([whole]), FeatureStore(parts)
    assert one.ids == two.ids
    for image in one.ids:
        a, b = one.get(image), two.get(image)
        assert (a.status, a.labels, a.caption) == (b.status, b.labels, b.caption), image
        if a.grid is not None:
            # The ResNet sees other batch sizes in the shards: CPU kernels may round the
            # last bit differently, so the float16 grids agree to one float16 step.
            np.testing.assert_allclose(a.grid, b.grid, rtol=2e-3, atol=1e-3)
            np.testing.assert_array_equal(a.scores, b.scores)  # the detector runs per image


def test_shard_arithmetic():
    ids = [f"{i}.jpg" for i in range(10)]
    for n in (1, 2, 3, 4, 11):
        parts = [shard_ids(ids, (i, n)) for i in range(n)]
        assert sum(parts, []) == ids
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(MsvseError, match="shard"):
            parse_shard(bad)


def test_an_empty_shard_is_a_valid_file(tmp_path, photos, tiny_config):
    out = tmp_path / "empty.h5"
    ids = select_ids(photos)
    n = len(ids) + 1  # more shards than images: shard 0 gets none
    assert shard_ids(ids, (0, n)) == []
    summary = extract(photos, out, tiny_config, ["grid"], shard=(0, n), progress=False)
    assert summary["rows"] == 0 and FeatureStore([out]).ids == []


def test_resume_completes_a_partial_file_to_the_same_rows(tmp_path, photos, tiny_config):
    straight = tmp_path / "straight.h5"
    extract(photos, straight, tiny_config, progress=False)
    # An interrupted run as the writer leaves it: NAME.partial whose later batches are
    # still pending (status -1), their feature bytes never written.
    out = tmp_path / "resumed.h5"
    with h5py.File(straight, "r") as src, h5py.File(partial_path(out), "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        src.visititems(lambda name, obj: src.copy(obj, dst, name) if isinstance(obj, h5py.Dataset) else None)
        dst["status"][3:] = -1
        dst["grid"][3:] = 0
        dst["caption"][4:] = np.array([b"stale"] * (len(dst["caption"]) - 4), dtype=dst["caption"].dtype)
    with pytest.raises(FeatureFileError, match="unfinished extraction.*--resume"):
        FeatureStore([partial_path(out)])
    summary = extract(photos, out, tiny_config, resume=True, progress=False)
    assert summary["written"] == 4  # batches of 3: rows 3..6 were pending
    assert not partial_path(out).exists()
    assert_same_rows(read_all(out), read_all(straight))
    # a finished file is left as it is; with nothing to resume, a run starts afresh
    assert extract(photos, tmp_path / "fresh.h5", tiny_config, ["caption"], resume=True, progress=False)["written"] == 7
    before = os.stat(out).st_mtime_ns
    assert extract(photos, out, tiny_config, resume=True, progress=False)["written"] == 0
    assert os.stat(out).st_mtime_ns == before


@pytest.mark.parametrize(
    "change, words",
    [
        ({"batch_size": 2}, "extract.batch_size = 3"),
        ({"grid": "image_size"}, "extract.grid.image_size"),
    ],
)
def test_resume_refuses_other_settings(tmp_path, photos, tiny_config, change, words):
    out = tmp_path / "f.h5"
    extract(photos, out, tiny_config, ["grid"], progress=False)
    out.rename(partial_path(out))
    if "grid" in change:
        other = dataclasses.replace(tiny_config, grid=dataclasses.replace(tiny_config.grid, image_size=96))
    else:
        other = dataclasses.replace(tiny_config, **change)
    with pytest.raises(MsvseError, match=words):
        extract(photos, out, other, ["grid"], resume=True, progress=False)
    with pytest.raises(MsvseError, match="holds kinds grid"):
        extract(photos, out, tiny_config, ["grid", "caption"], resume=True, progress=False)
    with pytest.raises(MsvseError, match="shard"):
        extract(photos, out, tiny_config, ["grid"], shard="0/2", resume=True, progress=False)
    # runtime-only settings may change
    fast = dataclasses.replace(tiny_config, num_workers=1)
    assert extract(photos, out, fast, ["grid"], resume=True, progress=False)["written"] == 0


def test_workers_write_the_same_file(tmp_path, photos, tiny_config):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract(photos, a, tiny_config, ["grid", "objects"], progress=False)
    extract(photos, b, dataclasses.replace(tiny_config, num_workers=2), ["grid", "objects"], progress=False)
    da, db = read_all(a), read_all(b)
    assert json.loads(da["attrs"].pop("config"))["num_workers"] == 0
    db["attrs"].pop("config")
    assert_same_rows(da, db)


def test_in_memory_matches_the_file(tmp_path, photos, tiny_config):
    out = tmp_path / "f.h5"
    extract(photos, out, tiny_config, progress=False)
    store = FeatureStore([out])
    (photos / "bad.jpg").write_bytes(b"")
    paths = [photos / "102.jpg", photos / "bad.jpg", photos / "gone.jpg", photos / "100.jpg"]
    feats = extract_in_memory(paths, tiny_config, ["grid", "objects", "caption"], device="cpu")
    assert [f.image for f in feats] == ["102.jpg", "bad.jpg", "gone.jpg", "100.jpg"]
    assert [f.status for f in feats] == [0, 1, 2, 0]
    for f in (feats[0], feats[3]):
        ref = store.get(f.image)
        np.testing.assert_allclose(f.grid, ref.grid, rtol=2e-3, atol=1e-3)  # float16, other batch size
        assert f.grid.dtype == np.float32 and f.labels == ref.labels and f.caption == ref.caption
        np.testing.assert_array_equal(f.scores, ref.scores)
    assert feats[1].grid is None and feats[2].caption is None
    only = extract_in_memory([photos / "100.jpg"], tiny_config, ["caption"])
    assert only[0].grid is None and only[0].caption == feats[3].caption


def test_no_images_is_an_error(tmp_path, tiny_config):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MsvseError, match="no image files"):
        extract(tmp_path / "empty", tmp_path / "x.h5", tiny_config, progress=False)
    with pytest.raises(MsvseError, match="images folder not found"):
        extract(tmp_path / "nope", tmp_path / "x.h5", tiny_config, progress=False)
    with pytest.raises(MsvseError, match="kinds"):
        extract(tmp_path / "empty", tmp_path / "x.h5", tiny_config, "grid,masks", progress=False)


def test_a_kinds_features_do_not_depend_on_the_other_kinds(tmp_path, photo_maker, tiny_config):
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(2):
        photo_maker(folder / f"{i}.jpg", i, size=(1000, 800))
    cfg = dataclasses.replace(tiny_config, grid=dataclasses.replace(tiny_config.grid, image_size=224))
    alone, together = tmp_path / "alone.h5", tmp_path / "together.h5"
    extract(folder, alone, cfg, ["grid"], progress=False)
    extract(folder, together, cfg, ["grid", "objects"], progress=False)  # objects decode at another JPEG scale
    np.testing.assert_array_equal(read_all(alone)["grid"], read_all(together)["grid"])


def test_a_grid_past_float16_stops_the_run_naming_the_image(tmp_path, tiny_config, photos, monkeypatch):
    # A grid past float16's range would be stored as inf and end in a NaN loss at training.
    from msvse.extract import run as run_module
    from msvse.extract.models import GridModel

    real = GridModel.__call__
    monkeypatch.setattr(GridModel, "__call__", lambda self, images: real(self, images) * 1e6)
    with pytest.raises(MsvseError, match=r"grid\.h5\.partial: the grid of 100\.jpg holds values up to .*float16"):
        run_module.extract(photos, tmp_path / "grid.h5", tiny_config, ["grid"], progress=False)
    assert not (tmp_path / "grid.h5").exists()
