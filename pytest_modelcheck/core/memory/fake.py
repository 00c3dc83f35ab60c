"""The fake-tensor set-up of an estimate: fake copies of the model and batch, and the patches that
make the fake step run as the real one would (docs/memory-model.md, "The estimate")."""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Iterator

from .._torch_compat import (caller_frame, dispatch_mode_base, fake_tensor_logger_name,
                             fake_tensor_module, runs_binary_operator)
from ..errors import UsageError
from ..errors import first_line as _first_line
from .report import _is_tensor


def _fake_device(dev: Any) -> Any:
    """Where a CUDA estimate's fake tensors live when the GPU is here: on it (fake CUDA tensors
    take CUDA's kernels, memory layouts and autocast lists; they allocate nothing)."""
    import torch

    return torch.device(dev.type, dev.index if dev.index is not None
                        else torch.cuda.current_device())


def _probe_kernels(dev: Any) -> bool:
    """Whether a CUDA estimate runs on fake CUDA tensors and asks the GPU for its kernels'
    workspaces: the target is a CUDA device present here (an index this machine has), and
    ``MODELCHECK_CUDA_PROBE`` is not ``0``."""
    import torch

    return (dev.type == "cuda" and os.environ.get("MODELCHECK_CUDA_PROBE", "1") != "0"
            and torch.cuda.is_available()
            and (dev.index is None or dev.index < torch.cuda.device_count()))


@contextlib.contextmanager
def _linear_bias_in_place() -> Iterator[None]:
    """Add a linear layer's bias in place, as the real kernel does, when the input is not
    contiguous.

    ``at::linear`` on a 3-D input that is not contiguous (a transposed sequence, a GRU with
    ``batch_first``) computes ``matmul(input, weight.t())`` and then ``output.add_(bias)``,
    unless a tensor subclass or any dispatch mode is involved, when it adds out of place for
    composite compliance. Fake tensors and the tracker are both, so the estimate would hold
    one more output while the bias is added (seen: a GRU's inference 1.15-1.19, a transposed
    Linear 1.29 of the measured peak). This mode, entered inside the tracker, turns the
    ``add`` that follows ``mm``/``bmm`` and the ``_unsafe_view`` of their result into the real
    in-place add (the result an alias of the product, as in the kernel). An ``add`` written
    as ``+`` in Python is left alone: there the out-of-place add is real. Not told apart:
    ``torch.add(a @ w.t(), b)`` on a non-contiguous ``a``, a function call like the kernel's.
    """
    import weakref

    import torch
    TorchDispatchMode = dispatch_mode_base()

    aten = torch.ops.aten
    products = (aten.mm.default, aten.bmm.default)

    class _InPlaceBias(TorchDispatchMode):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.previous: Any = None
            self.product: Any = None

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                               kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if getattr(func, "namespace", "") == "prim":
                return func(*args, **kwargs)
            product = self.product() if self.product is not None else None
            self.product = None
            if func is aten.add.Tensor and product is not None and len(args) == 2 \
                    and args[0] is product and kwargs.get("alpha", 1) == 1 \
                    and _is_bias_of(args[1], product) and not _called_as_operator():
                self.previous = func
                aten.add_.Tensor(product, args[1])
                return aten.alias.default(product)
            out = func(*args, **kwargs)
            if func is aten._unsafe_view.default and self.previous in products:
                self.product = weakref.ref(out)
            self.previous = func
            return out

    with _InPlaceBias():
        yield


@contextlib.contextmanager
def _causal_masks_by_origin() -> Iterator[None]:
    """Let ``nn.Transformer``/``TransformerEncoder``/``TransformerDecoder`` with an attention
    mask run on fake tensors.

    Their forward asks ``_detect_is_causal_mask`` whether the mask equals a causal one by
    comparing values, which fake tensors do not have (the estimate failed with "the step needs
    tensor values"). For the estimate, a mask is causal when it came from torch's own
    ``generate_square_subsequent_mask`` (the helper is wrapped to remember its results) or the
    caller said so with ``is_causal``; any other mask is not, and the layers use it as given
    (at most the mask's own bytes more than the causal path). Both helpers are put back after.
    """
    import weakref

    try:
        from torch.nn.modules import transformer
    except ImportError:  # pragma: no cover - every supported torch has it
        yield
        return
    FakeTensor = fake_tensor_module().FakeTensor

    detect = getattr(transformer, "_detect_is_causal_mask", None)
    generate = getattr(transformer, "_generate_square_subsequent_mask", None)
    if detect is None or generate is None:
        yield
        return
    causal: dict = {}  # id -> weak reference (tensors compare by value, not in a WeakSet)

    def generated(*args: Any, **kwargs: Any) -> Any:
        mask = generate(*args, **kwargs)
        if isinstance(mask, FakeTensor):
            causal[id(mask)] = weakref.ref(mask)
        return mask

    def detected(mask: Any, is_causal: Any = None, size: Any = None) -> bool:
        if isinstance(mask, FakeTensor) and is_causal is None:
            n = size if size is not None else mask.size(-2)
            ref = causal.get(id(mask))
            return ref is not None and ref() is mask and tuple(mask.shape[-2:]) == (n, n)
        return detect(mask, is_causal, size)

    transformer._detect_is_causal_mask = detected
    transformer._generate_square_subsequent_mask = generated
    try:
        yield
    finally:
        transformer._detect_is_causal_mask = detect
        transformer._generate_square_subsequent_mask = generate


def _is_bias_of(bias: Any, product: Any) -> bool:
    return (_is_tensor(bias) and bias.dim() == 1 and product.dim() >= 2
            and bias.shape[0] == product.shape[-1] and bias.dtype == product.dtype)


# Files of torch's own wrappers between an op's Python caller and a dispatch mode.
_DISPATCH_WRAPPERS = ("torch/_compile.py", "torch/_tensor.py", "torch/overrides.py",
                      "torch/utils/_python_dispatch.py", "torch/_dynamo/eval_frame.py")


def _called_as_operator() -> bool:
    """Whether the op being dispatched was called by a Python operator (``a + b``) rather than
    by a function (``F.linear``, ``_VF.gru``): the caller's current instruction."""
    frame = caller_frame(2)  # above this function and __torch_dispatch__
    while frame is not None and frame.f_code.co_filename.replace(os.sep, "/").endswith(
            _DISPATCH_WRAPPERS):
        frame = frame.f_back
    if frame is None:
        return False
    return runs_binary_operator(frame)


@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """Drop FakeTensorMode's log record of a failing op; the exception itself still propagates
    and is reported (e.g. as a shape mismatch in the module that raised)."""
    import logging

    logger = logging.getLogger(fake_tensor_logger_name())

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("failed while attempting to run meta")

    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    """Switch the fused attention/encoder-layer inference path (restored on exit).

    The fused ``_transformer_encoder_layer_fwd`` and ``_native_multi_head_attention`` allocate
    their intermediates inside one kernel, where no dispatcher-level tracker sees them. CPU
    estimates run them, as the real step does, and add those intermediates from the kernels'
    shapes (``_attention_workspace``). Elsewhere the estimate runs the unfused path, which
    allocates the same kinds of intermediates as visible ops (observed: equal, or up to 17%
    above the fused path's peak).
    """
    import torch

    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "get_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _no_nested_tensors(model: Any) -> None:
    """Turn off the packing of padded batches into nested tensors in the estimate's own copy.

    A ``TransformerEncoder`` (``enable_nested_tensor=True``, the default) given a
    ``src_key_padding_mask`` on the inference fast path packs the batch into a nested tensor,
    which needs the mask's values: fake tensors cannot. Without the packing its layers run the
    same fused kernel on the padded batch, with the mask, so the estimate errs high by the
    padding. Without a padding mask nothing changes: the fast path runs as in the real step
    (before, any such encoder was estimated on the unfused path, 0.69 of the peak of a default
    encoder at width 256, sequence 256, batch 8).
    """
    for m in model.modules():
        if getattr(m, "use_nested_tensor", False):
            m.use_nested_tensor = False


def _fake_like(t: Any, fake_mode: Any, device: Any = "cpu") -> Any:
    """A fake tensor on ``device`` with ``t``'s shape, strides, dtype and requires_grad; no
    storage."""
    import torch

    with fake_mode:
        fake = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype,
                                   device=device)
    if t.requires_grad and (fake.is_floating_point() or fake.is_complex()):
        fake.requires_grad_(True)
    return fake


def _fake_model_copy(model: Any, fake_mode: Any, device: Any = "cpu") -> Any:
    """A deep copy whose parameters and buffers are fake tensors on ``device`` (tied weights
    stay tied).

    The copy is made with a ``deepcopy`` memo that already maps every parameter and buffer to
    its fake twin, so no real or meta storage of the model is copied.
    """
    import torch

    memo: dict = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(_fake_like(p.detach(), fake_mode, device),
                                             requires_grad=p.requires_grad)
    for b in model.buffers():
        if id(b) not in memo:
            memo[id(b)] = _fake_like(b, fake_mode, device)
    try:
        return copy.deepcopy(model, memo)
    except Exception as exc:  # noqa: BLE001 - any failure to copy is a usage problem
        raise UsageError(f"model: cannot be deep-copied ({type(exc).__name__}: {exc}); checks"
                         " work on a copy so the original is never changed") from exc


def _is_fake_limitation(exc: Any) -> bool:
    if exc is None:
        return False
    ft = fake_tensor_module()

    kinds = tuple(getattr(ft, n) for n in (
        "DataDependentOutputException", "DynamicOutputShapeException",
        "UnsupportedOperatorException", "UnsupportedFakeTensorException") if hasattr(ft, n))
    if isinstance(exc, kinds):
        return True
    name = type(exc).__name__
    return "DataDependent" in name or "GuardOnDataDependent" in name


def _fake_limitation_message(exc: Any) -> str:
    return (f"the step needs tensor values, which fake tensors do not have"
            f" ({type(exc).__name__}: {_first_line(exc)}); measure it on a real device instead")
