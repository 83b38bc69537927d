"""The README's "Testing your service" section, pasted into a fresh project, passes.

Every fenced block in that section whose first line names a file
(``# conftest.py``) is written to a temporary project, which pytest then runs
in a subprocess: what a new user does, with nothing added.
"""

from __future__ import annotations

import os
import re
import tomllib

import pytest

from .proc import ROOT

SECTION = "## Testing your service"
BLOCK = re.compile(r"```(?:python|toml)\n(.*?)```", re.S)
FILE_NAME = re.compile(r"# ([\w.-]+\.(?:py|toml))\b")


def readme_files() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    files = {}
    for block in BLOCK.findall(text[start : end if end != -1 else None]):
        match = FILE_NAME.match(block)
        if match:
            files[match.group(1)] = block
    return files


def test_section_has_the_files_a_project_needs() -> None:
    assert set(readme_files()) == {
        "pyproject.toml",
        "conftest.py",
        "myservice.py",
        "test_service.py",
    }
    assert "trio_mode = true" in readme_files()["pyproject.toml"]


def test_testing_extra_installs_what_the_plugin_imports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    testing = {re.split(r"[<>=\[ ]", dep)[0] for dep in project["optional-dependencies"]["testing"]}
    assert {"pytest", "pytest-trio", "trustme", "httpx"} <= testing
    text = (ROOT / "README.md").read_text()
    assert 'pip install "trio-launcher[testing]"' in text[text.index(SECTION) :]


def test_pasted_section_passes(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, content in readme_files().items():
        (pytester.path / name).write_text(content)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.chdir(pytester.path)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=6)
