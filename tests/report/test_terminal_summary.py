"""The terminal health summary: long test ids keep their file name at narrow widths, tests
marked xfail are shown as xfail/XPASS and not as failures."""
import pytest

from pytest_modelcheck.report.terminal import failed_counts, health_table, short_nodeid

LONG_ID = ("tests/models/neural_operators/test_fourier_neural_operator.py::"
           "test_fno_default_checks[float32-cpu-large]")


def _row(nodeid, passed=False, **extra):
    return {"nodeid": nodeid, "model": {"parameters": 1234, "flops": 5678},
            "results": [{"check": "grads_finite", "passed": passed, "metrics": {}},
                        {"check": "no_host_sync", "passed": None, "metrics": {}}], **extra}


@pytest.mark.parametrize("width", [60, 80, 100])
def test_long_node_id_keeps_its_file_name_at_narrow_widths(width):
    lines = health_table([_row(LONG_ID)], width=width)
    text = "\n".join(lines)
    assert "test_fourier_neural_operator.py" in text
    # the whole id is readable, either in the row or on its own line
    assert LONG_ID in text or any("test_fourier_neural_operator.py::" in ln for ln in lines)
    assert not any("  …" in ln and "…/" not in ln for ln in lines)  # never cut from the left


def test_at_60_columns_the_full_id_is_on_its_own_line():
    lines = health_table([_row(LONG_ID)], width=60)
    assert any(ln.strip() == f"test: {LONG_ID}" for ln in lines), lines


def test_short_nodeid_drops_directories_then_the_middle_of_the_name():
    assert short_nodeid("a/b/test_m.py::test_a", 100) == ("a/b/test_m.py::test_a", True)
    assert short_nodeid(LONG_ID, 80) == ("…/test_fourier_neural_operator.py::"
                                         "test_fno_default_checks[float32-cpu-large]", True)
    short, whole = short_nodeid(LONG_ID, 60)
    assert whole and len(short) == 60
    assert short.startswith("…/test_fourier_neural_operator.py::test_")
    assert short.endswith("large]")
    short, whole = short_nodeid(LONG_ID, 30)
    assert not whole and len(short) <= 30 and short.startswith("test_")  # never from the left


def test_xfail_and_xpass_are_shown_as_such():
    rows = [_row("t.py::test_x", xfail={"outcome": "xfailed", "reason": "known", "strict": False}),
            _row("t.py::test_y", passed=True,
                 xfail={"outcome": "xpassed", "reason": "", "strict": True}),
            _row("t.py::test_z")]
    lines = health_table(rows, width=100)
    text = "\n".join(lines)
    row_x = next(ln for ln in lines if ln.endswith("t.py::test_x"))
    assert "0/2 (1 skipped, xfail)" in row_x
    assert "xfail (expected failure: known): grads_finite" in text
    assert "XPASS(strict): marked xfail, but passed" in text
    assert "1/2 (1 skipped, xpass)" in text
    failed = [ln.strip() for ln in lines if ln.strip().startswith("failed:")]
    assert failed == ["failed: grads_finite"]  # test_z only
    assert failed_counts(rows) == (1, 1, 1)


XFAIL_FILE = """
    import pytest

    @pytest.mark.xfail(reason="known shape bug")
    @pytest.mark.shapes_consistent(out=("B", 6))
    def test_expected_to_fail(): pass

    @pytest.mark.xfail(reason="fixed already")
    @pytest.mark.shapes_consistent(out=("B", 5))
    def test_passes_anyway(): pass

    @pytest.mark.shapes_consistent(out=("B", 7))
    def test_really_fails(): pass
"""


def test_xfail_run_shows_xfail_and_xpass_and_counts_no_expected_failure(healthy_project,
                                                                         tmp_path, monkeypatch):
    healthy_project.makepyfile(test_xf=XFAIL_FILE)
    monkeypatch.setenv("COLUMNS", "100")
    md = tmp_path / "summary.md"
    result = healthy_project.runpytest("--modelcheck", f"--modelcheck-markdown={md}")
    result.assert_outcomes(failed=1, xfailed=1, xpassed=1)
    result.stdout.fnmatch_lines([
        "*model health summary*",
        "*0/1 (xfail)*::test_expected_to_fail",
        "*xfail (expected failure: known shape bug): shapes_consistent",
        "*1/1 (xpass)*::test_passes_anyway",
        "*XPASS: marked xfail (fixed already), but passed",
        "*0/1*::test_really_fails",
        "*failed: shapes_consistent",
    ])
    summary = result.stdout.str().split("model health summary", 1)[1]
    assert summary.count("failed: ") == 1
    text = md.read_text()
    assert ("3 model tests, 3 checks, 1 failed, 1 failed as expected (xfail), 1 test passed"
            " though marked xfail (xpass).") in text


def test_narrow_terminal_keeps_the_file_name(healthy_project, monkeypatch):
    healthy_project.mkpydir("tests_of_models")
    (healthy_project.path / "tests_of_models" / "test_a_rather_long_module_name.py").write_text(
        "import pytest\n"
        "@pytest.mark.grads_finite\n"
        "def test_with_a_name_that_is_long_enough_to_need_room(): pass\n")
    monkeypatch.setenv("COLUMNS", "60")
    result = healthy_project.runpytest("--modelcheck", "tests_of_models")
    result.assert_outcomes(passed=1)
    summary = result.stdout.str().split("model health summary", 1)[1]
    assert "test_a_rather_long_module_name.py" in summary
