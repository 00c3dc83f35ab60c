"""modelcheck inspect/compare/merge: --allow-unsafe, and exit statuses that gate CI (1 for a
mismatch, a failed check or drift over --fail-over; 2 for usage mistakes). Run in process."""
import argparse
import importlib
import json
import math

import torch

from pytest_modelcheck.cli import main


def _model(tiny, **cfg):
    return importlib.import_module(tiny).build(**cfg)


def test_allow_unsafe_loads_a_trusted_full_pickle_and_its_refusal_names_the_flag(tiny, tmp_path,
                                                                                 capsys):
    path = tmp_path / "full.pt"
    torch.save(_model(tiny), path)  # a whole nn.Module pickled: not weights only
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "pass --allow-unsafe only for a file you trust" in err
    assert "allow_unsafe=True" not in err and len(err.strip().splitlines()) == 1
    assert main(["inspect", str(path), "--allow-unsafe"]) == 0
    out, err = capsys.readouterr()
    assert "Checkpoint: " in out
    assert "modelcheck: warning: --allow-unsafe" in err and "runs any code" in err
    assert main(["compare", str(path), str(path)]) == 2
    assert "pass --allow-unsafe" in capsys.readouterr().err
    assert main(["compare", str(path), str(path), "--allow-unsafe"]) == 0
    assert "warning: --allow-unsafe" in capsys.readouterr().err


def test_profile_checkpoint_needing_allow_unsafe(tiny, tmp_path, capsys):
    path = tmp_path / "run.pt"
    torch.save({"state_dict": _model(tiny).state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    common = ["profile", "--model", f"{tiny}:build", "--checkpoint", str(path), "--batch-sizes",
              "2", "--warmup", "0", "--runs", "2"]
    assert main(common) == 2
    assert "pass --allow-unsafe" in capsys.readouterr().err
    assert main(common + ["--allow-unsafe"]) == 0
    out, err = capsys.readouterr()
    assert f"weights loaded from {path}" in out and "warning: --allow-unsafe" in err


def test_checkpoint_shape_mismatch_exits_1(tiny, tmp_path, capsys):
    bad, good = tmp_path / "bad.pt", tmp_path / "good.pt"
    torch.save(_model(tiny, out=5).state_dict(), bad)
    torch.save(_model(tiny).state_dict(), good)
    out_json = tmp_path / "info.json"
    assert main(["inspect", "--model", f"{tiny}:build", "--checkpoint", str(bad),
                 "--json", str(out_json)]) == 1
    out, err = capsys.readouterr()
    assert "shape mismatch: 3.weight: checkpoint (5, 16), model (10, 16)" in out
    assert "modelcheck: failed: checkpoint" in err and "2 shape mismatches (3.bias: checkpoint (5,)" in err
    assert json.loads(out_json.read_text())["checkpoint"]["matches_model"] is False
    assert main(["inspect", "--model", f"{tiny}:build", "--checkpoint", str(good)]) == 0
    assert "keys and shapes match" in capsys.readouterr().out
    # profile refuses to time weights that do not load, with the same exit status
    assert main(["profile", "--model", f"{tiny}:build", "--checkpoint", str(bad)]) == 1
    assert "does not match the model" in capsys.readouterr().err


def _pair(tmp_path, scale):
    a = {"w": torch.ones(100), "v": torch.ones(100)}
    b = {"w": torch.ones(100) * (1 + scale), "v": torch.ones(100) * 1.001}
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(a, pa)
    torch.save(b, pb)
    return str(pa), str(pb)


def test_compare_fail_over_exits_1_above_and_0_below(tmp_path, capsys):
    a, b = _pair(tmp_path, 0.10)  # w moved 10%, v 0.1%
    assert main(["compare", a, b, "--fail-over", "0.05"]) == 1
    err = capsys.readouterr().err
    assert "--fail-over 0.05: 1 tensor(s) moved more: w 0.1 (relative)" in err
    assert main(["compare", a, b, "--fail-over", "20%"]) == 0
    assert "No tensor moved more than --fail-over 20%" in capsys.readouterr().out
    assert main(["compare", a, b, "--fail-over", "lots"]) == 2
    assert "--fail-over 'lots': expected a non-negative" in capsys.readouterr().err


def test_compare_keys_that_differ_exit_1(tmp_path, capsys):
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.ones(2), "gone": torch.ones(1)}, pa)
    torch.save({"w": torch.ones(3)}, pb)
    assert main(["compare", str(pa), str(pb)]) == 1
    assert "1 only in" in capsys.readouterr().err


def test_compare_ranks_real_movers_without_inf_and_lists_counters_apart(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for m in (model[0], model[3]):
        torch.nn.init.zeros_(m.bias)  # zero-initialised biases: ||a|| = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model(torch.randn(32, 8) + 3.0).square().mean().backward()  # BN running stats move too
    opt.step()
    with torch.no_grad():
        model[3].weight.mul_(2.0)  # the real mover: relative change 1
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(before, pa)
    torch.save(model.state_dict(), pb)
    out_json = tmp_path / "drift.json"
    assert main(["compare", str(pa), str(pb), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "inf" not in out.lower()
    table = out.split("Tensors that moved most", 1)[1].splitlines()
    assert table[1].split()[:2] == ["tensor", "change"] and table[2].split()[0] == "3.weight"
    assert "1.num_batches_tracked: 0 -> 1" in out.split("Counters and integer buffers")[1]
    assert "num_batches_tracked" not in out.split("Counters and integer buffers")[0]
    rows = {line.split()[0]: line.split() for line in table[2:] if line.startswith("  ")}
    assert rows["0.bias"][2] == "absolute" and rows["1.running_mean"][2] == "absolute"
    assert rows["3.weight"][2] == "relative"
    doc = json.loads(out_json.read_text())
    assert "inf" not in out_json.read_text().lower()
    assert doc["tensors"][0]["name"] == "3.weight"
    assert doc["tensors"][0]["change"] == doc["tensors"][0]["relative_change"]
    assert math.isclose(doc["tensors"][0]["relative_change"], 1.0, rel_tol=1e-3)
    assert [c["name"] for c in doc["counters"]] == ["1.num_batches_tracked"]


def test_merge_with_a_failed_check_exits_1(tmp_path, capsys):
    doc = {"format": "pytest-modelcheck/1", "tests": [
        {"nodeid": "t.py::x", "results": [{"check": "grads_finite", "passed": False}]}]}
    path = tmp_path / "shard.json"
    path.write_text(json.dumps(doc))
    assert main(["merge", str(path), "--json", str(tmp_path / "merged.json")]) == 1
    assert "1 failed check(s) in the merged report: t.py::x::grads_finite" in capsys.readouterr().err
    assert (tmp_path / "merged.json").exists()  # written all the same
