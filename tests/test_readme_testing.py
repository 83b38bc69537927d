"""The README's "Testing your service" section, pasted into a fresh project, passes;
so does the complete project of docs/testing.md.

Every fenced block in that section (or page) whose first line names a file
(``# conftest.py``) is written to a temporary project, which pytest then runs
in a subprocess: what a new user does, with nothing added.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from .proc import ROOT

SECTION = "## Testing your service"
BLOCK = re.compile(r"```(?:python|toml)\n(.*?)```", re.S)
FILE_NAME = re.compile(r"# ([\w.-]+\.(?:py|toml))\b")
README = ROOT / "README.md"
TESTING_DOC = ROOT / "docs" / "testing.md"
PROJECTS = [
    pytest.param(README, SECTION, 3, id="README"),
    pytest.param(TESTING_DOC, "## A complete project", 6, id="docs-testing"),
]


def project_files(page: Path = README, section: str = SECTION) -> dict[str, str]:
    """The files the fenced blocks of ``section`` (up to the next ``## ``) name."""
    text = page.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    files = {}
    for block in BLOCK.findall(text[start : end if end != -1 else None]):
        match = FILE_NAME.match(block)
        if match:
            files[match.group(1)] = block
    return files


@pytest.mark.parametrize(("page", "section", "tests"), PROJECTS)
def test_section_has_the_files_a_project_needs(page: Path, section: str, tests: int) -> None:
    files = project_files(page, section)
    assert set(files) == {"pyproject.toml", "conftest.py", "myservice.py", "test_service.py"}
    assert "trio_mode = true" in files["pyproject.toml"]


def test_testing_extra_installs_what_the_plugin_imports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    testing = {re.split(r"[<>=\[ ]", dep)[0] for dep in project["optional-dependencies"]["testing"]}
    assert {"pytest", "pytest-trio", "trustme", "httpx"} <= testing
    for page, section in ((README, SECTION), (TESTING_DOC, "## A complete project")):
        text = page.read_text()
        assert 'pip install "trio-launcher[testing]"' in text[text.index(section) :], page.name


@pytest.mark.parametrize(("page", "section", "tests"), PROJECTS)
def test_pasted_section_passes(
    page: Path,
    section: str,
    tests: int,
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, content in project_files(page, section).items():
        (pytester.path / name).write_text(content)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(pytester.path)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=tests)
