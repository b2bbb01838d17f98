"""The networks bench's quality metrics run: torch-fidelity's Inception-v3 (through torchmetrics), torchmetrics'
LPIPS layers on an AlexNet trunk, and the one safe way to import torchmetrics here.

torchvision does not import beside this torch (its compiled operators are missing: "operator torchvision::nms
does not exist"), and two packages stumble on that: torch-fidelity's package __init__ imports its CLIP, VGG and
DINOv2 extractors and dataset helpers, which import torchvision, although its Inception module does not; and
torchmetrics imports torch-fidelity's Inception module at import time once torch-fidelity is installed. So the
torch_fidelity package is registered without running its __init__ (its submodules import as usual) before
torchmetrics is first imported. LPIPS's trunk is torchvision's AlexNet `features` (12 layers, the same module
indices, so torchvision's state-dict keys load unchanged); its linear heads and maths are torchmetrics'.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch
from torch import nn

from .errors import ConfigError

INCEPTION_FEATURES = "2048"  # pool3: the features FID and KID are defined on
ALEXNET_TAPS = (1, 4, 7, 9, 11)  # LPIPS reads the trunk after these ReLUs (relu1..relu5)
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)


def _bare_torch_fidelity() -> None:
    """Make `import torch_fidelity.<submodule>` work without running torch_fidelity/__init__.py."""
    if "torch_fidelity" in sys.modules:
        return
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        return  # not installed: torchmetrics imports without it (fid/kid then say what to install)
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__file__ = spec.origin
    sys.modules["torch_fidelity"] = pkg


def torchmetrics():
    """The torchmetrics package, imported after the torch-fidelity fix above."""
    _bare_torch_fidelity()
    if "torchmetrics" not in sys.modules:
        os.environ.pop("SKIP_SLOW_DOCTEST", None)  # set, it makes torchmetrics' import download doctest weights
    import torchmetrics as tm

    return tm


def inception(weights_file: str, features: str = INCEPTION_FEATURES) -> nn.Module:
    """torchmetrics' NoTrainInceptionV3 (torch-fidelity's TF-compatible Inception-v3, which resizes any uint8
    (N, 3, H, W) batch to 299 px itself) on the given weights; (N, 2048) features out. The caller has checked
    the file (formats/metric_models.py): given a path, torch-fidelity never downloads."""
    torchmetrics()
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ConfigError("--metric fid/kid need torch-fidelity's Inception-v3: pip install --no-deps "
                          "'torch-fidelity>=0.3,<0.5' (--no-deps: it would pull torchvision)")
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[features],
                              feature_extractor_weights_path=weights_file)


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet `features` (same layers, same indices, so its state-dict keys `features.N.*` load)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018), AlexNet version, as torchmetrics' _LPIPS computes it: scale the [-1, 1] input,
    run the trunk, unit-normalise each tapped feature along channels, square the difference, weight channels by
    the linear head, average over space, sum over layers. One value per image pair."""

    def __init__(self):
        super().__init__()
        torchmetrics()
        from torchmetrics.functional.image.lpips import NetLinLayer, ScalingLayer

        self.scaling_layer = ScalingLayer()
        self.features = alexnet_features()
        self.lins = nn.ModuleList([NetLinLayer(c, use_dropout=True) for c in ALEXNET_CHANNELS])
        self.eval().requires_grad_(False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in ALEXNET_TAPS:
                out.append(x)
            if i == ALEXNET_TAPS[-1]:
                break
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (N, 3, H, W) in [-1, 1] -> (N,)."""
        from torchmetrics.functional.image.lpips import _normalize_tensor, _spatial_average

        fa, fb = self.taps(self.scaling_layer(a)), self.taps(self.scaling_layer(b))
        total = 0
        for lin, x, y in zip(self.lins, fa, fb):
            total = total + _spatial_average(lin((_normalize_tensor(x) - _normalize_tensor(y)) ** 2), keep_dim=True)
        return total.flatten()


class CLIPEmbedder(nn.Module):
    """A transformers CLIPModel whose get_image_features / get_text_features return the projected embeddings as
    tensors, as torchmetrics' CLIPScore expects (transformers 5 returns a model output with them as pooler_output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
