"""The README and docs/ say what the code does: kept in step with the options and the parser."""

from __future__ import annotations

import re

import pytest

from trio_launcher import ExitCode
from trio_launcher._parser import build_parser

from .docs_tables import API_DOC, options_table, rendered
from .proc import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
README = (ROOT / "README.md").read_text()
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_api_options_table_is_current() -> None:
    text = API_DOC.read_text()
    assert rendered(text) == text, "docs/api.md is stale: run python -m tests.docs_tables"
    assert options_table() in text


def test_every_exit_code_is_documented() -> None:
    cli = (ROOT / "docs" / "cli.md").read_text()
    for code in ExitCode:
        assert re.search(rf"^\| {code.value}\s+\|", cli, re.M), f"exit code {code.value}"
    assert "128+N" in cli


def test_readme_cli_synopsis_names_real_flags() -> None:
    synopsis = README[README.index("## CLI") :]
    synopsis = synopsis[: synopsis.index("```", synopsis.index("```") + 3)]
    flags = {f for action in build_parser()._actions for f in action.option_strings}
    named = set(re.findall(r"(--[a-z][a-z0-9-]*)", synopsis))
    assert named, "no flags in the README's CLI synopsis"
    assert named <= flags, named - flags


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_docs_page_is_linked_from_the_readme(page: object) -> None:
    assert f"docs/{getattr(page, 'name', '')}" in README


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page: object) -> None:
    from pathlib import Path

    assert isinstance(page, Path)
    prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not links
    for target in LINK.findall(prose):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
