"""``modelcheck_exclusive``: GPU-bound tests that must not share the device run on one xdist
worker (the hooks live in pytest_modelcheck/plugin.py)."""
import textwrap

import pytest

pytest.importorskip("xdist")



# 8 exclusive tests and 8 free ones; each writes the worker it ran on into a file of its own.
TESTS = textwrap.dedent('''
    import os
    import pathlib

    import pytest

    OUT = pathlib.Path(__file__).parent / "workers"

    def record(kind, i):
        OUT.mkdir(exist_ok=True)
        (OUT / f"{kind}-{i}").write_text(os.environ.get("PYTEST_XDIST_WORKER", "none"))

    @pytest.mark.modelcheck_exclusive
    @pytest.mark.parametrize("i", range(8))
    def test_gpu(i):
        record("gpu", i)

    @pytest.mark.parametrize("i", range(8))
    def test_free(i):
        record("free", i)

    @pytest.mark.modelcheck_exclusive
    class TestOnClass:
        def test_a(self):
            record("gpu", "class-a")
''')


def _workers(pytester, kind):
    files = sorted((pytester.path / "workers").glob(f"{kind}-*"))
    return {f.name: f.read_text() for f in files}


@pytest.fixture
def project(pytester, monkeypatch):
    # the inner runs must not inherit the outer xdist worker's identity
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    pytester.makepyfile(test_models=TESTS)
    return pytester


@pytest.mark.parametrize("dist_args", [["--dist", "loadgroup"], ["--dist=loadgroup"], []],
                         ids=["explicit", "explicit-eq", "automatic"])
def test_exclusive_tests_share_one_worker(project, dist_args):
    result = project.runpytest("--strict-markers", "-n", "2", *dist_args)
    result.assert_outcomes(passed=17)
    gpu = _workers(project, "gpu")
    assert len(gpu) == 9
    assert len(set(gpu.values())) == 1, gpu
    assert set(gpu.values()) <= {"gw0", "gw1"}
    assert set(_workers(project, "free").values()) <= {"gw0", "gw1"}


def test_an_explicit_other_dist_is_kept(project):
    # with --dist load the user opted out of grouping: the tests still run, the group is ignored
    project.makepyfile(test_probe='''
        def test_dist(request):
            import os
            assert os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw")
    ''')
    result = project.runpytest("--strict-markers", "-n", "2", "--dist", "load", "-v")
    result.assert_outcomes(passed=18)
    assert "@modelcheck-exclusive" not in result.stdout.str()


def test_marker_is_listed_and_runs_without_xdist(project):
    project.runpytest("--markers").stdout.fnmatch_lines(
        ["@pytest.mark.modelcheck_exclusive: run on a single xdist worker*"])
    result = project.runpytest("--strict-markers", "-p", "no:xdist")
    result.assert_outcomes(passed=17)
    assert set(_workers(project, "gpu").values()) == {"none"}
