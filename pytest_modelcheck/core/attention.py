"""The attention weights of every attention layer of a model, for one forward, and their PNG.

:func:`capture_attention` runs the model once under a ``TorchFunctionMode`` (torch's public
``torch.overrides`` mechanism) that sees three kinds of attention:

* ``F.scaled_dot_product_attention`` (fused kernels return no weights): the weights are
  recomputed from its ``q``, ``k`` arguments as ``softmax(q k^T * scale + mask)``, with
  ``attn_mask`` (boolean: True takes part; float: added), ``is_causal`` (top-left aligned),
  ``scale`` (default ``1/sqrt(E)``) and ``enable_gqa`` (key heads repeated);
* ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, ``nn.TransformerEncoder``): it
  is called with ``need_weights=True, average_attn_weights=False`` and the caller gets what it
  asked for (the fast path is not taken while a torch function mode is active);
* an explicit ``softmax`` over the last dim inside a module whose class or name says attention
  (``*Attention*``, ``*attn*``): timm's non-fused path, Hugging Face's eager path.

Each call becomes an :class:`AttentionMap`: the weights averaged over the batch ``(H, L, S)``,
and per head the share of the attention the most-attended key gets (per sample, averaged over
its queries) and the entropy normalized by ``log`` of the keys each query can see (1: uniform).
This module imports neither pytest nor, until called, torch or matplotlib.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from .trace import module_stack

#: Logits at or below this count as masked out (masks written as -1e4, -1e9, finfo.min, -inf).
MASKED_LOGIT = -5e3
_WORDS = ("attention", "attn")
#: The most attention weights of one sample (heads x queries x keys) a call may have to be
#: recorded (2**25 float32 weights: 128 MiB); longer sequences are listed as too large.
MAX_WEIGHTS = 2 ** 25


@dataclass
class AttentionMap:
    """The attention weights of one attention call, averaged over the batch, and per head the
    share of the most-attended key and the normalized entropy.

    >>> import torch
    >>> w = torch.zeros(2, 1, 3, 3)
    >>> w[..., 0] = 1.0                     # every query on key 0
    >>> acc = _Accumulator()
    >>> acc.add(w, torch.ones_like(w, dtype=torch.bool))
    >>> m = acc.result("blocks.0.attn", "softmax")
    >>> m.top_share, m.top_token, m.entropy, m.collapsed(0.9)
    ([1.0], [0], [0.0], True)
    """

    layer: str
    kind: str
    mean: Any  # (H, L, S) float32 tensor on the CPU
    top_share: list = field(default_factory=list)
    top_token: list = field(default_factory=list)
    entropy: list = field(default_factory=list)  # None for a head with no query seeing 2+ keys

    @property
    def heads(self) -> int:
        return int(self.mean.shape[0])

    @property
    def queries(self) -> int:
        return int(self.mean.shape[1])

    @property
    def keys(self) -> int:
        return int(self.mean.shape[2])

    def judged(self) -> bool:
        """Collapse is judged with 2+ queries and 2+ keys (a pooling query or a single key is
        not a pattern)."""
        return self.queries >= 2 and self.keys >= 2

    def collapsed(self, threshold: float) -> bool:
        """Every head puts at least ``threshold`` of its queries' attention on one key."""
        return self.judged() and bool(self.top_share) and min(self.top_share) >= threshold

    def uniform(self, threshold: float) -> bool:
        """Every head's normalized entropy is at least ``threshold`` (1 is uniform)."""
        return bool(self.entropy) and all(e is not None and e >= threshold for e in self.entropy)

    def mean_entropy(self) -> Optional[float]:
        known = [e for e in self.entropy if e is not None]
        return sum(known) / len(known) if known else None


class _Accumulator:
    """Sums of one call's weights chunk by chunk (chunks of samples), so a long sequence never
    needs the whole ``(B, H, L, S)`` tensor at once."""

    def __init__(self) -> None:
        self.total: Any = None
        self.count = 0
        self.shares: list = []  # (n, H) chunks
        self.tokens: list = []
        self.ent_sum: Any = None
        self.ent_n: Any = None

    def add(self, w: Any, visible: Any) -> None:
        """``w`` ``(n, H, L, S)`` weights, ``visible`` the keys each query can see (same)."""
        import torch

        w = w.detach().float().nan_to_num(0.0)
        visible = visible.expand_as(w)
        total = w.sum(0)
        self.total = total if self.total is None else self.total + total
        self.count += w.shape[0]
        share, token = w.mean(dim=-2).max(dim=-1)  # (n, H)
        self.shares.append(share)
        self.tokens.append(token)
        ent = -(w * torch.log(w.clamp_min(1e-30))).sum(-1)  # (n, H, L)
        nvis = visible.sum(-1)
        ok = nvis >= 2
        norm = torch.where(ok, ent / torch.log(nvis.clamp_min(2).double()).float(),
                           torch.zeros_like(ent))
        s, n = norm.sum(dim=(0, 2)), ok.sum(dim=(0, 2))
        self.ent_sum = s if self.ent_sum is None else self.ent_sum + s
        self.ent_n = n if self.ent_n is None else self.ent_n + n

    def result(self, layer: str, kind: str) -> AttentionMap:
        import torch

        share = torch.cat(self.shares).mean(0)
        token = torch.cat(self.tokens).mode(dim=0).values
        entropy = [float(s / n) if int(n) else None for s, n in zip(self.ent_sum, self.ent_n)]
        return AttentionMap(layer, kind, (self.total / self.count).cpu(),
                            [round(float(v), 6) for v in share], [int(v) for v in token],
                            [None if e is None else round(e, 6) for e in entropy])


def _as_4d(t: Any) -> Any:
    """``(..., L, S)`` as ``(N, H, L, S)``: 2D is one head of one sample, 3D one head per
    sample, more dims fold into the samples."""
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[:, None]
    return t.reshape(-1, *t.shape[-3:])


def sdpa_weights(q: Any, k: Any, attn_mask: Any = None, is_causal: bool = False,
                 scale: Optional[float] = None, enable_gqa: bool = False) -> tuple:
    """``(weights, visible)`` of ``F.scaled_dot_product_attention(q, k, v, ...)``: the softmax
    it computes, in float32, and the keys each query can see (mask and causality).

    >>> import torch
    >>> q = k = torch.randn(1, 2, 4, 8)
    >>> w, vis = sdpa_weights(q, k, is_causal=True)
    >>> tuple(w.shape), bool(torch.allclose(w.sum(-1), torch.ones(1, 2, 4))), float(w[0, 0, 0, 1])
    ((1, 2, 4, 4), True, 0.0)
    """
    import torch

    q, k = q.detach().float(), k.detach().float()
    if enable_gqa and q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    factor = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    logits = (q @ k.transpose(-2, -1)) * factor
    length, keys = logits.shape[-2], logits.shape[-1]
    visible = torch.ones(length, keys, dtype=torch.bool, device=logits.device)
    if is_causal:
        visible = visible.tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            logits = logits + attn_mask.detach().float()
    visible = visible & (logits > MASKED_LOGIT)
    weights = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    return weights, visible.expand_as(weights)


def _chunks(q: Any, k: Any, mask: Any) -> Iterator[tuple]:
    """``(q, k, mask)`` one sample at a time (dim 0) where q has a batch dim."""
    if q.dim() < 4 or q.shape[0] == 1:
        yield q, k, mask
        return
    for i in range(q.shape[0]):
        kk = k[i:i + 1] if k.dim() == q.dim() and k.shape[0] == q.shape[0] else k
        mm = mask
        if mask is not None and mask.dim() == q.dim() and mask.shape[0] == q.shape[0]:
            mm = mask[i:i + 1]
        yield q[i:i + 1], kk, mm


def _attention_owner(stack: list, modules: dict) -> bool:
    for name in stack:
        mod = modules.get(name)
        words = (type(mod).__name__.lower(), name.rsplit(".", 1)[-1].lower())
        if any(w in text for w in _WORDS for text in words):
            return True
    return False


def _sdpa_call(args: tuple, kwargs: dict) -> tuple:
    import inspect

    import torch.nn.functional as F

    try:
        bound = inspect.signature(F.scaled_dot_product_attention).bind(*args, **kwargs)
        a = bound.arguments
    except (TypeError, ValueError):  # a builtin without a signature: positional order
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                 "enable_gqa")
        a = {**dict(zip(names, args)), **kwargs}
    return (a.get("query"), a.get("key"), a.get("attn_mask"), bool(a.get("is_causal", False)),
            a.get("scale"), bool(a.get("enable_gqa", False)))


def _record_sdpa(acc: _Accumulator, args: tuple, kwargs: dict) -> None:
    q, k, mask, causal, scale, gqa = _sdpa_call(args, kwargs)
    for qq, kk, mm in _chunks(q, k, mask):
        w, vis = sdpa_weights(qq, kk, mm, causal, scale, gqa)
        acc.add(_as_4d(w), _as_4d(vis))


def _mha(func: Any, args: tuple, kwargs: dict, acc: _Accumulator) -> Any:
    """``F.multi_head_attention_forward`` run with per-head weights kept; the caller gets what
    it asked for."""
    import inspect

    bound = inspect.signature(func).bind(*args, **kwargs)
    q, k = bound.arguments["query"], bound.arguments["key"]  # (L, B, E) or unbatched (L, E)
    if int(q.shape[0]) * int(k.shape[0]) * int(bound.arguments["num_heads"]) > MAX_WEIGHTS:
        return func(*args, **kwargs)  # too long to record
    want = bound.arguments.get("need_weights", True)
    average = bound.arguments.get("average_attn_weights", True)
    bound.arguments["need_weights"] = True
    bound.arguments["average_attn_weights"] = False
    out, weights = func(*bound.args, **bound.kwargs)
    acc.add(_as_4d(weights), _as_4d(weights > 0))
    if not want:
        return out, None
    return out, (weights.mean(dim=-3) if average else weights)


def _per_sample(q: Any, k: Any) -> int:
    """Weights per sample of an attention with queries ``q`` and keys ``k``: heads x L x S."""
    heads = int(q.shape[-3]) if q.dim() >= 4 else 1
    return heads * int(q.shape[-2]) * int(k.shape[-2])


def capture_attention(model: Any, batch: Any, skipped: Optional[list] = None) -> list:
    """Run ``model`` on ``batch`` (a ``Batch``) once under ``no_grad`` and return one
    :class:`AttentionMap` per attention call, in call order, named by the innermost module
    that ran it (``"blocks.0.attn"``; a second call of one module gets ``" (call 2)"``).

    The model runs as it is (put it in eval mode first to switch dropout off). A call with more
    than ``MAX_WEIGHTS`` weights per sample is not recorded; its name is appended to
    ``skipped`` when given.

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32,
    ...     batch_first=True), 2, enable_nested_tensor=False).eval()
    >>> maps = capture_attention(enc, Batch.from_user(torch.randn(3, 5, 16)))
    >>> [(m.layer, m.kind, m.heads, m.queries, m.keys) for m in maps]
    [('layers.0.self_attn', 'MultiheadAttention', 2, 5, 5), ('layers.1.self_attn', 'MultiheadAttention', 2, 5, 5)]
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    from .forward import run_forward

    softmaxes = {F.softmax, torch.softmax, torch.Tensor.softmax}
    modules = dict(model.named_modules())
    maps: list = []
    calls: dict = {}

    def new(stack: list) -> tuple:
        where = stack[-1] if stack and stack[-1] else type(model).__name__
        calls[where] = calls.get(where, 0) + 1
        return _Accumulator(), where + (f" (call {calls[where]})" if calls[where] > 1 else "")

    class Capture(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                q, k = _sdpa_call(args, kwargs)[:2]
                acc, name = new(stack)
                if _per_sample(q, k) > MAX_WEIGHTS:
                    (skipped if skipped is not None else []).append(name)
                else:
                    _record_sdpa(acc, args, kwargs)
                    maps.append(acc.result(name, "scaled_dot_product_attention"))
            elif func is F.multi_head_attention_forward:
                acc, name = new(stack)
                out = _mha(func, args, kwargs, acc)
                if acc.count:
                    maps.append(acc.result(name, "MultiheadAttention"))
                else:
                    (skipped if skipped is not None else []).append(name)
                return out
            elif func in softmaxes and _attention_owner(stack, modules):
                out = func(*args, **kwargs)
                dim = args[1] if len(args) > 1 else kwargs.get("dim")
                x = args[0]
                if not (isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-1] >= 2
                        and dim in (-1, x.dim() - 1)):
                    return out
                acc, name = new(stack)
                if (x.numel() // x.shape[0] if x.dim() >= 3 else x.numel()) > MAX_WEIGHTS:
                    (skipped if skipped is not None else []).append(name)
                else:
                    acc.add(_as_4d(out), _as_4d(x.detach() > MASKED_LOGIT))
                    maps.append(acc.result(name, "softmax"))
                return out
            return func(*args, **kwargs)

    with module_stack(model) as stack, torch.no_grad(), Capture():
        run_forward(model, batch)
    return maps


def _grid_image(row: Any, grid: tuple) -> Any:
    """A query's attention over the token grid as a 2D image: a 2D grid as it is, a 1D grid as
    a strip, a 3D grid as up to 4 evenly spaced depth slices side by side."""
    import numpy as np

    a = np.asarray(row, dtype=float).reshape(grid)
    if a.ndim == 1:
        return a[None, :]
    if a.ndim == 2:
        return a
    depth = a.shape[0]
    picks = sorted({round(i * (depth - 1) / 3) for i in range(4)}) if depth > 1 else [0]
    pad = np.full((a.shape[1], 1), np.nan)
    parts: list = []
    for i in picks:
        parts += [a[i], pad]
    return np.concatenate(parts[:-1], axis=1)


def save_attention_maps(maps: list, path: Any, *, grid: Optional[tuple] = None, extra: int = 0,
                        max_layers: int = 12, max_heads: int = 6) -> Optional[str]:
    """Save one PNG of the attention maps: a row per layer, a panel per head (the ``L x S``
    weights averaged over the batch); with ``grid`` (the patch grid) and ``extra`` leading
    non-patch tokens (CLS), more panels per head show the attention of one query (the first
    token, or the grid's centre without extra tokens) over the token grid (3D: depth slices).
    Returns the path, or None without matplotlib.

    >>> import os, tempfile, torch
    >>> m = AttentionMap("attn", "softmax", torch.softmax(torch.randn(2, 5, 5), -1))
    >>> p = save_attention_maps([m], os.path.join(tempfile.mkdtemp(), "a.png"), grid=(2, 2),
    ...                         extra=1)
    >>> with open(p, "rb") as f:
    ...     f.read(4) == b"\\x89PNG"
    True
    """
    from .plots import _figure

    shown = maps if len(maps) <= max_layers else [
        maps[round(i * (len(maps) - 1) / (max_layers - 1))] for i in range(max_layers)]
    heads = min(max(m.heads for m in shown), max_heads)
    fits = grid is not None and all(m.keys == math.prod(grid) + extra for m in shown)
    cols = heads * (2 if fits else 1)
    fig = _figure(1.9 * cols + 0.5, 1.9 * len(shown) + 0.6)
    if fig is None:
        return None
    query = 0 if extra else (math.prod(grid) // 2 if grid else 0)
    for r, m in enumerate(shown):
        for h in range(min(m.heads, heads)):
            ax = fig.add_subplot(len(shown), cols, r * cols + h + 1)
            ax.imshow(m.mean[h].numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
            ax.set_title(f"{m.layer} h{h}", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            if fits and grid is not None:
                q = min(query, m.queries - 1)
                ax2 = fig.add_subplot(len(shown), cols, r * cols + heads + h + 1)
                ax2.imshow(_grid_image(m.mean[h, q, extra:].numpy(), grid), cmap="magma",
                           interpolation="nearest")
                ax2.set_title(f"h{h} query {q} over grid", fontsize=6)
                ax2.set_xticks([])
                ax2.set_yticks([])
    what = "query x key weights per head (batch mean)"
    if fits:
        what += "; right: one query over the token grid" + (" (depth slices)" if grid and len(grid) == 3
                                                             else "")
    fig.suptitle(what, fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), format="png", dpi=80)
    return str(path)
