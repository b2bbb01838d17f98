"""Scoring with the judge (ditkit.nn.judge.Judge, a small CNN digit classifier): class accuracy + Frechet distance.

Input convention (everything that feeds the judge must follow it):
    float tensors of shape (N, 3, 32, 32), values in [0, 1], white digit strokes (1.0) on a black
    background (0.0), the three channels equal (grey). This is what `DiTPipeline(..., output_type="np")`
    returns for the tiny-digits model once transposed, and what `score` builds from uint8 images.

`Judge.features(x)` is the 64-d penultimate activation used for the Frechet distance (FD, the FID recipe
with this judge in place of Inception). The reference statistics (mean, covariance, float64) of the
held-out real digits live in the judge as the buffers `ref_mu` / `ref_sigma` (see `set_reference`).

The network is ditkit.nn.judge; no file I/O here: `ditkit.formats.judge` saves and loads judges.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ditkit.formats.errors import ConfigError
from ditkit.nn.judge import DEFAULT_CONFIG, Judge  # noqa: F401  (the network; scoring lives here)


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
