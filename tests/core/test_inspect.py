import doctest
import logging
import sys

import numpy as np
import pytest
import torch

from pytest_modelcheck.core import inspect as inspect_mod
from pytest_modelcheck.core.errors import UsageError
from pytest_modelcheck.core.inspect import ModelInfo, dump_model_info, inspect_model, tensor_stats


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)    # 50*16 = 800
        self.norm = torch.nn.LayerNorm(16)         # 16 + 16 = 32
        self.head = torch.nn.Linear(16, 50)        # weight tied to embed (not counted), bias 50
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.norm(self.embed(x)))


def test_linear_counts_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    info = inspect_model(model)
    # Linear(10, 5): 10*5 + 5 = 55; Linear(5, 2): 5*2 + 2 = 12; total 67
    assert info.total_params == 67
    assert info.trainable_params == 67 and info.frozen_params == 0
    assert info.param_bytes == 67 * 4
    assert info.by_module_type == {"Linear": 67}
    assert info.module_type_percentages() == {"Linear": 100.0}
    assert [r.name for r in info.params] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert info.row("0.weight").shape == (5, 10) and info.row("0.weight").bytes == 200
    assert info.num_modules == 4  # Sequential + 3 children
    assert info.dtypes == {"float32": 67}


def test_module_type_percentages_and_frozen():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)
    info = inspect_model(model)
    # Conv2d(3, 4, 3): 4*3*3*3 + 4 = 112; BatchNorm2d(4): 4 + 4 = 8; Linear(4, 2): 4*2 + 2 = 10
    assert info.total_params == 130
    assert info.frozen_params == 112 and info.non_trainable_params == 112
    assert info.trainable_params == 18
    assert info.by_module_type == {"Conv2d": 112, "Linear": 10, "BatchNorm2d": 8}
    pct = info.module_type_percentages()
    assert pct["Conv2d"] == pytest.approx(100 * 112 / 130)  # 86.15%
    assert pct["BatchNorm2d"] == pytest.approx(100 * 8 / 130)
    assert sum(pct.values()) == pytest.approx(100.0)
    # buffers separate: running_mean 4 + running_var 4 float32 + num_batches_tracked 1 int64
    assert info.buffer_tensors == 3 and info.buffer_numel == 9
    assert info.buffer_bytes == 4 * 4 + 4 * 4 + 8
    assert info.total_bytes == 130 * 4 + 40
    assert {r.name for r in info.buffers} == {"1.running_mean", "1.running_var",
                                              "1.num_batches_tracked"}
    assert all(r.kind == "buffer" and not r.requires_grad for r in info.buffers)


def test_tied_weights_counted_once_and_listed():
    info = inspect_model(TiedLM())
    # 800 (embedding, tied with head.weight) + 32 (LayerNorm) + 50 (head bias) = 882
    assert info.total_params == 882
    assert info.tied == [["embed.weight", "head.weight"]]
    assert info.by_module_type == {"Embedding": 800, "Linear": 50, "LayerNorm": 32}
    assert info.row("head.weight").name == "embed.weight"
    assert "embed.weight = head.weight" in info.render()
    # consistent with torch's own de-duplicated count
    assert info.total_params == sum(p.numel() for p in TiedLM().parameters())


def test_shared_storage_views_counted_once():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            base = torch.zeros(4, 4)
            self.a = torch.nn.Parameter(base)
            self.b = torch.nn.Parameter(base)  # a different Parameter object on the same memory

    info = inspect_model(Shared())
    assert info.total_params == 16
    assert info.tied == [["a", "b"]]


def test_meta_model_with_a_billion_parameters_allocates_nothing():
    with torch.device("meta"):
        model = torch.nn.Sequential(*[torch.nn.Linear(10_000, 10_000) for _ in range(10)])
    info = inspect_model(model)
    # 10 * (10_000*10_000 + 10_000) = 1_000_100_000
    assert info.total_params == 1_000_100_000
    assert info.param_bytes == 4 * 1_000_100_000
    assert info.devices == ["meta"]
    assert not info.has_statistics
    assert all(r.mean is None and r.nonfinite is None for r in info.tensors)
    assert "3.73 GiB" in info.render()  # 4_000_400_000 B / 2**30
    assert "no data" in info.render(verbose=True)


def test_statistics_match_numpy():
    torch.manual_seed(0)
    lin = torch.nn.Linear(30, 20)
    with torch.no_grad():
        lin.weight[0, :5] = 0.0
    info = inspect_model(lin)
    w = lin.weight.detach().double().numpy()
    row = info.row("weight")
    assert row.mean == pytest.approx(w.mean(), rel=1e-12, abs=1e-15)
    assert row.std == pytest.approx(w.std(), rel=1e-12)  # population std, ddof=0
    assert row.min == w.min() and row.max == w.max()
    assert row.zero_fraction == pytest.approx(np.count_nonzero(w == 0) / w.size)
    assert row.nonfinite == 0


def test_statistics_chunked_and_nonfinite(monkeypatch):
    monkeypatch.setattr(inspect_mod, "_CHUNK", 7)  # force many chunks
    g = torch.Generator().manual_seed(1)
    t = torch.randn(10, 10, generator=g) * 3 + 1
    t[2, 3] = float("nan")
    t[5, 5] = float("inf")
    s = tensor_stats(t)
    finite = t.double().numpy()[np.isfinite(t.double().numpy())]
    assert s["mean"] == pytest.approx(finite.mean(), rel=1e-12)
    assert s["std"] == pytest.approx(finite.std(), rel=1e-12)
    assert s["min"] == finite.min() and s["max"] == finite.max()
    assert s["nonfinite"] == 2
    # non-contiguous input is handled too
    s2 = tensor_stats(t.t())
    assert s2["mean"] == pytest.approx(s["mean"], rel=1e-12)


def test_to_dict_and_render_sections():
    info = inspect_model(TiedLM())
    d = info.to_dict()
    assert d["total_params"] == 882 and d["tied"] == [["embed.weight", "head.weight"]]
    assert d["tensors"][0]["shape"] == [50, 16]
    text = info.render()
    for section in ("Model summary: TiedLM", "Parameter statistics:", "Total parameters:      882",
                    "Parameters by module type:", "Embedding           :        800 ( 90.7%)"):
        assert section in text
    assert "Weight statistics" not in text
    verbose = info.render(verbose=True)
    assert "Weight statistics:" in verbose and "norm.weight" in verbose


def test_not_a_module_is_a_usage_error():
    with pytest.raises(UsageError, match=r"^model: expected a torch.nn.Module, got int$"):
        inspect_model(3)


def test_dump_prints_or_logs(capsys, caplog):
    info = dump_model_info(torch.nn.Linear(10, 5), plot_distributions=False)
    assert isinstance(info, ModelInfo) and info.plot_path is None
    assert "Total parameters:      55" in capsys.readouterr().out
    logger = logging.getLogger("modelcheck-test")
    with caplog.at_level(logging.INFO, logger="modelcheck-test"):
        dump_model_info(torch.nn.Linear(10, 5), logger=logger, plot_distributions=False)
    assert "Total parameters:      55" in caplog.text
    assert capsys.readouterr().out == ""


def test_dump_writes_a_png(tmp_path, capsys):
    path = tmp_path / "weights.png"
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    info = dump_model_info(model, save_path=str(path))
    assert info.plot_path == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dump_without_save_path_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    dump_model_info(torch.nn.Linear(2, 2))
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_warns_and_skips(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import raise ImportError
    path = tmp_path / "w.png"
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        info = dump_model_info(torch.nn.Linear(2, 2), save_path=str(path))
    assert info.plot_path is None and not path.exists()


def test_meta_model_plot_warns(tmp_path, capsys):
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="no parameter holds data"):
        dump_model_info(model, save_path=str(tmp_path / "w.png"))
    assert not (tmp_path / "w.png").exists()


def test_model_left_untouched():
    model = TiedLM()
    model.norm.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inspect_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and not model.norm.weight.requires_grad and model.embed.weight.grad is None


def test_doctests(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' mkdtemp()
    result = doctest.testmod(inspect_mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 10
