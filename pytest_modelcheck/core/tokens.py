"""Token inputs: which integer inputs are token ids (and their vocabulary) or attention masks,
and how to change them without leaving the set of inputs the model was built for.

A language model takes integer inputs only, so checks that differentiate or fuzz floating
inputs have nothing to work on. :func:`token_inputs` finds, among a batch's integer (and bool)
input tensors with a batch dimension:

* **token ids**: tensors looked up in an embedding table (``aten.embedding`` /
  ``aten.embedding_bag``, recorded with a dispatch mode during one forward); their bound is the
  table's number of rows. Integer inputs that are not looked up anywhere and are not masks are
  left alone (class indices, lengths, positions: changing them could change shapes).
* **attention masks**: integer or bool tensors, not looked up, whose values are all 0/1. The
  attended value is the one most of the example's entries hold (``1`` for Hugging Face masks,
  ``False`` for ``key_padding_mask`` style masks); the padding side (``"right"``: every row a
  run of attended tokens then padding, ``"left"``: the reverse, ``"any"`` otherwise) is read
  from the example. Masks are only ever changed into masks of the same layout with at least one
  attended token per row: an all-padding row never occurs in real data (there is nothing to
  encode), so a model that divides by the number of attended tokens is not faulted for it.

Targets (keys ``labels``, ``targets``, ...) are never treated as inputs to change.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from .batch import TARGET_KEYS


@dataclass
class TokenInput:
    """One integer input that can be changed: ``kind`` is ``"ids"`` or ``"mask"``."""

    index: int            # position in ``Batch.input_tensors()``
    path: str
    kind: str
    low: int = 0          # ids: smallest id to draw
    high: int = 1         # ids: one past the largest id (the vocabulary size when known)
    vocab_source: str = ""  # "embedding" or "max id + 1"
    attended: int = 1     # masks: the value that means "attend"
    layout: str = "right"  # masks: "right", "left" or "any"

    def describe(self) -> str:
        if self.kind == "ids":
            return (f"{self.path} token ids in [{self.low}, {self.high})"
                    f" ({'vocabulary of the embedding' if self.vocab_source == 'embedding' else 'max id + 1'})")
        return f"{self.path} attention mask ({self.layout} padding, attended = {self.attended})"


def is_target_path(path: str) -> bool:
    """Whether an input path names a target (``input['labels']``, ``input[0]['y']``).

    >>> is_target_path("input['labels']"), is_target_path("input['input_ids']")
    (True, False)
    """
    keys = re.findall(r"\[([^\]]+)\]", path)
    return bool(keys) and keys[-1].strip("'\"") in TARGET_KEYS


def _embedding_bounds(model: Any, batch: Any) -> dict:
    """{storage pointer: number of embedding rows} for the tensors looked up in an embedding."""
    import torch
    from ._torch_compat import dispatch_mode_base

    from .forward import run_forward

    bounds: dict = {}

    class Recorder(dispatch_mode_base()):  # type: ignore[misc]
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
            if name in ("embedding", "embedding_bag", "_embedding_bag", "_embedding_bag_forward_only"):
                weight, idx = args[0], args[1]
                if isinstance(idx, torch.Tensor) and isinstance(weight, torch.Tensor):
                    try:
                        key = idx.untyped_storage().data_ptr()
                    except RuntimeError:
                        key = None
                    if key is not None:
                        bounds[key] = min(bounds.get(key, 1 << 62), int(weight.shape[0]))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Recorder():
        run_forward(model, batch)
    return bounds


def embedding_vocab(model: Any, batch: Any, tensor: Any) -> Optional[int]:
    """Rows of the smallest embedding that ``tensor`` (one of ``batch``'s inputs) is looked up
    in during one forward of ``model`` (no grad; pass copies), else None.

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> ids = torch.tensor([[3, 1, 4]])
    >>> embedding_vocab(torch.nn.Embedding(10, 2), Batch(args=(ids,)), ids)
    10
    """
    try:
        key = tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return None
    return _embedding_bounds(model, batch).get(key)


def token_inputs(model: Any, batch: Any, n: Optional[int] = None) -> list:
    """The token ids and attention masks among ``batch``'s inputs (see the module doc).

    ``model`` is run once (no grad) to see which inputs are looked up in an embedding; pass a
    copy. Only tensors whose first dimension is the batch size ``n`` are considered.

    >>> import torch
    >>> class LM(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb = torch.nn.Embedding(50, 4)
    ...     def forward(self, ids, mask):
    ...         return self.emb(ids) * mask[..., None]
    >>> from pytest_modelcheck.core.batch import Batch
    >>> b = Batch(args=(torch.tensor([[5, 7, 9], [1, 2, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])))
    >>> [t.describe() for t in token_inputs(LM(), b)]
    ['input[0] token ids in [0, 50) (vocabulary of the embedding)', 'input[1] attention mask (right padding, attended = 1)']
    """
    import torch

    n = batch.batch_size if n is None else n
    target = getattr(batch, "target_path", None)
    candidates = [(i, p, t) for i, (p, t) in enumerate(batch.input_tensors())
                  if not (t.is_floating_point() or t.is_complex()) and t.dim() > 0
                  and t.shape[0] == n and t.numel() and not is_target_path(p) and p != target]
    if not candidates:
        return []
    bounds = _embedding_bounds(model, batch)
    found = []
    for i, path, t in candidates:
        try:
            key = t.untyped_storage().data_ptr()
        except RuntimeError:
            key = None
        v = t.detach().long()
        if key in bounds:
            found.append(TokenInput(i, path, "ids", 0, bounds[key], "embedding"))
            continue
        values = set(torch.unique(v).tolist())
        if values <= {0, 1} and t.dim() >= 2:
            ones = int(v.sum())
            attended = 1 if 2 * ones >= v.numel() else 0
            found.append(TokenInput(i, path, "mask", attended=attended,
                                    layout=_layout(v.reshape(v.shape[0], -1) == attended)))
        elif "id" in path.lower() and int(v.min()) >= 0:
            found.append(TokenInput(i, path, "ids", 0, int(v.max()) + 1, "max id + 1"))
    return found


def _layout(att: Any) -> str:
    """'right' when every row is attended tokens then padding, 'left' for the reverse, else 'any'."""
    right = left = True
    for row in att.tolist():
        k = sum(row)
        right = right and row == [True] * k + [False] * (len(row) - k)
        left = left and row == [False] * (len(row) - k) + [True] * k
    return "right" if right else "left" if left else "any"


def mask_from_counts(spec: TokenInput, like: Any, counts: Any, gen: Any) -> Any:
    """A mask shaped like ``like`` with ``counts[r]`` (>= 1) attended tokens in row ``r``,
    placed as the example's layout places them (random positions for 'any')."""
    import torch

    rows = like.reshape(like.shape[0], -1)
    width = rows.shape[1]
    pos = torch.arange(width).expand(rows.shape[0], width)
    counts = counts.clamp(1, width)[:, None]
    if spec.layout == "right":
        att = pos < counts
    elif spec.layout == "left":
        att = pos >= width - counts
    else:
        order = torch.rand(rows.shape, generator=gen).argsort(dim=1).argsort(dim=1)
        att = order < counts
    out = torch.where(att, spec.attended, 1 - spec.attended)
    return out.reshape(like.shape).to(dtype=like.dtype, device=like.device)


def perturb_rows(spec: TokenInput, t: Any, rows: list, gen: Any) -> Any:
    """A copy of ``t`` whose listed rows hold other legal values (every id changes; a mask row
    gets another number of attended tokens, at least one)."""
    import torch

    out = t.detach().clone()
    if not rows:
        return out
    idx = torch.tensor(rows, dtype=torch.long)
    if spec.kind == "ids":
        span = spec.high - spec.low
        if span < 2:
            return out
        cur = out.index_select(0, idx.to(out.device)).long().cpu() - spec.low
        shift = torch.randint(1, span, cur.shape, generator=gen)
        new = (cur + shift) % span + spec.low
        out[idx.to(out.device)] = new.to(out.dtype).to(out.device)
        return out
    sub = out.index_select(0, idx.to(out.device)).cpu()
    flat = sub.reshape(sub.shape[0], -1)
    width = flat.shape[1]
    have = (flat.long() == spec.attended).sum(1)
    if width < 2:
        return out
    want = (have - 1 + torch.randint(1, width, have.shape, generator=gen)) % width + 1
    new = mask_from_counts(spec, sub, want, gen)
    out[idx.to(out.device)] = new.to(out.device)
    return out


def fuzz_tokens(spec: TokenInput, like: Any, kind: str, gen: Any) -> Any:
    """Legal values for a fuzzed token input of edge case ``kind`` (``operator_stable``'s kinds).

    Ids: uniform over the vocabulary (``random``, ``tiny``), the smallest id (``zeros``,
    ``low_edge``), the largest (``huge``, ``high_edge``), one id everywhere (``constant``), one
    id per row (``constant_rows``). Masks: one attended token per row (``zeros``, ``tiny``,
    ``low_edge``), all attended (``constant``, ``huge``, ``high_edge``), a random number per row
    (``random``, ``constant_rows``); never an all-padding row.
    """
    import torch

    shape = like.shape
    if spec.kind == "ids":
        lo, hi = spec.low, spec.high
        if kind in ("random", "tiny"):
            v = torch.randint(lo, hi, tuple(shape), generator=gen)
        elif kind in ("zeros", "low_edge"):
            v = torch.full(tuple(shape), lo)
        elif kind in ("huge", "high_edge"):
            v = torch.full(tuple(shape), hi - 1)
        elif kind == "constant":
            v = torch.full(tuple(shape), int(torch.randint(lo, hi, (), generator=gen)))
        else:  # constant_rows
            v = torch.randint(lo, hi, (shape[0],) + (1,) * (len(shape) - 1),
                              generator=gen).expand(shape).clone()
        return v.to(dtype=like.dtype, device=like.device)
    rows = shape[0]
    width = like.reshape(rows, -1).shape[1]
    if kind in ("zeros", "tiny", "low_edge"):
        counts = torch.ones(rows, dtype=torch.long)
    elif kind in ("constant", "huge", "high_edge"):
        counts = torch.full((rows,), width, dtype=torch.long)
    else:
        counts = torch.randint(1, width + 1, (rows,), generator=gen)
    return mask_from_counts(spec, like, counts, gen)
