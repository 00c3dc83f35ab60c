"""The private torch features the package reaches (core/_torch_compat.py) are all present in the
installed torch, and a missing one is a clear error naming it and the torch version."""
import io
import re
import tokenize
import tomllib
from pathlib import Path

import pytest

from pytest_modelcheck.core import _torch_compat as compat


def test_every_private_feature_is_present_in_this_torch():
    assert compat.probe() == {name: True for name in compat.probe()}


def test_a_missing_feature_is_a_one_line_error_naming_it_and_the_tested_releases():
    with pytest.raises(compat.TorchFeatureMissing) as info:
        compat.require("torch.utils._gone", lambda: __import__("torch.utils._gone"))
    text = str(info.value)
    assert "\n" not in text
    assert "lacks torch.utils._gone" in text
    assert "2.13" in text


def test_the_tested_releases_match_the_torch_requirement():
    project = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())
    torch_req = next(d for d in project["project"]["dependencies"] if d.startswith("torch"))
    low = re.search(r">=\s*([\d.]+)", torch_req).group(1)
    high = re.search(r"<\s*([\d.]+)", torch_req).group(1)
    assert compat.TESTED_TORCH[0] == ".".join(low.split(".")[:2])
    last = tuple(int(x) for x in compat.TESTED_TORCH[-1].split("."))
    assert tuple(int(x) for x in high.split(".")[:2]) == (last[0], last[1] + 1)


def _code_lines(source: str) -> dict:
    """Line number -> the code on that line, with strings (docstrings, messages) and comments
    left out: text about a private name is not access to it."""
    lines: dict = {}
    last = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            continue
        row = tok.start[0]
        gap = " " if last == tokenize.NAME and tok.type == tokenize.NAME else ""
        lines[row] = lines.get(row, "") + gap + tok.string
        last = tok.type
    return lines


def test_no_other_module_reaches_private_torch_or_cpython_internals():
    """Private torch modules (``torch._x``, ``torch.utils._x``, ``torch._C``), MemTracker's
    private members and frame inspection appear in _torch_compat.py only (in code: strings
    and comments do not count)."""
    pattern = re.compile(r"torch\.(?:utils\.|distributed\._tools\.)?_[a-zA-Z]\w*|torch\._C\b|"
                         r"_curr_mem_snap|sys\._getframe|\bimport dis\b")
    package = Path(compat.__file__).parents[1]
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "_torch_compat.py":
            continue
        for number, code in _code_lines(path.read_text()).items():
            if pattern.search(code):
                offenders.append(f"{path.relative_to(package)}:{number}: {code}")
    assert offenders == []
