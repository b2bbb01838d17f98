"""Tiny random-weight stand-ins for bench's metric models, in the layout the real weights use (tests, docs).

    python tools/metric_models.py OUT
      OUT/clip/                                        a tiny transformers CLIPModel + CLIPProcessor (save_pretrained)
      OUT/inception/weights-inception-2015-12-05-6726825d.pth   torch-fidelity's Inception-v3 class, random weights
      OUT/lpips/alexnet-owt-7be5be79.pth               torchvision's AlexNet `features.*` keys, random weights

The scores they give are numbers from random networks, not image quality: they exist so that the real loading
and scoring code (transformers, torch-fidelity, torchmetrics) runs without the real weights, which nothing here
downloads.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from unittest import mock

import torch
from torch import nn


def _kaiming_(module: nn.Module, seed: int) -> None:
    """Variance-preserving random weights, so that activations stay O(1) through a deep random network."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
            if m.bias is not None:
                m.bias.data.zero_()


def write_clip(out: Path, seed: int = 0) -> Path:
    """A CLIP with 2-layer, 32-wide towers, 32 px images and a byte-level tokenizer (256 bytes, no merges)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"))
    bos, eos = len(vocab) - 2, len(vocab) - 1
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    # bias both towers' last LayerNorm towards one shared direction and share the projection, so that random
    # image and text embeddings have positive cosines: a CLIP score (clamped at 0) with a ratio to the base
    with torch.no_grad():
        for ln in (model.vision_model.post_layernorm, model.text_model.final_layer_norm):
            ln.weight.fill_(0.5)
            ln.bias.fill_(1.0)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(out)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(out)
    return out


def random_inception(seed: int = 0) -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 itself, with random weights instead of its download."""
    from ditkit.nn.metric_nets import torchmetrics

    torchmetrics()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        # the class always loads a state dict in __init__; skip that one call to keep its random initialisation
        with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    _kaiming_(net, seed)
    return net


def write_inception(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception(seed).state_dict(), path)
    return path


def write_alexnet(path: Path, seed: int = 0) -> Path:
    from ditkit.nn.metric_nets import alexnet_features

    net = nn.Module()
    net.features = alexnet_features()
    _kaiming_(net, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def write_all(out: Path, seed: int = 0) -> dict[str, Path]:
    from ditkit.formats.metric_models import ALEXNET_FILE, INCEPTION_FILE

    return {"clip": write_clip(out / "clip", seed),
            "inception": write_inception(out / "inception" / INCEPTION_FILE, seed),
            "lpips": write_alexnet(out / "lpips" / ALEXNET_FILE, seed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, path in write_all(args.out, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
