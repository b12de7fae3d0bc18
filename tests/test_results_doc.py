"""docs/results.md is rendered from docs/results.in.md and the files omoe report / analyze / bench
wrote (scripts/render_results.py): the committed page must be exactly what the script renders, so a
table number edited by hand fails here."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def render_results():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "scripts" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_results_page_is_what_the_script_renders(render_results):
    template = (ROOT / "docs" / "results.in.md").read_text(encoding="utf-8")
    assert "<!-- include:" in template
    assert (ROOT / "docs" / "results.md").read_text(encoding="utf-8") == render_results.render(template)


def test_an_include_pastes_a_whole_file_or_one_section(render_results, tmp_path, monkeypatch):
    monkeypatch.setattr(render_results, "ROOT", tmp_path)
    (tmp_path / "t.md").write_text("### A `generate`\n\n| x |\n\n### B `label`\n\n| y |\n")
    whole = render_results.render("intro\n<!-- include: t.md -->\nend")
    assert whole.splitlines()[2:] == [
        "intro",
        "### A `generate`",
        "",
        "| x |",
        "",
        "### B `label`",
        "",
        "| y |",
        "end",
    ]
    part = render_results.render("<!-- include: t.md # `label` -->")
    assert part.splitlines()[2:] == ["### B `label`", "", "| y |"]
    with pytest.raises(SystemExit, match=re.escape("no '### ...nothing...' section in t.md")):
        render_results.render("<!-- include: t.md # nothing -->")
    with pytest.raises(SystemExit, match=r"missing\.md .* does not exist"):
        render_results.render("<!-- include: missing.md -->")
