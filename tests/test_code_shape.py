"""The engine stays readable in pieces: no engine file over 400 lines, no function anywhere in the
package over 50. Algorithm plugins are not engine files (one method per file, however long it is), but
their functions are held to the same 50 lines."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_imwa"
MAX_ENGINE_FILE_LINES = 400
MAX_FUNCTION_LINES = 50


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_engine_file_is_over_400_lines() -> None:
    engine = [path for path in _sources() if "algorithms" not in path.relative_to(PACKAGE).parts]
    assert len(engine) > 20, "the package was not found where the test looks for it"
    long_files = {str(path.relative_to(PACKAGE)): lines for path in engine
                  if (lines := len(path.read_text().splitlines())) > MAX_ENGINE_FILE_LINES}
    assert long_files == {}


def test_no_function_is_over_50_lines() -> None:
    long_functions = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions[f"{path.relative_to(PACKAGE)}:{node.name}"] = lines
    assert long_functions == {}
