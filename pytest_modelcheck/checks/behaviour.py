"""Behaviour checks: samples stay independent, parameters learn, eval is deterministic and
stateless, and a saved state_dict reproduces the model. Each lives in a module of its topic;
this module re-exports them under their old import path.

* ``batch_independent`` (``independence``) -- the output of sample i has a zero gradient with
  respect to the input of every other sample (eval mode): wrong reshapes, batch statistics in
  eval, attention across the batch, means over dim 0 all show up as a cross-sample gradient.
* ``params_learn`` (``learning``) -- one optimizer step moves every trainable parameter (all of
  its elements) and leaves frozen parameters and the buffers of frozen modules alone.
* ``eval_deterministic`` (``determinism``) -- two eval forwards on identical inputs under
  different RNG seeds agree bitwise (dropout or noise left on in eval).
* ``stateless_forward`` (``statelessness``) -- an eval forward changes no parameter, buffer,
  plain attribute or input.
* ``state_roundtrip`` (``roundtrip``) -- ``state_dict`` through ``torch.save``/
  ``torch.load(weights_only=True)`` into a fresh instance reproduces the outputs; tensors kept
  as plain attributes are named.

>>> from pytest_modelcheck.checks.behaviour import params_learn
>>> params_learn.spec.name
'params_learn'
"""
from __future__ import annotations

from .independence import batch_independent
from .learning import params_learn
from .determinism import eval_deterministic
from .statelessness import stateless_forward
from .roundtrip import state_roundtrip

__all__ = ["batch_independent", "params_learn", "eval_deterministic", "stateless_forward",
           "state_roundtrip"]
