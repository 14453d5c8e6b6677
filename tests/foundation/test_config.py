"""Typed params: typos, wrong types and out-of-range values are errors naming key and file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from msvse.config import bounds, from_dict, load_section, to_dict
from msvse.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    lr: float = field(default=3e-5, metadata=bounds(min=0, min_inclusive=False))
    schedule: Literal["linear", "constant"] = "linear"


@dataclass(frozen=True)
class Section:
    name: str
    epochs: int = field(default=30, metadata=bounds(min=1))
    scales: tuple[str, ...] = field(default=("grid",), metadata=bounds(min=1))
    shards: tuple[str, ...] = ()
    device: str | None = None
    fast: bool = False
    optim: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        if "caption" in self.scales and self.name == "nocaption":
            raise ValueError("scales: 'caption' is not allowed for this name")


def write_params(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_loads_a_frozen_typed_section(tmp_path):
    path = write_params(tmp_path, "other: {x: 1}\nstage:\n  name: demo\n  epochs: 3\n  scales: [grid, caption]\n  optim: {lr: 4e-5}\n")
    cfg = load_section(path, "stage", Section)
    assert cfg == Section(name="demo", epochs=3, scales=("grid", "caption"), optim=Inner(lr=4e-5))
    with pytest.raises(AttributeError):
        cfg.epochs = 5  # type: ignore[misc]
    assert to_dict(cfg)["scales"] == ["grid", "caption"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: a\nepoch: 3\n", "stage.epoch: unknown key"),
        ("name: a\noptim: {lr: 1e-5, shedule: linear}\n", "stage.optim.shedule: unknown key"),
        ("name: a\nepochs: three\n", "stage.epochs: expected an integer, got 'three'"),
        ("name: a\nepochs: 2.5\n", "stage.epochs: expected an integer"),
        ("name: a\nepochs: 0\n", "stage.epochs: value must be >= 1, got 0"),
        ("name: a\noptim: {lr: 0}\n", "stage.optim.lr: value must be > 0"),
        ("name: a\noptim: {lr: fast}\n", "stage.optim.lr: expected a number, got 'fast'"),
        ("name: a\noptim: {schedule: cosine}\n", "stage.optim.schedule: expected one of 'linear', 'constant'"),
        ("name: a\nscales: []\n", "stage.scales: length must be >= 1"),
        ("name: a\nscales: grid\n", "stage.scales: expected a list"),
        ("name: a\nfast: yes please\n", "stage.fast: expected true or false"),
        ("epochs: 3\n", "stage.name: required key is missing"),
        ("name: nocaption\nscales: [caption]\n", "stage: scales: 'caption' is not allowed"),
    ],
)
def test_bad_values_name_the_key_and_file(tmp_path, body, message):
    indented = "".join(f"  {line}\n" for line in body.splitlines())
    path = write_params(tmp_path, "stage:\n" + indented)
    with pytest.raises(ConfigError) as info:
        load_section(path, "stage", Section)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_missing_file_section_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_section(tmp_path / "nope.yaml", "stage", Section)
    path = write_params(tmp_path, "other: {}\n")
    with pytest.raises(ConfigError, match="missing section 'stage'"):
        load_section(path, "stage", Section)
    path = write_params(tmp_path, "stage:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: invalid YAML"):
        load_section(path, "stage", Section)


def test_overrides_are_checked_like_the_file(tmp_path):
    path = write_params(tmp_path, "stage:\n  name: a\n")
    cfg = load_section(path, "stage", Section, overrides={"optim.lr": 1e-4, "epochs": 2})
    assert cfg.optim.lr == 1e-4 and cfg.epochs == 2
    with pytest.raises(ConfigError, match="stage.optim.lrr: unknown key"):
        load_section(path, "stage", Section, overrides={"optim.lrr": 1e-4})


def test_from_dict_optional_and_nested_defaults():
    cfg = from_dict(Section, {"name": "x", "device": None, "shards": ["a.h5", "b.h5"]}, source="inline")
    assert cfg.device is None and cfg.shards == ("a.h5", "b.h5") and cfg.optim == Inner()
