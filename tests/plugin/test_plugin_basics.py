"""The pytest glue: enabling, skipping, markers help, usage errors, ini keys, summary, JSON."""
import json
import subprocess
import sys

import pytest

from pytest_modelcheck.checks import all_checks


def test_importing_the_plugin_does_not_import_torch():
    code = ("import sys, pytest_modelcheck, pytest_modelcheck.plugin, pytest_modelcheck.checks;"
            " print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_markers_are_registered_with_signature_and_summary(pytester):
    result = pytester.runpytest("--markers")
    for name in all_checks():
        result.stdout.fnmatch_lines([f"@pytest.mark.{name}(*): *"])
    result.stdout.fnmatch_lines(["@pytest.mark.memory_under(limit, phase='train'*"])


def test_marked_tests_are_skipped_without_modelcheck(healthy_project):
    healthy_project.makepyfile("""
        import pytest
        @pytest.mark.grads_finite
        def test_a(): pass
    """)
    result = healthy_project.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*model checks are off: run pytest with --modelcheck*"])


def test_ini_key_enables_checks(healthy_project):
    healthy_project.makeini("[pytest]\nmodelcheck = true\n")
    healthy_project.makepyfile("""
        import pytest
        @pytest.mark.grads_finite
        def test_a(): pass
    """)
    healthy_project.runpytest().assert_outcomes(passed=1)


def test_unmarked_tests_are_untouched(pytester):
    pytester.makepyfile("def test_plain(): assert 1")
    result = pytester.runpytest("--modelcheck")
    result.assert_outcomes(passed=1)
    assert "model health summary" not in result.stdout.str()


@pytest.mark.parametrize("marker, message", [
    ("memory_under('12 parsecs')", "@pytest.mark.memory_under: limit='12 parsecs': expected*"),
    ("memory_under('1 GiB', phase='eval')", "@pytest.mark.memory_under: phase='eval': expected 'train' or 'inference'"),
    ("throughput_at_least('fast')", "@pytest.mark.throughput_at_least: rate='fast': expected*"),
    ("model_overfits(steps=-3)", "@pytest.mark.model_overfits: steps=-3: expected a positive integer"),
    ("model_overfits(lr='big')", "@pytest.mark.model_overfits: lr='big': expected a positive number"),
    ("model_overfits(optimizer='lion')", "@pytest.mark.model_overfits: optimizer='lion': expected one of*"),
    ("shapes_consistent(out=('B', 1.5))", "@pytest.mark.shapes_consistent: out=('B', 1.5): dimension 1.5 is not an int*"),
    ("shapes_consistent(sizes={'H': [8]})", "@pytest.mark.shapes_consistent: sizes=*needs inputs=*"),
    ("grads_finite(allow_unused=3)", "@pytest.mark.grads_finite: allow_unused=3: expected a list*"),
    ("grads_finite(loss='hinge')", "@pytest.mark.grads_finite: loss='hinge': expected one of*"),
    ("grads_finite(colour='red')", "@pytest.mark.grads_finite: got an unexpected keyword argument 'colour'; expected grads_finite(*"),
    ("memory_under()", "@pytest.mark.memory_under: missing a required argument: 'limit'; expected memory_under(*"),
])
def test_bad_marker_arguments_fail_at_setup_in_one_line(healthy_project, marker, message):
    healthy_project.makepyfile(f"""
        import pytest
        @pytest.mark.{marker}
        def test_a(): raise AssertionError("the test body must not run")
    """)
    result = healthy_project.runpytest("--modelcheck")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])
    out = result.stdout.str()
    assert "Traceback" not in out and "pytest_modelcheck/" not in out
    assert "During handling" not in out and "the test body must not run" not in out


def test_missing_model_fixture_is_a_usage_error(pytester):
    pytester.makepyfile("""
        import pytest
        @pytest.mark.grads_finite
        def test_a(): pass
    """)
    result = pytester.runpytest("--modelcheck")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.grads_finite: no fixture named 'model'*"])
    assert "Traceback" not in result.stdout.str()


def test_fixture_names_from_marker_and_ini(healthy_project):
    healthy_project.makeconftest("""
        import pytest, torch
        @pytest.fixture
        def net():
            return torch.nn.Linear(3, 2)
        @pytest.fixture
        def data():
            return torch.randn(4, 3)
    """)
    healthy_project.makepyfile("""
        import pytest
        @pytest.mark.shapes_consistent(out=("B", 2), model_fixture="net", batch_fixture="data")
        def test_marker_names(): pass
        @pytest.mark.shapes_consistent(out=("B", 2))
        def test_ini_names(): pass
    """)
    healthy_project.makeini("[pytest]\nmodelcheck_model_fixture = net\nmodelcheck_batch_fixture = data\n")
    healthy_project.runpytest("--modelcheck").assert_outcomes(passed=2)


def test_loss_fixture_is_used(healthy_project):
    healthy_project.makepyfile("""
        import pytest, torch
        calls = []
        @pytest.fixture
        def loss_fn():
            def loss(out, target):
                calls.append(1)
                return torch.nn.functional.cross_entropy(out, target)
            return loss
        @pytest.mark.grads_finite
        def test_a(): pass
        def test_called():
            assert calls
    """)
    healthy_project.runpytest("--modelcheck", "-p", "no:randomly").assert_outcomes(passed=2)


def test_summary_and_json(healthy_project, tmp_path):
    healthy_project.makepyfile("""
        import pytest
        @pytest.mark.grads_finite
        @pytest.mark.shapes_consistent(out=("B", 5))
        def test_good(): pass
        @pytest.mark.shapes_consistent(out=("B", 6))
        def test_bad(): pass
    """)
    path = tmp_path / "results.json"
    result = healthy_project.runpytest("--modelcheck", f"--modelcheck-json={path}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*model health summary*",
        "params*peak mem*throughput*checks*test",
        "453*0/1*::test_bad",
        "*failed: shapes_consistent",
        "453*2/2*::test_good",
    ])
    doc = json.loads(path.read_text())
    assert doc["format"] == "pytest-modelcheck/1"
    assert doc["summary"] == {"tests": 2, "checks": 3, "failed_checks": 1}
    bad = next(t for t in doc["tests"] if t["nodeid"].endswith("test_bad"))
    assert bad["results"][0]["check"] == "shapes_consistent"
    assert bad["results"][0]["passed"] is False
    assert "dim 1 is 5, expected 6" in bad["results"][0]["headline"]


def test_json_path_from_ini(healthy_project):
    healthy_project.makeini("[pytest]\nmodelcheck_json = out/mc.json\n")
    healthy_project.makepyfile("""
        import pytest
        @pytest.mark.grads_finite
        def test_a(): pass
    """)
    healthy_project.runpytest("--modelcheck").assert_outcomes(passed=1)
    assert (healthy_project.path / "out" / "mc.json").exists()


def test_results_go_to_junit_xml(healthy_project):
    healthy_project.makepyfile("""
        import pytest
        @pytest.mark.grads_finite
        def test_a(): pass
    """)
    healthy_project.runpytest("--modelcheck", "--junitxml=j.xml").assert_outcomes(passed=1)
    xml = (healthy_project.path / "j.xml").read_text()
    assert 'name="modelcheck"' in xml and "grads_finite" in xml


def test_xdist_gives_the_same_summary(healthy_project):
    pytest.importorskip("xdist")
    healthy_project.makepyfile("""
        import pytest
        @pytest.mark.grads_finite
        def test_a(): pass
        @pytest.mark.shapes_consistent(out=("B", 6))
        def test_b(): pass
    """)
    serial = healthy_project.runpytest("--modelcheck")
    parallel = healthy_project.runpytest("--modelcheck", "-n", "2")
    for res in (serial, parallel):
        res.assert_outcomes(passed=1, failed=1)
    start = serial.stdout.lines.index(next(ln for ln in serial.stdout.lines if "model health summary" in ln))
    # the summary ends at the next "=" rule (short test summary info); under CI=true pytest
    # prints that section untruncated, with continuation lines that must not count here
    rest = serial.stdout.lines[start + 1:]
    end = next((i for i, ln in enumerate(rest) if ln.startswith("=")), len(rest))
    table = [ln for ln in rest[:end] if ln.strip()]
    # torch threads, header, two rows, one "failed:" line (and a "test:" line per id too long
    # for its row's file name)
    assert len([ln for ln in table if not ln.strip().startswith("test: ")]) == 5, table
    assert table[0].startswith("torch threads: 1 per test (auto: small model"), table
    parallel.stdout.fnmatch_lines(table)


def test_fixture_methods_fail_with_headline(healthy_project):
    healthy_project.makepyfile("""
        def test_ok(modelcheck):
            r = modelcheck.shapes_consistent(out=("B", 5))
            assert r.passed and "consistent" in r.headline
        def test_bad(modelcheck):
            modelcheck.shapes_consistent(out=("B", 7))
        def test_usage(modelcheck):
            modelcheck.shapes_consistent(batch_sizes=0)
        def test_unknown(modelcheck):
            modelcheck.no_such_check()
    """)
    result = healthy_project.runpytest("--modelcheck")
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines([
        "*shapes_consistent?*expected outputs*7*observed at B=1*dim 1 is 5, expected 7",
        "*modelcheck.shapes_consistent: batch_sizes=0: expected a tuple of positive ints*",
        "*modelcheck has no check 'no_such_check'*",
    ])


def test_model_health_marker_runs_the_default_set(healthy_project):
    healthy_project.makepyfile("""
        import math, pytest
        @pytest.mark.model_health(out=("B", 5), chance_level=math.log(5))
        def test_good(): pass
        @pytest.mark.model_health(out=("B", 6))
        def test_bad_shape(): pass
        @pytest.mark.model_health(checks=["grads_finite"], memory_under={"limit": "1 B"})
        def test_budget(): pass
        @pytest.mark.model_health(colour="red")
        def test_usage(): pass
    """)
    result = healthy_project.runpytest("--modelcheck")
    result.assert_outcomes(passed=1, failed=2, errors=1)
    result.stdout.fnmatch_lines([
        "*@pytest.mark.model_health: colour: not an argument of any selected check*",
    ])
    out = result.stdout.str()
    assert "[shapes_consistent] expected outputs ('B', 6)" in out
    assert "[memory_under] expected peak memory" in out
    from pytest_modelcheck.checks import default_checks
    n = len(default_checks())
    result.stdout.fnmatch_lines([f"*{n}/{n}*::test_good"])


def test_json_rows_carry_the_xfail_outcome(healthy_project, tmp_path):
    healthy_project.makepyfile("""
        import pytest
        @pytest.mark.xfail(reason="known")
        @pytest.mark.shapes_consistent(out=("B", 6))
        def test_xf(): pass
        @pytest.mark.shapes_consistent(out=("B", 5))
        def test_ok(): pass
    """)
    path = tmp_path / "results.json"
    healthy_project.runpytest("--modelcheck", f"--modelcheck-json={path}").assert_outcomes(
        passed=1, xfailed=1)
    tests = {t["nodeid"].rsplit("::", 1)[1]: t for t in json.loads(path.read_text())["tests"]}
    assert tests["test_xf"]["xfail"] == {"outcome": "xfailed", "reason": "known", "strict": False}
    assert tests["test_xf"]["outcome"] == "skipped"  # pytest's own outcome, as before
    assert "xfail" not in tests["test_ok"]
