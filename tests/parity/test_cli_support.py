"""parity.cli_support: the one KEY=VALUE parser, and the CLI's import direction (table -> commands -> support)."""

from __future__ import annotations

import ast
import os

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


# ------------------------------------------------------------------------------------------------ outputs


def test_separate_refuses_an_output_that_is_inside_or_contains_an_input(tmp_path):
    from parity.cli_support import separate

    dump = tmp_path / "A"
    dump.mkdir()
    (dump / "manifest.json").write_text("{}")
    cases = [
        ({"--json": dump / "manifest.json"}, "--json .*manifest.json: lies inside the input dump a .*/A;"),
        ({"--out": dump}, "--out .*/A: is the input dump a .*/A;"),
        ({"--out": tmp_path}, f"--out {tmp_path}: contains the input dump a .*/A; replacing it would delete"),
    ]
    for outputs, match in cases:
        with pytest.raises(BadInput, match=match):
            separate({"dump a": dump}, outputs)
    # links are followed: a link to the input is the input; a hard link to an input file is that file
    (tmp_path / "link").symlink_to(dump)
    with pytest.raises(BadInput, match="--out .*/link: is the input dump a"):
        separate({"dump a": dump}, {"--out": tmp_path / "link"})
    os.link(dump / "manifest.json", tmp_path / "hard.json")
    with pytest.raises(BadInput, match="--json .*hard.json: is the input --tolerances"):
        separate({"--tolerances": dump / "manifest.json"}, {"--json": tmp_path / "hard.json"})
    # two outputs on one path
    with pytest.raises(BadInput, match="--json .*r and --plot .*r: the same or nested paths"):
        separate({}, {"--json": tmp_path / "r", "--plot": tmp_path / "r"})
    # siblings, a name sharing a prefix, stdout and absent options are fine
    separate({"dump a": dump, "--x": None}, {"--json": tmp_path / "A.json", "--plot": tmp_path / "AB" / "p.png",
                                             "--stdout": "-", "--none": None})


def test_output_file_replaces_only_what_it_recognises(tmp_path):
    from parity.cli_support import output_file

    ours = ("a report", lambda p: p.read_bytes() == b"ours")
    mine = tmp_path / "r.json"
    mine.write_bytes(b"ours")
    assert output_file(mine, "--json", ours) == mine
    notes = tmp_path / "notes.json"
    notes.write_bytes(b"my notes")
    with pytest.raises(BadInput, match=f"--json {notes}: exists and is not a report; refusing to replace it"):
        output_file(notes, "--json", ours)
    link = tmp_path / "link.json"
    link.symlink_to(mine)
    with pytest.raises(BadInput, match="--json .*link.json: is a symbolic link"):
        output_file(link, "--json", ours)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(BadInput, match="--json .*fifo.json: exists and is not a regular file"):
        output_file(fifo, "--json", ours)
    assert output_file(tmp_path / "new.json", "--json", ours) == tmp_path / "new.json"


def test_read_head_never_follows_links_or_blocks(tmp_path):
    from parity.files import read_head

    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    assert read_head(f, 4) == b"0123"
    (tmp_path / "l").symlink_to(f)
    os.mkfifo(tmp_path / "p")
    assert read_head(tmp_path / "l") is None and read_head(tmp_path / "p") is None
    assert read_head(tmp_path / "absent") is None and read_head(tmp_path) is None
