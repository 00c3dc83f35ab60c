"""core/training: the loop reads losses and gradient norms back in chunks, and its records are
exactly those of a step-by-step loop (reference below: one float() per loss, term and gradient)."""
import math

import pytest
import torch

from pytest_modelcheck.core.batch import Batch
from pytest_modelcheck.core.errors import ModelError, UsageError
from pytest_modelcheck.core.forward import run_forward
from pytest_modelcheck.core.losses import resolve_loss
from pytest_modelcheck.core.training import (TrainingRun, grad_norm, grad_norm_tensor,
                                             make_optimizer, train_steps)


def reference(model, batch, loss, *, steps, lr=1e-3, stop=None):
    """The step-by-step loop: a float() of the loss and of every parameter's gradient per step."""
    torch.manual_seed(0)
    model.train()
    opt = make_optimizer("adam", model.parameters(), lr)
    run = TrainingRun()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        out = run_forward(model, batch)
        total, terms = loss.compute(out, batch, model)
        value = float(total.detach())
        run.losses.append(value)
        for k, v in terms.items():
            run.terms.setdefault(k, []).append(float(v.detach()))
        run.lrs.append(float(opt.param_groups[0]["lr"]))
        if not math.isfinite(value):
            run.stopped = f"loss became {value} at step {step}"
            break
        total.backward()
        run.grad_norms.append(math.sqrt(sum(float(p.grad.double().pow(2).sum())
                                            for p in model.parameters() if p.grad is not None)))
        opt.step()
        if stop is not None and stop(run.losses):
            break
    return run


def mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def cls_batch():
    g = torch.Generator().manual_seed(2)
    return Batch.from_user((torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])))


class NanAt(torch.nn.Module):
    """Its output turns NaN from the forward call ``at`` on; once its weights are NaN (after an
    update on a NaN loss), its forward raises, as data-dependent code (multinomial) does."""

    def __init__(self, at):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(4, 3)
        self.calls, self.at = 0, at

    def forward(self, x):
        if torch.isnan(self.lin.weight).any():
            raise RuntimeError("probability tensor contains nan")
        self.calls += 1
        out = self.lin(x)
        return out * float("nan") if self.calls > self.at else out


def same(a, b):
    assert len(a.losses) == len(b.losses) and a.stopped == b.stopped and a.lrs == b.lrs
    assert len(a.grad_norms) == len(b.grad_norms)
    for x, y in zip(a.losses, b.losses):
        assert x == y or (math.isnan(x) and math.isnan(y))
    for x, y in zip(a.grad_norms, b.grad_norms):
        assert x == pytest.approx(y, rel=1e-6)
    assert a.terms.keys() == b.terms.keys()
    for k in a.terms:
        assert a.terms[k] == pytest.approx(b.terms[k], rel=1e-6, nan_ok=True)


@pytest.mark.parametrize("sync_every", [None, 8])
@pytest.mark.parametrize("steps", [1, 7, 8, 9, 20])
def test_full_run_matches_the_step_by_step_loop(steps, sync_every):
    b = cls_batch()
    lf = resolve_loss("cross_entropy", b)
    run = train_steps(mlp(), b, lf, steps=steps, sync_every=sync_every)
    same(run, reference(mlp(), b, lf, steps=steps))
    assert len(run.losses) == len(run.grad_norms) == steps
    assert all(isinstance(v, float) for v in run.losses + run.grad_norms + run.lrs)


@pytest.mark.parametrize("sync_every", [None, 8])
@pytest.mark.parametrize("at", [1, 5, 8, 9, 13])
def test_stop_is_evaluated_at_every_step_in_order(at, sync_every):
    # stop holds first after `at` steps, whatever chunk that falls in: the run records `at`
    b = cls_batch()
    lf = resolve_loss("cross_entropy", b)
    seen = []

    def stop(losses):
        seen.append(len(losses))
        return len(losses) >= at

    run = train_steps(mlp(), b, lf, steps=30, stop=stop, sync_every=sync_every)
    assert seen == list(range(1, at + 1))
    same(run, reference(mlp(), b, lf, steps=30, stop=lambda losses: len(losses) >= at))
    assert len(run.losses) == len(run.grad_norms) == at


@pytest.mark.parametrize("sync_every", [None, 8])
@pytest.mark.parametrize("at", [0, 1, 4, 8, 11])
def test_first_nonfinite_loss_ends_the_run_and_later_errors_are_not_raised(at, sync_every):
    # the model's forward raises once an update on the NaN loss made its weights NaN; the
    # step-by-step loop never gets there, and neither does the chunked one's record
    b = cls_batch()
    lf = resolve_loss("cross_entropy", b)
    run = train_steps(NanAt(at), b, lf, steps=30, sync_every=sync_every)
    assert run.stopped == f"loss became nan at step {at}"
    assert len(run.losses) == at + 1 and len(run.grad_norms) == at
    same(run, reference(NanAt(at), b, lf, steps=30))


@pytest.mark.parametrize("sync_every", [None, 8])
def test_an_error_after_finite_losses_is_raised(sync_every):
    class Fails(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = torch.nn.Linear(4, 3), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 6:
                raise RuntimeError("boom at the sixth forward")
            return self.lin(x)

    b = cls_batch()
    with pytest.raises(RuntimeError, match="sixth"):
        train_steps(Fails(), b, resolve_loss("cross_entropy", b), steps=30, sync_every=sync_every)


@pytest.mark.parametrize("sync_every", [None, 8])
def test_loss_terms_are_read_back_per_step(sync_every):
    b = cls_batch()

    def lf(out, y):
        return {"ce": torch.nn.functional.cross_entropy(out, y), "l2": out.pow(2).mean()}

    loss = resolve_loss(lf, b)
    run = train_steps(mlp(), b, loss, steps=11, sync_every=sync_every)
    same(run, reference(mlp(), b, loss, steps=11))
    assert len(run.terms["ce"]) == len(run.terms["l2"]) == 11


def test_a_loss_without_grad_is_a_model_error_unless_it_is_nonfinite():
    b = cls_batch()
    with pytest.raises(ModelError, match="does not require grad"):
        train_steps(mlp(), b, resolve_loss(lambda out, y: out.detach().sum(), b), steps=5)
    run = train_steps(mlp(), b, resolve_loss(lambda out, y: out.detach().sum() * math.nan, b),
                      steps=5)
    assert run.stopped == "loss became nan at step 0" and run.grad_norms == []


def test_sync_every_is_validated():
    b = cls_batch()
    for bad in (0, -1, 2.0, True):
        with pytest.raises(UsageError, match="sync_every="):
            train_steps(mlp(), b, resolve_loss("cross_entropy", b), steps=3, sync_every=bad)


@pytest.mark.parametrize("sync_every, reads", [
    (8, [1, 9, 17, 20]),     # after step 0, then every 8 steps, then the last chunk
    (None, list(range(1, 21))),  # the CPU default: every step (a CPU read waits for nothing)
])
def test_values_are_read_back_only_at_chunk_ends(sync_every, reads):
    # every aten._local_scalar_dense (float(), .item(), .tolist()) comes at the end of a chunk:
    # none inside one, where the step-by-step loop had 1 loss + 4 parameters per step. SGD:
    # Adam reads its own step counters (CPU tensors, no device sync) with .item().
    from torch.utils._python_dispatch import TorchDispatchMode

    forwards, at = [], []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                at.append(len(forwards))
            return func(*args, **(kwargs or {}))

    class Counted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.record = mlp(), forwards.append

        def forward(self, x):
            self.record(1)
            return self.net(x)

    b = cls_batch()
    lf = resolve_loss("cross_entropy", b)
    stops = []
    with Reads():
        run = train_steps(Counted(), b, lf, steps=20, optimizer="sgd", sync_every=sync_every,
                          stop=lambda losses: stops.append((len(losses), len(forwards))) and False)
    assert len(run.losses) == 20
    assert sorted(set(at)) == reads
    # stop sees every step, in order, when its chunk has been read
    assert [n for n, _ in stops] == list(range(1, 21))
    assert all(f == min(r for r in reads if r >= n) for n, f in stops)


def test_read_back_stacked_or_not_gives_the_same_floats():
    from pytest_modelcheck.core.training import read_back

    ts = [torch.tensor(0.1), torch.tensor(math.nan), torch.tensor(1e30, dtype=torch.float64),
          torch.tensor(3.0).half()]
    a, b = read_back(ts, stacked=True), read_back(ts, stacked=False)
    assert a[0] == b[0] == float(torch.tensor(0.1)) and a[2:] == b[2:] == [1e30, 3.0]
    assert math.isnan(a[1]) and math.isnan(b[1])
    assert read_back([]) == []


def test_grad_norm_is_one_fused_value():
    m = torch.nn.Linear(2, 2)
    assert grad_norm(m) == 0.0 and grad_norm_tensor(m) is None
    m.weight.grad = torch.full((2, 2), 1.0)       # sum of squares 4
    m.bias.grad = torch.tensor([2.0, 4.0])        # 4 + 16 = 20
    assert grad_norm(m) == pytest.approx(math.sqrt(24))
    assert grad_norm_tensor(m).dtype == torch.float64
    m.bias.grad = torch.tensor([math.inf, 0.0])
    assert grad_norm(m) == math.inf
    h = torch.nn.Linear(2, 1).half()
    h.weight.grad = torch.tensor([[3e4, 4e4]]).half()  # norm 5e4; its square is beyond float16
    h.bias.grad = torch.tensor([0.0]).half()
    assert grad_norm(h) == pytest.approx(5e4, rel=1e-3)
