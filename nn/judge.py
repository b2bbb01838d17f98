"""The judge network: a small CNN digit classifier (its scoring is ditkit.ops.judge, its files ditkit.formats.judge).

Input convention: float tensors of shape (N, 3, 32, 32), values in [0, 1], white digit strokes (1.0) on a black
background (0.0), the three channels equal (grey). `Judge.features(x)` is the 64-d penultimate activation used
for the Frechet distance; the reference statistics (mean, covariance, float64) of the held-out real digits live
in the judge as the buffers `ref_mu` / `ref_sigma` (see `set_reference`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

DEFAULT_CONFIG = {
    "arch": "cnn3",
    "in_channels": 3,
    "image_size": 32,
    "channels": [32, 64, 64],
    "feature_dim": 64,
    "num_classes": 10,
    "dropout": 0.2,
}


def _check_config(config: dict) -> dict:
    cfg = dict(DEFAULT_CONFIG)
    cfg.update(config or {})
    if cfg["arch"] != "cnn3":
        raise ConfigError(f"judge config arch={cfg['arch']!r} is unknown; only 'cnn3' is supported")
    if len(cfg["channels"]) != 3:
        raise ConfigError(f"judge config channels={cfg['channels']!r} must list 3 widths")
    if cfg["image_size"] % 8 != 0:
        raise ConfigError(f"judge config image_size={cfg['image_size']} must be a multiple of 8")
    return cfg


class Judge(nn.Module):
    """3 x (conv3x3 + ReLU + maxpool2) -> flatten -> Linear(feature_dim) + ReLU -> Linear(num_classes).

    Takes (N, 3, 32, 32) float images in [0, 1] (white on black); `forward` returns logits,
    `features` the penultimate feature vectors (N, feature_dim).
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = _check_config(config or {})
        self.config = cfg
        c1, c2, c3 = cfg["channels"]
        self.conv1 = nn.Conv2d(cfg["in_channels"], c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        side = cfg["image_size"] // 8
        self.fc = nn.Linear(c3 * side * side, cfg["feature_dim"])
        self.drop = nn.Dropout(cfg["dropout"])
        self.head = nn.Linear(cfg["feature_dim"], cfg["num_classes"])
        d = cfg["feature_dim"]
        # Reference statistics of the held-out real digits (float64); not part of the weights' state dict.
        self.register_buffer("ref_mu", torch.zeros(d, dtype=torch.float64), persistent=False)
        self.register_buffer("ref_sigma", torch.zeros(d, d, dtype=torch.float64), persistent=False)
        self.has_reference = False

    def set_reference(self, mu, sigma) -> None:
        d = self.config["feature_dim"]
        mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64).reshape(-1)
        sigma = torch.as_tensor(np.asarray(sigma), dtype=torch.float64)
        if mu.shape != (d,) or sigma.shape != (d, d):
            raise ConfigError(f"judge reference must be mu ({d},) and sigma ({d}, {d}); got "
                              f"{tuple(mu.shape)} and {tuple(sigma.shape)}")
        self.ref_mu = mu
        self.ref_sigma = sigma
        self.has_reference = True

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return x.flatten(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self._trunk(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))
