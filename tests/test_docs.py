"""The documentation stays true to the code: the generated check reference is current, the
README lists exactly the registered checks and the plugin's options and ini keys, stays under
its size limit, and every relative link in README.md and docs/*.md points to a file."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_modelcheck import reference
from pytest_modelcheck.checks.registry import all_checks

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT = 15_000

OPTION = re.compile(r"--modelcheck(?:-[a-z]+)*")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def test_checks_md_is_current():
    current = (DOCS / "checks.md").read_text(encoding="utf-8")
    assert current == reference.render(), (
        f"docs/checks.md is out of date: run `{reference.COMMAND}`")


def test_readme_size():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, (
        f"README.md is {size} bytes, over {README_LIMIT}: move detail into docs/")


def _readme_check_table() -> set:
    """Names in the first column of the README's check table (the section '## Checks')."""
    section = _readme().split("\n## Checks\n", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for m in re.finditer(r"^\| `([a-z_0-9]+)` \|", section, re.M)}


def test_readme_check_table_lists_exactly_the_registered_checks():
    table, registered = _readme_check_table(), set(all_checks())
    assert table == registered, (
        f"README check table: missing {sorted(registered - table)},"
        f" not registered {sorted(table - registered)}")


@pytest.fixture(scope="module")
def pytest_help(tmp_path_factory) -> str:
    """``pytest --help`` run in an empty directory (so no project ini applies)."""
    cwd = tmp_path_factory.mktemp("help")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
                          cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _help_ini_keys(text: str) -> set:
    """Ini keys from the '[pytest] ...' (configuration options) part of ``pytest --help``."""
    parts = text.split("\n[pytest]", 1)
    assert len(parts) == 2, "no '[pytest]' ini section in pytest --help"
    ini_part = parts[1]
    return set(re.findall(r"^  (modelcheck(?:_[a-z]+)*) \(", ini_part, re.M))


def test_readme_names_every_option_and_ini_key_and_no_other(pytest_help):
    options = set(re.findall(r"^\s+(--modelcheck(?:-[a-z]+)*)", pytest_help, re.M))
    ini_keys = _help_ini_keys(pytest_help)
    assert "--modelcheck" in options and "modelcheck_threads" in ini_keys, pytest_help[-2000:]
    text = _readme()
    readme_options = set(OPTION.findall(text))
    # ini keys as the README writes them: in backticks, optionally with a '(bool)' note
    readme_ini = set(re.findall(r"`(modelcheck(?:_[a-z]+)*)`", text))
    assert options - readme_options == set(), "options missing from the README"
    assert readme_options - options == set(), "the README names options pytest does not have"
    assert ini_keys - readme_ini == set(), "ini keys missing from the README"
    assert readme_ini - ini_keys == set(), "the README names ini keys pytest does not have"


def _markdown_files() -> list:
    return [README] + sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_relative_links_point_to_files(path):
    text = path.read_text(encoding="utf-8")
    # links inside code are code, not links
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # absolute URL or an anchor in the same file
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{path.name}: links to missing files: {broken}"
