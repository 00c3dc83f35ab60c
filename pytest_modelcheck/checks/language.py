"""Language models: causal, kv_cache_consistent and tied_parameters.

* ``causal(dim)``: the output at position t does not depend on inputs after t. The input is
  altered at positions >= s (token ids replaced by other ids of the vocabulary, float inputs
  given noise) for a few boundaries s; the outputs at positions < s must not change. A leak is
  named by the first output position that changed and the smallest offset k at which it sees
  the input t + k.
* ``kv_cache_consistent(steps)``: decoding one token at a time with the model's cache gives the
  full forward's logits. Hugging Face models are driven natively (``use_cache=True``, the cache
  of one call passed to the next); any other model through ``step_fn(model, tokens, cache) ->
  (logits, cache)``.
* ``tied_parameters(tied)``: declared tied parameters (an embedding and the output head) are one
  tensor as built, after ``.to(device)``, after an optimizer step and after a ``state_dict``
  save and load into a fresh copy.

The input altered or decoded is named by ``input_index`` (int: positional, str: key of the dict
argument or keyword such as ``"input_ids"``); ``None`` picks the first positional tensor, else
``input_ids``, else the first tensor keyword. The prediction compared is the forward's primary
output (a tensor, the ``logits`` of a ``ModelOutput``...).

This module imports neither torch nor pytest at import time.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from ..core.errors import ModelError, UsageError
from ..core.result import CheckResult
from ..core.units import is_int
from .invariance import _compare, _get, _ref_text, _replaced, _tolerances
from .registry import SkipCheck, check
from .subject import Subject

TOKEN_KEYS = ("input_ids", "inputs_embeds", "tokens", "ids", "x")
MASK_KEYS = ("attention_mask",)
CACHE_ARGS = ("cache", "past_key_values")   # transformers 5 names it ``cache``, 4.x the other
LEAK_PROBES = 64   # at most this many single-position probes to measure a leak's offset


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------
def _input_ref(value: Any, arg: str = "input_index") -> Any:
    if value is None or is_int(value) or (isinstance(value, str) and value):
        return value
    raise UsageError(f"{arg}={value!r}: expected None (the first positional tensor, else"
                     " input_ids), a positional input index (int) or an input key (str) such as"
                     " 'input_ids'")


def _pick_input(batch: Any, ref: Any) -> tuple:
    """``(ref, tensor)`` of the input to alter or decode (``ref`` None: found automatically)."""
    import torch

    if ref is not None:
        return ref, _get(batch, ref)
    if batch.args and isinstance(batch.args[0], torch.Tensor):
        return 0, batch.args[0]
    pool = batch.args[0] if batch.args and isinstance(batch.args[0], dict) else batch.kwargs
    tensors = [k for k, v in pool.items() if isinstance(v, torch.Tensor)]
    for key in TOKEN_KEYS:
        if key in tensors:
            return key, pool[key]
    if tensors:
        return tensors[0], pool[tensors[0]]
    raise UsageError("input_index=None: the batch holds no input tensor; name the token input"
                     " with input_index")


def _time_size(t: Any, dim: int, ref: Any) -> int:
    if not -t.dim() <= dim < t.dim():
        raise UsageError(f"dim={dim}: {_ref_text(ref)} has shape {list(t.shape)}, no dim {dim}")
    return int(t.shape[dim])


def _prediction(out: Any) -> Any:
    from ..core.outputs import primary_output

    pred = primary_output(out)
    if pred is None:
        raise ModelError("the forward's output holds no prediction tensor")
    return pred


def _positions_diff(a: Any, b: Any, dim: int) -> Any:
    """Max |a - b| per position along ``dim`` (NaN where exactly one side is NaN counts inf)."""
    import torch

    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).abs()
    diff = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=float("inf"))
    d = dim % a.dim()
    return diff.movedim(d, 0).reshape(a.shape[d], -1).amax(dim=1)


def _bad_positions(a: Any, b: Any, dim: int, atol: float, rtol: float) -> list:
    """Positions along ``dim`` where ``b`` is off ``a`` by more than ``atol + rtol * |a|``."""
    import torch

    a, b = a.detach().double(), b.detach().double()
    diff = torch.nan_to_num((a - b).abs(), nan=float("inf"))
    diff = torch.where(torch.isnan(a) & torch.isnan(b), torch.zeros_like(diff), diff)
    bad = diff > atol + rtol * a.abs().nan_to_num(0.0)
    d = dim % a.dim()
    per_position = bad.movedim(d, 0).reshape(a.shape[d], -1).any(dim=1)
    return [int(i) for i in per_position.nonzero().flatten()]


# --------------------------------------------------------------------------------------------
# causal
# --------------------------------------------------------------------------------------------
def _validate_causal(dim: Any = 1, input_index: Any = None, positions: Any = None,
                     vocab_size: Any = None, atol: Any = 1e-5, rtol: Any = 1e-4) -> dict:
    if not is_int(dim):
        raise UsageError(f"dim={dim!r}: expected an int, the time (sequence) dimension of the"
                         " input and the output, such as 1 for (batch, time, ...)")
    if positions is not None:
        items = tuple(positions) if isinstance(positions, (list, tuple)) else (positions,)
        if not items or not all(is_int(p) and p >= 1 for p in items):
            raise UsageError(f"positions={positions!r}: expected None or a list of ints >= 1, the"
                             " boundaries s: inputs at positions >= s are altered")
        positions = tuple(sorted(set(items)))
    if vocab_size is not None and (not is_int(vocab_size) or vocab_size < 2):
        raise UsageError(f"vocab_size={vocab_size!r}: expected None (read from the nn.Embedding"
                         " the ids feed) or an int >= 2, the number of token ids")
    return {"dim": dim, "input_index": _input_ref(input_index), "positions": positions,
            "vocab_size": vocab_size, **_tolerances(atol, rtol)}


def _default_boundaries(n: int) -> tuple:
    """A few boundaries in ``1..n-1``: the first, quarter points and the last two."""
    return tuple(sorted({s for s in (1, n // 4, n // 2, (3 * n) // 4, n - 2, n - 1) if 1 <= s < n}))


def _embedding_vocab(work: Any, data: Any, ref: Any) -> Optional[int]:
    """``num_embeddings`` of the smallest ``nn.Embedding`` that the ids ``data[ref]`` feed."""
    from ..core.tokens import embedding_vocab

    data = data.clone()  # a forward that changes its inputs in place changes this copy
    return embedding_vocab(work, data, _get(data, ref))


def _alter(x: Any, dim: int, where: Any, vocab: Optional[int], gen: Any) -> Any:
    """``x`` with the positions ``where`` (bool over ``dim``) replaced by different values."""
    import torch

    shape = [1] * x.dim()
    shape[dim % x.dim()] = x.shape[dim]
    sel = where.to(x.device).reshape(shape).expand_as(x)
    if x.dtype == torch.bool:
        other = ~x
    elif x.is_floating_point() or x.is_complex():
        scale = max(float(x.detach().float().std()) if x.numel() > 1 else 1.0, 1.0)
        other = x + (torch.randn(x.shape, generator=gen) * scale).to(x.device, x.dtype)
    else:
        assert vocab is not None, "token ids are altered within a vocabulary"
        shift = torch.randint(1, vocab, x.shape, generator=gen).to(x.device, x.dtype)
        other = (x + shift) % vocab
    return torch.where(sel, other, x)


def _where_defined(mod: Any) -> str:
    """``file:line`` of a user module's forward (empty for torch's own modules)."""
    cls = type(mod)
    if cls.__module__.startswith("torch."):
        return ""
    try:
        lines = inspect.getsourcelines(cls.forward)
        return f" (forward at {inspect.getsourcefile(cls.forward)}:{lines[1]})"
    except (TypeError, OSError):
        return ""


def _first_leaking_module(work: Any, forward: Callable, x: Any, altered: Any, dim: int, s: int,
                          atol: float, rtol: float) -> str:
    """The first module to finish whose output at positions < ``s`` along ``dim`` changes when
    ``x`` becomes ``altered``: where the leak enters (its inputs there were still unchanged)."""
    import torch

    from ..core.outputs import primary_output

    def record(into: list) -> list:
        def hook(mod: Any, args: Any, out: Any, name: str) -> None:
            t = primary_output(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                into.append((name, mod, t.detach().clone()))
        return [m.register_forward_hook(lambda m_, a, o, n=n: hook(m_, a, o, n))
                for n, m in work.named_modules()]

    runs: list = [[], []]
    for inp, into in ((x, runs[0]), (altered, runs[1])):
        handles = record(into)
        try:
            forward(inp)
        finally:
            for h in handles:
                h.remove()
    for (name, mod, a), (_, _, b) in zip(*runs):
        if a.shape != b.shape or not -a.dim() <= dim < a.dim() or a.shape[dim] != x.shape[dim]:
            continue
        if _bad_positions(a.narrow(dim, 0, s), b.narrow(dim, 0, s), dim, atol, rtol):
            return f"{type(mod).__name__} '{name or '<root>'}'{_where_defined(mod)}"
    return ""


def _token_vocab(work: Any, data: Any, ref: Any, x: Any, vocab_size: Any) -> Optional[int]:
    """The number of token ids to draw replacements from (None for float or bool inputs)."""
    import torch

    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        return None
    vocab = vocab_size or _embedding_vocab(work, data, ref)
    if vocab is None:
        vocab = int(x.max()) + 1
    if vocab < 2 or int(x.min()) < 0 or int(x.max()) >= vocab:
        raise UsageError(f"{_ref_text(ref)}: cannot alter the token ids (ids in"
                         f" [{int(x.min())}, {int(x.max())}], vocabulary {vocab}); pass"
                         " vocab_size=")
    return vocab


@dataclass
class _Leak:
    """Output position ``t`` changed when inputs at positions >= ``s`` were altered; it sees the
    input ``t + k`` (``k`` None: not found among the probes)."""

    s: int
    t: int
    bad: list
    size: float
    k: Optional[int]
    culprit: str


@dataclass
class _Probe:
    """How the altered inputs are made and run: the prediction of ``forward(input)``."""

    forward: Callable
    x: Any
    dim: int
    vocab: Optional[int]
    atol: float
    rtol: float
    gen: Any = None

    def altered(self, where: Any) -> Any:
        return _alter(self.x, self.dim, where, self.vocab, self.gen)

    def changed(self, a: Any, b: Any) -> list:
        return _bad_positions(a, b, self.dim, self.atol, self.rtol)


def _leak_offset(probe: _Probe, base: Any, t: int, n: int) -> Optional[int]:
    """The smallest k for which altering only the input at ``t + k`` changes output ``t``."""
    import torch

    ar, dim = torch.arange(n), probe.dim
    for j in range(t + 1, min(n, t + 1 + LEAK_PROBES)):
        got = probe.forward(probe.altered(ar == j))
        if probe.changed(base.narrow(dim, t, 1), got.narrow(dim, t, 1)):
            return j - t
    return None


def _find_leak(work: Any, probe: _Probe, base: Any, boundaries: tuple, n: int) -> Optional[_Leak]:
    """The first boundary s whose altered future changes an output before s, or None."""
    import torch

    ar, dim = torch.arange(n), probe.dim
    for s in boundaries:
        altered = probe.altered(ar >= s)
        got = probe.forward(altered)
        a, b = base.narrow(dim, 0, s), got.narrow(dim, 0, s)
        bad = probe.changed(a, b)
        if not bad:
            continue
        t = bad[-1]
        size = float(_positions_diff(a, b, dim)[t])
        k = _leak_offset(probe, base, t, n)
        culprit = _first_leaking_module(work, probe.forward, probe.x, altered, dim, s, probe.atol,
                                        probe.rtol)
        return _Leak(s, t, bad, size, k, culprit)
    return None


CAUSAL_REMEDY = ("remedy: mask attention with an upper-triangular mask that excludes the future"
                 " (torch.triu(..., diagonal=1) set to -inf, or is_causal=True), pad convolutions on"
                 " the left only, and keep pooling and normalisation over time out of the"
                 " per-position path")


def _leak_result(subject: Subject, expected: str, leak: _Leak, metrics: dict) -> CheckResult:
    s, t, k = leak.s, leak.t, leak.k
    seen = (f"it sees position {t + k}, {k} ahead" if k is not None else
            f"it sees some position >= {s}, at least {s - t} ahead")
    if leak.culprit:
        metrics["module"] = leak.culprit.split(" (forward at")[0]
    metrics.update({"boundary": s, "position": t, "leak_offset": k if k is not None else s - t,
                    "max_diff": leak.size})
    bad = leak.bad
    details = ([f"first module whose output changed there: {leak.culprit}"] if leak.culprit else [])
    details += [f"positions changed below boundary {s}: {bad[:16]}{' ...' if len(bad) > 16 else ''}",
                CAUSAL_REMEDY]
    return subject.failed(f"{expected}, observed output position {t} changed when only inputs at"
                          f" positions >= {s} were altered: {seen} (max |diff| {leak.size:.2g})",
                          details, metrics)


@check(default=False, validate=_validate_causal)
def causal(dim: Any = 1, input_index: Any = None, positions: Any = None, vocab_size: Any = None,
           atol: Any = 1e-5, rtol: Any = 1e-4, *, subject: Subject) -> CheckResult:
    """The output at position t does not depend on inputs after t (along `dim`).

    For each boundary s (``positions``; by default 1, the quarter points and the last two), the
    input named by ``input_index`` is altered at positions >= s and the primary output (logits)
    must stay within ``atol + rtol * |output|`` at positions < s. Token ids are replaced by
    other ids below the vocabulary size (``vocab_size``, by default the ``nn.Embedding`` the ids
    feed, else the largest id + 1); float inputs get noise. A failure names the first output
    position that changed and the smallest offset k at which it sees the input t + k.

    >>> import torch
    >>> class Cumulative(torch.nn.Module):   # running mean: causal
    ...     def forward(self, x):
    ...         return x.cumsum(1) / torch.arange(1, x.shape[1] + 1).view(1, -1, 1)
    >>> causal(model=Cumulative(), batch=torch.randn(2, 6, 3)).passed
    True
    >>> class Centred(torch.nn.Module):      # subtracts the mean over all positions: leaks
    ...     def forward(self, x):
    ...         return x - x.mean(1, keepdim=True)
    >>> result = causal(model=Centred(), batch=torch.randn(2, 6, 3))
    >>> print(result.headline.split("observed ")[1].split(": ")[0])
    output position 0 changed when only inputs at positions >= 1 were altered
    >>> print(result.headline.split(": ")[-1].split(" (max")[0])
    it sees position 1, 1 ahead
    """
    import torch

    from ..core.forward import run_forward

    work, data = subject.model_copy("eval"), subject.batch_copy()
    ref, x = _pick_input(data, input_index)
    n = _time_size(x, dim, ref)
    if n < 2:
        raise UsageError(f"dim={dim}: {_ref_text(ref)} has {n} position(s) there; causality needs"
                         " at least 2")
    vocab = _token_vocab(work, data, ref, x, vocab_size)
    boundaries = positions or _default_boundaries(n)
    if boundaries[-1] >= n:
        raise UsageError(f"positions={list(positions)}: {_ref_text(ref)} has {n} positions along"
                         f" dim {dim}; boundaries must be in 1..{n - 1}")

    def forward(inp: Any) -> Any:  # fresh copies: a forward that changes its inputs in place
        with torch.no_grad():
            return _prediction(run_forward(work, _replaced(data.clone(), {ref: inp.clone()})))

    base = forward(x)
    if not -base.dim() <= dim < base.dim() or base.shape[dim] != n:
        raise UsageError(f"dim={dim}: the output has shape {list(base.shape)}, expected {n}"
                         f" positions along dim {dim} (one per input position)")
    noise = _compare(base, forward(x), atol, rtol)
    if noise["bad"]:
        return subject.failed("expected a deterministic forward in eval mode, observed two runs on"
                              f" the same input differ by {noise['max']:.3g}",
                              "causality is judged by comparing outputs; make the forward"
                              " deterministic in eval mode (no dropout or sampling)",
                              {"max_diff": noise["max"]})
    probe = _Probe(forward, x, dim, vocab, atol, rtol, torch.Generator().manual_seed(0))
    expected = (f"expected outputs at positions < s unchanged when {_ref_text(ref)} is altered"
                f" at positions >= s (dim {dim})")
    metrics: dict = {"positions": n, "boundaries": list(boundaries)}
    leak = _find_leak(work, probe, base, boundaries, n)
    if leak is not None:
        return _leak_result(subject, expected, leak, metrics)
    return subject.passed(f"{expected}, observed no change at {len(boundaries)} boundaries"
                          f" {list(boundaries)} of {n} positions", "", metrics)


# --------------------------------------------------------------------------------------------
# kv_cache_consistent
# --------------------------------------------------------------------------------------------
def _validate_kv(steps: Any = 4, prefix: Any = None, input_index: Any = None,
                 step_fn: Any = None, atol: Any = 1e-4, rtol: Any = 1e-4) -> dict:
    if not is_int(steps) or steps < 1:
        raise UsageError(f"steps={steps!r}: expected an int >= 1, the tokens decoded one at a"
                         " time after the prefix")
    if prefix is not None and (not is_int(prefix) or prefix < 1):
        raise UsageError(f"prefix={prefix!r}: expected None (all tokens but the last `steps`) or"
                         " an int >= 1, the tokens given in the first call")
    if step_fn is not None and not callable(step_fn):
        raise UsageError(f"step_fn={step_fn!r}: expected None (a Hugging Face model's own cache)"
                         " or a callable step_fn(model, tokens, cache) -> (logits, cache)")
    return {"steps": steps, "prefix": prefix, "input_index": _input_ref(input_index),
            "step_fn": step_fn, **_tolerances(atol, rtol)}


def _takes(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_arg(model: Any) -> Optional[str]:
    """The keyword a Hugging Face style forward takes its cache by, or None."""
    if not _takes(model, "use_cache"):
        return None
    return next((name for name in CACHE_ARGS if _takes(model, name)), None)


def _returned_cache(out: Any) -> Any:
    for name in CACHE_ARGS:
        value = out.get(name) if isinstance(out, dict) else getattr(out, name, None)
        if value is not None:
            return value
    return None


def _hf_stepper(work: Any, data: Any, ref: Any, x: Any, arg: str) -> Callable:
    """``step(start, stop, cache) -> (logits, cache)`` calling the model on positions
    ``start:stop`` with the cache of the previous call."""
    import torch

    from ..core.forward import run_forward

    b, n = x.shape[0], x.shape[1]
    pool = data.args[0] if data.args and isinstance(data.args[0], dict) else data.kwargs
    per_token = {k: v for k, v in pool.items() if k != ref and isinstance(v, torch.Tensor)
                 and v.dim() >= 2 and tuple(v.shape[:2]) == (b, n)}

    def step(start: int, stop: int, cache: Any) -> tuple:
        new = {ref: x[:, start:stop]}
        for k, v in per_token.items():
            new[k] = v[:, :stop] if k in MASK_KEYS else v[:, start:stop]
        call = _replaced(data, new)
        call.kwargs = dict(call.kwargs, use_cache=True)
        if cache is not None:
            call.kwargs[arg] = cache
        with torch.no_grad():
            out = run_forward(work, call)
        returned = _returned_cache(out)
        if returned is None:
            raise _NoCache()
        return _prediction(out), returned

    return step


def _without_labels(batch: Any) -> Any:
    """The batch without its ``labels`` keyword (or the target's key): decoding calls see a
    part of the tokens, and the logits are compared, not a loss."""
    from ..core.batch import Batch

    drop = {"labels", batch.target_key}
    kwargs = {k: v for k, v in batch.kwargs.items() if k not in drop}
    return Batch(args=batch.args, kwargs=kwargs, target=batch.target,
                 has_target=batch.has_target)


class _NoCache(Exception):
    pass


def _user_stepper(work: Any, x: Any, step_fn: Callable) -> Callable:
    import torch

    def step(start: int, stop: int, cache: Any) -> tuple:
        with torch.no_grad():
            got = step_fn(work, x[:, start:stop], cache)
        if not (isinstance(got, (tuple, list)) and len(got) == 2):
            raise UsageError(f"step_fn: returned {type(got).__name__}; expected (logits, cache)")
        logits = _prediction(got[0])
        return logits, got[1]

    return step


def _cache_route(model: Any, step_fn: Any) -> Optional[str]:
    """The keyword a Hugging Face model takes its cache by (None with a ``step_fn``); SkipCheck
    for a model with neither, or an encoder-decoder without a ``step_fn``."""
    arg = _cache_arg(model) if step_fn is None else None
    if step_fn is None and arg is None:
        raise SkipCheck(f"{type(model).__name__}.forward takes no use_cache and cache (or"
                        " past_key_values) arguments and no step_fn was given: pass"
                        " step_fn(model, tokens, cache) -> (logits, cache) to check its cache")
    if arg is not None and _takes(model, "decoder_input_ids"):
        raise SkipCheck(f"{type(model).__name__} is an encoder-decoder (its forward takes"
                        " decoder_input_ids): pass step_fn(model, tokens, cache) -> (logits, cache)"
                        " to check the decoder's cache")
    return arg


@dataclass
class _Decoded:
    """What incremental decoding gave: the largest |diff| seen, and the first problem: no cache
    returned, logits of another shape (``shape``: got, expected, start, stop), or logits off the
    full forward's at ``position`` in call ``call`` (0: the prefix)."""

    worst: float = 0.0
    no_cache: bool = False
    shape: Optional[tuple] = None
    call: int = 0
    position: Optional[int] = None
    diff: float = 0.0


def _decode(step: Callable, full: Any, calls: list, atol: float, rtol: float) -> _Decoded:
    """Run ``step(start, stop, cache)`` over ``calls``, comparing each call's logits with
    ``full[:, start:stop]``; stops at the first problem."""
    got = _Decoded()
    cache = None
    for k, (start, stop) in enumerate(calls):
        try:
            logits, cache = step(start, stop, cache)
        except _NoCache:
            got.no_cache = True
            return got
        if logits.dim() == full.dim() - 1 and stop - start == 1:
            logits = logits.unsqueeze(1)
        ref_logits = full[:, start:stop]
        if tuple(logits.shape) != tuple(ref_logits.shape):
            got.shape = (list(logits.shape), list(ref_logits.shape), start, stop)
            return got
        diffs = _positions_diff(ref_logits, logits, 1)
        got.worst = max(got.worst, float(diffs.max()))
        bad = _bad_positions(ref_logits, logits, 1, atol, rtol)
        if bad:
            got.call, got.position, got.diff = k, start + bad[0], float(diffs[bad[0]])
            return got
    return got


KV_REMEDY = ("remedy: the cached path must see exactly what the full forward sees: offset"
             " positions (position_ids, rotary angles) by the cache length, append each new"
             " key/value to the cache (not replace it), and mask the same past tokens")


def _decode_result(subject: Subject, expected: str, got: _Decoded, first: int, steps: int,
                   metrics: dict) -> CheckResult:
    if got.no_cache:
        return subject.failed(f"{expected}, observed no cache in the output of a call with"
                              " use_cache=True", "", metrics)
    if got.shape is not None:
        shape, want, start, stop = got.shape
        return subject.failed(f"{expected}, observed logits of shape {shape} for positions"
                              f" {start}..{stop - 1}, expected {want}", "", metrics)
    if got.position is not None:
        pos, k = got.position, got.call
        where = (f"position {pos} (in the prefix of {first} tokens)" if k == 0 else
                 f"position {pos} (decode step {k} of {steps})")
        metrics.update({"position": pos, "max_diff": got.diff})
        return subject.failed(
            f"{expected}, observed {where} off by max |diff| {got.diff:.3g}",
            KV_REMEDY + ("" if k else "; a prefix mismatch means the forward itself is not causal"),
            metrics)
    metrics["max_diff"] = got.worst
    return subject.passed(f"{expected}, observed equal logits at {first + steps} positions"
                          f" (max |diff| {got.worst:.2g})", "", metrics)


@check(default=False, validate=_validate_kv)
def kv_cache_consistent(steps: Any = 4, prefix: Any = None, input_index: Any = None,
                        step_fn: Any = None, atol: Any = 1e-4, rtol: Any = 1e-4, *,
                        subject: Subject) -> CheckResult:
    """Decoding one token at a time with the cache gives the full forward's logits.

    The tokens (``input_index``, shape (batch, time)) are split into a ``prefix`` (default: all
    but the last ``steps``) given in one call, then ``steps`` calls of one token each, every call
    getting the cache the previous one returned; each call's logits must equal the full
    forward's at the same positions within ``atol + rtol * |logits|`` (eval mode, no grad).

    A Hugging Face model (its forward takes ``use_cache`` and ``cache``/``past_key_values``) is
    driven natively: ``use_cache=True``, the cache from the previous output, the attention mask
    cut to the tokens seen so far, per-token inputs (``position_ids``...) cut to the call's
    tokens, the ``labels`` keyword dropped. Otherwise pass ``step_fn(model, tokens, cache) -> (logits,
    cache)``: ``tokens`` are the new tokens, (batch, n); ``cache`` is None on the first call and
    then whatever the previous call returned; ``logits`` are the new tokens', (batch, n, vocab).
    A model with neither is skipped, saying so.

    >>> import torch
    >>> class Bigram(torch.nn.Module):       # each position sees only its own token
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb = torch.nn.Embedding(10, 10)
    ...     def forward(self, ids):
    ...         return self.emb(ids)
    >>> def step(model, tokens, cache):       # a cache of the tokens seen so far
    ...     seen = tokens if cache is None else torch.cat([cache, tokens], 1)
    ...     return model(seen)[:, -tokens.shape[1]:], seen
    >>> ids = torch.randint(0, 10, (2, 7))
    >>> kv_cache_consistent(step_fn=step, model=Bigram(), batch=ids).passed
    True
    >>> kv_cache_consistent(model=Bigram(), batch=ids).status   # no cache and no step_fn
    'skipped'
    """
    import torch

    from ..core.forward import run_forward

    arg = _cache_route(subject.model, step_fn)
    work, data = subject.model_copy("eval"), subject.batch_copy()
    if step_fn is None:
        data = _without_labels(data)
    ref, x = _pick_input(data, input_index)
    if x.dim() < 2:
        raise UsageError(f"{_ref_text(ref)}: expected (batch, time) tokens, got shape"
                         f" {list(x.shape)}")
    n = int(x.shape[1])
    first = prefix if prefix is not None else n - min(steps, n - 1)
    if n < 2 or first + steps > n:
        raise UsageError(f"prefix={prefix!r}, steps={steps}: {_ref_text(ref)} has {n} tokens;"
                         " prefix + steps must be at most that, with a prefix >= 1")
    with torch.no_grad():
        full = _prediction(run_forward(work, data))
    if full.dim() < 2 or tuple(full.shape[:2]) != tuple(x.shape[:2]):
        raise UsageError(f"the output has shape {list(full.shape)}; expected (batch, time, ...)"
                         f" logits for the {list(x.shape[:2])} tokens")
    step = _user_stepper(work, x, step_fn) if arg is None else \
        _hf_stepper(work, data, ref, x, arg)
    how = "step_fn" if step_fn is not None else f"use_cache=True and {arg}="
    expected = (f"expected the logits of incremental decoding ({how}; a prefix of {first} tokens,"
                f" then {steps} single tokens) to equal the full forward's")
    calls = [(0, first)] + [(i, i + 1) for i in range(first, first + steps)]
    got = _decode(step, full, calls, atol, rtol)
    return _decode_result(subject, expected, got, first, steps,
                          {"prefix": first, "steps": steps, "tokens": n})


# --------------------------------------------------------------------------------------------
# tied_parameters
# --------------------------------------------------------------------------------------------
def _validate_tied(tied: Any, factory: Any = None) -> dict:
    example = "[('tok_emb.weight', 'head.weight')]"
    if isinstance(tied, tuple) and tied and all(isinstance(n, str) for n in tied):
        tied = [tied]
    if not isinstance(tied, (list, tuple)) or not tied:
        raise UsageError(f"tied={tied!r}: expected a list of tuples of parameter names that are"
                         f" one tensor, such as {example}")
    groups = []
    for group in tied:
        if not isinstance(group, (list, tuple)) or len(group) < 2 or not all(
                isinstance(n, str) and n for n in group) or len(set(group)) != len(group):
            raise UsageError(f"tied={tied!r}: {group!r} is not a tuple of two or more distinct"
                             f" parameter names; expected, for example, {example}")
        groups.append(tuple(group))
    if factory is not None and not callable(factory):
        raise UsageError(f"factory={factory!r}: expected None or a callable returning a fresh"
                         " instance of the model, such as build_model")
    return {"tied": tuple(groups), "factory": factory}


def _params(model: Any) -> dict:
    return dict(model.named_parameters(remove_duplicate=False))


def _check_names(model: Any, groups: tuple) -> None:
    import difflib

    names = _params(model)
    for group in groups:
        for name in group:
            if name not in names:
                close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
                hint = f"; close: {', '.join(close)}" if close else ""
                raise UsageError(f"tied: {name!r} is not a parameter of {type(model).__name__}"
                                 f" (named_parameters(remove_duplicate=False)){hint}")


def _untied(model: Any, group: tuple) -> Optional[str]:
    """Why the group is not one tensor in ``model`` (None when it is)."""
    names = _params(model)
    missing = [n for n in group if n not in names]
    if missing:
        return f"{missing[0]!r} is no longer a parameter"
    first = names[group[0]]
    for name in group[1:]:
        p = names[name]
        if p is first:
            continue
        same = (p.shape == first.shape and p.stride() == first.stride() and p.device == first.device
                and p.storage_offset() == first.storage_offset()
                and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr())
        if not same:
            if p.shape != first.shape:
                values = f"shapes {list(first.shape)} and {list(p.shape)}"
            else:
                d = float((p.detach().double() - first.detach().double()).abs().max()) \
                    if p.numel() else 0.0
                values = "equal values" if d == 0 else f"values differ by up to {d:.3g}"
            return f"{group[0]!r} and {name!r} are separate tensors ({values})"
    return None


def _trained_stage(work: Any, data: Any, loss: Any) -> str:
    """One Adam step (lr 1e-3) of ``work`` in train mode on ``loss`` (else the loss the model
    computes, else mean(output**2)); the stage's name."""
    from ..core.forward import run_forward
    from ..core.losses import resolve_loss, surrogate_loss
    from ..core.outputs import model_loss, primary_output
    from ..core.training import make_optimizer

    work.train()
    opt = make_optimizer("adam", work.parameters(), 1e-3)
    opt.zero_grad(set_to_none=True)
    out = run_forward(work, data)
    if loss is not None:
        total, _ = resolve_loss(loss, data, out).compute(out, data, work)
    else:
        total = model_loss(out)
        if total is None:
            total = surrogate_loss(primary_output(out))
    if total.requires_grad:
        total.backward()
        opt.step()
        return "after an optimizer step"
    return "after a forward (the loss needs no grad: no step taken)"


def _reloaded(work: Any, subject: Subject, factory: Any) -> Any:
    """A fresh instance (``factory()`` or a copy of the user's model) on the device, loaded with
    ``work``'s state_dict through ``torch.save``/``torch.load(weights_only=True)``."""
    import io

    import torch

    from ..core.batch import copy_model

    buffer = io.BytesIO()
    torch.save(work.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = factory() if factory is not None else copy_model(subject.model)
    fresh = fresh.to(subject.device)
    fresh.load_state_dict(state)
    return fresh


def _tied_stages(subject: Subject, factory: Any) -> Iterator[tuple]:
    """``(stage, model)`` for each stage, made only when the previous one was judged."""
    yield "as built", subject.model
    work = subject.model_copy()
    device = subject.device
    yield (f"after .to({str(device)!r})" if device is not None else "after .to()"), work
    yield _trained_stage(work, subject.batch_copy(), subject.loss), work
    yield "after a state_dict save and load into a fresh instance", _reloaded(work, subject, factory)


TIED_REMEDY = ("remedy: tie by assigning the same Parameter (self.head.weight = self.emb.weight)"
               " and keep it so: do not re-create or clone either module in load_state_dict, .to()"
               " or _apply, and re-tie after replacing one (Hugging Face: model.tie_weights())")


@check(default=False, validate=_validate_tied)
def tied_parameters(tied: Any, factory: Any = None, *, subject: Subject) -> CheckResult:
    """Declared tied parameters stay one tensor: as built, after .to(), a step and a reload.

    ``tied`` is a list of tuples of parameter names (as ``named_parameters(remove_duplicate=
    False)`` spells them) that must share one storage: as built; in a copy moved with
    ``.to(device)``; after one optimizer step (Adam, lr 1e-3) on that copy, with ``loss`` or the
    loss the model computes (else mean(output**2)); and after its ``state_dict`` goes through
    ``torch.save``/``torch.load(weights_only=True)`` into a fresh instance (``factory()``, or a
    deep copy of the model) with ``load_state_dict``. An unknown name is a usage error.

    >>> import torch
    >>> class TinyLM(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb = torch.nn.Embedding(10, 4)
    ...         self.head = torch.nn.Linear(4, 10, bias=False)
    ...         self.head.weight = self.emb.weight          # tied
    ...     def forward(self, ids):
    ...         return self.head(self.emb(ids))
    >>> ids = torch.randint(0, 10, (2, 5))
    >>> tied_parameters([("emb.weight", "head.weight")], model=TinyLM(), batch=ids).passed
    True
    """
    _check_names(subject.model, tied)
    pairs = "; ".join(" = ".join(g) for g in tied)
    expected = (f"expected {pairs} to be one tensor as built, after .to(), after an optimizer"
                " step and after a state_dict save and load into a fresh instance")
    metrics: dict = {"groups": len(tied)}
    for stage, work in _tied_stages(subject, factory):
        why = next((w for w in (_untied(work, group) for group in tied) if w is not None), None)
        if why is not None:
            metrics["stage"] = stage
            return subject.failed(f"{expected}, observed {why} {stage}", TIED_REMEDY, metrics)
    return subject.passed(f"{expected}, observed one tensor per group at all four stages", "",
                          metrics)
