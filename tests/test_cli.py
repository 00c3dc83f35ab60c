"""The modelcheck command run as a user would: subprocess, exit codes, one-line errors."""
import json
import subprocess
import sys

import pytest
import torch

ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pytest_modelcheck.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_inspect_a_factory_prints_the_sections_and_writes_json(tmp_path):
    out = tmp_path / "info.json"
    r = run("inspect", "--model", "example_models.vit3d:build_model", "--batch-size", "2",
            "--json", str(out))
    assert r.returncode == 0, r.stderr
    for section in ("Parameters", "Parameters by module type:", "Forward flow (batch size 2",
                    "Memory estimate, training step at batch size 2"):
        assert section in r.stdout
    doc = json.loads(out.read_text())
    assert doc["model"]["total_params"] == 142595
    assert {"fp32", "bf16"} <= set(doc["memory"])


def test_inspect_with_config(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"depth": 1}))
    r = run("inspect", "--model", "example_models.vit3d:build_model", "--config", str(cfg),
            "--batch-size", "1")
    assert r.returncode == 0, r.stderr
    assert "depth" in r.stdout


def test_inspect_and_compare_checkpoints(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    torch.save({"model_state_dict": m.state_dict(), "epoch": 3}, a)
    with torch.no_grad():
        m[1].weight.add_(1.0)
    torch.save({"model_state_dict": m.state_dict(), "epoch": 4}, b)
    r = run("inspect", str(a))
    assert r.returncode == 0, r.stderr
    assert "epoch" in r.stdout
    r = run("compare", str(a), str(b))
    assert r.returncode == 0, r.stderr
    assert "1.weight" in r.stdout


@pytest.mark.parametrize("args, message", [
    (("inspect", "--model", "example_models.vit3d"), "expected 'package.module:factory'"),
    (("inspect", "--model", "example_models.vit3d:no_such"), "has no 'no_such'"),
    (("inspect", "--model", "no_such_pkg.mod:f"), "cannot import 'no_such_pkg.mod'"),
    (("inspect", "/nonexistent/ckpt.pt"), "/nonexistent/ckpt.pt"),
    (("profile", "--model", "example_models.fno:build_model", "--batch-sizes", "1,x"), "--batch-sizes"),
])
def test_user_mistakes_are_one_line_with_exit_2(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_bad_config_is_one_line(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("depth: [1, 2\n")
    r = run("inspect", "--model", "example_models.vit3d:build_model", "--config", str(cfg))
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    cfg.write_text("colour: red\n")
    r = run("inspect", "--model", "example_models.vit3d:build_model", "--config", str(cfg))
    assert r.returncode == 2 and "colour" in r.stderr


def test_profile_prints_a_table_and_json(tmp_path):
    out = tmp_path / "p.json"
    r = run("profile", "--model", "example_models.fno:build_model", "--batch-sizes", "1,2",
            "--warmup", "1", "--runs", "3", "--json", str(out))
    assert r.returncode == 0, r.stderr
    for column in ("p50", "p90", "p99", "FLOPs", "FLOP/s"):
        assert column in r.stdout.splitlines()[0].split()
    # stderr is a pipe, not a terminal: plain progress lines, nothing that rewrites a line
    assert "\r" not in r.stderr and "\x1b" not in r.stderr
    assert "[1/2] batch size 1: " in r.stderr and "[2/2] batch size 2: " in r.stderr
    doc = json.loads(out.read_text())
    assert [row["batch_size"] for row in doc["batch_profiling"]] == [1, 2]
    assert {"config", "architecture", "single_input", "batch_profiling"} <= set(doc)


def test_inspect_estimates_the_per_rank_memory_of_distributed_training(tmp_path):
    out = tmp_path / "info.json"
    r = run("inspect", "--model", "example_models.fno:build_model", "--world-size", "4",
            "--strategy", "fsdp", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "per rank with fsdp on 4 ranks (the batch is the per-rank batch): peak" in r.stdout
    assert json.loads(out.read_text())["memory"]["fp32"]["per_rank"]
    bad = run("inspect", "--model", "example_models.fno:build_model", "--world-size", "0")
    assert bad.returncode == 2 and "--world-size 0: expected a positive integer" in bad.stderr


def test_exit_statuses_gate_ci(tmp_path):
    """0 success, 1 a gate failed (here: a checkpoint whose head has another shape), 2 a usage
    mistake; the failure is named on stderr."""
    from example_models.fno import build_model

    state = build_model().state_dict()
    name = next(k for k, v in reversed(list(state.items())) if v.dim() >= 1)
    state[name] = torch.zeros(state[name].shape[0] + 1, *state[name].shape[1:])
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    r = run("inspect", "--model", "example_models.fno:build_model", "--checkpoint", str(bad),
            "--batch-size", "1")
    assert r.returncode == 1, r.stderr
    assert f"shape mismatch: {name}" in r.stdout
    assert "modelcheck: failed: checkpoint" in r.stderr and "1 shape mismatch" in r.stderr
    r = run("compare", str(bad), str(bad), "--fail-over", "-1")
    assert r.returncode == 2 and "--fail-over '-1'" in r.stderr
