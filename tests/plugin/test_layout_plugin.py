"""The plugin's shape: small modules, short functions (a long one says why on its def line)."""
from __future__ import annotations

import ast
from pathlib import Path

PLUGIN = Path(__file__).resolve().parents[2] / "mapclip" / "plugin"
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 120
LONG = "# long:"


def _modules():
    return sorted(PLUGIN.rglob("*.py"))


def test_every_plugin_module_has_at_most_800_lines():
    too_long = {str(p.relative_to(PLUGIN)): n for p in _modules()
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not too_long, too_long


def test_every_plugin_function_has_at_most_120_lines_or_says_why():
    too_long = []
    for path in _modules():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and LONG not in lines[node.lineno - 1]:
                too_long.append(f"{path.relative_to(PLUGIN)}:{node.lineno} {node.name} ({length})")
    assert not too_long, too_long
