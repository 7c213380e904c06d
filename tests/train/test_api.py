"""docs/api.md runs: every ```python block, in order, in one namespace (the page's own asserts check it)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```python blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.M | re.S)


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]


def test_api_page_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 4
    ns: dict = {"__name__": "api_doc"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name}[block {i}]", "exec"), ns)
    out = capsys.readouterr().out
    assert "best validation top-1 after 2 epochs" in out and "validation top-1 per epoch" in out
    # the page trained, resumed and logged for real
    run_dir = ns["run_dir"]
    assert ns["trainer2"].state.epoch == 3
    assert (run_dir / "tb").is_dir() and any((run_dir / "tb").iterdir())
    assert ns["toy_result"]["val"]["samples"] == 128


def test_migration_table_flags_are_accepted():
    """Every BMXNet flag in docs/migration.md's option table is a `bitrain train` flag, except the
    ones the page says are not accepted (so the guide and the parser cannot drift apart)."""
    import argparse

    from bitrain.cli.train import add_train_args

    text = (DOC.parent / "migration.md").read_text(encoding="utf-8")
    table = text.split("## Every option", 1)[1].split("\n## ", 1)[0]
    parser = argparse.ArgumentParser()
    add_train_args(parser)
    known = {s for a in parser._actions for s in a.option_strings}
    checked = 0
    for line in table.splitlines():
        if not line.startswith("| `-"):
            continue
        first, bitrain_col = line.split("|")[1], line.split("|")[2]
        flags = re.findall(r"`(--?[a-z][a-z0-9-]*)", first)
        if "not accepted" in line or bitrain_col.strip() == "—":
            assert not set(flags) & known, line
            continue
        for flag in flags:
            assert flag in known, f"{flag} is in the migration table but not a bitrain train flag"
            checked += 1
    assert checked >= 60
