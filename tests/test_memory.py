"""Resource limits (ops/memory.py): generate, bench, distill and lora-train estimate peak memory before allocating
and refuse a job that clearly cannot fit with one line (exit 2) naming the estimate and the free memory; --force
overrides."""
from __future__ import annotations

import pytest
import torch

from ditkit.cli.errors import EXIT_INPUT
from ditkit.ops import memory


def test_available_memory_is_measured():
    free = memory.available_bytes("cpu")
    assert free is not None and 1 << 20 < free < 1 << 50


def test_load_estimate_counts_headers_at_the_target_dtype(tiny_dir):
    from ditkit.formats.layouts import load_bundle

    d = tiny_dir("dit")
    est = memory.load_estimate(d)
    b = load_bundle(d)
    loaded = memory.module_bytes(b)  # every tensor of every component (+ 2 kB of buffers no file holds)
    assert est.total <= loaded <= 1.01 * est.total
    half = memory.load_estimate(d, dtype=torch.float16)
    assert half.total * 2 == est.total  # all-float checkpoint: exactly half at 2 bytes per element


def test_inference_estimate_grows_with_the_batch(tiny_dir):
    from ditkit.formats.layouts import load_bundle

    b = load_bundle(tiny_dir("dit"))
    e4, e8 = memory.inference_estimate("generate", [b], 4), memory.inference_estimate("generate", [b], 8)
    assert e4.allocated == e8.allocated == memory.module_bytes(b)
    assert e8.parts["transformer activations"] == 2 * e4.parts["transformer activations"] > 0
    # rows x tokens x hidden x 4 bytes x 16: 2*8 rows, (8/2)^2 tokens, 2 heads x 16
    assert e8.parts["transformer activations"] == 16 * 16 * 32 * 4 * memory.ACT_FACTOR


@pytest.fixture
def free(monkeypatch):
    def set_free(n: int):
        monkeypatch.setattr(memory, "available_bytes", lambda device: n)
    return set_free


def class_data(root, n=4):
    """n black 16x16 images in class folders 0/ and 1/ (the tiny DiT's native size)."""
    from PIL import Image

    for i in range(n):
        (root / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(root / str(i % 2) / f"{i}.png")
    return root


@pytest.mark.parametrize("command", ["generate", "bench", "distill", "lora-train"])
def test_refuses_what_cannot_load(command, cli, tiny_dir, tmp_path, free):
    free(100_000)  # 100 kB: the tiny DiT's weights are 0.7 MB
    out = tmp_path / ("out.safetensors" if command == "lora-train" else "out")
    args = {"generate": ["-o", out], "bench": ["--num-images", "0"],
            "distill": ["-o", out, "--mode", "steps"],
            "lora-train": ["-o", out, "--data", class_data(tmp_path / "data")]}[command]
    r = cli(command, tiny_dir("dit"), *args, "--steps", "1")
    assert r.code == EXIT_INPUT and len([l for l in r.err.splitlines() if l.strip()]) == 1, r.err
    assert r.error_line.startswith(f"Error: loading {tiny_dir('dit')} needs about 671.5 kB (weights 671.5 kB)")
    assert "only 100.0 kB is available on cpu" in r.error_line and "--force" in r.error_line
    assert not out.exists() and not (tmp_path / "out.ckpt").exists()


def test_refuses_a_batch_that_cannot_fit(cli, tiny_dir, tmp_path, free):
    free(50_000_000)  # 50 MB: the weights load, 4096 images' activations (268 MB) do not
    r = cli("generate", tiny_dir("dit"), "-o", tmp_path / "out", "--steps", "1", "--num-images", "4096",
            "--batch-size", "4096")
    assert r.code == EXIT_INPUT, r.err
    assert r.error_line.startswith("Error: generate needs about 269.4 MB (weights 673.5 kB, transformer "
                                   "activations 268.4 MB, VAE decode 262.1 kB)"), r.error_line
    assert "only 50.0 MB is available on cpu; use a smaller --batch-size" in r.error_line
    assert not (tmp_path / "out").exists()


def test_force_overrides(cli, tiny_dir, tmp_path, free):
    free(100_000)
    r = cli("generate", tiny_dir("dit"), "-o", tmp_path / "out", "--steps", "1", "--num-images", "1", "--force")
    assert r.code == 0, r.err
    assert r.err.count("going on because of --force") == 2  # the load check and the batch check
    assert (tmp_path / "out" / "00000.png").is_file()


def test_distill_refuses_a_pool_that_cannot_fit(cli, tiny_dir, tmp_path, free):
    free(3_000_000)  # the weights (0.7 MB) load; 1000 trajectories, optimizer state and activations do not
    r = cli("distill", tiny_dir("dit"), "-o", tmp_path / "out", "--mode", "steps", "--steps", "1",
            "--pool-size", "1000", "--batch-size", "256", "--val-images", "4")
    assert r.code == EXIT_INPUT, r.err
    assert r.error_line.startswith("Error: distill needs about"), r.error_line
    assert "use a smaller --batch-size or --pool-size" in r.error_line
    assert not (tmp_path / "out").exists()


def test_lora_train_refuses_a_batch_that_cannot_fit(cli, tiny_dir, tmp_path, free):
    free(5_000_000)  # the weights (0.7 MB) load; 4096 samples' activations do not
    out = tmp_path / "out.safetensors"
    r = cli("lora-train", tiny_dir("dit"), "--data", class_data(tmp_path / "data"), "-o", out, "--steps", "1",
            "--batch-size", "4096")
    assert r.code == EXIT_INPUT, r.err
    assert r.error_line.startswith("Error: lora-train needs about"), r.error_line
    # weights: the tiny pipeline's 673.5 kB + 8.2 kB of LoRA factors; optimizer: their grads + AdamW m and v
    assert "(weights 681.7 kB, optimizer 24.6 kB, activations " in r.error_line
    assert "only 5.0 MB is available on cpu; use a smaller --batch-size, more --grad-accum or " \
           "--grad-checkpointing, or pass --force" in r.error_line
    assert not out.exists() and not (tmp_path / "out.ckpt").exists()  # nor the data cache


def test_lora_train_force_overrides(cli, tiny_dir, tmp_path, free):
    free(100_000)
    out = tmp_path / "out.safetensors"
    r = cli("lora-train", tiny_dir("dit"), "--data", class_data(tmp_path / "data"), "-o", out, "--steps", "1",
            "--batch-size", "2", "--validation-images", "1", "--validation-steps", "1", "--force")
    assert r.code == 0, r.err
    assert r.err.count("going on because of --force") == 2  # before loading, and the plan's estimate
    assert out.is_file()


def test_lora_estimate_scales_with_the_batch_and_checkpointing(tiny_dir, tmp_path):
    from ditkit.formats.layouts import load_bundle
    from ditkit.formats.datasets import read_image_folder
    from ditkit.ops.lora import LoraConfig, _inject, encode_data, estimate_peak_memory, resolve_targets

    b = load_bundle(tiny_dir("dit"))
    folder = read_image_folder(class_data(tmp_path / "data"), size=(16, 16))
    tensors, _ = encode_data(b, folder, LoraConfig())
    tr = b.transformer
    _inject(tr, resolve_targets(b.family, tr, ("attention",)), 4, 4.0, "ditkit")
    for n, p in tr.named_parameters():
        p.requires_grad_(".lora_" in n)
    m8 = estimate_peak_memory(b, tensors, LoraConfig(batch_size=8))
    m16 = estimate_peak_memory(b, tensors, LoraConfig(batch_size=16))
    acc = estimate_peak_memory(b, tensors, LoraConfig(batch_size=16, grad_accum=2))
    gc = estimate_peak_memory(b, tensors, LoraConfig(batch_size=16, grad_checkpointing=True))
    assert m16["weights"] == m8["weights"] == memory.module_bytes(b)  # every component, LoRA factors included
    lora = sum(p.numel() for n, p in tr.named_parameters() if ".lora_" in n)
    assert m8["optimizer"] == lora * 4 * 3  # fp32 grads + AdamW m and v
    assert m16["activations"] == 2 * m8["activations"] > 0 and acc["activations"] == m8["activations"]
    assert 0 < gc["activations"] < 0.6 * m16["activations"]  # block inputs + one of the 2 blocks recomputed
    assert not tr.is_gradient_checkpointing  # the probe leaves the model as it found it
