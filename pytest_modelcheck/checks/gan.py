"""GAN checks: ``discriminator_scales`` (every scale of a multi-scale PatchGAN discriminator
responds to its input, and how far its feature maps separate real from generated samples) and
``gan_pairs`` (a conditional GAN's real and fake discriminator pairs are built alike: the same
channel order, the generator output where the real sample is, no real sample on the fake side).

Both read the batch as ``(condition, real)``: the first input tensor is the condition (the
generator's input), the target is the real sample. The facts come from ``core/gan.py``.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..core.errors import ModelError, UsageError, first_line
from ..core.result import CheckResult
from ..core.units import is_number
from .registry import SkipCheck, check
from .subject import Subject

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_BUILDER = ("a pair builder: a callable build(cond, real, fake) -> (real_pair, fake_pair) or"
            " build(cond, volume) -> pair, or the name of such a model method, such as 'make_pairs'")


def _member_name(value: Any, argument: str, example: str, optional: bool = False) -> Any:
    if optional and value is None:
        return None
    if isinstance(value, str) and _DOTTED.fullmatch(value):
        return value
    none = " or None" if optional else ""
    raise UsageError(f"{argument}={value!r}: expected the name of a model attribute (dotted for"
                     f" a nested one), such as {example!r}{none}")


def _builder_arg(pairs: Any, optional: bool) -> Any:
    if pairs is None and optional:
        return None
    if callable(pairs) and not isinstance(pairs, type):
        return pairs
    if isinstance(pairs, str) and _DOTTED.fullmatch(pairs):
        return pairs
    default = "; None concatenates [cond, volume] along dim 1" if optional else ""
    raise UsageError(f"pairs={pairs!r}: expected {_BUILDER}{default}")


def _plot_arg(plot: Any) -> Any:
    if plot is None or plot is False or plot == "auto":
        return None if plot is False else plot
    if isinstance(plot, (str, os.PathLike)) and str(plot).strip():
        return plot
    raise UsageError(f"plot={plot!r}: expected a file path for the PNG, 'auto' (a file per test"
                     " in the temporary directory) or None (no plot)")


def _validate_scales(discriminator: Any = "discriminator", pairs: Any = None,
                     generator: Any = None, min_separation: Any = None, plot: Any = "auto") -> dict:
    if min_separation is not None and not (is_number(min_separation) and min_separation >= 0
                                           and math.isfinite(min_separation)):
        raise UsageError(f"min_separation={min_separation!r}: expected a number >= 0 (the least"
                         " real/fake separation of each scale's best layer) or None")
    return {"discriminator": _member_name(discriminator, "discriminator", "discriminator"),
            "pairs": _builder_arg(pairs, optional=True),
            "generator": _member_name(generator, "generator", "generator", optional=True),
            "min_separation": None if min_separation is None else float(min_separation),
            "plot": _plot_arg(plot)}


def _validate_pairs(pairs: Any) -> dict:
    return {"pairs": _builder_arg(pairs, optional=False)}


# ------------------------------------------------------------------------------ gathering
def _cond_and_real(data: Any) -> tuple:
    """The condition (first input tensor) and the real sample (the target tensor)."""
    import torch

    tensors = [t for _, t in data.input_tensors()]
    if not tensors or not isinstance(data.target, torch.Tensor):
        raise SkipCheck("the batch is not (condition, real sample) tensors: a GAN check needs an"
                        " input tensor (the condition) and a target tensor (the real sample)")
    return tensors[0], data.target


def _builder(work: Any, pairs: Any) -> Any:
    if isinstance(pairs, str):
        from ..core.gan import member

        return member(work, pairs, "pairs", _BUILDER)
    return pairs


def _name_of(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _pairs(build: Any, cond: Any, real: Any, fake: Any) -> tuple:
    """``build_pairs``; an exception in the builder becomes a ModelError naming it."""
    from ..core.gan import build_pairs

    try:
        return build_pairs(build, cond, real, fake)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's builder raised
        name = _name_of(build) if build is not None else "cat([cond, volume], dim=1)"
        raise ModelError(f"building the discriminator pairs with {name} raised"
                         f" {type(exc).__name__}: {first_line(exc)}", original=exc) from exc


def _generate(work: Any, data: Any, generator: Optional[str]) -> Any:
    """The generated sample: the model's output (its first tensor), or ``model.<generator>``
    called with the batch inputs."""
    from ..core.batch import iter_tensors
    from ..core.forward import run_forward

    if generator is None:
        out = run_forward(work, data)
    else:
        from ..core.gan import member

        out = member(work, generator, "generator", "the generator submodule or method")(
            *data.args, **data.kwargs)
    return next((t for _, t in iter_tensors(out)), None)


def _discriminate(disc: Any, pair: Any, name: str) -> Any:
    import torch

    from ..core.batch import Batch
    from ..core.forward import run_forward

    if isinstance(disc, torch.nn.Module):
        try:
            return run_forward(disc, Batch(args=(pair,)))
        except ModelError as exc:
            raise ModelError(f"the discriminator model.{name}: {exc}", exc.module,
                             exc.original) from exc
    return disc(pair)


@dataclass
class ScaleFacts:
    name: str
    layers: list          # LayerFacts, the last being the output map
    maps: tuple           # (real output map, fake output map)

    @property
    def output(self) -> Any:
        return self.layers[-1]

    @property
    def first_constant(self) -> Optional[int]:
        return next((i for i, lf in enumerate(self.layers) if lf.constant), None)


def _scale_facts(subject: Subject, discriminator: str, pairs: Any, generator: Any) -> list:
    """Each scale's LayerFacts on the real and the generated sample's pairs."""
    import torch

    from ..core.gan import layer_facts, member, scale_owner, scales_of

    work, data = subject.model_copy("eval"), subject.batch_copy()
    with torch.no_grad():
        fake = _generate(work, data, generator)
        cond, real = _cond_and_real(data)
        if fake is None or tuple(fake.shape) != tuple(real.shape):
            got = tuple(fake.shape) if fake is not None else None
            raise SkipCheck(f"the generated sample {got} and the real sample {tuple(real.shape)}"
                            " (the batch target) differ in shape: the discriminator cannot judge"
                            " them alike")
        real_pair, fake_pair = _pairs(_builder(work, pairs), cond, real, fake)
        disc = member(work, discriminator, "discriminator",
                      "the discriminator submodule or method, such as 'discriminator'")
        real_out = scales_of(_discriminate(disc, real_pair, discriminator))
        fake_out = scales_of(_discriminate(disc, fake_pair, discriminator))
    if real_out is None or fake_out is None or [len(s) for s in real_out] != [
            len(s) for s in fake_out]:
        raise SkipCheck(f"model.{discriminator} returned neither a tensor, a list of tensors (one"
                        " per scale) nor a list of lists (the feature maps of each scale)")
    owner = scale_owner(disc, len(real_out))
    facts = []
    for i, (rs, fs) in enumerate(zip(real_out, fake_out)):
        name = f"scale {i}" + (f" ({discriminator}.{owner}.{i})" if owner else "")
        layers = [layer_facts(r, f, keep_values=j == len(rs) - 1)
                  for j, (r, f) in enumerate(zip(rs, fs))]
        facts.append(ScaleFacts(name, layers, (rs[-1], fs[-1])))
    return facts


# ------------------------------------------------------------------------------ wording
def _scale_lines(facts: list) -> list:
    lines = [f"{'scale':<34} {'layer':>5} {'shape':<22} {'separation':>10}  state"]
    for s in facts:
        for j, lf in enumerate(s.layers):
            state = "constant" if lf.constant else (
                f"saturated {lf.saturated:.0%}" if lf.saturated >= _saturated_at() else "")
            lines.append(f"{s.name:<34} {j:>5} {str(lf.shape):<22} {lf.separation:10.4g}  {state}")
    return lines


def _saturated_at() -> float:
    from ..core.gan import SATURATED_FRACTION

    return SATURATED_FRACTION


def _scales_metrics(facts: list) -> dict:
    return {"scales": len(facts),
            "separation": {s.name.split(" (")[0]: [round(lf.separation, 6) for lf in s.layers]
                           for s in facts},
            "constant_scales": [s.name.split(" (")[0] for s in facts if s.output.constant],
            "saturated": {s.name.split(" (")[0]: round(s.output.saturated, 6) for s in facts}}


def _scales_problems(facts: list, min_separation: Optional[float]) -> list:
    problems = []
    for s in facts:
        out = s.output
        if out.constant:
            first = s.first_constant
            where = (f"constant from layer {first} of {len(s.layers)} on" if first is not None
                     and first < len(s.layers) - 1 else "its last layer")
            problems.append(f"{s.name} outputs a constant ({out.value:.4g}) on real and fake"
                            f" samples ({where}): a dead scale")
        elif out.saturated >= _saturated_at():
            problems.append(f"{s.name} is saturated ({out.saturated:.0%} of its output map at the"
                            " bounds of its activation)")
        elif min_separation is not None:
            best = max(lf.separation for lf in s.layers)
            if best < min_separation:
                problems.append(f"{s.name} separates real from fake by {best:.3g} at most"
                                f" (below min_separation={min_separation:g})")
    return problems


@check(default=False, validate=_validate_scales)
def discriminator_scales(discriminator: Any = "discriminator", pairs: Any = None,
                         generator: Any = None, min_separation: Any = None, plot: Any = "auto",
                         *, subject: Subject) -> CheckResult:
    """Every scale of a multi-scale (PatchGAN) discriminator responds to real and generated pairs: none constant or saturated.

    The batch is ``(condition, real)``; the model's output (or ``model.<generator>(inputs)``) is
    the generated sample. ``model.<discriminator>`` (a submodule or method) judges the pairs
    ``pairs`` builds (default ``cat([cond, volume], dim=1)``) and returns a tensor, a list per
    scale of output maps, or a list per scale of its feature maps (the last is the output map).
    For each scale and layer, the separation is the standardised difference of the per-channel
    means on real and fake pairs. A scale fails when its output map is constant (dead) or
    saturated (99% at the bounds of [0, 1] or [-1, 1]), or, with ``min_separation``, when no
    layer separates that much. ``plot`` saves a PNG per run ('auto': the temporary directory).

    >>> import torch
    >>> class GAN(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.generator = torch.nn.Conv1d(1, 1, 3, padding=1)
    ...         self.discriminator = torch.nn.Conv1d(2, 1, 3)
    ...     def forward(self, cond):
    ...         return self.generator(cond)
    >>> torch.manual_seed(0) and None
    >>> batch = (torch.randn(4, 1, 8), torch.randn(4, 1, 8))
    >>> discriminator_scales(plot=None, model=GAN(), batch=batch).passed
    True
    """
    facts = _scale_facts(subject, discriminator, pairs, generator)
    metrics: dict = _scales_metrics(facts)
    details = _scale_lines(facts)
    if plot is not None:
        from ..core.gan import save_scales_plot
        from ..core.plots import plot_path

        path = plot_path(plot, subject.check)
        saved = save_scales_plot([s.layers for s in facts], [s.maps for s in facts], path,
                                 [s.name for s in facts])
        if saved:
            metrics["plot"] = saved
            metrics["plot_title"] = "discriminator output per scale, real vs generated"
            details.append(f"plot: {saved}")
    expected = "expected every discriminator scale to respond to its input (no constant or" \
               " saturated output map" + (", separation >= " f"{min_separation:g}"
                                          if min_separation is not None else "") + ")"
    problems = _scales_problems(facts, min_separation)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return subject.failed(f"{expected}, observed {problems[0]}{more}", problems + details,
                              metrics)
    seps = ", ".join(f"{s.name.split(' (')[0]} {s.output.separation:.3g}" for s in facts)
    return subject.passed(f"{expected}, observed {len(facts)} responding scale"
                          f"{'s' if len(facts) > 1 else ''} (output-map separation real/fake:"
                          f" {seps})", details, metrics)


# ------------------------------------------------------------------------------ gan_pairs
@dataclass
class PairFacts:
    real: list      # the source of each channel of the real pair: "cond[0]", "real[0]", "?"
    fake: list
    builder: str


def _pair_facts(subject: Subject, pairs: Any) -> PairFacts:
    """The channel sources of the real and fake pairs the builder makes from marked probes."""
    import torch

    from ..core.gan import channel_sources, probes_like

    data = subject.batch_copy()
    cond, real = _cond_and_real(data)
    if not cond.is_floating_point():
        raise SkipCheck(f"the condition (the first input) is a {cond.dtype} tensor: the pair"
                        " builder is probed with random float tensors in its place")
    build = _builder(subject.model_copy("eval") if isinstance(pairs, str) else None, pairs)
    probes = probes_like(cond, real)
    with torch.no_grad():
        real_pair, fake_pair = _pairs(build, probes["cond"], probes["real"], probes["fake"])
    return PairFacts(channel_sources(real_pair, probes), channel_sources(fake_pair, probes),
                     pairs if isinstance(pairs, str) else _name_of(pairs))


def _pair_problem(f: PairFacts) -> Optional[str]:
    """What is wrong with the pairs, worded, or None."""
    from ..core.gan import describe_sources

    kind = [s.split("[")[0] for s in f.fake]
    if "real" in kind:
        k = kind.index("real")
        return f"the fake pair contains the real sample (channel {k} comes from {f.fake[k]}): a leak"
    if "fake" in [s.split("[")[0] for s in f.real]:
        k = [s.split("[")[0] for s in f.real].index("fake")
        return f"the real pair contains the generated sample (channel {k} comes from {f.real[k]})"
    if not any(s.startswith("real[") for s in f.real):
        return f"the real pair holds no channel of the real sample ({describe_sources(f.real)})"
    if len(f.real) != len(f.fake):
        return f"the real pair has {len(f.real)} channels, the fake pair {len(f.fake)}"
    want = [s.replace("real[", "fake[") for s in f.real]
    if want == f.fake:
        return None
    if sorted(want) == sorted(f.fake):
        return (f"the channel order differs: real pair ({describe_sources(f.real)}), fake pair"
                f" ({describe_sources(f.fake)})")
    k = next(i for i, (w, g) in enumerate(zip(want, f.fake)) if w != g)
    if want[k].startswith("fake[") and f.fake[k].startswith("cond["):
        return (f"channel {k} of the fake pair comes from the condition ({f.fake[k]}) where the"
                f" generated sample ({want[k]}) should be")
    if not any(s.startswith("fake[") for s in f.fake):
        return f"the generated sample does not reach the fake pair ({describe_sources(f.fake)})"
    return (f"channel {k} of the fake pair comes from {f.fake[k]} where the real pair has"
            f" {f.real[k]} (real pair: {describe_sources(f.real)}; fake pair:"
            f" {describe_sources(f.fake)})")


@check(default=False, validate=_validate_pairs)
def gan_pairs(pairs: Any, *, subject: Subject) -> CheckResult:
    """A conditional GAN's (cond, real) and (cond, fake) discriminator pairs have one channel order and no leak.

    ``pairs`` is the pair builder: a callable ``build(cond, real, fake) -> (real_pair,
    fake_pair)`` or ``build(cond, volume) -> pair``, or the name of such a model method. It is
    called with random probe tensors shaped like the batch's condition (the first input) and
    real sample (the target), and each channel (dim 1) of each pair is traced to the probe it
    correlates with. The fake pair must be the real pair with the real sample's channels
    replaced by the generated sample's: it fails on a different order (``cat(fake, cond)`` vs
    ``cat(cond, real)``), on the real sample in the fake pair (a leak), and on the condition where
    the generated sample should be.

    >>> import torch
    >>> cat = lambda c, r, f: (torch.cat([c, r], 1), torch.cat([c, f], 1))
    >>> batch = (torch.zeros(2, 1, 8), torch.zeros(2, 1, 8))
    >>> gan_pairs(cat, model=torch.nn.Identity(), batch=batch).passed
    True
    >>> swapped = lambda c, r, f: (torch.cat([c, r], 1), torch.cat([f, c], 1))
    >>> gan_pairs(swapped, model=torch.nn.Identity(), batch=batch).headline.split(", observed ")[1]
    'the channel order differs: real pair (cond[0], real[0]), fake pair (fake[0], cond[0])'
    """
    from ..core.gan import describe_sources

    facts = _pair_facts(subject, pairs)
    details = [f"builder: {facts.builder}", f"real pair channels: {describe_sources(facts.real)}",
               f"fake pair channels: {describe_sources(facts.fake)}"]
    metrics = {"real_pair": facts.real, "fake_pair": facts.fake}
    expected = ("expected the fake pair to be the real pair with the real sample's channels"
                " replaced by the generated sample's")
    problem = _pair_problem(facts)
    if problem is not None:
        return subject.failed(f"{expected}, observed {problem}", details, metrics)
    return subject.passed(f"{expected}, observed real pair ({describe_sources(facts.real)}),"
                          f" fake pair ({describe_sources(facts.fake)})", details, metrics)
