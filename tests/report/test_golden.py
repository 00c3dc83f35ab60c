"""The renderers' output under golden files, so that a change of wording or layout is seen in
review: the terminal health table, the markdown job summary, the HTML page's skeleton and the
model/checkpoint inspection of ``modelcheck inspect``, on fixed inputs.

Regenerate after an intended change with ``MODELCHECK_UPDATE_GOLDEN=1 pytest
tests/report/test_golden.py`` and review the diff of ``tests/report/golden/``.
"""
import os
import re
from pathlib import Path

import pytest
import torch

from pytest_modelcheck.core.baseline import Baseline, compare
from pytest_modelcheck.core.result import CheckResult
from pytest_modelcheck.report.html import render_html
from pytest_modelcheck.report.markdown import render_markdown
from pytest_modelcheck.report.terminal import health_table, threads_line

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("MODELCHECK_UPDATE_GOLDEN") == "1"
FP = {"key": "machine"}


def _rows(flops=2000):
    a = [CheckResult("grads_finite", True, "expected finite gradients for all 4 trainable"
                     " tensors, observed finite (loss 1.61, grad norm 0.82)"),
         CheckResult("flops_under", True, "expected <= 1M FLOPs, observed 2k",
                     metrics={"flops": flops}),
         CheckResult("memory_under", True, "expected a peak <= 64 MiB, observed 3 MiB",
                     metrics={"peak_bytes": 3 * 2 ** 20}, estimated=True),
         CheckResult("no_host_sync", None, "skipped: device 'cuda' is not available")]
    b = [CheckResult("grads_finite", False, "expected finite outputs, loss and gradients,"
                     " observed NaN in the gradient of 'fc.weight' (Linear 'fc')",
                     details="parameters with non-finite gradients:\n  fc.weight NaN: 12/12")]
    return [{"nodeid": "tests/test_m.py::test_b", "outcome": "failed",
             "model": {"parameters": 5, "flops": 10}, "results": [r.to_dict() for r in b],
             "threads": {"count": 1, "reason": "auto: small model", "setting": "auto"}},
            {"nodeid": "tests/test_m.py::test_a", "outcome": "passed",
             "model": {"parameters": 1_500_000, "flops": 2000},
             "results": [r.to_dict() for r in a],
             "threads": {"count": 1, "reason": "auto: small model", "setting": "auto"}}]


def _comparisons():
    return compare(Baseline.from_rows(_rows(), FP), _rows(flops=2400), FP)


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE or not path.exists():
        if not UPDATE:
            pytest.fail(f"{path} is missing: run with MODELCHECK_UPDATE_GOLDEN=1 to write it")
        path.write_text(text)
        return
    assert text == path.read_text(), (f"{name} differs from its golden file; if the change is"
                                      " intended, rerun with MODELCHECK_UPDATE_GOLDEN=1")


def test_terminal_health_table():
    rows = _rows()
    _check("terminal.txt", "\n".join([threads_line(rows), *health_table(rows, width=100)]) + "\n")


def test_markdown_job_summary():
    _check("summary.md", render_markdown(_rows(), _comparisons()))


def _skeleton(page: str) -> str:
    """The page's structure: the stylesheet and embedded images left out, one tag per line."""
    page = re.sub(r"<style>.*?</style>", "<style>...</style>", page, flags=re.S)
    page = re.sub(r'src="data:image/png;base64,[^"]*"', 'src="data:image/png;base64,..."', page)
    return re.sub(r">\s*<", ">\n<", page) + "\n"


def test_html_page_skeleton():
    _check("report.html.txt", _skeleton(render_html(_rows(), _comparisons())))


def test_modelcheck_inspect_of_a_model_and_a_checkpoint(tmp_path, capsys):
    from pytest_modelcheck.core.checkpoint import inspect_checkpoint
    from pytest_modelcheck.core.inspect import inspect_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    text = inspect_model(model).render() + "\n" + inspect_checkpoint(str(path)).render()
    _check("inspect.txt", text.replace(str(tmp_path), "<tmp>") + "\n")
