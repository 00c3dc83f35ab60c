"""How an example batch is split into model inputs and targets, and how the model is called.

Accepted forms (``Batch.from_user``):

* a tensor ``x``                    -> ``model(x)``, no target
* a tuple/list ``(inputs, target)`` -> ``inputs`` is a tensor (``model(x)``), a tuple/list of
  positional inputs (``model(x_sig, t, label, geom)``) or a dict passed as one argument;
  ``target`` is anything the loss understands (usually a tensor, or ``None``)
* a dict ``{...}``                  -> ``model(batch_dict)`` (the whole dict is one argument, as a
  collate function builds it); the target is ``batch_dict["targets"]`` (or ``"target"``, ``"y"``,
  ``"labels"``, ``"label"``), the first of those keys present
* a dict for a model called ``model(**batch_dict)`` (the Hugging Face convention) -> the dict's
  entries are keyword arguments. This is detected when the model is known (``from_user(...,
  model=model)``, as every check does): the model is a ``transformers.PreTrainedModel`` (found
  in its class hierarchy, transformers is not imported), or every key of the dict names a
  parameter of ``model.forward``, or ``forward`` takes only ``**kwargs``. ``labels`` then stays
  among the keyword inputs (the model computes its own ``.loss``) and is also the target.
* ``Batch(args=..., kwargs=..., target=...)`` for anything else, and to decide explicitly how a
  dict is passed: ``Batch(kwargs=batch_dict, target_key="labels")`` calls
  ``model(**batch_dict)`` with ``batch_dict["labels"]`` as the target, ``Batch(args=(batch_dict,),
  target_key="labels")`` calls ``model(batch_dict)``
* a callable ``make_batch(batch_size)`` returning any of the above: checks that need other
  batch sizes call it; otherwise tensors whose first dimension equals the batch size are tiled or
  sliced (ragged/packed batches, such as pulses packed across events, need the factory).

The batch size is the first dimension of the target when it is a tensor, otherwise of the first
input tensor.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from .errors import UsageError

TARGET_KEYS = ("targets", "target", "y", "labels", "label")
FACTORY_EXAMPLE_SIZE = 4


def _is_tensor(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def map_structure(fn: Callable[[Any], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in a nest of tuples, lists and dicts.

    >>> import torch
    >>> map_structure(lambda t: t * 2, {"a": (torch.ones(1), 3)})["a"][0]
    tensor([2.])
    """
    if _is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_structure(fn, v)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_structure(fn, v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_structure(fn, v) for v in obj)
    return obj


def iter_tensors(obj: Any, prefix: str = "") -> Iterator[tuple]:
    """Yield ``(path, tensor)`` for every tensor in a nest; paths look like ``[0]['logits']``.

    >>> import torch
    >>> [p for p, _ in iter_tensors({"a": torch.ones(1), "b": [torch.ones(1)]}, "out")]
    ["out['a']", "out['b'][0]"]
    """
    if _is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{prefix}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{prefix}[{i}]")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # structured outputs
        for f in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, f.name, None), f"{prefix}.{f.name}")


@dataclass
class Batch:
    """Model inputs (positional and keyword) plus an optional target.

    >>> import torch
    >>> b = Batch.from_user((torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)))
    >>> (b.batch_size, b.has_target, len(b.args))
    (3, True, 1)
    >>> b.resized(5).args[0].shape
    torch.Size([5, 4])
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    target: Any = None
    has_target: bool = False
    factory: Optional[Callable[[int], Any]] = None
    target_key: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.args, list):
            self.args = tuple(self.args)
        if not isinstance(self.args, tuple):
            raise UsageError(f"Batch(args={type(self.args).__name__}): expected a tuple of"
                             " positional model inputs")
        if not isinstance(self.kwargs, dict):
            raise UsageError(f"Batch(kwargs={type(self.kwargs).__name__}): expected a dict of"
                             " keyword model inputs")
        inputs = self._input_dict()
        if self.target_key is not None and self.target is None:
            if inputs is None or self.target_key not in inputs:
                held = sorted(map(str, inputs)) if inputs is not None else []
                raise UsageError(f"Batch(target_key={self.target_key!r}): no input named"
                                 f" {self.target_key!r}; expected one of the keyword (or dict)"
                                 f" inputs {held}")
            self.target = inputs[self.target_key]
        elif self.target_key is None and self.target is not None and inputs is not None:
            # a target given as the very tensor of one of the inputs (labels=y, target=y) stays
            # that tensor through clone/to/resized
            self.target_key = next((k for k, v in inputs.items() if v is self.target), None)
        if not self.has_target and self.target is not None:
            self.has_target = True

    def _input_dict(self) -> Optional[dict]:
        """The dict that holds named inputs: the keyword inputs, else a dict positional input."""
        if self.kwargs:
            return self.kwargs
        if self.args and isinstance(self.args[0], dict):
            return self.args[0]
        return None

    @property
    def target_path(self) -> Optional[str]:
        """Path (as in ``input_tensors``) of the input that is also the target, if one is.

        >>> import torch
        >>> Batch(kwargs={"input_ids": torch.ones(2, 3), "labels": torch.ones(2, 3)},
        ...       target_key="labels").target_path
        "input['labels']"
        """
        if self.target_key is None:
            return None
        if self.target_key in self.kwargs:
            return f"input[{self.target_key!r}]"
        return f"input[0][{self.target_key!r}]"

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_user(cls, batch: Any, *, name: str = "batch", model: Any = None,
                  keywords: Optional[bool] = None) -> "Batch":
        """Normalize whatever the user's ``batch`` fixture returned (see the module doc).

        ``model`` decides how a dict is passed: as keywords, ``model(**batch)``, when
        ``keywords_call(model, batch)`` says so, else as one argument. ``keywords=True/False``
        forces one way (``resized`` uses it to rebuild a factory's batch the same way).

        >>> import torch
        >>> class LM(torch.nn.Module):
        ...     def forward(self, input_ids, attention_mask=None, labels=None):
        ...         return input_ids.float()
        >>> ids = torch.ones(2, 5, dtype=torch.long)
        >>> b = Batch.from_user({"input_ids": ids, "labels": ids}, model=LM())
        >>> sorted(b.kwargs), b.target_key, b.batch_size
        (['input_ids', 'labels'], 'labels', 2)
        """
        if isinstance(batch, Batch):
            return batch
        if _is_tensor(batch):
            return cls(args=(batch,))
        if isinstance(batch, dict):
            key = next((k for k in TARGET_KEYS if k in batch), None)
            spread = keywords if keywords is not None else keywords_call(model, batch)
            return cls(args=() if spread else (batch,), kwargs=dict(batch) if spread else {},
                       target=batch[key] if key else None, has_target=key is not None,
                       target_key=key)
        if isinstance(batch, (tuple, list)):
            if len(batch) != 2:
                raise UsageError(
                    f"{name}: a tuple batch must be (inputs, target), got a {type(batch).__name__}"
                    f" of length {len(batch)}; wrap several inputs as ((a, b, c), target) or use"
                    " pytest_modelcheck.Batch(args=..., kwargs=..., target=...)")
            inputs, target = batch
            if isinstance(inputs, dict) and (
                    keywords if keywords is not None else keywords_call(model, inputs)):
                return cls(kwargs=dict(inputs), target=target, has_target=target is not None)
            if isinstance(inputs, (tuple, list)):
                args = tuple(inputs)
            else:
                args = (inputs,)
            return cls(args=args, target=target, has_target=target is not None)
        if callable(batch) and not hasattr(batch, "forward"):
            example = batch(FACTORY_EXAMPLE_SIZE)
            if callable(example) and not _is_tensor(example):
                raise UsageError(f"{name}: the batch factory returned a callable; it must return a batch")
            made = cls.from_user(example, name=name, model=model, keywords=keywords)
            made.factory = batch
            return made
        raise UsageError(
            f"{name}: expected a tensor, an (inputs, target) tuple, a dict, a Batch or a"
            f" make_batch(batch_size) callable, got {type(batch).__name__}")

    # properties -----------------------------------------------------------------------------
    @property
    def inputs(self) -> tuple:
        return (self.args, self.kwargs)

    @property
    def batch_size(self) -> Optional[int]:
        if _is_tensor(self.target) and self.target.dim() > 0:
            return int(self.target.shape[0])
        for _, t in iter_tensors(self.inputs):
            if t.dim() > 0:
                return int(t.shape[0])
        return None

    def input_tensors(self) -> list:
        return list(iter_tensors(self.args, "input")) + list(iter_tensors(self.kwargs, "input"))

    # operations -----------------------------------------------------------------------------
    def call(self, model: Any) -> Any:
        """Run ``model`` on the inputs: ``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def map(self, fn: Callable) -> "Batch":
        """A new Batch with ``fn`` applied to every tensor (inputs and target)."""
        args, kwargs = map_structure(fn, (self.args, self.kwargs))
        if self.target_key is not None and self.target_key in kwargs:
            target = kwargs[self.target_key]    # the mapped one, the same object as the input
        elif self.target_key is not None and args and isinstance(args[0], dict):
            target = args[0][self.target_key]
        else:
            target = map_structure(fn, self.target)
        return Batch(args=args, kwargs=kwargs, target=target, has_target=self.has_target,
                     factory=self.factory, target_key=self.target_key)

    def clone(self) -> "Batch":
        """Deep copy: tensors cloned (detached), other values copied."""
        return self.map(lambda t: t.detach().clone())

    def to(self, device: Any) -> "Batch":
        return self.map(lambda t: t.to(device))

    def resized(self, n: int) -> "Batch":
        """The same kind of batch with ``n`` samples.

        With a factory, ``factory(n)``; otherwise every tensor whose first dimension equals the
        batch size is sliced (``n`` smaller) or tiled (``n`` larger, samples repeat in order).
        """
        if n < 1:
            raise UsageError(f"batch size must be >= 1, got {n}")
        if self.factory is not None:
            # a dict the model takes as keywords is taken so again
            made = Batch.from_user(self.factory(n), keywords=bool(self.kwargs and not self.args))
            made.factory = self.factory
            here = next((t.device for _, t in iter_tensors((self.args, self.kwargs, self.target))),
                        None)
            # a batch moved to a device stays there: the factory's new batch follows it
            # (.to() leaves tensors already on that device as they are)
            return made if here is None else made.to(here)
        b = self.batch_size
        if b is None:
            raise UsageError("cannot change the batch size: the batch holds no tensor with a batch"
                             " dimension; give a make_batch(batch_size) factory as the batch")
        if n == b:
            return self.clone()
        import torch

        growth = sum(t.numel() * t.element_size() for _, t in iter_tensors(
            (self.args, self.kwargs, self.target)) if t.dim() and t.shape[0] == b) * n // b
        check_allocation(growth, f"a batch of {n} samples")

        def resize(t: Any) -> Any:
            if t.dim() == 0 or t.shape[0] != b:
                return t.detach().clone()
            index = torch.arange(n, device=t.device) % b
            return t.detach().index_select(0, index).clone()

        return self.map(resize)

    def differs_from(self, other: "Batch") -> list:
        """Paths of the input tensors whose values differ (bitwise, NaN-aware) from ``other``."""
        import torch

        changed = []
        mine = self.input_tensors() + list(iter_tensors(self.target, "target"))
        theirs = other.input_tensors() + list(iter_tensors(other.target, "target"))
        for (path, a), (_, b) in zip(mine, theirs):
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(
                    a.detach().cpu().view(-1).view(torch.uint8) if a.is_floating_point() else a.detach().cpu(),
                    b.detach().cpu().view(-1).view(torch.uint8) if b.is_floating_point() else b.detach().cpu()):
                changed.append(path)
        return changed

    def describe(self) -> str:
        """Short text: shapes and dtypes of the inputs and target."""
        parts = [f"{p}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                 for p, t in self.input_tensors()]
        if self.has_target:
            parts += [f"{p}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                      for p, t in iter_tensors(self.target, "target")]
        return ", ".join(parts)


def keywords_call(model: Any, inputs: dict) -> bool:
    """Whether ``model`` takes the dict ``inputs`` as keyword arguments, ``model(**inputs)``.

    True for a Hugging Face ``PreTrainedModel`` (found by the module names of its class
    hierarchy; transformers is not imported), and for a ``forward`` whose required parameters
    are all keys of ``inputs`` and whose named parameters (or ``**kwargs``) take every other key;
    False for a ``forward(batch)`` that takes the dict as one argument, and when the model is
    unknown.

    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def forward(self, input_ids, attention_mask=None):
    ...         return input_ids.float()
    >>> class Collated(torch.nn.Module):
    ...     def forward(self, batch):
    ...         return batch["x"]
    >>> keywords_call(Net(), {"input_ids": 0, "attention_mask": 1})
    True
    >>> keywords_call(Collated(), {"x": 0})
    False
    """
    import inspect

    if model is None or not isinstance(inputs, dict) or not inputs:
        return False
    if is_hf_pretrained(model):
        return True
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (AttributeError, TypeError, ValueError):
        return False
    if any(p.kind is p.POSITIONAL_ONLY and p.default is p.empty for p in params):
        return False
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {p.name for p in params if p.name in named and p.default is p.empty}
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    keys = set(inputs)
    if not required <= keys or not (keys <= named or any_keyword):
        return False
    # a key naming a parameter, or a forward(**kwargs) that a positional dict cannot reach
    return bool(keys & named) or not any(
        p.kind in (p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def is_hf_pretrained(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers.PreTrainedModel`` (without importing
    transformers: the class hierarchy's module names say it).

    >>> import torch
    >>> is_hf_pretrained(torch.nn.Linear(2, 2))
    False
    """
    return any(c.__name__ == "PreTrainedModel" and c.__module__.split(".")[0] == "transformers"
               for c in type(model).__mro__)


def check_allocation(nbytes: int, what: str) -> None:
    """Refuse, as a usage error, to build inputs larger than half the memory this machine has
    available (a batch size or an input size typed with too many zeros), before allocating.

    >>> check_allocation(1 << 60, "a batch of 10**18 samples")
    Traceback (most recent call last):
    ...
    pytest_modelcheck.core.errors.UsageError: a batch of 10**18 samples needs 1.00 EiB, more than half the memory available here (...); use a smaller size
    """
    available = _available_memory()
    if available is not None and nbytes > available // 2:
        from .units import format_bytes

        raise UsageError(f"{what} needs {format_bytes(nbytes)}, more than half the memory"
                         f" available here ({format_bytes(available)}); use a smaller size")


def _available_memory() -> Any:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def copy_model(model: Any) -> Any:
    """A deep copy of the model that a check may train, move or mutate freely.

    Tensors a module keeps as plain attributes with an autograd history (the ``weight`` that
    the old ``nn.utils.weight_norm`` recomputes before each forward) cannot be deep-copied;
    they are copied detached (the originals are left as they were).

    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> m.scaled = m.weight * 2  # a plain attribute with an autograd history
    >>> copy_model(m).scaled.grad_fn is None, m.scaled.grad_fn is not None
    (True, True)
    """
    try:
        return copy.deepcopy(model)
    except Exception as first:  # noqa: BLE001 - tried again with history-carrying attributes
        try:
            return _copy_without_history(model)
        except Exception:  # noqa: BLE001 - any failure to copy is a usage problem
            exc = first
        raise UsageError(f"model: cannot be deep-copied ({type(exc).__name__}: {exc}); checks"
                         " work on a copy so the original is never changed") from exc


def _copy_without_history(model: Any) -> Any:
    import torch

    swapped = []
    try:
        for mod in model.modules():
            for attr, value in list(vars(mod).items()):
                if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) \
                        and value.grad_fn is not None:
                    swapped.append((mod, attr, value))
                    object.__setattr__(mod, attr, value.detach())
        return copy.deepcopy(model)
    finally:
        for mod, attr, value in swapped:
            object.__setattr__(mod, attr, value)
