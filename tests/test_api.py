"""docs/api.md runs: every ```python block, in order, in one namespace (the page's own asserts check it)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


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
