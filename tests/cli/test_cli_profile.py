"""modelcheck profile: the table's columns, --memory-budget, progress (plain lines off a
terminal, a tqdm bar on one), and what to pass when the batch does not fit the model."""
import io
import itertools
import json

import pytest
import torch
import tqdm

from pytest_modelcheck.cli import main
from pytest_modelcheck.core.profiler import profile_model
from pytest_modelcheck.core.units import format_count

FAST = ["--warmup", "0", "--runs", "3"]


def test_table_has_flops_flop_rate_and_percentiles(tiny, capsys, tmp_path):
    assert main(["profile", "--model", f"{tiny}:build", "--batch-sizes", "1,2", *FAST,
                 "--json", str(tmp_path / "p.json")]) == 0
    out, err = capsys.readouterr()
    header = next(line for line in out.splitlines() if "samples/s" in line).split()
    assert header[-8:] == ["p50", "p90", "p99", "samples/s", "FLOPs", "FLOP/s", "peak", "memory"]
    doc = json.loads((tmp_path / "p.json").read_text())
    row = next(line for line in out.splitlines() if line.split()[:1] == ["2"]).split()
    data = doc["batch_profiling"][1]
    pct = data["latency_percentiles_ms"]
    assert row[4:7] == [f"{pct[k]:.2f}" for k in ("p50", "p90", "p99")]
    assert pct["p50"] <= pct["p90"] <= pct["p99"]
    assert row[8:10] == [format_count(data["flops"]), format_count(data["achieved_flops_per_s"])]
    assert data["flops"] == 2 * 2 * (8 * 16 + 16 * 10)  # the two linear layers at batch 2
    # stderr is not a terminal here: one plain line per batch size, nothing that rewrites one
    assert "\r" not in err and "\x1b" not in err
    lines = [line for line in err.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in lines] == ["[1/2] batch size 1", "[2/2] batch size 2"]


def test_memory_budget_reports_the_largest_batch_that_fits(tiny, capsys):
    # batch norm trains on 2 samples or more
    args = ["profile", "--model", f"{tiny}:build", "--batch-sizes", "2,4", *FAST]
    assert main(args + ["--memory-budget", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "Largest batch size that fits --memory-budget 8GiB: 4 (a training step needs" in out
    assert "--batch-sizes 4,8,16" in out  # the largest profiled fits: look further
    assert main(args + ["--memory-budget", "1KiB"]) == 1
    err = capsys.readouterr().err
    assert "modelcheck: failed: --memory-budget 1KiB: no profiled batch size fits" in err
    assert main(args + ["--memory-budget", "plenty"]) == 2
    assert "--memory-budget 'plenty': expected a size such as 8GiB" in capsys.readouterr().err


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    bars = []

    class Spy(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            bars.append(kwargs)
            super().__init__(*args, **kwargs)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(tqdm, "tqdm", Spy)
    monkeypatch.setattr("sys.stderr", terminal)
    profile_model(torch.nn.Linear(4, 2), lambda n: torch.ones(n, 4), batch_sizes=[1, 2],
                  warmup=0, runs=1, timer=itertools.count(0.0, 0.25).__next__, progress=True)
    assert len(bars) == 1 and bars[0]["total"] == 2 and bars[0]["file"] is terminal
    assert "2/2" in terminal.getvalue() and "100%" in terminal.getvalue()


def test_a_batch_that_does_not_fit_says_what_to_pass(tiny, capsys):
    # features=4 takes another input than the module's make_batch (8 features) gives
    cfg = "cfg.json"
    with open(cfg, "w") as fh:
        fh.write('{"features": 4}')
    assert main(["profile", "--model", f"{tiny}:build", "--config", cfg, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"modelcheck: error: profile: the model raised on the batch from {tiny}:make_batch")
    assert "--input-shape 3,224,224" in err and "--batch package.module:make_batch" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["profile", "--model", f"{tiny}:build", "--config", cfg, "--input-shape", "4",
                 "--batch-size", "2", *FAST]) == 0
    assert main(["inspect", "--model", f"{tiny}:build", "--config", cfg]) == 2
    assert "--input-shape" in capsys.readouterr().err


def test_no_batch_factory_says_what_to_pass(tiny, capsys):
    assert main(["profile", "--model", f"{tiny}_nobatch:build", *FAST]) == 2
    err = capsys.readouterr().err
    assert "no make_batch next to the factory" in err and "--input-shape 3,224,224" in err
    assert main(["profile", "--model", f"{tiny}_nobatch:build", "--input-shape", "8",
                 "--batch-sizes", "1", "--verbose", *FAST]) == 0
    assert "Details per batch size" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "2", "--batch-sizes", "1,2"], "give one of them"),
    (["--input-shape", "3,x"], "--input-shape '3,x': expected one sample's shape"),
    (["--input-shape", "8", "--batch", "m:f"], "give one of them"),
    (["--batch-size", "0"], "--batch-size 0: expected a positive integer"),
])
def test_option_mistakes_exit_2(tiny, capsys, args, message):
    assert main(["profile", "--model", f"{tiny}:build", *args, *FAST]) == 2
    assert message in capsys.readouterr().err
