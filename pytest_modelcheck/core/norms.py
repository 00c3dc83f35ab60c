"""Facts about the normalisation layers with running statistics (BatchNorm, InstanceNorm) of a
model: how each is configured, and what it did during one forward (the mode it ran in, the
variance of its input per channel, whether its running statistics moved).

Only ``torch.nn`` layers derived from ``_NormBase`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
the lazy variants, ``InstanceNorm1d/2d/3d`` and their subclasses such as timm's
``BatchNormAct2d``) are watched; ``LayerNorm``, ``GroupNorm`` and ``RMSNorm`` hold no running
statistics, and torchvision's ``FrozenBatchNorm2d`` is frozen by construction (its statistics
are plain buffers that no forward updates).

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Optional

#: A channel of a norm layer's input has collapsed (is constant over what the layer reduces)
#: when its variance is at most COLLAPSE_RELATIVE x the median channel variance of that layer
#: plus COLLAPSE_ROUNDING x its squared mean (float32 rounding of a constant), and at least
#: COLLAPSE_ABSOLUTE. Small but healthy variances (depthwise convolutions at initialisation
#: feed BatchNorm variances far below its eps) are not collapse.
COLLAPSE_RELATIVE = 1e-6
COLLAPSE_ROUNDING = 1e-12
COLLAPSE_ABSOLUTE = 1e-30

#: Class names of layers that are frozen by construction (no running statistics to update).
FROZEN_BY_CONSTRUCTION = ("FrozenBatchNorm",)


@dataclass
class NormCall:
    """What one call of a norm layer did: the mode it ran in, whether its running statistics
    moved, and its input's per-channel variance (as the layer reduces: over batch and space for
    BatchNorm, over space per sample for InstanceNorm)."""

    training: bool
    moved: bool = False
    channels: int = 0
    collapsed: int = 0  # channels whose input is constant (see COLLAPSE_RELATIVE)
    min_var: float = math.nan
    nonfinite_stats: bool = False  # running statistics non-finite after the call


@dataclass
class NormLayer:
    """One norm layer's configuration and the calls seen in each phase ("train", "eval")."""

    name: str
    kind: str
    affine: bool
    tracked: bool  # track_running_stats
    has_stats: bool  # running_mean / running_var buffers present
    momentum: Optional[float]
    eps: float
    has_weight: bool
    has_bias: bool
    trainable: bool  # every affine parameter present requires grad (False without any)
    calls: dict = field(default_factory=dict)  # phase -> [NormCall]

    def phase(self, name: str) -> list:
        return self.calls.get(name, [])


def norm_layers(model: Any) -> list:
    """``[(name, module)]`` of the layers with running statistics (BatchNorm, InstanceNorm).

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2),
    ...                         torch.nn.LayerNorm(2))
    >>> [name for name, _ in norm_layers(m)]
    ['1']
    """
    from torch.nn.modules.batchnorm import _NormBase

    return [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, _NormBase)]


def frozen_by_construction(model: Any) -> list:
    """Names of the layers frozen by construction (``FrozenBatchNorm2d`` and its kin).

    >>> import torch
    >>> frozen_by_construction(torch.nn.Sequential(torch.nn.BatchNorm1d(2)))
    []
    """
    return [name or "<root>" for name, m in model.named_modules()
            if any(k in type(m).__name__ for k in FROZEN_BY_CONSTRUCTION)]


def describe_layer(name: str, module: Any) -> NormLayer:
    """A norm layer's configuration.

    >>> import torch
    >>> layer = describe_layer("bn", torch.nn.BatchNorm1d(3))
    >>> layer.affine, layer.tracked, layer.has_stats, layer.trainable
    (True, True, True, True)
    >>> describe_layer("in", torch.nn.InstanceNorm2d(3)).has_stats
    False
    """
    params = [p for p in (module.weight, module.bias) if p is not None]
    return NormLayer(
        name=name, kind=type(module).__name__, affine=bool(module.affine),
        tracked=bool(module.track_running_stats),
        has_stats=module.running_mean is not None or module.running_var is not None,
        momentum=module.momentum, eps=float(module.eps),
        has_weight=module.weight is not None, has_bias=module.bias is not None,
        trainable=bool(params) and all(p.requires_grad for p in params))


def matches(name: str, patterns: tuple) -> bool:
    """Whether a module name matches one of the ``fnmatch`` patterns (``"backbone.*"``).

    >>> matches("backbone.layer1.0.bn1", ("backbone.*",)), matches("head.bn", ("backbone.*",))
    (True, False)
    """
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _stats(module: Any) -> Any:
    """A copy of the running statistics (None when the layer has none)."""
    import torch

    bufs = [b for b in (module.running_mean, module.running_var) if b is not None]
    if not bufs:
        return None
    return torch.cat([b.detach().reshape(-1).double() for b in bufs]).clone()


def _input_variance(module: Any, x: Any) -> tuple:
    """``(channels, collapsed, min_var)`` of the layer's input, reduced as the layer reduces."""
    import torch

    from torch import nn

    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        return 0, 0, math.nan
    with torch.no_grad():
        v = x.detach().double()
        unbatched = {nn.InstanceNorm1d: 2, nn.InstanceNorm2d: 3, nn.InstanceNorm3d: 4}
        instance = next((n for cls, n in unbatched.items() if isinstance(module, cls)), None)
        if instance is not None:
            if v.dim() == instance:
                v = v.unsqueeze(0)
            per = v.flatten(2).var(dim=2, unbiased=False)  # (N, C): constant in every sample
            var = per.max(dim=0).values if per.numel() else per.new_zeros(0)
            mean = v.flatten(2).mean(dim=2).abs().max(dim=0).values if per.numel() else per
        else:
            flat = v.transpose(0, 1).reshape(v.shape[1], -1)
            var, mean = flat.var(dim=1, unbiased=False), flat.mean(dim=1).abs()
        ok = torch.isfinite(var)
        if var.numel() == 0 or not bool(ok.any()):
            return int(var.numel()), 0, math.nan
        floor = torch.clamp(COLLAPSE_RELATIVE * var[ok].median() + COLLAPSE_ROUNDING * mean[ok] ** 2,
                            min=COLLAPSE_ABSOLUTE)
        return int(var.numel()), int((var[ok] <= floor).sum()), float(var[ok].min())


class NormWatch:
    """Forward hooks on every norm layer of ``model`` that record each call in ``layers``
    under the current ``phase``; hooks are removed on exit.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train()
    >>> with NormWatch(m) as watch:
    ...     watch.phase = "train"
    ...     _ = m(torch.randn(8, 3))
    >>> call = watch.layers["1"].phase("train")[0]
    >>> call.training, call.moved, call.channels, call.collapsed
    (True, True, 4, 0)
    """

    def __init__(self, model: Any) -> None:
        self.modules = norm_layers(model)
        self.layers = {name: describe_layer(name, m) for name, m in self.modules}
        self.phase = "train"
        self.handles: list = []
        self._before: dict = {}

    def __enter__(self) -> "NormWatch":
        for name, m in self.modules:
            self.handles.append(m.register_forward_pre_hook(self._pre(name)))
            self.handles.append(m.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, name: str) -> Any:
        def hook(module: Any, args: Any) -> None:
            channels, collapsed, min_var = _input_variance(module, args[0] if args else None)
            call = NormCall(bool(module.training), channels=channels, collapsed=collapsed,
                            min_var=min_var)
            self.layers[name].calls.setdefault(self.phase, []).append(call)
            self._before[name] = _stats(module)

        return hook

    def _post(self, name: str) -> Any:
        def hook(module: Any, args: Any, out: Any) -> None:
            import torch

            before, after = self._before.pop(name, None), _stats(module)
            call = self.layers[name].calls[self.phase][-1]
            if before is not None and after is not None and before.shape == after.shape:
                call.moved = not torch.equal(before, after)
            call.nonfinite_stats = after is not None and not bool(torch.isfinite(after).all())

        return hook


def run_phases(model: Any, batch: Any, loss: Any = None, *, steps: int = 2,
               lr: float = 1e-3, seed: int = 0) -> NormWatch:
    """Watch the norm layers of ``model`` (a copy: it is trained) through ``steps`` training
    steps (``model.train()`` as a training loop calls it, forward, loss, backward, an Adam step;
    forwards only when nothing is trainable), then one eval forward (``model.eval()``).

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    >>> watch = run_phases(m, Batch.from_user(torch.randn(8, 3)))
    >>> [c.moved for c in watch.layers["1"].phase("train")], watch.layers["1"].phase("eval")[0].moved
    ([True, True], False)
    """
    import torch

    from .forward import run_forward
    from .errors import UsageError
    from .losses import Loss, resolve_loss
    from .training import make_optimizer

    torch.manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        probe = run_forward(model.eval(), batch)  # eval: no statistics move
    try:
        lossfn = resolve_loss(loss, batch, probe)
    except UsageError:  # no loss for this target: the surrogate still reaches every output
        lossfn = Loss("surrogate mean(output**2)")
    opt = make_optimizer("adam", trainable, lr) if trainable else None
    with NormWatch(model) as watch:
        watch.phase = "train"
        model.train()
        for _ in range(steps):
            out = run_forward(model, batch)
            if opt is None:
                continue
            opt.zero_grad(set_to_none=True)
            total, _ = lossfn.compute(out, batch, model)
            if total.requires_grad and bool(torch.isfinite(total)):
                total.backward()
                opt.step()
        watch.phase = "eval"
        model.eval()
        with torch.no_grad():
            run_forward(model, batch)
    return watch
