"""ddp_consistent: each planted multi-GPU bug is caught with its cause on a CPU runner (gloo,
2 local processes); the healthy twin passes; a hung rank is killed and leaves no process."""
import os
import time

import pytest
import torch
from torch import nn

from pytest_modelcheck.checks import ddp_consistent
from pytest_modelcheck.core.errors import UsageError


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)


class UnusedBranch(MLP):
    """A head built but never called: DDP raises at the second step."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(6, 2)


class DataDependentBranch(UnusedBranch):
    """The head runs only for batches whose first sample is positive: rank 1 never uses it."""

    def forward(self, x):
        out = self.net(x)
        return out + self.aux(x) if bool(x[0, 0] > 0) else out


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)


class RankLocalBuffer(MLP):
    """A running mean of the inputs, updated from each rank's own shard."""

    def __init__(self):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(6))

    def forward(self, x):
        if self.training:
            self.feature_mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return self.net(x - self.feature_mean)


class HangsOnRank1(MLP):
    def forward(self, x):
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() == 1:
            time.sleep(600)
        return self.net(x)


class FunctionalDropout(MLP):
    """Dropout called as a function, as T5's attention does: no module to switch off."""

    def forward(self, x):
        h = nn.functional.dropout(self.net[1](self.net[0](x)), p=0.5, training=self.training)
        weights = torch.softmax(h[:, None, :4] @ h[:, :4, None], dim=-1)
        h = h + nn.functional.scaled_dot_product_attention(h[:, None, None], h[:, None, None],
                                                           h[:, None, None], dropout_p=0.5)[:, 0, 0]
        return self.net[3](h * weights[:, 0])


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: each sample's branch dropped at random."""

    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = x.new_empty(x.shape[0], 1).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


class WithDropPath(MLP):
    def __init__(self):
        super().__init__()
        self.branch = nn.Linear(16, 16)
        self.drop_path = DropPath(0.5)

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        return self.net[3](h + self.drop_path(self.branch(h)))


_IN_THE_TEST_PROCESS = False


def _rebuild(state):
    if not _IN_THE_TEST_PROCESS:  # a fresh rank process: as a missing compiled operator would
        raise RuntimeError("operator mylib::fused_op does not exist")
    model = OnlyHere()
    model.load_state_dict(state)
    return model


class OnlyHere(MLP):
    """Pickles in this process but cannot be rebuilt in a rank process."""

    def __reduce__(self):
        return _rebuild, (self.state_dict(),)


def summed_mse(out, target):
    return ((out - target) ** 2).sum()


def make_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g)
    x[:4, 0] = x[:4, 0].abs() + 0.1  # rank 0's shard: positive first feature
    x[4:, 0] = -x[4:, 0].abs() - 0.1  # rank 1's shard: negative
    return x, torch.randn(8, 2, generator=g)


def test_healthy_model_matches_one_process_and_is_left_unchanged():
    model, batch = MLP(), make_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = ddp_consistent(model=model, batch=batch, loss="mse")
    assert result.passed, result.headline
    assert result.metrics["max_update_rel_diff"] < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.net[2].p == 0.1  # dropout was switched off in the copies only


@pytest.mark.parametrize("model", [UnusedBranch, DataDependentBranch])
def test_a_parameter_without_gradient_on_some_rank_is_named(model):
    result = ddp_consistent(model=model(), batch=make_batch(), loss="mse", timeout="30s")
    assert result.passed is False
    assert "observed 'aux.weight' (Linear) and 1 more got no gradient on rank" in result.headline
    assert "find_unused_parameters=True" in result.details


def test_batchnorm_without_syncbatchnorm_is_named_with_how_far_it_moved():
    result = ddp_consistent(model=WithBatchNorm(), batch=make_batch(), loss="mse")
    assert result.passed is False
    assert "BatchNorm 'net.1' normalises each rank's 4 samples with their own statistics" \
        in result.headline
    assert result.metrics["max_update_rel_diff"] > 1e-2
    assert "convert_sync_batchnorm" in result.details
    accepted = ddp_consistent(model=WithBatchNorm(), batch=make_batch(), loss="mse",
                              local_batchnorm=True)
    assert accepted.passed, accepted.headline


def test_a_buffer_updated_from_rank_local_data_is_named():
    result = ddp_consistent(model=RankLocalBuffer(), batch=make_batch(), loss="mse")
    assert result.passed is False
    assert "observed 'feature_mean' (RankLocalBuffer) differing by up to" in result.headline


def test_a_summed_loss_is_named_with_the_world_size_factor():
    result = ddp_consistent(model=MLP(), batch=make_batch(), loss=summed_mse)
    assert result.passed is False
    assert "x0.5 (1/2): the loss sums over samples instead of averaging" in result.headline


def _children() -> list:
    """Live (non-zombie) child processes of this process."""
    me, found = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and fields[0] != "Z":
            found.append(int(pid))
    return found


def test_a_hung_rank_fails_within_the_timeout_and_leaves_no_process():
    before = set(_children())
    start = time.monotonic()
    result = ddp_consistent(model=HangsOnRank1(), batch=make_batch(), loss="mse", timeout="6s")
    assert time.monotonic() - start < 30
    assert result.passed is False
    assert "hung and were killed after the timeout" in result.headline
    assert set(_children()) <= before


def test_a_model_that_cannot_be_sent_to_the_ranks_is_skipped_with_the_reason():
    class Local(MLP):
        pass

    result = ddp_consistent(model=Local(), batch=make_batch(), loss="mse")
    assert result.passed is None
    assert "cannot be sent to the rank processes" in result.headline


@pytest.mark.parametrize("model", [FunctionalDropout, WithDropPath])
def test_functional_dropout_and_stochastic_depth_are_off_in_every_copy(model):
    """No false alarm from random masks: a sharded batch never draws the whole batch's mask."""
    result = ddp_consistent(model=model(), batch=make_batch(), loss="mse")
    assert result.passed, result.headline
    assert result.metrics["max_update_rel_diff"] < 1e-4


def test_a_model_the_rank_processes_cannot_rebuild_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(globals(), "_IN_THE_TEST_PROCESS", True)
    result = ddp_consistent(model=OnlyHere(), batch=make_batch(), loss="mse", timeout="20s")
    assert result.passed is None, result.headline
    assert "cannot be sent to the rank processes" in result.headline
    assert "operator mylib::fused_op does not exist" in result.headline


def test_update_difference_ignores_rounding_and_cancelled_gradients():
    from pytest_modelcheck.core.distributed import update_difference

    start = torch.ones(512)
    # MLP-Mixer's LayerNorm weight: an update of a few float32 ulps, one element one ulp apart
    ref = start + 2e-5 / 512 ** 0.5
    mine = ref.clone()
    mine[0] = torch.nextafter(mine[0], torch.tensor(2.0))
    assert update_difference(start, ref, mine, typical=1e-4) == 0.0
    # a bias whose gradient nearly cancels: judged against the model's typical update
    bias = torch.full((64,), 1e-6)
    assert update_difference(bias, bias + 1e-11, bias + 2e-11, typical=1e-4) < 1e-3
    # a real difference stays one: a gradient twice as large
    assert update_difference(start, start + 1e-2, start + 2e-2, typical=1e-4) > 0.9


@pytest.mark.parametrize("kwargs, expected", [
    ({"world_size": 1}, "world_size=1: expected an integer from 2 to 64"),
    ({"backend": "mpi"}, "backend='mpi': expected one of 'gloo', 'nccl'"),
    ({"steps": 1}, "steps=1: expected an integer from 2 to 100"),
    ({"rtol": 0}, "rtol=0: expected a relative tolerance between 0 and 1"),
    ({"timeout": "2 h"}, "timeout='2 h': expected a duration up to 1 hour"),
    ({"timeout": "forever"}, "timeout='forever': expected a duration such as '30s'"),
    ({"local_batchnorm": "yes"}, "local_batchnorm='yes': expected True or False"),
])
def test_bad_arguments_are_one_line_errors(kwargs, expected):
    with pytest.raises(UsageError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        ddp_consistent.spec.bind((), kwargs)


def test_a_batch_smaller_than_the_world_is_a_usage_error():
    with pytest.raises(UsageError, match="world_size=4: expected a batch of at least 4 samples"):
        ddp_consistent(4, model=MLP(), batch=(torch.randn(2, 6), torch.randn(2, 2)), loss="mse")
