"""The judge: a small CNN digit classifier that scores generated digits (class accuracy + Frechet distance).

Input convention (everything that feeds the judge must follow it):
    float tensors of shape (N, 3, 32, 32), values in [0, 1], white digit strokes (1.0) on a black
    background (0.0), the three channels equal (grey). This is what `DiTPipeline(..., output_type="np")`
    returns for the tiny-digits model once transposed, and what `score` builds from uint8 images.

`Judge.features(x)` is the 64-d penultimate activation used for the Frechet distance (FD, the FID recipe
with this judge in place of Inception). The reference statistics (mean, covariance, float64) of the
held-out real digits live in the judge as the buffers `ref_mu` / `ref_sigma` (see `set_reference`).

No file I/O here: `ditkit.formats.judge` saves and loads judges.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditkit.formats.errors import ConfigError

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


@dataclass
class JudgeScores:
    accuracy: float
    fd: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), in float64 (the FID formula)."""
    import warnings

    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ConfigError(f"frechet_distance needs matching shapes; got {mu1.shape}/{mu2.shape} and "
                          f"{s1.shape}/{s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular products are handled below
        covmean = linalg.sqrtm(s1.dot(s2))
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        # Numerical error can give tiny imaginary parts; anything large means the input is broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: sqrtm has a large imaginary part "
                             f"({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    fd = float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(fd, 0.0)


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, rowvar=False) of an (N, D) feature matrix."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def images_to_tensor(images_uint8: np.ndarray, size: int = 32) -> torch.Tensor:
    """(N, H, W, 3) or (N, H, W) uint8 -> (N, 3, size, size) float in [0, 1] (the judge's input)."""
    a = np.asarray(images_uint8)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ConfigError(f"judge images must be (N, H, W, 3) uint8; got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ConfigError(f"judge images must be uint8 (0..255); got dtype {a.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1).contiguous()


@torch.no_grad()
def judge_features(judge: Judge, x: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float64, logits (N, C)) for judge-convention inputs x."""
    judge.eval()
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        f = judge.features(x[i:i + batch_size])
        feats.append(f.double().numpy())
        logits.append(judge.head(f).numpy())
    return np.concatenate(feats), np.concatenate(logits)


def score(judge: Judge, images_uint8: np.ndarray, labels: list[int], ref=None) -> JudgeScores:
    """Class accuracy of `images_uint8` (N, H, W, 3) uint8 against `labels`, and the FD of their judge
    features to the reference statistics (`ref=(mu, sigma)`, default: those stored in the judge).

    FD needs at least 2 images; it is NaN with fewer.
    """
    labels = [int(v) for v in labels]
    x = images_to_tensor(images_uint8, judge.config["image_size"])
    if len(labels) != len(x):
        raise ConfigError(f"score got {len(x)} images but {len(labels)} labels; pass one label per image")
    if len(x) == 0:
        raise ConfigError("score got no images; generate at least one")
    feats, logits = judge_features(judge, x)
    acc = float((logits.argmax(1) == np.asarray(labels)).mean())
    if ref is None:
        if not judge.has_reference:
            raise ConfigError("this judge has no reference statistics; call judge.set_reference(mu, sigma) "
                              "or load it with ditkit.formats.judge.load_judge")
        mu_r, s_r = judge.ref_mu.numpy(), judge.ref_sigma.numpy()
    else:
        mu_r, s_r = ref
    if len(x) < 2:
        fd = float("nan")
    else:
        mu, sigma = feature_stats(feats)
        fd = frechet_distance(mu, sigma, mu_r, s_r)
    return JudgeScores(accuracy=acc, fd=fd, n=len(x))
