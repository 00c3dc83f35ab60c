"""activations_healthy: per-layer activation statistics and gradient norms on one batch:
exploding activations, vanishing gradients, dead ReLUs, saturated sigmoid/tanh and attention.

Gathering (``_gather``: one traced forward and backward, the per-layer rows, the growth along
the data path, the attention measures) is kept apart from judging (``_problems``) and wording
(``_table``, the headline). This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.errors import UsageError
from ..core.result import CheckResult
from ..core.units import is_number
from .op_trace import ROOT, _flat_tensors, _ModuleStack
from .registry import check
from .subject import Subject

RELU_LIKE = ("ReLU", "ReLU6")
SATURATING = ("Sigmoid", "Tanh")
#: Attention rows that may attend to fewer keys than this are left out of the saturation measure:
#: a causal mask's first rows see one or two keys, so their largest probability is near 1 by design.
ATTENTION_MIN_KEYS = 4
#: Attention whose rows put, on average, at least this probability on their top key is saturated.
#: Measured at random init (mean over query rows of the largest probability; 1/T is uniform):
#: torch nn.MultiheadAttention and nn.TransformerEncoderLayer (d=64, 4 heads, T=16, unit-std
#: inputs) 0.14, inputs of std 3 0.71-0.73, std 4 0.86; HF BERT 0.10, GPT-2 0.14, Llama 0.14,
#: ViT 0.06, T5 (unscaled by design) 0.45; timm vit_tiny 0.07; torchvision vit_b_32 (T=5) 0.33,
#: swin_t 0.05. Scores multiplied by sqrt(d) instead of divided (one head after a LayerNorm):
#: d=64 0.91-0.97 for T=8..64, d=128 0.95-0.98, d=32 0.83-0.92, d=16 0.65-0.81.
ATTENTION_SATURATED = 0.85
#: Samples of a batch used to recompute attention probabilities (bounds the extra work).
ATTENTION_SAMPLES = 8
#: Fused attention kernels (what ``scaled_dot_product_attention`` dispatches to): their
#: probabilities are recomputed from query, key, scale and mask.
SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_fused_attention_overrideable")
SOFTMAX_OPS = ("_softmax", "_safe_softmax")


def _validate_activations(max_growth: Any = 1e4, min_grad_ratio: Any = 1e-5,
                          dead_fraction: Any = 0.9, saturated_fraction: Any = 0.9,
                          attention_max_prob: Any = ATTENTION_SATURATED) -> dict:
    if not is_number(max_growth) or not max_growth >= 1:
        raise UsageError(f"max_growth={max_growth!r}: expected a number >= 1, the largest ratio of"
                         " a layer's activation std to that of an earlier layer")
    if not is_number(min_grad_ratio) or not 0 <= min_grad_ratio < 1:
        raise UsageError(f"min_grad_ratio={min_grad_ratio!r}: expected a number in [0, 1), the"
                         " smallest first-layer/last-layer gradient norm ratio")
    for name, v in (("dead_fraction", dead_fraction), ("saturated_fraction", saturated_fraction)):
        if not is_number(v) or not 0 < v <= 1:
            raise UsageError(f"{name}={v!r}: expected a fraction in (0, 1]")
    if not is_number(attention_max_prob) or not 0 < attention_max_prob <= 1:
        raise UsageError(f"attention_max_prob={attention_max_prob!r}: expected a probability in"
                         " (0, 1], the largest mean top-key attention probability at initialisation")
    return {"max_growth": float(max_growth), "min_grad_ratio": float(min_grad_ratio),
            "dead_fraction": float(dead_fraction), "saturated_fraction": float(saturated_fraction),
            "attention_max_prob": float(attention_max_prob)}


def _std_growth(order: list, stats: dict) -> tuple:
    """``(growth, earlier layer, later layer)``: the largest ratio of a layer's activation std to
    the smallest non-zero std of a layer that ran before it (``inf`` for a non-finite std).
    Used only when the data path cannot be traced."""
    growth, low_at, top_at = 0.0, "", ""
    low = None
    for p in order:
        s = stats[p].get("std")
        if s is None:
            continue
        if not math.isfinite(s):
            return math.inf, low or p, p
        if s <= 0:
            continue
        if low is not None and s / stats[low]["std"] > growth:
            growth, low_at, top_at = s / stats[low]["std"], low, p
        if low is None or s < stats[low]["std"]:
            low = p
    return growth, low_at, top_at


def _top_probs(probs: Any, allowed: Any) -> tuple:
    """``(sum of each row's largest probability, rows)`` over rows with at least
    ``ATTENTION_MIN_KEYS`` allowed keys."""
    rows = allowed.sum(-1) >= ATTENTION_MIN_KEYS
    return float(probs.amax(-1)[rows].sum()), int(rows.sum())


def _softmax_attention(args: tuple, out: Any) -> Optional[tuple]:
    """Top-probability sums of a softmax over attention scores: the last dim of a tensor whose
    last two dims are equal (T query rows by T keys), at least 3-d; None for any other softmax."""
    import torch

    scores, dim = args[0], args[1]
    if not isinstance(scores, torch.Tensor) or scores.dim() < 3 or not scores.is_floating_point():
        return None
    if dim % scores.dim() != scores.dim() - 1 or scores.shape[-1] != scores.shape[-2] \
            or scores.shape[-1] < ATTENTION_MIN_KEYS:
        return None
    x = scores[:ATTENTION_SAMPLES].detach()
    allowed = torch.isfinite(x) & (x > torch.finfo(x.dtype).min / 2)  # additive masks use finfo.min
    return _top_probs(out[:ATTENTION_SAMPLES].detach().float(), allowed)


def _sdpa_attention(func: Any, args: tuple, kwargs: dict) -> Optional[tuple]:
    """Top-probability sums of a fused attention kernel, its probabilities recomputed from the
    query, key, scale, mask and causal flag it was given."""
    import torch

    a = dict(zip([x.name for x in func._schema.arguments], args))
    a.update(kwargs)
    q, k = a.get("query"), a.get("key")
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() < 2:
        return None
    n = q.shape[0] if q.dim() > 2 else 1
    q = q[:ATTENTION_SAMPLES].detach().float() if q.dim() > 2 else q.detach().float()
    k = k[:ATTENTION_SAMPLES].detach().float() if k.dim() > 2 else k.detach().float()
    if q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3] and k.shape[-3] \
            and q.shape[-3] % k.shape[-3] == 0:  # grouped-query attention
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = a.get("scale")
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    allowed = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    mask = a.get("attn_mask", a.get("attn_bias"))
    if isinstance(mask, torch.Tensor):
        m = mask.detach()
        if m.dim() == q.dim() and m.dim() > 2 and m.shape[0] == n:
            m = m[:ATTENTION_SAMPLES]
        m = torch.broadcast_to(m, scores.shape)
        if m.dtype == torch.bool:
            allowed = m
        else:
            allowed = torch.isfinite(m) & (m > torch.finfo(m.dtype).min / 2)
            scores = scores + m.float()
    if a.get("is_causal"):
        rows, cols = scores.shape[-2:]
        allowed = allowed & torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
    return _top_probs(probs, allowed)


def _at_line(source: str) -> str:
    """``file.py:12`` of a ``path/file.py:12 in fn`` source; "an unknown line" without one."""
    if not source:
        return "an unknown line"
    where = source.split(" in ")[0]
    return os.path.basename(where)


def _rms(t: Any, cache: Any) -> float:
    seen = cache.get(t)
    if seen is not None and seen[0] == t._version:
        return seen[1]
    value = float(t.detach().float().pow(2).mean().sqrt()) if t.numel() else 0.0
    cache[t] = (t._version, value)
    return value


def _path_tracer(mods: "_ModuleStack", tags: Any, attention: dict, state: dict) -> Any:
    """A dispatch mode that carries each activation's path tag from the inputs of every op to its
    outputs, and measures the attention probabilities of softmaxes over scores and fused kernels.

    A tag is ``(std, module)``: the smallest output std of a module on the path the data took to
    this tensor. An op with several tagged inputs (a residual ``x + branch``, ``cat``, a gate)
    passes on the tag of the input that carries the magnitude (largest RMS), so a residual
    branch that is tiny by design (ConvNeXt's layer scale) is not on the main path.
    """
    from torch.utils.weak import WeakTensorKeyDictionary

    from ..core._torch_compat import dispatch_mode_base
    from ..core.dispatch import user_source

    rms_cache = WeakTensorKeyDictionary()

    class PathTracer(dispatch_mode_base()):  # type: ignore[misc]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            if state["quiet"]:
                return func(*args, **kwargs)
            # the tag is chosen before the op runs: an in-place `x += branch` changes x
            ins = [t for t in _flat_tensors((args, kwargs)) if t.is_floating_point() and t in tags]
            src = ins[0] if len(ins) == 1 else max(ins, key=lambda t: _rms(t, rms_cache),
                                                   default=None)
            tag = tags[src] if src is not None else None
            out = func(*args, **kwargs)
            name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
            found = None
            try:
                if name in SOFTMAX_OPS:
                    found = _softmax_attention(args, out)
                elif name in SDPA_OPS:
                    found = _sdpa_attention(func, args, kwargs)
            except Exception:  # noqa: BLE001 - an attention layout this measure does not know
                found = None
            if found is not None and found[1]:
                row = attention.setdefault(mods.current, {"sum": 0.0, "rows": 0, "calls": 0,
                                                          "op": "aten." + name,
                                                          "source": user_source()})
                row["sum"] += found[0]
                row["rows"] += found[1]
                row["calls"] += 1
            if tag is not None:
                for t in _flat_tensors(out):
                    if t.is_floating_point():
                        tags[t] = tag
            return out

    return PathTracer()


def _zero_parameters(model: Any) -> list:
    """Names of parameters (more than one element) that are exactly zero: zero-initialised heads
    and gates pass no gradient upstream at the first step, by design."""
    import torch

    with torch.no_grad():
        return [n for n, p in model.named_parameters()
                if p.requires_grad and p.numel() > 1 and not bool(p.any())]




# ------------------------------------------------------------------------------------ gathering
def _layer_row(mod: Any, t: Any, std: float) -> dict:
    """A layer's table row from its first floating output ``t`` (detached, float)."""
    row = {"type": type(mod).__name__, "shape": list(t.shape), "numel": t.numel(),
           "mean": float(t.mean()), "std": std}
    kind = type(mod).__name__
    if kind in RELU_LIKE and t.dim() >= 1:
        per_sample = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
        row["zeros"] = float((t == 0).float().mean())
        row["dead"] = float((per_sample == 0).all(dim=0).float().mean())
    if kind == "Tanh":
        row["saturated"] = float((t.abs() > 0.99).float().mean())
    elif kind == "Sigmoid":
        row["saturated"] = float(((t < 0.01) | (t > 0.99)).float().mean())
    return row


class _LayerRecorder:
    """Forward hooks on the leaf modules of a copy: one row per layer (its first call), the
    growth of activation std along the traced data paths, and the attention measures the path
    tracer adds."""

    def __init__(self) -> None:
        from torch.utils.weak import WeakTensorKeyDictionary

        self.names: dict = {}  # module -> path, of the copy now running
        self.stats: dict = {}  # path -> dict, in first-call order
        self.growths: list = []  # (growth, earlier path, earlier std, path, std) along data paths
        self.attention: dict = {}  # module path -> top-probability sums of its attention
        self.tags = WeakTensorKeyDictionary()
        self.state = {"quiet": False}

    def reset(self) -> None:
        self.stats.clear()
        self.growths.clear()
        self.attention.clear()

    def hook(self, mod: Any, args: Any, out: Any) -> None:
        self.state["quiet"] = True
        try:
            self.record(mod, out)
        finally:
            self.state["quiet"] = False

    def record(self, mod: Any, out: Any) -> None:
        path = self.names[mod]
        outs = [t for t in _flat_tensors(out) if t.is_floating_point()]
        if not outs or outs[0].numel() == 0:
            return
        t = outs[0].detach().float()
        std = float(t.std(unbiased=False)) if t.numel() > 1 else 0.0
        self._follow_path(path, outs, std)
        if path not in self.stats:  # a module called twice: its first call is the one in the table
            self.stats[path] = _layer_row(mod, t, std)

    def _follow_path(self, path: str, outs: list, std: float) -> None:
        """Record the growth over the smallest std on the data path and tag the outputs."""
        prior = self.tags.get(outs[0])
        if not math.isfinite(std):
            self.growths.append((math.inf, prior[1] if prior else path,
                                 prior[0] if prior else std, path, std))
        elif prior is not None and std > 0:
            self.growths.append((std / prior[0], prior[1], prior[0], path, std))
        tag = prior if prior is not None and (std <= 0 or not math.isfinite(std) or prior[0] <= std) \
            else ((std, path) if std > 0 and math.isfinite(std) else None)
        if tag is not None:
            for o in outs:
                self.tags[o] = tag

    def run(self, subject: Subject, traced: bool) -> Any:
        """One forward (traced or not) and backward on a fresh train-mode copy; returns the copy."""
        import torch

        from ..core.forward import run_forward
        from ..core.losses import resolve_loss

        work = subject.model_copy("train")
        work.zero_grad(set_to_none=True)
        self.names.clear()
        self.names.update({m: (n or ROOT) for n, m in work.named_modules()})
        leaves = [m for m in self.names if not any(True for _ in m.children())]
        data = subject.batch_copy()
        handles = [m.register_forward_hook(self.hook) for m in leaves]
        try:
            if traced:
                with _ModuleStack(work) as mods, _path_tracer(mods, self.tags, self.attention,
                                                              self.state):
                    out = data.call(work)
            else:
                out = run_forward(work, data)
            total, _ = resolve_loss(subject.loss, data, out).compute(out, data, work)
            if isinstance(total, torch.Tensor) and total.requires_grad:
                total.backward()
        finally:
            for h in handles:
                h.remove()
        return work


@dataclass
class _Observed:
    """The facts of one forward and backward: per-layer rows, growths, attention, gradients."""

    stats: dict  # path -> row, in first-call order (with "grad_norm" where measured)
    growths: list  # (growth, earlier path, earlier std, path, std)
    attention: dict  # path -> {"sum", "rows", "calls", "op", "source"}
    grads: dict  # path -> gradient norm of the module's own parameters
    traced: bool  # the forward ran under the path tracer
    zero_params: list  # parameters initialised to exactly zero
    types: dict  # path -> module type name

    @property
    def order(self) -> list:
        return list(self.stats)


def _grad_norms(names: dict, stats: dict) -> dict:
    """Gradient norm of each tabled module's own trainable parameters."""
    grads: dict = {}
    for m, path in names.items():
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if own and path in stats:
            norms = [float(p.grad.detach().float().norm()) for p in own if p.grad is not None]
            if norms:
                grads[path] = math.sqrt(sum(n * n for n in norms))
    return grads


def _gather(subject: Subject) -> _Observed:
    """Run the traced forward and backward (untraced, on a fresh copy with the same random
    state, when the model cannot run under the dispatch mode) and collect the facts."""
    import torch

    rec = _LayerRecorder()
    traced = True
    rng = torch.random.get_rng_state()
    try:
        work = rec.run(subject, True)
    except UsageError:
        raise
    except Exception:  # noqa: BLE001 - replayed on a fresh copy without the mode: a model error is named there
        traced = False
        rec.reset()
        torch.random.set_rng_state(rng)
        work = rec.run(subject, False)
    zero_params = _zero_parameters(work)
    grads = _grad_norms(rec.names, rec.stats)
    for p, g in grads.items():
        rec.stats[p]["grad_norm"] = g
    types = {(n or ROOT): type(m).__name__ for n, m in work.named_modules()}
    return _Observed(rec.stats, rec.growths, rec.attention, grads, traced, zero_params, types)


# -------------------------------------------------------------------------------------- judging
@dataclass
class _Limits:
    max_growth: float
    min_grad_ratio: float
    dead_fraction: float
    saturated_fraction: float
    attention_max_prob: float


@dataclass
class _Growth:
    """The largest activation std growth: from ``low`` (std ``low_std``) to ``top``."""

    growth: float
    low: str
    low_std: float
    top: str
    top_std: float
    where: str  # how ``low`` relates to ``top``, for the message


UNTRACED_NOTE = ("note: the forward could not run under a dispatch mode, so activation growth"
                 " is measured in call order, not along the data path, and attention is not"
                 " measured")


def _growth(obs: _Observed) -> _Growth:
    if obs.traced:
        growth, low, low_std, top, top_std = max(obs.growths, key=lambda g: g[0],
                                                 default=(0.0, "", 0.0, "", 0.0))
        return _Growth(growth, low, low_std, top, top_std, "earlier on its data path")
    growth, low, top = _std_growth(obs.order, obs.stats)
    low_std = obs.stats[low]["std"] if low in obs.stats else 0.0
    top_std = obs.stats[top]["std"] if top in obs.stats else 0.0
    return _Growth(growth, low, low_std, top, top_std, "of a layer that ran before it")


def _exploding(g: _Growth, obs: _Observed, limits: _Limits) -> list:
    if not g.growth > limits.max_growth:
        return []
    ratio_text = "not finite" if not math.isfinite(g.top_std) else f"{g.growth:.3g}x"
    kind = obs.stats[g.top]["type"] if g.top in obs.stats else "?"
    return [("exploding", g.top,
             f"exploding activations at '{g.top}' ({kind}):"
             f" std {g.top_std:.3g} is {ratio_text} the std {g.low_std:.3g} of '{g.low}'"
             f" {g.where} (max_growth {limits.max_growth:g})")]


def _vanishing(obs: _Observed, limits: _Limits, notes: list) -> tuple:
    """``(problems, first/last gradient ratio or None)``; a note when the ratio is not judged."""
    grad_layers = [p for p in obs.order if p in obs.grads]
    if len(grad_layers) < 2:
        return [], None
    first, last = grad_layers[0], grad_layers[-1]
    grads = obs.grads
    if not grads[last] > 0:
        return [], None
    ratio = grads[first] / grads[last]
    if ratio == 0 and obs.zero_params:
        notes.append(f"note: gradient ratio not judged: '{first}' gets exactly zero gradient"
                     f" at the first step because parameters are initialised to zero"
                     f" ({', '.join(obs.zero_params[:3])}); params_learn follows them over steps")
        return [], ratio
    if ratio < limits.min_grad_ratio:
        return [("vanishing", first,
                 f"vanishing gradients at '{first}' ({obs.stats[first]['type']}):"
                 f" gradient norm {grads[first]:.3g} is {ratio:.3g}x that of the"
                 f" last layer '{last}' ({grads[last]:.3g}; min_grad_ratio"
                 f" {limits.min_grad_ratio:g})")], ratio
    return [], ratio


def _unit_problems(obs: _Observed, limits: _Limits) -> list:
    """Dead ReLUs and saturated sigmoid/tanh, layer by layer."""
    problems: list = []
    for p in obs.order:
        r = obs.stats[p]
        if r.get("dead", 0.0) >= limits.dead_fraction:
            problems.append(("dead", p, f"dead ReLU at '{p}' ({r['type']}): {r['dead']:.0%} of its"
                             f" units are zero for every sample (dead_fraction"
                             f" {limits.dead_fraction:g})"))
        if r.get("saturated", 0.0) >= limits.saturated_fraction:
            problems.append(("saturated", p, f"saturated {r['type']} at '{p}': {r['saturated']:.0%}"
                             f" of its outputs saturated (saturated_fraction"
                             f" {limits.saturated_fraction:g})"))
    return problems


def _attention_problems(obs: _Observed, limits: _Limits) -> tuple:
    """``(problems, table rows)`` of the measured attentions."""
    problems, rows = [], []
    types = obs.types
    for p, a in obs.attention.items():
        mean_top = a["sum"] / a["rows"]
        rows.append(f"  {p[:40]:40} {types.get(p, '?')[:22]:22} {a['op']:44}"
                    f" {mean_top:>6.3f}  {a['source'] or '(no user line)'}")
        if mean_top >= limits.attention_max_prob:
            problems.append(("attention", p,
                             f"saturated attention in '{p}' ({types.get(p, '?')}): {a['op']} at"
                             f" {_at_line(a['source'])}"
                             f" puts a mean max probability of {mean_top:.3f} on one key per"
                             f" query at initialisation (attention_max_prob"
                             f" {limits.attention_max_prob:g}): scores multiplied by sqrt(d)"
                             f" instead of divided, not scaled, or inputs to the query/key"
                             f" projections far from unit scale (no normalisation before"
                             f" attention)"))
    return problems, rows


@dataclass
class _Findings:
    problems: list  # (kind, path, text), the headline's first
    notes: list
    ratio: Optional[float]  # first/last gradient norm ratio
    attn_rows: list = field(default_factory=list)


def _judge(obs: _Observed, g: _Growth, limits: _Limits) -> _Findings:
    notes = [] if obs.traced else [UNTRACED_NOTE]
    problems = _exploding(g, obs, limits)
    vanishing, ratio = _vanishing(obs, limits, notes)
    problems += _unit_problems(obs, limits)
    attention, attn_rows = _attention_problems(obs, limits)
    problems += attention
    problems += vanishing  # dead or saturated units are the usual cause: named first
    return _Findings(problems, notes, ratio, attn_rows)


# -------------------------------------------------------------------------------------- wording
def _table(obs: _Observed, found: _Findings) -> list:
    """The per-layer table, the attention rows and the notes."""
    table = [f"{'layer':32} {'type':14} {'mean':>10} {'std':>10} {'zeros':>6} {'dead':>6}"
             f" {'satur':>6} {'grad norm':>10}"]
    for p in obs.order:
        r = obs.stats[p]

        def pct(key: str) -> str:
            return f"{r[key]:.0%}" if key in r else "-"

        g = f"{r['grad_norm']:.3g}" if "grad_norm" in r else "-"
        table.append(f"{p[:32]:32} {r['type'][:14]:14} {r.get('mean', 0.0):>10.3g}"
                     f" {r.get('std', 0.0):>10.3g} {pct('zeros'):>6} {pct('dead'):>6}"
                     f" {pct('saturated'):>6} {g:>10}")
    if found.attn_rows:
        table += ["attention (mean max probability over query rows):"] + found.attn_rows
    return table + found.notes


def _metrics(obs: _Observed, g: _Growth, found: _Findings) -> dict:
    attention = obs.attention
    return {"layers": len(obs.order), "std_growth": g.growth,
            "grad_ratio_first_last": found.ratio, "growth_from": g.low, "growth_at": g.top,
            "data_path_traced": obs.traced, "attention_max_prob": _attention_max(obs),
            "attention": {p: a["sum"] / a["rows"] for p, a in attention.items()},
            "problems": [f"{k}:{p}" for k, p, _ in found.problems]}


def _attention_max(obs: _Observed) -> Optional[float]:
    return max((a["sum"] / a["rows"] for a in obs.attention.values()), default=None)


@check(default=True, validate=_validate_activations)
def activations_healthy(max_growth: Any = 1e4, min_grad_ratio: Any = 1e-5, dead_fraction: Any = 0.9,
                        saturated_fraction: Any = 0.9, attention_max_prob: Any = ATTENTION_SATURATED,
                        *, subject: Subject) -> CheckResult:
    """No exploding activations, vanishing gradients, dead ReLUs, saturated sigmoid/tanh or saturated attention on one batch.

    One forward and backward of the loss in train mode on a copy. For every leaf module: the
    mean and std of its (first floating) output; for ReLU/ReLU6 modules the fraction of units
    (output elements, per sample) that are zero for every sample; for Sigmoid/Tanh modules the
    fraction of outputs saturated (``|tanh| > 0.99``, sigmoid ``< 0.01`` or ``> 0.99``); for every
    module with parameters of its own, the gradient norm of those parameters; for every softmax
    over attention scores (the last dim of a tensor whose last two dims are (T, T)) and every
    ``scaled_dot_product_attention`` (probabilities recomputed from its query, key, scale and
    mask), the mean over query rows of the largest probability. Fails when

    * a layer's activation std exceeds ``max_growth`` times the smallest non-zero std of a
      layer earlier on the path its data took (exploding across depth), or is not finite. The
      path is traced op by op: where a residual ``x + branch`` meets, it follows the input that
      carries the magnitude, so a branch that is tiny by design (layer scale) is not compared
      with the main path;
    * the first parameterized layer's gradient norm is below ``min_grad_ratio`` times the last
      one's (vanishing; not judged when it is exactly zero because a parameter is initialised
      to zero, such as a zero-initialised classifier head);
    * a ReLU has ``>= dead_fraction`` of its units dead for all samples;
    * a Sigmoid/Tanh has ``>= saturated_fraction`` of its outputs saturated;
    * an attention's mean top probability is ``>= attention_max_prob`` (saturated softmax at
      initialisation: scores multiplied by sqrt(d) instead of divided, a missing scale).

    Details hold the per-layer table.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> activations_healthy(model=m, batch=(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))).passed
    True
    """
    obs = _gather(subject)
    growth = _growth(obs)
    found = _judge(obs, growth, _Limits(max_growth, min_grad_ratio, dead_fraction,
                                        saturated_fraction, attention_max_prob))
    table = _table(obs, found)
    metrics = _metrics(obs, growth, found)
    expected = "expected healthy activations and gradients"
    if found.problems:
        observed = found.problems[0][2]
        if len(found.problems) > 1:
            observed += f", and {len(found.problems) - 1} more problem(s)"
        details = ["problems:"] + [f"  {text}" for _, _, text in found.problems] + table
        return subject.failed(f"{expected}, observed {observed}", details, metrics)
    ratio = found.ratio
    attn_max = metrics["attention_max_prob"]
    ratio_text = f", first/last gradient ratio {ratio:.3g}" if ratio is not None else ""
    attn_text = (f", attention mean max probability <= {attn_max:.3g}" if attn_max is not None
                 else "")
    return subject.passed(f"{expected}, observed {len(obs.order)} layers with std growth"
                          f" {growth.growth:.3g}x{ratio_text}{attn_text}, no dead or saturated"
                          " activations", table, metrics)
