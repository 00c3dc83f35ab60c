"""Conformance: healthy public architectures pass the whole default set.

Each case (see ``zoo.py``) is a torchvision, timm or Hugging Face model with random weights and
only honest declarations. A failing check here is a false alarm of the check, to be fixed in the
check. By default the fast subset ``zoo.FAST`` runs; ``MODELCHECK_CONFORMANCE=full`` runs every
case. A case whose package is not installed is skipped (``pip install -e ".[conformance]"``).
"""
import importlib.util
import os

import pytest
import torch

from tests.conformance import zoo

FULL = os.environ.get("MODELCHECK_CONFORMANCE", "").lower() == "full"
NAMES = list(zoo.CASES) if FULL else zoo.FAST


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", NAMES)
def test_default_set_passes_on_public_architecture(name):
    package = zoo.CASES[name].package
    if importlib.util.find_spec(package) is None:  # (importing torchvision needs zoo's care)
        pytest.skip(f"{package} is not installed (pip install -e '.[conformance]')")
    report = zoo.run_case(name)
    failed = [f"{r.check}: {r.headline}" for r in report.results if r.passed is False]
    assert not failed, f"{name}: false alarms on a healthy public model:\n" + "\n".join(failed)
    ran = [r.check for r in report.results if r.passed is True]
    # the core checks really ran (a skip everywhere would make this suite vacuous)
    assert {"grads_finite", "model_overfits", "params_learn"} <= set(ran), ran


#: declared checks that apply to any architecture: they must find nothing wrong with a healthy one
BROAD_DECLARED = ["norm_stats", "attention_maps"]


@pytest.mark.parametrize("name", NAMES)
def test_broad_declared_checks_pass_on_public_architecture(name):
    package = zoo.CASES[name].package
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[conformance]')")
    from pytest_modelcheck import check_model

    model, batch, declared = zoo.build_case(name)   # facts for the default set: not routed here
    report = check_model(model, batch, loss=declared.get("loss"), checks=BROAD_DECLARED,
                         plot=False)
    assert [r.check for r in report.results] == BROAD_DECLARED
    failed = [f"{r.check}: {r.headline}" for r in report.results if r.passed is False]
    assert not failed, f"{name}: false alarms on a healthy public model:\n" + "\n".join(failed)


CHILD_SITE = os.path.join(os.path.dirname(__file__), "child_site")


@pytest.mark.parametrize("name", NAMES)
def test_ddp_consistent_passes_on_public_architecture(name, monkeypatch):
    """DDP on 2 gloo ranks matches one process; per-GPU BatchNorm statistics declared where the
    model has BatchNorm (torchvision's reference training uses them unless --sync-bn)."""
    package = zoo.CASES[name].package
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[conformance]')")
    from pytest_modelcheck import check_model

    # the rank processes import torchvision while unpickling the model: see child_site/
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [CHILD_SITE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    model, batch, declared = zoo.build_case(name)
    report = check_model(model, batch, loss=declared.get("loss"), checks=["ddp_consistent"],
                         local_batchnorm=True)
    (result,) = report.results
    if result.passed is None and "cannot be sent to the rank processes" in result.headline:
        pytest.skip(f"{name}: {result.headline}")  # a case whose loss is a local function
    assert result.passed is True, f"{name}: {result.headline}\n{result.details}"


def test_zoo_covers_the_declared_breadth():
    by_package = {}
    for case in zoo.CASES.values():
        by_package.setdefault(case.package, []).append(case.name)
    classification = [n for n in by_package["torchvision"]
                      if n not in ("tv_lraspp_mobilenet_v3_large", "tv_r3d_18")]
    assert len(classification) >= 20
    assert "tv_lraspp_mobilenet_v3_large" in zoo.CASES and "tv_r3d_18" in zoo.CASES
    assert len(by_package["timm"]) >= 8
    assert {"hf_bert", "hf_gpt2", "hf_llama", "hf_t5", "hf_vit"} <= set(by_package["transformers"])
    assert set(zoo.FAST) <= set(zoo.CASES)
