"""The package's layering (issue 28), read from the source: inference never imports training (not even inside a
function), and no file of the core or the modules grows past 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("doseai/train/", "doseai/cli/")  # the command line may start training; nothing else may


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_inference_never_imports_training():
    offenders = {}
    for path in sorted((ROOT / "doseai").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(TRAINING):
            continue
        upward = sorted(m for m in _imported_modules(path) if m == "doseai.train" or m.startswith("doseai.train."))
        if upward:
            offenders[relative] = upward
    assert offenders == {}


def test_no_file_of_the_core_or_the_modules_is_over_600_lines():
    files = [*(ROOT / "doseai").rglob("*.py"), *(ROOT / "DosePreference").rglob("*.py"),
             *(ROOT / "DoseOptimizer").rglob("*.py")]
    assert len(files) > 50
    long = {p.relative_to(ROOT).as_posix(): n for p in files if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
