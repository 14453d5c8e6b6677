"""The feature schema is the contract below both stages: stage 2 imports it and nothing
of stage 1 (but for extracting a single post on the fly), and the old import path
still works for this release."""

from __future__ import annotations

import ast
from pathlib import Path

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
