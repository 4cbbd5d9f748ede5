"""parity.cli_support: the one KEY=VALUE parser, and the CLI's import direction (table -> commands -> support)."""

from __future__ import annotations

import ast

import pytest

from conftest import REPO
from parity.cli_support import BadInput, parse_assignments, parse_value


@pytest.mark.parametrize("text, value", [
    ("1", 1), ("0.5", 0.5), ("1e3", 1000.0), ("[1,2]", [1, 2]), ("true", True), ("false", False),
    ("none", None), ("None", None), ("null", None), ("enable", "enable"), ("float16", "float16"), ("nan", "nan"),
    (" 64 ", 64), ("", ""),
])
def test_parse_value(text, value):
    assert parse_value(text) == value


def test_parse_assignments_later_items_win_and_keys_are_stripped():
    assert parse_assignments(["topk=1", " cfg_scale = 2.5", "topk=3", "x=a=b"], "--param") == {
        "topk": 3, "cfg_scale": 2.5, "x": "a=b"}
    assert parse_assignments(None, "--param") == {}


@pytest.mark.parametrize("item", ["topk", "=1", " =1"])
def test_parse_assignments_names_the_flag(item):
    with pytest.raises(BadInput, match=r"^--set .*: expected KEY=VALUE$"):
        parse_assignments([item], "--set")


def _imports(path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


@pytest.mark.parametrize("module", ["parity/cli_support.py", "parity/commands.py", "trt/commands.py"])
def test_command_modules_never_import_the_cli(module):
    """Lazy imports inside functions count: nothing below the table imports it back."""
    assert not {m for m in _imports(REPO / module) if m == "parity.cli" or m.startswith("parity.cli.")}


def test_cli_support_imports_no_command_module():
    assert not _imports(REPO / "parity/cli_support.py") & {"parity.commands", "trt.commands", "parity.cli"}
