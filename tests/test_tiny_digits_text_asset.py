"""The shipped default model formats/assets/tiny-digits-text: a PixArt pipeline whose captions pick the digit.
It loads in diffusers' PixArtAlphaPipeline and in ditkit by name, draws the digit a prompt names, is small.

Rebuild it with `make tiny-digits-text` (tools/tiny_digits_text.py; see docs/tiny-digits-text.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import ditkit.formats
from ditkit.formats.layouts import DEFAULT_MODELS, load_bundle
from ditkit.ops.judge import score
from tiny_digits_text import LABEL_NAMES, MAX_TOKENS, TEMPLATES, VOCAB, prompt  # tools/, on the path by conftest

ASSET = Path(ditkit.formats.__file__).parent / "assets" / "tiny-digits-text"
MAX_BYTES = 10 * 1024 * 1024
PIPELINE = "PixArtAlphaPipeline"  # conftest's `pipe` fixture loads the asset with it
BUILDER = "tools/tiny_digits_text.py"
LABELS = list(range(10)) * 2  # 20 images: a few seconds on 2 cores


def draw(pipe, prompts: list[str], d: dict) -> np.ndarray:
    """The pipeline's own __call__ (resolution binning off: its tables start at 256 px)."""
    out = pipe(prompts, height=32, width=32, use_resolution_binning=False, num_inference_steps=d["steps"],
               guidance_scale=d["guidance"], generator=torch.Generator().manual_seed(0), output_type="np",
               clean_caption=False, max_sequence_length=MAX_TOKENS).images
    return (np.asarray(out) * 255).round().clip(0, 255).astype(np.uint8)


def test_asset_is_small_and_pickle_free(asset):
    files = [p for p in asset.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    assert total < MAX_BYTES, f"asset is {total / 1e6:.2f} MB"
    weights = {p.suffix for p in files} - {".json"}
    assert weights == {".safetensors"}, f"unexpected file types {weights}"


def test_manifest_defaults(manifest):
    d = manifest["defaults"]
    assert manifest["family"] == "pixart" and manifest["op"] == "build-default"
    assert d["sampler"] == "ddim" and d["steps"] == 25
    assert 1.0 <= d["guidance"] <= 8.0
    assert d["prompts"] == [f"a handwritten {w}" for w in LABEL_NAMES]
    assert d["prompt_labels"]["seven"] == 7 and d["prompt_labels"]["7"] == 7
    assert manifest["report"]["judge_accuracy"] >= 0.95
    assert manifest["report"]["diffusers_pipeline_call"]["accuracy"] >= 0.95


def test_pipeline_parts(pipe):
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.clip_sample is False
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())
    ids = pipe.tokenizer("a handwritten seven").input_ids
    assert ids == [VOCAB.index(w) for w in ("a", "handwritten", "seven")] + [1]  # ... </s>
    assert pipe.tokenizer("A Handwritten SEVEN").input_ids == ids  # lower-cased
    assert pipe.tokenizer("a scribbled seven").input_ids[1] == VOCAB.index("<unk>")


def test_every_template_word_is_in_the_vocabulary():
    words = {w for t in range(len(TEMPLATES)) for l in range(10) for w in prompt(l, t).split()}
    assert words <= set(VOCAB)


def test_diffusers_pipeline_draws_the_named_digits(pipe, judge, manifest):
    d = manifest["defaults"]
    images = draw(pipe, [prompt(l) for l in LABELS], d)
    assert images.shape == (20, 32, 32, 3)
    s = score(judge, images, LABELS)
    assert s.accuracy >= 0.9, s.to_dict()


def test_prompts_drive_it(pipe, judge, manifest):
    """Same seed, other words: the judge sees the digit the prompt names, not the one the noise favoured."""
    d = manifest["defaults"]
    shifted = [(l + 3) % 10 for l in LABELS]
    s = score(judge, draw(pipe, [prompt(l, 6) for l in shifted], d), shifted)  # "the digit 3": numerals too
    assert s.accuracy >= 0.9, s.to_dict()


def test_ditkit_loads_it_by_name_and_scores_prompts():
    from ditkit.ops.generate import GenerateConfig, generate

    assert "tiny-digits-text" in DEFAULT_MODELS
    bundle = load_bundle("tiny-digits-text")
    assert bundle.family.name == "pixart" and bundle.judge is not None
    images, rep = generate(bundle, GenerateConfig(prompts=["a handwritten seven", "a handwritten two"],
                                                  num_images=10, seed=0))
    assert images.shape == (10, 32, 32, 3)
    assert rep.judge is not None and rep.judge["n"] == 10 and rep.judge["accuracy"] >= 0.9
