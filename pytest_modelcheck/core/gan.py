"""GAN facts: a discriminator's feature maps per scale on real and generated samples, and which
input each channel of a discriminator input pair comes from.

* ``scales_of(output)`` reads a discriminator's output as ``scales x layers`` feature maps
  (the pix2pixHD convention: a list per scale of its intermediate maps, the last being the patch
  output map);
* ``layer_facts(real, fake)`` compares one layer's maps on real and fake inputs: a normalised
  distance between their per-channel statistics, whether the map is constant, how much of it
  sits at the bounds of a squashing activation;
* ``probe_pairs(build, cond, real_like)`` calls a pair builder on marked random tensors and
  ``channel_sources`` tells, for each channel of a pair, which probe it came from.

This module imports neither pytest nor, until called, torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import UsageError
from .plots import ensure_folder

#: A map is constant when its spread is at most this fraction of its magnitude (or of 1).
CONSTANT_RTOL = 1e-6
#: Values within this distance of 0/1 (or -1/1) count as saturated, ...
SATURATION_MARGIN = 1e-3
#: ... and a map with at least this fraction of such values is saturated.
SATURATED_FRACTION = 0.99
#: A pair channel is recognised as coming from a probe channel when |correlation| reaches this.
MIN_CORRELATION = 0.9
PROBES = ("cond", "real", "fake")


def member(model: Any, path: str, argument: str, expected: str) -> Any:
    """The attribute ``path`` (dotted) of ``model``; a UsageError naming ``argument`` when absent.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> type(member(m, "0", "discriminator", "a submodule")).__name__
    'Linear'
    >>> member(m, "disc", "discriminator", "a submodule")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: discriminator='disc': the model (Sequential) has no attribute 'disc'; expected a submodule
    """
    obj = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{argument}={path!r}: the model ({type(model).__name__}) has no"
                             f" attribute {path!r}; expected {expected}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{argument}={path!r}: model.{path} is a {type(obj).__name__}, not"
                         f" callable; expected {expected}")
    return obj


def scales_of(output: Any) -> Optional[list]:
    """A discriminator's output as a list of scales, each a list of layer maps (the last is the
    scale's output map): a tensor is one scale with one map, a list of tensors one map per scale,
    a list of lists the maps of each scale. None for anything else.

    >>> import torch
    >>> t = torch.zeros(1)
    >>> [len(s) for s in scales_of([[t, t], [t, t, t]])], len(scales_of([t, t])), len(scales_of(t))
    ([2, 3], 2, 1)
    """
    import torch

    if isinstance(output, torch.Tensor):
        return [[output]]
    if not isinstance(output, (list, tuple)) or not output:
        return None
    if all(isinstance(s, torch.Tensor) for s in output):
        return [[s] for s in output]
    if all(isinstance(s, (list, tuple)) and s and all(isinstance(t, torch.Tensor) for t in s)
           for s in output):
        return [list(s) for s in output]
    return None


@dataclass
class LayerFacts:
    """One feature map on real and on fake inputs."""

    shape: tuple
    separation: float     # mean over channels of |mu_real - mu_fake| / pooled std
    constant: bool        # one value everywhere, on real and fake inputs alike
    value: float          # the mean value (the constant, when constant)
    saturated: float      # fraction of values at the bounds of [0, 1] or [-1, 1] (0 otherwise)
    real_values: Any = field(default=None, repr=False)  # flat float64 arrays, for the plot
    fake_values: Any = field(default=None, repr=False)


def layer_facts(real: Any, fake: Any, keep_values: bool = False) -> LayerFacts:
    """Compare one layer's ``(B, C, ...)`` maps on real and fake inputs.

    ``separation`` is the standardised mean difference of each channel (over batch and
    positions), averaged over channels: 0 when D sees no difference.

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> real, fake = torch.randn(4, 2, 8, generator=g), torch.randn(4, 2, 8, generator=g) + 3
    >>> f = layer_facts(real, fake)
    >>> f.separation > 2, f.constant, layer_facts(torch.ones(2, 1, 3), torch.ones(2, 1, 3)).constant
    (True, False, True)
    """
    import torch

    r, f = real.detach().double(), fake.detach().double()
    both = torch.cat([r.flatten(), f.flatten()])
    spread = float(both.max() - both.min()) if both.numel() else 0.0
    scale = max(1.0, float(both.abs().max())) if both.numel() else 1.0
    constant = spread <= CONSTANT_RTOL * scale
    separation = 0.0
    if not constant and r.dim() >= 2 and r.shape[1:] == f.shape[1:]:
        rc = r.transpose(0, 1).reshape(r.shape[1], -1)
        fc = f.transpose(0, 1).reshape(f.shape[1], -1)
        pooled = ((rc.var(dim=1, unbiased=False) + fc.var(dim=1, unbiased=False)) / 2).sqrt()
        diff = (rc.mean(dim=1) - fc.mean(dim=1)).abs()
        separation = float((diff / pooled.clamp_min(1e-12 * scale)).clamp_max(1e6).mean())
    return LayerFacts(tuple(real.shape), separation, constant, float(both.mean()),
                      _saturated(both), both[:r.numel()].numpy() if keep_values else None,
                      both[r.numel():].numpy() if keep_values else None)


def _saturated(values: Any) -> float:
    """The fraction of ``values`` at the bounds of [0, 1] or [-1, 1] when all lie in it."""
    if not values.numel():
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    m = SATURATION_MARGIN
    for a, b in ((0.0, 1.0), (-1.0, 1.0)):
        if lo >= a - 1e-6 and hi <= b + 1e-6:
            return float(((values - a).abs() < m).logical_or((values - b).abs() < m).double().mean())
    return 0.0


def scale_owner(discriminator: Any, n_scales: int) -> Optional[str]:
    """The child of ``discriminator`` holding one module per scale (a ModuleList or Sequential
    of ``n_scales``), by name, or None.

    >>> import torch
    >>> class D(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.scales = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
    >>> scale_owner(D(), 2), scale_owner(D(), 3)
    ('scales', None)
    """
    import torch

    if n_scales < 2 or not isinstance(discriminator, torch.nn.Module):
        return None
    for name, child in discriminator.named_children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) and len(child) == n_scales:
            return name
    return None


# ------------------------------------------------------------------------------------ pairs
def concat_pair(cond: Any, volume: Any) -> Any:
    """The default discriminator input of a conditional GAN: ``cat([cond, volume], dim=1)``.

    >>> import torch
    >>> concat_pair(torch.zeros(2, 1, 4), torch.ones(2, 3, 4)).shape
    torch.Size([2, 4, 4])
    """
    import torch

    return torch.cat([cond, volume], dim=1)


def takes_three(build: Callable) -> bool:
    """Whether a pair builder is ``build(cond, real, fake) -> (real_pair, fake_pair)`` (three
    positional arguments accepted) rather than ``build(cond, volume) -> pair``.

    >>> takes_three(lambda c, r, f: (r, f)), takes_three(lambda c, v: v)
    (True, False)
    """
    import inspect

    try:
        inspect.signature(build).bind(None, None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): assume the two-argument form
        return False
    return True


def build_pairs(build: Optional[Callable[..., Any]], cond: Any, real: Any, fake: Any) -> tuple:
    """``(real_pair, fake_pair)``: ``build(cond, real, fake)`` when it takes three arguments,
    else ``build(cond, real)`` and ``build(cond, fake)``; ``build=None`` is ``concat_pair``.

    >>> import torch
    >>> r, f = build_pairs(None, torch.zeros(1, 1, 2), torch.ones(1, 1, 2), torch.ones(1, 1, 2))
    >>> r.shape, f.shape
    (torch.Size([1, 2, 2]), torch.Size([1, 2, 2]))
    """
    if build is None:
        return concat_pair(cond, real), concat_pair(cond, fake)
    if takes_three(build):
        out = build(cond, real, fake)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ValueError(f"a pair builder taking (cond, real, fake) must return (real_pair,"
                             f" fake_pair), returned {type(out).__name__}")
        return out[0], out[1]
    return build(cond, real), build(cond, fake)


def probes_like(cond: Any, volume: Any, seed: int = 0) -> dict:
    """Independent standard normal tensors shaped like the condition and the real volume, as
    ``{"cond": ..., "real": ..., "fake": ...}``, of their dtype when floating (else float32),
    drawn from a private generator: the global RNG is not touched.

    >>> import torch
    >>> p = probes_like(torch.zeros(2, 1, 4), torch.zeros(2, 3, 4))
    >>> [tuple(p[k].shape) for k in PROBES]
    [(2, 1, 4), (2, 3, 4), (2, 3, 4)]
    """
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def draw(like: Any) -> Any:
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(like.device, dtype)

    return {"cond": draw(cond), "real": draw(volume), "fake": draw(volume)}


def _channels(pair: Any) -> list:
    """The channels (dim 1; a whole tensor when it has fewer dims) of a pair: a tensor or a
    tuple/list of tensors, in order."""
    import torch

    tensors = [pair] if isinstance(pair, torch.Tensor) else [
        t for t in (pair if isinstance(pair, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
    out = []
    for t in tensors:
        if t.dim() < 2:
            out.append(t)
        else:
            out += [t[:, c] for c in range(t.shape[1])]
    return out


def channel_sources(pair: Any, probes: dict) -> list:
    """For each channel of ``pair``, the probe channel it comes from, as ``"cond[0]"``, or
    ``"?"`` when no probe channel correlates with it (|r| >= MIN_CORRELATION); a scaled,
    shifted, detached or slightly noised copy is still recognised.

    >>> import torch
    >>> p = probes_like(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8))
    >>> channel_sources(torch.cat([p["fake"], 2 * p["cond"] + 1], 1), p)
    ['fake[0]', 'cond[0]']
    """
    candidates = [(f"{name}[{c}]", ch.detach().double().flatten())
                  for name in PROBES for c, ch in enumerate(_channels(probes[name]))]
    sources = []
    for ch in _channels(pair):
        x = ch.detach().double().flatten()
        best, label = 0.0, "?"
        for name, y in candidates:
            if y.numel() != x.numel():
                continue
            xc, yc = x - x.mean(), y - y.mean()
            denom = float(xc.norm() * yc.norm())
            r = abs(float((xc * yc).sum())) / denom if denom > 0 else 0.0
            if r >= MIN_CORRELATION and r > best:
                best, label = r, name
        sources.append(label)
    return sources


def describe_sources(sources: list) -> str:
    """Channel sources as runs: ``cond[0-2], fake[0]``.

    >>> describe_sources(["cond[0]", "cond[1]", "fake[0]", "?"])
    'cond[0-1], fake[0], ?'
    """
    runs: list = []
    for label in sources:
        m = re.fullmatch(r"(\w+)\[(\d+)\]", label)
        if m and runs and runs[-1][0] == m.group(1) and runs[-1][2] == int(m.group(2)) - 1:
            runs[-1][2] = int(m.group(2))
        elif m:
            runs.append([m.group(1), int(m.group(2)), int(m.group(2))])
        else:
            runs.append([label, None, None])
    return ", ".join(name if lo is None else f"{name}[{lo}]" if lo == hi else f"{name}[{lo}-{hi}]"
                     for name, lo, hi in runs)


# ------------------------------------------------------------------------------------ plots
def _map_image(t: Any) -> Any:
    """A 2D image of an output map: the first sample and channel, middle slices of extra dims."""
    a = t.detach().to("cpu").double()
    a = a[0, 0] if a.dim() >= 3 else a.reshape(1, -1)  # (B, C, *spatial); (B, n) or (B,): all
    while a.dim() > 2:
        a = a[a.shape[0] // 2]
    if a.dim() < 2:
        a = a.reshape(1, -1)
    return a.numpy()


def save_scales_plot(facts: list, maps: list, path: Any, names: list) -> Optional[str]:
    """One row per discriminator scale: the separation of each layer (bars; red when the layer is
    constant), the histogram of the output map's values on real and fake inputs, and the output
    map of the first real and fake sample. Returns the path, or None without matplotlib.

    ``facts[s]`` lists the scale's LayerFacts (the last with values kept), ``maps[s]`` is its
    ``(real_output_map, fake_output_map)``, ``names[s]`` its title.

    >>> import os, tempfile, torch
    >>> g = torch.Generator().manual_seed(0)
    >>> r, f = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    >>> path = os.path.join(tempfile.mkdtemp(), "d.png")
    >>> save_scales_plot([[layer_facts(r, f, keep_values=True)]], [(r, f)], path, ["scale 0"]) == path
    True
    """
    from .plots import _figure

    fig = _figure(13, 2.8 * len(facts) + 0.6)
    if fig is None:
        return None
    axes = fig.subplots(len(facts), 4, squeeze=False)
    for row, (layers, (real_map, fake_map), name) in enumerate(zip(facts, maps, names)):
        bars, hist, real_ax, fake_ax = axes[row]
        seps = [lf.separation for lf in layers]
        colors = ["tab:red" if lf.constant else "tab:blue" for lf in layers]
        bars.bar(range(len(seps)), seps, color=colors)
        bars.set_xticks(range(len(seps)))
        bars.set_xlabel("layer (last = output map)")
        bars.set_ylabel("real/fake separation")
        bars.set_title(f"{name}\nreal/fake separation per layer", fontsize=9)
        out = layers[-1]
        if out.real_values is not None:
            bins = int(min(40, max(5, out.real_values.size // 2)))
            hist.hist(out.real_values, bins=bins, alpha=0.6, label="real", color="tab:green")
            hist.hist(out.fake_values, bins=bins, alpha=0.6, label="fake", color="tab:orange")
            hist.legend(fontsize=8)
        state = " (constant)" if out.constant else f" (saturated {out.saturated:.0%})" \
            if out.saturated >= SATURATED_FRACTION else ""
        hist.set_title(f"output map values{state}", fontsize=9)
        images = [_map_image(real_map), _map_image(fake_map)]
        lo = min(float(i.min()) for i in images)
        hi = max(float(i.max()) for i in images)
        for ax, image, which in ((real_ax, images[0], "real"), (fake_ax, images[1], "fake")):
            shown = ax.imshow(image, vmin=lo, vmax=hi if hi > lo else lo + 1e-12, cmap="viridis")
            ax.set_title(f"output map, {which} (sample 0)", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(shown, ax=fake_ax, fraction=0.046)
    fig.tight_layout()
    ensure_folder(str(path))
    fig.savefig(str(path), format="png")
    return str(path)
