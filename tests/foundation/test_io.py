"""Atomic writes: a file appears whole or not at all."""

from __future__ import annotations

import json

import pytest

from msvse.io import atomic_path, write_json_atomic, write_resolved_config


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_resolved_config_records_who_wrote_it(tmp_path):
    write_resolved_config(tmp_path / "sub" / "config.json", "demo", {"seed": 3})
    data = json.loads((tmp_path / "sub" / "config.json").read_text())
    assert data["stage"] == "demo" and data["config"] == {"seed": 3}
    assert data["msvse_version"] and data["written_at"]
    write_json_atomic(tmp_path / "x.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2]}


def test_atomic_file_gets_ordinary_permissions(tmp_path):
    import os
    import stat

    write_json_atomic(tmp_path / "m.json", {})
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o666 & ~mask
