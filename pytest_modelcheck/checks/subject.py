"""What one check runs on, built by the registry: the check's name, the user's model and batch,
the loss and the device, with the copies and result helpers every check needs.

A check that takes ``subject`` (instead of ``model``, ``batch``, ``loss``, ``device``) gets one::

    @check(default=True)
    def grads_finite(allow_unused=(), *, subject: Subject) -> CheckResult:
        work, data = subject.model_copy("train"), subject.batch_copy()
        ...
        return subject.passed("expected ..., observed ...", metrics=...)

Its public signature (marker help, ``check_model``, the generated reference) is still
``grads_finite(allow_unused=(), *, model, batch, loss=None, device=None)``: the registry turns
those four into the subject. The user's model and batch are never changed: a check trains,
moves and mutates the copies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..core.result import CheckResult


@dataclass
class Subject:
    """One check's model, batch, loss and device, and its name for the results it returns.

    >>> import torch
    >>> from pytest_modelcheck.core.batch import Batch
    >>> m = torch.nn.Linear(2, 1)
    >>> s = Subject("demo", m, Batch.from_user((torch.ones(3, 2), torch.zeros(3, 1))), None,
    ...             torch.device("cpu"))
    >>> s.model_copy("eval") is not m, s.model_copy("eval").training
    (True, False)
    >>> s.failed("expected 1, observed 2", metrics={"n": 2}).status
    'failed'
    """

    check: str
    model: Any
    batch: Any
    loss: Any = None
    device: Any = None

    def model_copy(self, mode: Optional[str] = None) -> Any:
        """A deep copy of the model on the check's device; ``mode`` "train" or "eval" sets it
        (None keeps the model's own)."""
        from ..core.batch import copy_model

        work = copy_model(self.model).to(self.device)
        if mode == "train":
            work.train()
        elif mode == "eval":
            work.eval()
        elif mode is not None:
            raise ValueError(f"mode={mode!r}: expected 'train', 'eval' or None")
        return work

    def batch_copy(self) -> Any:
        """A clone of the batch on the check's device."""
        return self.batch.clone().to(self.device)

    def result(self, passed: Optional[bool], headline: str, details: Any = "",
               metrics: Optional[dict] = None, **extra: Any) -> CheckResult:
        """A result of this check; ``details`` may be a list of lines."""
        if isinstance(details, (list, tuple)):
            details = "\n".join(details)
        return CheckResult(self.check, passed, headline, details, dict(metrics or {}), **extra)

    def passed(self, headline: str, details: Any = "", metrics: Optional[dict] = None,
               **extra: Any) -> CheckResult:
        return self.result(True, headline, details, metrics, **extra)

    def failed(self, headline: str, details: Any = "", metrics: Optional[dict] = None,
               **extra: Any) -> CheckResult:
        return self.result(False, headline, details, metrics, **extra)

    def skipped(self, headline: str, details: Any = "", metrics: Optional[dict] = None,
                **extra: Any) -> CheckResult:
        return self.result(None, headline, details, metrics, **extra)
