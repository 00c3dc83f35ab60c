"""attention_maps: the attention weights of every attention layer for one batch, drawn as a PNG,
with degenerate patterns flagged: every query attending to one token (collapse), and, opt-in,
uniform attention everywhere (randomly initialized attention is near-uniform, so that flag is
for trained models only)."""
from __future__ import annotations

import math
import os
from typing import Any, Optional

from ..core.errors import UsageError
from ..core.plots import plot_path
from ..core.result import CheckResult
from ..core.units import is_number
from .registry import SkipCheck, check
from .subject import Subject

#: Where ``plot=True`` saves its PNG (a new file per run; the HTML report embeds it).


def _fraction(name: str, value: Any, allow_none: bool, what: str) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not is_number(value) or not 0 < value <= 1:
        none = " or None (not judged)" if allow_none else ""
        raise UsageError(f"{name}={value!r}: expected a number in (0, 1]{none}: {what}")
    return float(value)


def _validate(collapse: Any = 0.9, uniform: Any = None, plot: Any = True,
              input_index: Any = 0) -> dict:
    """The marker's arguments, checked at collection.

    >>> _validate(uniform=0.995)["uniform"]
    0.995
    """
    from .spatial import _validate_index

    collapse = _fraction("collapse", collapse, True, "the share of a head's attention on one"
                         " token at which the layer counts as collapsed, such as 0.9")
    uniform = _fraction("uniform", uniform, True, "the normalized entropy (1 = uniform) at which"
                        " a trained layer counts as uniform, such as 0.995")
    if not isinstance(plot, (bool, str, os.PathLike)) and plot is not None:
        raise UsageError(f"plot={plot!r}: expected True (a PNG in the temporary directory), a"
                         " file path for the PNG, or False/None (no plot)")
    return {"collapse": collapse, "uniform": uniform, "plot": plot,
            "input_index": _validate_index(input_index)}


def _token_grid(work: Any, data: Any, input_index: int, maps: list) -> tuple:
    """``(grid, extra)``: the patch grid of the input (a convolution with kernel == stride)
    and the count of leading non-patch tokens, when every layer's keys are ``prod(grid) +
    extra``; ``(None, 0)`` otherwise."""
    from .spatial import _input_tensor
    from .vit import _patch_embedding

    _, _, patch = _patch_embedding(work)
    if not patch:
        return None, 0
    try:
        x = _input_tensor(data, input_index)
    except UsageError:
        return None, 0
    if x.dim() < len(patch) + 1:
        return None, 0
    grid = tuple(int(s) // p for s, p in zip(x.shape[-len(patch):], patch))
    extra = maps[0].keys - math.prod(grid)
    if not 0 <= extra <= 16 or any(m.keys != maps[0].keys for m in maps):
        return None, 0
    return grid, extra


def _token(t: int, extra: int) -> str:
    return f"token {t}" + (" (a non-patch token such as CLS)" if t < extra else "")


def _row(m: Any) -> str:
    ent = m.mean_entropy()
    return (f"  {m.layer:32} {m.kind:29} {m.heads} heads {m.queries}x{m.keys}"
            f"  top-token share {min(m.top_share):.3f}-{max(m.top_share):.3f}"
            f"  entropy {'-' if ent is None else f'{ent:.3f}'} of uniform")


def _layer_facts(m: Any) -> dict:
    return {"layer": m.layer, "kind": m.kind, "heads": m.heads, "queries": m.queries,
            "keys": m.keys, "top_share": m.top_share, "top_token": m.top_token,
            "entropy": m.entropy}


def _collapse_text(m: Any, extra: int) -> str:
    tokens = sorted(set(m.top_token))
    onto = _token(tokens[0], extra) if len(tokens) == 1 else f"tokens {tokens}"
    lo, hi = f"{min(m.top_share):.0%}", f"{max(m.top_share):.0%}"
    return (f"attention layer '{m.layer}' collapsed onto one token: in all {m.heads} heads the"
            f" queries put {lo if lo == hi else lo + '-' + hi} of their attention on {onto}")


@check(default=False, validate=_validate)
def attention_maps(collapse: Any = 0.9, uniform: Any = None, plot: Any = True,
                   input_index: Any = 0, *, subject: Subject) -> CheckResult:
    """Attention weights of every attention layer, drawn per layer and head; fails on a layer collapsed onto one token.

    One forward on the example batch (eval, no gradients, on a copy) records the weights of
    every ``F.scaled_dot_product_attention`` call (recomputed from its q, k, mask, causality
    and scale), every ``nn.MultiheadAttention`` (``F.multi_head_attention_forward``, run with
    per-head weights) and every explicit softmax over the keys inside a module named like
    attention (timm's non-fused path, Hugging Face's eager path); skipped when none runs.
    A layer fails as collapsed when, in every head, the queries of a sample put at least
    ``collapse`` of their attention on one key token (a mask or bias bug that leaves one token
    visible). ``uniform`` (off by default: randomly initialized attention is itself near-uniform,
    entropy about 0.99 of ``log n``) fails layers whose every head's normalized entropy reaches
    it, for trained models. ``plot=True`` saves a PNG in the temporary directory (a path saves
    it there; False none): per layer and head the query x key weights averaged over the batch,
    and for a patch grid (a convolution with kernel == stride on input ``input_index``) the
    attention of the first token (CLS), or of the grid's centre, over the grid (3D: depth
    slices); ``metrics["plot"]`` names it for the HTML report.

    >>> import torch
    >>> enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32,
    ...     batch_first=True), 2, enable_nested_tensor=False)
    >>> r = attention_maps(plot=False, model=enc, batch=torch.randn(2, 6, 16))
    >>> r.passed, r.metrics["attention_layers"]
    (True, 2)
    """
    from ..core.attention import MAX_WEIGHTS, capture_attention, save_attention_maps

    work, data = subject.model_copy("eval"), subject.batch_copy()
    too_long: list = []
    maps = capture_attention(work, data, skipped=too_long)
    if not maps and too_long:
        raise SkipCheck(f"every attention call has more than {MAX_WEIGHTS} weights per sample"
                        f" (heads x queries x keys), too many to record ('{too_long[0]}'); use a"
                        " batch with shorter sequences")
    if not maps:
        raise SkipCheck("no attention ran: no F.scaled_dot_product_attention, no"
                        " nn.MultiheadAttention and no softmax over the keys inside a module"
                        " named like attention")
    grid, extra = _token_grid(work, data, input_index, maps)
    collapsed = [m for m in maps if collapse is not None and m.collapsed(collapse)]
    flat = [m for m in maps if uniform is not None and m.uniform(uniform)]
    details = [f"{len(maps)} attention calls" + (f" over a {'x'.join(map(str, grid))} patch grid"
                                                 f" + {extra} extra tokens" if grid else "")]
    details += [_row(m) for m in maps]
    if too_long:
        details.append(f"not recorded (over {MAX_WEIGHTS} weights per sample): "
                       + ", ".join(too_long))
    metrics: dict = {"attention_layers": len(maps), "layers": [_layer_facts(m) for m in maps],
                     "collapsed": [m.layer for m in collapsed], "uniform": [m.layer for m in flat],
                     "too_long": too_long}
    path = plot_path(plot, "attention_maps")
    if path is not None:
        saved = save_attention_maps(maps, path, grid=grid, extra=extra)
        if saved:
            metrics["plot"] = saved
            metrics["plot_title"] = "attention per layer and head (batch mean)"
            details.append(f"plot: {saved}")
    expected = f"expected no attention layer collapsed onto one token (share < {collapse})" \
        if collapse is not None else "expected attention maps"
    if uniform is not None:
        expected += f" nor uniform (entropy < {uniform} of log n)"
    if collapsed:
        more = f" (and {len(collapsed) - 1} more layers)" if len(collapsed) > 1 else ""
        details.append("remedy: look at the mask or bias added to the attention logits of that"
                       " layer (a mask leaving one key visible, a bias that dwarfs q.k)")
        return subject.failed(f"{expected}, observed {_collapse_text(collapsed[0], extra)}{more}",
                              details, metrics)
    if flat:
        m = flat[0]
        return subject.failed(f"{expected}, observed attention layer '{m.layer}' uniform: every"
                              f" head's entropy is {min(e for e in m.entropy if e is not None):.3f}"
                              " of log n or more (the queries do not discriminate between keys)",
                              details, metrics)
    top = max(max(m.top_share) for m in maps)
    ents = [e for e in (m.mean_entropy() for m in maps) if e is not None]
    ent = f", mean entropy {sum(ents) / len(ents):.3f} of uniform" if ents else ""
    return subject.passed(f"{expected}, observed {len(maps)} attention calls, top-token share at"
                          f" most {top:.3f}{ent}", details, metrics)
