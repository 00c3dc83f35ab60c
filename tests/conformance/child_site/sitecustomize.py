"""Start-up hook for the rank processes of the conformance suite's ``ddp_consistent`` cases.

PyPI's Linux torchvision wheels link their C++ operators against CUDA torch libraries; beside a
CPU torch build the import of torchvision fails (see ``zoo.import_torchvision``). A rank process
unpickles the model, which imports torchvision (transformers and timm import it too), before any
code of ours runs in it; with this folder on ``PYTHONPATH`` the same two schemas are declared
just before torchvision is first imported. Nothing else changes, and nothing when the compiled
operators load.
"""
import importlib.abc
import sys


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        try:
            torch.ops.torchvision.nms.default  # noqa: B018 - present when the C++ ops loaded
        except (AttributeError, RuntimeError):
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIBS.append(lib)
        return None  # the normal finders import torchvision itself


_LIBS: list = []
sys.meta_path.insert(0, _DeclareTorchvisionOps())
