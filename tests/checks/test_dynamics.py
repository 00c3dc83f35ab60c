"""lr_schedule, grad_norms_stable, loss_components: planted bugs, healthy twins, usage errors."""
import importlib

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

from pytest_modelcheck import UsageError
from pytest_modelcheck.checks.dynamics import grad_norms_stable, loss_components, lr_schedule


def _linear():
    torch.manual_seed(0)
    return nn.Linear(4, 1)


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


# ---------------------------------------------------------------------------- lr_schedule
def _warmup_cosine(opt):
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=0.2, total_iters=5),
                                S.CosineAnnealingLR(opt, T_max=15)], milestones=[5])


def test_warmup_cosine_passes_and_saves_a_plot(tmp_path):
    path = tmp_path / "schedule.png"
    r = lr_schedule(_warmup_cosine, ("warmup_cosine", {"warmup": 5}), steps=20, plot=path,
                    model=_linear(), batch=_batch())
    assert r.passed is True, r.headline
    assert path.read_bytes()[:4] == b"\x89PNG"
    # LinearLR from 0.2 x 0.01: 0.002, 0.0036, 0.0052, ...; the cosine starts at step 5 from 0.01
    assert r.metrics["lrs"][:2] == pytest.approx([0.002, 0.0036])
    assert r.metrics["lrs"][5] == pytest.approx(0.01)
    assert len(r.metrics["losses"]) == 20


def test_cosine_with_wrong_period_names_the_first_deviating_step():
    # T_max=10 instead of 20: at step 2, 0.005 (1 + cos(pi/5)) = 0.009045 vs 0.005 (1 + cos(pi/10)) = 0.009755
    r = lr_schedule(lambda opt: S.CosineAnnealingLR(opt, T_max=10), "cosine", steps=20,
                    model=_linear(), batch=_batch())
    assert r.passed is False
    assert r.headline.startswith("expected a cosine schedule (lr 0.009755 at step 2, tolerance 0.02"
                                 " x 0.01), observed lr 0.009045 at step 2")


def test_triangular_and_callable():
    cyc = lambda opt: S.CyclicLR(opt, base_lr=0.001, max_lr=0.01, step_size_up=4)  # noqa: E731
    good = ("triangular", {"base_lr": 0.001, "max_lr": 0.01, "step_size": 4})
    bad = ("cyclic", {"base_lr": 0.001, "max_lr": 0.01, "step_size": 5})
    assert lr_schedule(cyc, good, steps=16, model=_linear(), batch=_batch()).passed is True
    r = lr_schedule(cyc, bad, steps=16, model=_linear(), batch=_batch())
    assert r.passed is False and "at step 1" in r.headline
    step = lambda opt: S.StepLR(opt, 5, 0.5)  # noqa: E731
    assert lr_schedule(step, lambda t: 0.01 * 0.5 ** (t // 5), steps=12, model=_linear(),
                       batch=_batch()).passed is True
    r = lr_schedule(step, lambda t: 0.01, steps=12, model=_linear(), batch=_batch())
    assert r.passed is False and "observed lr 0.005 at step 5" in r.headline


@pytest.mark.parametrize("kwargs, message", [
    ({"scheduler": 3, "expected": "cosine"}, "scheduler=3: expected a callable factory(optimizer)"),
    ({"scheduler": _warmup_cosine, "expected": "cosine_warm"}, "expected='cosine_warm': expected one of"),
    ({"scheduler": _warmup_cosine, "expected": "warmup_cosine"}, "expected warmup=None: expected a positive integer"),
    ({"scheduler": _warmup_cosine, "expected": ("cosine", {"tmax": 3})}, "expected=('cosine', {'tmax': 3}): unknown parameter(s) tmax"),
    ({"scheduler": _warmup_cosine, "expected": "cosine", "tolerance": 0}, "tolerance=0: expected a positive number"),
    ({"scheduler": _warmup_cosine, "expected": "cosine", "plot": 3}, "plot=3: expected a file path"),
])
def test_lr_schedule_usage_errors(kwargs, message):
    with pytest.raises(UsageError) as info:
        lr_schedule(**kwargs, model=_linear(), batch=_batch())
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------- grad_norms_stable
class Scaled(nn.Module):
    def __init__(self, scale):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.scale = scale

    def forward(self, x):
        return self.body(x) * self.scale


def test_vanishing_gradients_fail():
    # every gradient is multiplied by 1e-12 (and the MSE residual is ~ the target, O(1))
    r = grad_norms_stable(steps=5, model=Scaled(1e-12), batch=_batch())
    assert r.passed is False
    assert r.headline.startswith("expected gradient norms >= 1e-08, observed")
    assert "at step 0 (vanishing gradients)" in r.headline


def test_exploding_gradients_fail():
    # SGD with lr 1.5 on a linear least-squares problem diverges: the norm grows every step
    r = grad_norms_stable(steps=20, optimizer="sgd", lr=1.5, model=_linear(), batch=_batch())
    assert r.passed is False
    assert ("exploding gradients" in r.headline or "non-finite" in r.headline
            or "loss became" in r.headline), r.headline


def test_healthy_twin_passes():
    r = grad_norms_stable(steps=20, optimizer="sgd", lr=0.05, model=_linear(), batch=_batch())
    assert r.passed is True, r.headline
    assert len(r.metrics["grad_norms"]) == 20
    assert r.metrics["max_ratio_observed"] < 10  # converging (momentum may overshoot a little)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps=0: expected a positive integer"),
    ({"max_ratio": -2}, "max_ratio=-2: expected a positive number"),
    ({"min_norm": "x"}, "min_norm='x': expected a positive number"),
    ({"optimizer": "lion"}, "optimizer='lion': expected one of"),
])
def test_grad_norms_usage_errors(kwargs, message):
    with pytest.raises(UsageError) as info:
        grad_norms_stable(**kwargs, model=_linear(), batch=_batch())
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize("name", ["icecube_deepsets", "genesis_dit", "pix2pixcc_gan", "vnet_unet",
                                  "fno", "vit3d", "swinir"])
def test_example_models_pass_by_default(name):
    mod = importlib.import_module(f"example_models.{name}")
    torch.manual_seed(0)
    batch = mod.make_batch if name == "icecube_deepsets" else mod.make_batch(4)
    r = grad_norms_stable(steps=4, model=mod.build_model(), batch=batch, loss=mod.loss_fn)
    assert r.passed is True, r.headline


# ------------------------------------------------------------------------ loss_components
def _terms(weight_l1=1.0):
    def loss(out, y):
        return {"mse": (out - y).pow(2).mean(), "l1": weight_l1 * (out - y).abs().mean()}
    return loss


def test_dominating_term_fails_and_balanced_twin_passes():
    bad = loss_components(max_ratio=100, steps=5, model=_linear(), batch=_batch(), loss=_terms(1e4))
    assert bad.passed is False
    assert bad.headline.startswith("expected no loss term above 100 x another, observed 'l1' (mean")
    assert set(bad.metrics["terms"]) == {"mse", "l1"} and len(bad.metrics["terms"]["l1"]) == 5
    good = loss_components(max_ratio=100, steps=5, model=_linear(), batch=_batch(), loss=_terms())
    assert good.passed is True, good.headline


def test_nonfinite_term_fails():
    def loss(out, y):
        return {"mse": (out - y).pow(2).mean(), "log": torch.log(out - out).mean()}  # log(0)
    r = loss_components(steps=3, model=_linear(), batch=_batch(), loss=loss)
    assert r.passed is False
    assert r.headline.startswith("expected every loss term finite, observed")


def test_single_valued_loss_is_skipped():
    r = loss_components(steps=2, model=_linear(), batch=_batch(), loss="mse")
    assert r.passed is None and "nothing to decompose" in r.headline


class TinyGAN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gen = nn.Linear(4, 4)
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, cond):
        return self.gen(cond)


def _d_loss(scale=1.0):
    def d_loss(model, cond, real, fake):
        d_real = model.discriminator(torch.cat([cond, real], 1))
        d_fake = model.discriminator(torch.cat([cond, fake.detach()], 1))
        return {"d_real": scale * (d_real - 1).pow(2).mean(), "d_fake": scale * d_fake.pow(2).mean()}
    return d_loss


def _g_loss(weight=1.0):
    def g_loss(out, target, model, inputs):
        d_fake = model.discriminator(torch.cat([inputs[0], out], 1))
        return {"adv": (d_fake - 1).pow(2).mean(), "l1": weight * (out - target).abs().mean()}
    return g_loss


def _gan_batch():
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(8, 4, generator=g)
    return cond, torch.tanh(cond)


def test_gan_balanced_passes():
    r = loss_components(max_ratio=20, gan=True, d_loss=_d_loss(), steps=10, model=TinyGAN(),
                        batch=_gan_batch(), loss=_g_loss())
    assert r.passed is True, r.headline
    assert len(r.metrics["d_total"]) == 10
    assert set(r.metrics["terms"]) == {"D:d_real", "D:d_fake", "G:adv", "G:l1"}


def test_gan_discriminator_collapse_fails():
    # the discriminator terms weighted by 1e-6: its loss sits near zero from the start
    r = loss_components(gan=True, d_loss=_d_loss(1e-6), steps=5, model=TinyGAN(),
                        batch=_gan_batch(), loss=_g_loss())
    assert r.passed is False
    assert r.headline.startswith("expected the discriminator loss to stay above 0.001, observed")
    assert "discriminator collapse" in r.headline


def test_gan_imbalance_fails():
    r = loss_components(max_ratio=20, gan=True, d_loss=_d_loss(), steps=5, model=TinyGAN(),
                        batch=_gan_batch(), loss=_g_loss(weight=1e3))
    assert r.passed is False
    assert r.headline.startswith("expected the G/D loss ratio within [1/20, 20], observed")


def test_pix2pixcc_gan_balance():
    from example_models import pix2pixcc_gan as gan

    torch.manual_seed(0)
    r = loss_components(max_ratio=100, gan=True, d_loss=gan.discriminator_loss, steps=3,
                        model=gan.build_model(), batch=gan.make_batch(2), loss=gan.generator_loss)
    assert r.passed is True, r.headline
    assert {"D:d_real", "D:d_fake", "G:lsgan", "G:feature_matching", "G:correlation"} == set(
        r.metrics["terms"])


def test_gan_without_discriminator_is_a_usage_error():
    with pytest.raises(UsageError, match="needs a .discriminator submodule"):
        loss_components(gan=True, d_loss=_d_loss(), steps=2, model=_linear(), batch=_batch(),
                        loss=_terms())


@pytest.mark.parametrize("kwargs, message", [
    ({"gan": True}, "d_loss=None: gan=True needs a callable d_loss(model, cond, real, fake)"),
    ({"gan": "yes"}, "gan='yes': expected True or False"),
    ({"max_ratio": 0}, "max_ratio=0: expected a positive number or None"),
    ({"d_loss": 3}, "d_loss=3: expected a callable"),
])
def test_loss_components_usage_errors(kwargs, message):
    with pytest.raises(UsageError) as info:
        loss_components(**kwargs, model=_linear(), batch=_batch())
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_a_large_first_gradient_that_then_falls_is_not_exploding():
    """ConvNeXt-style: the batch is fitted in the first step, and the gradient norm falls from
    ~1e2 to ~1e-5: a falling norm, not an explosion (the reference median sits at the low end)."""
    model = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    x, y = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[10.0]])
    # MSE gradient 2(w.x - y)x, norm 2*10*sqrt(30) = 109.5; SGD with lr 1/(2*|x|^2) = 1/60
    # lands on w = x/3, w.x = 10: the batch is fitted exactly in one step
    plain_sgd = lambda params, lr: torch.optim.SGD(params, lr=lr)  # noqa: E731 - no momentum
    r = grad_norms_stable(steps=6, optimizer=plain_sgd, lr=1 / 60, model=model, batch=(x, y))
    norms = r.metrics["grad_norms"]
    assert abs(norms[0] - 109.54) < 0.01 and max(norms[1:]) < 1e-3, norms
    assert r.passed, r.headline


class CountsForwards(nn.Module):
    """A linear model that appends to a list shared by its copies at every forward."""

    def __init__(self, calls):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.record = nn.Linear(4, 1), calls.append  # a builtin: shared, not copied

    def forward(self, x):
        self.record(1)
        return self.lin(x)


@pytest.mark.parametrize("loss, train, forwards", [
    (None, False, 6),     # eval mode: the loss is inferred from a probe forward, then 5 steps
    (None, True, 5),      # train mode: inferred from the first step's output, no probe
    ("mse", False, 5),    # a named or callable loss needs no probe
    (lambda out, y: (out - y).pow(2).mean(), False, 5),
])
def test_grad_norms_probe_forward_only_when_the_loss_is_inferred(loss, train, forwards):
    calls = []
    model = CountsForwards(calls).train(train)
    r = grad_norms_stable(steps=5, model=model, batch=_batch(), loss=loss)
    assert r.passed is True, r.headline
    assert len(calls) == forwards
    assert model.training is train  # the caller's model is left as it was


def test_grad_norms_inferred_loss_is_the_same_either_way():
    # the same run whether the loss comes from a probe (eval-mode model) or the first step
    a = grad_norms_stable(steps=5, model=_linear().train(), batch=_batch())
    b = grad_norms_stable(steps=5, model=_linear().eval(), batch=_batch())
    assert a.metrics["grad_norms"] == b.metrics["grad_norms"]
    assert a.metrics["losses"] == b.metrics["losses"]
