"""The quality metrics papers report, as bench's `--metric NAME[=PATH]`: CLIP score, FID, KID, LPIPS.

METRICS is the registry (name -> Metric). Each metric loads its local weights once (formats/metric_models.py;
nothing downloads) and scores a model's images, made on the same prompts/labels and seeds as the base's:

- clip: CLIP score (Hessel et al. 2021) of each image with its own prompt, 100 x cosine of the CLIP image and
  text embeddings, averaged (torchmetrics CLIPScore). Higher is better; text families only.
- fid: Frechet distance between Inception-v3 pool features (2048-d) of the model's images and a reference set:
  a folder (--fid-reference) or the base's own images on the same prompts and seeds ("FID to base", the base
  scores 0). Lower is better. Features: torch-fidelity's TF-compatible Inception; maths: torchmetrics'.
- kid: the unbiased squared MMD (cubic polynomial kernel) between the same features (torchmetrics'); less
  biased than FID at few images. Lower is better.
- lpips: LPIPS (AlexNet, v0.1 heads) of each image against the base's image of the same seed, averaged. 0 is
  identical; lower is better.
- image-reward, hps: named so that asking for them says why they are not offered (their packages import
  torchvision, which does not import beside this torch).

Pure functions of arrays and loaded modules: no argv, no printing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ditkit.formats.errors import ConfigError

CHUNK = 16  # images per forward pass of a metric network
LPIPS_MIN_SIZE = 64  # LPIPS was calibrated on 64 px patches; smaller images are upsampled to this
KID_SUBSET_SIZE = 1000  # torchmetrics' default; capped at the number of images
KID_SUBSETS = 100


def _nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class Metric:
    name: str
    summary: str
    higher_is_better: bool
    load: Callable[[str | None], object] | None  # path -> loaded model(s); None: not offered
    unavailable: str | None = None  # why it is not offered, and what would make it so


# -- CLIP score ---------------------------------------------------------------------------------------

def clip_score(model_and_processor, images: np.ndarray, prompts: list[str]) -> float:
    """Mean CLIP score of images (uint8 (N, H, W, 3)) with their prompts (torchmetrics CLIPScore)."""
    from ditkit.nn.metric_nets import torchmetrics

    torchmetrics()
    from torchmetrics.multimodal.clip_score import CLIPScore

    from ditkit.nn.metric_nets import CLIPEmbedder

    model, processor = model_and_processor
    metric = CLIPScore(model_name_or_path=lambda: (CLIPEmbedder(model), processor))
    x = _nchw(images)
    for i in range(0, len(x), CHUNK):
        metric.update(list(x[i:i + CHUNK]), list(prompts[i:i + CHUNK]))
    return float(metric.compute())


# -- Inception features, FID, KID -----------------------------------------------------------------------

def inception_features(net, images: np.ndarray) -> torch.Tensor:
    """(N, 2048) float64 pool features of uint8 (N, H, W, 3) images (the network resizes to 299 px itself)."""
    x = _nchw(images)
    return torch.cat([net(x[i:i + CHUNK]).double() for i in range(0, len(x), CHUNK)])


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets (torchmetrics' formula: ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)))."""
    from ditkit.nn.metric_nets import torchmetrics

    torchmetrics()
    from torchmetrics.image.fid import _compute_fid

    if len(a) < 2 or len(b) < 2:
        return math.nan
    a, b = a.double(), b.double()
    return max(0.0, float(_compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))))


def kid(a: torch.Tensor, b: torch.Tensor, seed: int = 0) -> float:
    """KID: mean over subsets of torchmetrics' poly_mmd (degree 3, gamma 1/d, coef 1), subsets drawn with `seed`."""
    from ditkit.nn.metric_nets import torchmetrics

    torchmetrics()
    from torchmetrics.image.kid import poly_mmd

    m = min(len(a), len(b), KID_SUBSET_SIZE)
    if m < 2:
        return math.nan
    subsets = 1 if m == len(a) == len(b) else KID_SUBSETS  # all images: one subset is the whole set
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        ia, ib = torch.randperm(len(a), generator=g)[:m], torch.randperm(len(b), generator=g)[:m]
        vals.append(float(poly_mmd(a[ia].double(), b[ib].double())))
    return float(np.mean(vals))


# -- LPIPS ----------------------------------------------------------------------------------------------

def lpips(net, images: np.ndarray, ref: np.ndarray) -> float:
    """Mean LPIPS between paired uint8 (N, H, W, 3) images (image i against ref i)."""
    import torch.nn.functional as F

    def prep(z):
        x = _nchw(z).float() / 127.5 - 1.0  # [-1, 1]
        if min(x.shape[-2:]) < LPIPS_MIN_SIZE:
            s = LPIPS_MIN_SIZE / min(x.shape[-2:])
            x = F.interpolate(x, size=(round(x.shape[-2] * s), round(x.shape[-1] * s)), mode="bilinear",
                              align_corners=False)
        return x

    a, b = prep(images), prep(ref)
    return float(torch.cat([net(a[i:i + CHUNK], b[i:i + CHUNK]) for i in range(0, len(a), CHUNK)]).mean())


# -- the registry ---------------------------------------------------------------------------------------

def _loader(name: str):
    def load(path):
        from ditkit.formats import metric_models

        return {"clip": metric_models.load_clip, "fid": metric_models.load_inception,
                "kid": metric_models.load_inception, "lpips": metric_models.load_lpips}[name](path, name)
    return load


_NO_TORCHVISION = ("its package imports torchvision, which does not import beside this torch build "
                   "(torchvision::nms missing); install a torchvision built for this torch, then ask for it again")

METRICS: dict[str, Metric] = {
    "clip": Metric("clip", "CLIP score of each image with its prompt (x100 cosine); higher is better", True,
                   _loader("clip")),
    "fid": Metric("fid", "Frechet Inception distance to the reference (the base's images by default)", False,
                  _loader("fid")),
    "kid": Metric("kid", "kernel Inception distance to the reference (the base's images by default)", False,
                  _loader("kid")),
    "lpips": Metric("lpips", "LPIPS (AlexNet) of each image against the base's on the same seed", False,
                    _loader("lpips")),
    "image-reward": Metric("image-reward", "ImageReward (pip install image-reward; ImageReward.pt and "
                           "med_config.json)", True, None, "--metric image-reward is not offered: " + _NO_TORCHVISION),
    "hps": Metric("hps", "HPSv2 (pip install hpsv2; HPS_v2_compressed.pt and the open_clip ViT-H-14 weights)", True,
                  None, "--metric hps is not offered: " + _NO_TORCHVISION),
}

# gate name -> (metric, "value" or "ratio" to the base, comparison); bench's GATES include these
METRIC_GATES = {
    "min_clip": ("clip", "value", ">="),
    "min_clip_ratio": ("clip", "ratio", ">="),
    "max_fid": ("fid", "value", "<="),
    "max_fid_ratio": ("fid", "ratio", "<="),
    "max_kid": ("kid", "value", "<="),
    "max_kid_ratio": ("kid", "ratio", "<="),
    "max_lpips": ("lpips", "value", "<="),
}


def parse_metrics(specs: list[str]) -> dict[str, str | None]:
    """['clip=DIR', 'fid'] -> {'clip': 'DIR', 'fid': None}; unknown names refused with the choices."""
    out: dict[str, str | None] = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        name = name.strip()
        if name not in METRICS:
            raise ConfigError(f"unknown --metric {name!r}, choose one of: {', '.join(METRICS)} (NAME or NAME=PATH)")
        if name in out:
            raise ConfigError(f"--metric {name} is given twice; give it once")
        out[name] = path or None
    return out


def check_metrics(metrics: dict[str, str | None]) -> None:
    """Refuse the metrics that are not offered (one line: why, and what would make it so)."""
    for name in metrics:
        if name not in METRICS:
            raise ConfigError(f"unknown metric {name!r}, choose one of: {', '.join(METRICS)}")
        if METRICS[name].unavailable:
            raise ConfigError(METRICS[name].unavailable)


def load_metrics(metrics: dict[str, str | None]) -> dict[str, object]:
    """name -> loaded model(s); fid and kid share one Inception when they name the same weights."""
    check_metrics(metrics)
    loaded: dict[str, object] = {}
    for name, path in metrics.items():
        twin = {"fid": "kid", "kid": "fid"}.get(name)
        if twin in loaded and metrics.get(twin) == path:
            loaded[name] = loaded[twin]
        else:
            loaded[name] = METRICS[name].load(path)
    return loaded


@torch.inference_mode()
def score_all(loaded: dict[str, object], images: dict[str, np.ndarray], prompts: dict[str, list | None],
              base: str, reference: np.ndarray | None, seed: int = 0,
              log: Callable[[str], None] = lambda m: None) -> dict[str, dict[str, float | None]]:
    """model name -> {metric: value}; `base` names the reference model, `reference` a folder's images (or None)."""
    out: dict[str, dict[str, float | None]] = {n: {} for n in images}
    ref_images = images.get(base)
    feats: dict[int, dict[str, torch.Tensor]] = {}  # per Inception network: model -> features
    for name, model in loaded.items():
        for m, img in images.items():
            value = None
            if name == "clip":
                p = prompts.get(m)
                if p and all(isinstance(s, str) for s in p):
                    log(f"metric clip: {m}")
                    value = clip_score(model, img, list(p))
            elif name in ("fid", "kid"):
                cache = feats.setdefault(id(model), {})
                target = reference if reference is not None else ref_images
                if target is None:
                    continue
                if "\0reference" not in cache:
                    log(f"metric {name}: Inception features of the reference ({len(target)} images)")
                    cache["\0reference"] = inception_features(model, target)
                if m not in cache:
                    log(f"metric {name}: Inception features of {m}")
                    cache[m] = (cache["\0reference"] if reference is None and m == base
                                else inception_features(model, img))
                if reference is None and m == base:
                    value = 0.0  # the base against its own images
                elif name == "fid":
                    value = fid(cache[m], cache["\0reference"])
                else:
                    value = kid(cache[m], cache["\0reference"], seed)
            elif name == "lpips":
                if ref_images is not None and ref_images.shape == img.shape:
                    log(f"metric lpips: {m}")
                    value = 0.0 if m == base else lpips(model, img, ref_images)
            out[m][name] = None if value is None or not math.isfinite(value) else round(value, 6)
    return out


def ratios(values: dict[str, float | None], base_values: dict[str, float | None]) -> dict[str, float | None]:
    """metric -> value / the base's value, where the base's is a positive number (FID/KID to base and LPIPS are 0
    for the base itself: no ratio)."""
    out = {}
    for k, v in values.items():
        b = base_values.get(k)
        out[k] = None if v is None or b is None or b <= 0 else round(v / b, 6)
    return out
