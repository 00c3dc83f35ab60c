"""Public architectures, built from code with random weights, for the conformance suite.

Each entry builds ``(model, batch, declared)``: a model from torchvision (``weights=None``),
timm (``pretrained=False``) or Hugging Face transformers (a tiny ``*Config``), a small example
batch, and only what a user would honestly declare (the output shape and the chance level of
the loss). Nothing is downloaded. A case whose package is not installed is skipped.

``FAST`` names the subset that runs in CI; ``python -m tests.conformance.zoo NAME...`` runs the
full default set on the named cases (all of them without names) and prints a table.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

B = 4          # samples per example batch
C = 10         # classes of the image heads
V = 96         # vocabulary of the tiny language models
T = 12         # tokens per sample


@dataclass
class Case:
    name: str
    package: str
    build: Callable[[], tuple]


CASES: dict = {}


def case(package: str, name: str = None):
    def deco(fn):
        key = name or fn.__name__
        if key in CASES:
            raise ValueError(f"duplicate conformance case {key}")
        CASES[key] = Case(key, package, fn)
        return fn
    return deco


# --- package imports --------------------------------------------------------------------------
def import_torchvision():
    """Import torchvision beside a CPU-only torch build.

    PyPI's Linux torchvision wheels link their C++ operators against CUDA torch libraries; beside
    a CPU torch build that library cannot load, and torchvision's import then fails while it
    registers fake kernels for ``torchvision::nms``/``qnms``. Declaring those two schemas first
    (when the operators are absent) lets the import finish; the classification, segmentation and
    video models never call them.
    """
    import torch

    try:
        torch.ops.torchvision.nms.default  # noqa: B018 - present when the C++ ops loaded
    except (AttributeError, RuntimeError):
        global _TV_LIB
        _TV_LIB = torch.library.Library("torchvision", "DEF")
        _TV_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TV_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision


_TV_LIB = None


def import_transformers():
    """Import transformers; it imports torchvision when that is installed, so the same care."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()
    import transformers

    return transformers


def _images(size: int = 64, n: int = B, channels: int = 3, classes: int = C) -> tuple:
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, channels, size, size, generator=g),
            torch.randint(0, classes, (n,), generator=g))


def _classifier(classes: int = C) -> dict:
    return {"out": ("B", classes), "chance_level": math.log(classes)}


# --- torchvision classification ---------------------------------------------------------------
def _tv(builder: str, size: int = 64, **kw):
    def build():
        import torch

        tv = import_torchvision()
        torch.manual_seed(0)
        model = getattr(tv.models, builder)(weights=None, num_classes=C, **kw)
        return model, _images(size), _classifier()
    return build


TORCHVISION = {
    "resnet18": {}, "resnet50": {}, "resnext50_32x4d": {}, "wide_resnet50_2": {},
    "mobilenet_v2": {}, "mobilenet_v3_small": {}, "mobilenet_v3_large": {},
    "efficientnet_b0": {}, "efficientnet_v2_s": {}, "convnext_tiny": {},
    "regnet_y_400mf": {}, "regnet_x_400mf": {}, "densenet121": {},
    "shufflenet_v2_x0_5": {}, "squeezenet1_1": {}, "mnasnet0_5": {},
    "googlenet": {"kw": {"aux_logits": False, "init_weights": True}},
    "vgg11_bn": {}, "alexnet": {"size": 64},
    "vit_b_32": {"kw": {"image_size": 64}}, "swin_t": {},
    "inception_v3": {"size": 96, "kw": {"aux_logits": False, "init_weights": True}},
}
for _name, _opts in TORCHVISION.items():
    case("torchvision", f"tv_{_name}")(_tv(_name, _opts.get("size", 64), **_opts.get("kw", {})))


@case("torchvision")
def tv_lraspp_mobilenet_v3_large():
    """Segmentation: a dict output ``{'out': (B, C, H, W)}`` and per-pixel class targets."""
    import torch

    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, 64, 64, generator=g)
    # masks are regions, not per-pixel noise: one class per 16x16 block
    coarse = torch.randint(0, 5, (B, 1, 4, 4), generator=g).float()
    y = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="nearest")[:, 0].long()

    def loss(out, target):
        return torch.nn.functional.cross_entropy(out["out"], target)
    return model, (x, y), {"chance_level": math.log(5), "loss": loss}


@case("torchvision")
def tv_r3d_18():
    """Video: (B, 3, T, H, W) clips, small enough that some kernel taps see only padding."""
    import torch

    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.video.r3d_18(weights=None, num_classes=C)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, 4, 32, 32, generator=g)
    return model, (x, torch.randint(0, C, (B,), generator=g)), _classifier()


# --- timm ---------------------------------------------------------------------------------------
def _timm(name: str, size: int = 64, **kw):
    def build():
        import torch

        import_torchvision()  # timm imports torchvision
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=C, **kw)
        return model, _images(size), _classifier()
    return build


TIMM = {
    "resnet26d": {}, "convnextv2_atto": {}, "vit_tiny_patch16_224": {"kw": {"img_size": 64}},
    "mixer_s32_224": {"kw": {"img_size": 64}}, "efficientnet_b0": {},
    "mobilenetv3_small_100": {}, "regnetx_002": {}, "deit_tiny_patch16_224": {"kw": {"img_size": 64}},
    "resnet18": {},
}
for _name, _opts in TIMM.items():
    case("timm", f"timm_{_name}")(_timm(_name, _opts.get("size", 64), **_opts.get("kw", {})))


# --- Hugging Face transformers ------------------------------------------------------------------
def _tokens(n: int = B, t: int = T, vocab: int = V, pad_last: int = 3) -> dict:
    """input_ids, an attention mask with the last ``pad_last`` tokens of the odd samples padded."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[1::2, t - pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _hf_small(**kw) -> dict:
    base = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64)
    base.update(kw)
    return base


@case("transformers")
def hf_bert():
    """BERT sequence classification: labels in the batch, the model computes ``.loss``."""
    import torch
    tr = import_transformers()

    torch.manual_seed(0)
    cfg = tr.BertConfig(**_hf_small(max_position_embeddings=64), num_labels=3)
    model = tr.BertForSequenceClassification(cfg)
    batch = _tokens()
    batch["labels"] = torch.tensor([0, 1, 2, 1])
    return model, batch, {"chance_level": math.log(3)}


@case("transformers")
def hf_gpt2():
    """GPT-2 language model: (B, T, V) logits, labels = input_ids (the model shifts them)."""
    import torch
    tr = import_transformers()

    torch.manual_seed(0)
    cfg = tr.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                         bos_token_id=1, eos_token_id=2)
    model = tr.GPT2LMHeadModel(cfg)
    batch = _tokens(pad_last=0)
    batch["labels"] = batch["input_ids"].clone()
    return model, batch, {"chance_level": math.log(V)}


@case("transformers")
def hf_llama():
    import torch
    tr = import_transformers()

    torch.manual_seed(0)
    cfg = tr.LlamaConfig(**_hf_small(max_position_embeddings=64, num_key_value_heads=2))
    model = tr.LlamaForCausalLM(cfg)
    batch = _tokens(pad_last=0)
    batch["labels"] = batch["input_ids"].clone()
    return model, batch, {"chance_level": math.log(V)}


@case("transformers")
def hf_t5():
    """T5 encoder-decoder: labels give the decoder inputs (shifted right inside the model)."""
    import torch
    tr = import_transformers()

    torch.manual_seed(0)
    cfg = tr.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0, pad_token_id=0)
    model = tr.T5ForConditionalGeneration(cfg)
    batch = _tokens()
    g = torch.Generator().manual_seed(1)
    batch["labels"] = torch.randint(3, V, (B, 6), generator=g)
    return model, batch, {"chance_level": math.log(V)}


@case("transformers")
def hf_vit():
    import torch
    tr = import_transformers()

    torch.manual_seed(0)
    cfg = tr.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, image_size=32, patch_size=8, num_labels=C)
    model = tr.ViTForImageClassification(cfg)
    x, y = _images(32)
    return model, {"pixel_values": x, "labels": y}, {"chance_level": math.log(C)}


FAST = ["tv_resnet18", "tv_convnext_tiny", "tv_squeezenet1_1", "timm_resnet26d",
        "hf_gpt2", "hf_bert"]


def build_case(name: str) -> tuple:
    """``(model, batch, declared)`` for a case; ImportError when its package is missing."""
    return CASES[name].build()


def run_case(name: str, **extra):
    """Run ``check_model``'s default set on one case; returns the HealthReport."""
    from pytest_modelcheck import check_model

    model, batch, declared = build_case(name)
    declared = dict(declared)
    loss = declared.pop("loss", None)
    declared.update(extra)
    return check_model(model, batch, loss=loss, **declared)


def main(argv: list) -> int:
    import torch

    torch.set_num_threads(1)
    names = argv or list(CASES)
    bad = 0
    for name in names:
        start = time.perf_counter()
        try:
            report = run_case(name)
        except ImportError as exc:
            print(f"{name:34s} SKIP ({exc})")
            continue
        took = time.perf_counter() - start
        failed = [r for r in report.results if r.passed is False]
        bad += bool(failed)
        print(f"{name:34s} {'FAIL' if failed else 'ok  '} {took:6.1f} s", flush=True)
        for r in failed:
            print(f"    {r.check}: {r.headline[:300]}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
