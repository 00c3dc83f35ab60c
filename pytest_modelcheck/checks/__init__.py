"""One function per check; each returns a CheckResult. See ``registry`` for the mechanism.

Importing this package registers the built-in checks; it imports neither torch nor pytest.
Check modules are named for their topic (``gradients``, ``shapes``...) and export the check
functions, which are re-exported here.

>>> from pytest_modelcheck.checks import all_checks, grads_finite
>>> grads_finite.spec.name in all_checks()
True
"""
from .registry import CheckSpec, SkipCheck, all_checks, check, default_checks, get_check
from .gradients import grads_finite
from .shapes import shapes_consistent
from .overfit import model_overfits
from .throughput import throughput_at_least
from .memory import memory_under
from .dispatch_checks import no_host_sync, vectorized
from .independence import batch_independent
from .learning import params_learn
from .determinism import eval_deterministic
from .statelessness import stateless_forward
from .roundtrip import state_roundtrip
from .portability import device_portable
from .precision import dtype_stable
from .activations import activations_healthy
from .numerics import head_range, output_range
from .invariance import padding_invariant, permutation_equivariant, permutation_invariant
from .language import causal, kv_cache_consistent, tied_parameters
from .stability import operator_stable
from .data import data_sane
from .dynamics import grad_norms_stable, loss_components, lr_schedule
from .budgets import flops_under, params_under
from .unet import unet_skips
from .vit import token_capacity, vit_patches
from .attention import attention_maps
from .fno import fno_modes
from .fno_sweep import mode_sweep
from .spectra import no_aliasing, spectrum_matches
from .distributed import ddp_consistent
from .norms import norm_stats
from .gan import discriminator_scales, gan_pairs

__all__ = ["CheckSpec", "SkipCheck", "all_checks", "check", "default_checks", "get_check",
           "grads_finite", "shapes_consistent", "model_overfits",
           "throughput_at_least", "memory_under", "no_host_sync", "vectorized",
           "batch_independent", "params_learn", "eval_deterministic", "stateless_forward",
           "state_roundtrip", "device_portable", "dtype_stable", "activations_healthy",
           "output_range", "permutation_invariant", "permutation_equivariant",
           "padding_invariant", "operator_stable", "data_sane", "grad_norms_stable",
           "loss_components", "lr_schedule", "flops_under", "params_under",
           "unet_skips", "vit_patches", "token_capacity", "attention_maps", "fno_modes",
           "mode_sweep", "no_aliasing", "spectrum_matches", "causal",
           "kv_cache_consistent", "tied_parameters", "ddp_consistent",
           "discriminator_scales", "gan_pairs", "norm_stats", "head_range"]
