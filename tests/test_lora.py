"""LoRA: training on every family, adapter files (PEFT/diffusers and kohya), diffusers interop, strict matching,
exact resume, and the base staying bit-identical."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import tiny
from conftest import FAMILY_NAMES
from ditkit.formats.families import FAMILIES
from ditkit.formats.layouts import load_bundle
from ditkit.formats.checkpoint import CheckpointStore
from ditkit.formats.datasets import read_image_folder
from ditkit.formats.embeddings import load_embeddings
from ditkit.formats.errors import ConfigError, FormatError, Interrupted
from ditkit.formats.lora import Adapter, load_adapter, save_adapter
from ditkit.ops.lora import (LoraConfig, apply_lora, base_digest, extract_adapter, fuse_lora, linear_modules,
                             lora_train, native_size, resolve_targets, unload_lora)


# -- helpers -----------------------------------------------------------------------------------------

def make_data(root, bundle, n=6, labels=False):
    """n random images at the model's native size, captioned with tiny.PROMPTS (or class-labelled)."""
    h, w = native_size(bundle)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        if labels:
            rows.append(json.dumps({"file_name": f"{i}.png", "label": i % 3}))
        else:
            (root / f"{i}.txt").write_text(tiny.PROMPTS[i % 2])
    if labels:
        (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def setup(family, tiny_dir, tiny_embeddings, tmp_path):
    bundle = load_bundle(tiny_dir(family))
    data = make_data(tmp_path / "data", bundle, labels=family == "dit")
    emb = load_embeddings(tiny_embeddings(family)) if family != "dit" else None
    return bundle, read_image_folder(data), emb


def outputs(bundle, seed=0):
    x, t, c = bundle.family.dummy_inputs(bundle.transformer, 2, seed=seed)
    with torch.no_grad():
        return bundle.family.predict(bundle.transformer, x, t, c, guidance=bundle.defaults()["guidance"])


def random_adapter(bundle, rank=4, alpha=8.0, targets=("attention",), seed=0) -> Adapter:
    from ditkit.ops.lora import TARGETS

    targets = [t for t in targets if TARGETS[t].modules(bundle.family, bundle.transformer)]  # Sana: no Linear MLP
    mods = resolve_targets(bundle.family, bundle.transformer, targets)
    lin = linear_modules(bundle.transformer)
    g = torch.Generator().manual_seed(seed)
    A = {m: torch.randn(rank, lin[m][1], generator=g) * 0.1 for m in mods}
    B = {m: torch.randn(lin[m][0], rank, generator=g) * 0.1 for m in mods}
    return Adapter(A=A, B=B, rank=rank, alpha=alpha, family=bundle.family.name, targets=list(targets))


FAST = dict(steps=2, batch_size=4, validation_images=1, validation_steps=2, checkpoint_every=1)


# -- training ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_trains_and_base_stays_identical(family, tiny_dir, tiny_embeddings, tmp_path):
    bundle, folder, emb = setup(family, tiny_dir, tiny_embeddings, tmp_path)
    before_digest, before_out = base_digest(bundle.transformer), outputs(bundle)
    bundle, rep = lora_train(bundle, LoraConfig(**FAST), folder, embeddings=emb)
    assert rep.steps == 2 and np.isfinite(rep.final_loss) and rep.base_unchanged
    assert rep.adapter_params > 0 and rep.adapter_fraction == pytest.approx(rep.adapter_params / rep.transformer_params,
                                                                            abs=1e-5)
    assert rep.peak_memory_mb["total"] > 0 and rep.validation["images"] == 1
    assert base_digest(bundle.transformer) == before_digest
    with_adapter = outputs(bundle)
    assert not torch.equal(with_adapter, before_out)  # the adapter does something
    adapter = extract_adapter(bundle, LoraConfig(**FAST))
    assert adapter.num_params == rep.adapter_params and adapter.rank == 4 and adapter.alpha == 4.0
    unload_lora(bundle)
    assert torch.equal(outputs(bundle), before_out)  # unloading restores the exact base outputs
    assert not any(".lora_" in k for k in bundle.transformer.state_dict())


def test_targets_derived_from_module_types(tiny_dir):
    b = load_bundle(tiny_dir("flux"))
    att = resolve_targets(b.family, b.transformer, ["attention"])
    mlp = resolve_targets(b.family, b.transformer, ["mlp"])
    mod = resolve_targets(b.family, b.transformer, ["modulation"])
    assert "transformer_blocks.0.attn.add_k_proj" in att and "single_transformer_blocks.0.attn.to_q" in att
    assert "single_transformer_blocks.0.proj_mlp" in mlp and "transformer_blocks.0.ff.net.2" in mlp
    assert "single_transformer_blocks.0.norm.linear" in mod and not set(att) & set(mlp) | set(att) & set(mod)
    dit = load_bundle(tiny_dir("dit"))
    assert resolve_targets(dit.family, dit.transformer, ["attention"]) == [
        f"transformer_blocks.{i}.attn1.{p}" for i in range(2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
    with pytest.raises(ConfigError, match="unknown target"):
        LoraConfig(targets=("attn",))


def test_mlp_and_modulation_targets_train(tiny_dir, tiny_embeddings, tmp_path):
    bundle, folder, emb = setup("pixart", tiny_dir, tiny_embeddings, tmp_path)
    cfg = LoraConfig(**{**FAST, "steps": 1}, targets=("attention", "mlp", "modulation"), rank=2)
    bundle, rep = lora_train(bundle, cfg, folder, embeddings=emb)
    assert rep.modules == 16 + 4 + 1 and rep.base_unchanged


def test_resume_equals_uninterrupted_run(tiny_dir, tmp_path):
    def run(store_dir, resume=False, stop_at=None):
        bundle = load_bundle(tiny_dir("dit"))
        folder = read_image_folder(make_data(tmp_path / "data", bundle, labels=True))

        def on_step(step, loss):
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)

        cfg = LoraConfig(**{**FAST, "steps": 4, "validate_every": 0})
        bundle, rep = lora_train(bundle, cfg, folder, CheckpointStore(store_dir), resume, on_step=on_step)
        return extract_adapter(bundle, cfg), rep

    straight, _ = run(tmp_path / "a")
    with pytest.raises(Interrupted, match="--resume"):
        run(tmp_path / "b", stop_at=2)
    resumed, rep = run(tmp_path / "b", resume=True)
    assert rep.resumed_from == 2
    assert all(torch.equal(straight.A[m], resumed.A[m]) and torch.equal(straight.B[m], resumed.B[m])
               for m in straight.modules)
    log = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_resume_with_other_settings_is_refused(tiny_dir, tmp_path):
    bundle = load_bundle(tiny_dir("dit"))
    folder = read_image_folder(make_data(tmp_path / "data", bundle, labels=True))
    lora_train(bundle, LoraConfig(**FAST), folder, CheckpointStore(tmp_path / "c"))
    with pytest.raises(ConfigError, match="rank: 4 -> 8"):
        lora_train(load_bundle(tiny_dir("dit")), LoraConfig(**FAST, rank=8), folder, CheckpointStore(tmp_path / "c"),
                   resume=True)


def test_class_family_needs_labels_and_text_needs_captions(tiny_dir, tiny_embeddings, tmp_path):
    bundle = load_bundle(tiny_dir("dit"))
    captioned = read_image_folder(make_data(tmp_path / "caps", bundle))
    with pytest.raises(ConfigError, match="class-conditional: --data needs class labels"):
        lora_train(bundle, LoraConfig(**FAST), captioned)
    pix = load_bundle(tiny_dir("pixart"))
    labelled = read_image_folder(make_data(tmp_path / "labs", pix, labels=True))
    with pytest.raises(ConfigError, match="needs a caption per image"):
        lora_train(pix, LoraConfig(**FAST), labelled, embeddings=load_embeddings(tiny_embeddings("pixart")))


# -- adapter files -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_adapter_round_trip(family, fmt, tiny_dir, tmp_path):
    bundle = load_bundle(tiny_dir(family))
    base = outputs(bundle)
    from ditkit.ops.lora.targets import mlp_targets

    # Sana's MLP is convolutions (GLUMBConv): no Linear for a LoRA there
    ad = random_adapter(bundle, targets=("attention", "mlp") if mlp_targets(bundle.family, bundle.transformer)
                        else ("attention",))
    path = save_adapter(tmp_path / "a.safetensors", ad, fmt)
    apply_lora(bundle, ad, 0.5)
    direct = outputs(bundle)
    unload_lora(bundle)
    loaded = load_adapter(path)
    assert loaded.rank == 4 and loaded.alpha == 8.0 and loaded.family == family
    apply_lora(bundle, loaded, 0.5)
    assert torch.equal(outputs(bundle), direct) and not torch.equal(direct, base)
    unload_lora(bundle)
    assert torch.equal(outputs(bundle), base)


def test_file_metadata_and_kohya_keys(tiny_dir, tmp_path):
    bundle = load_bundle(tiny_dir("sd3"))
    ad = random_adapter(bundle, rank=4, alpha=2.0)
    peft_path = save_adapter(tmp_path / "p.safetensors", ad, "peft")
    with safe_open(str(peft_path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["rank"] == "4" and float(meta["alpha"]) == 2.0 and json.loads(meta["targets"]) == ["attention"]
    assert meta["family"] == "sd3"
    dmeta = json.loads(meta["lora_adapter_metadata"])
    assert dmeta["transformer.r"] == 4 and dmeta["transformer.lora_alpha"] == 2.0
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys

    kohya_path = save_adapter(tmp_path / "k.safetensors", ad, "kohya")
    with safe_open(str(kohya_path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
        alpha = f.get_tensor("lora_transformer_transformer_blocks_0_attn_to_q.alpha")
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert "lora_transformer_transformer_blocks_0_attn_to_out_0.lora_down.weight" in keys
    assert "lora_transformer_transformer_blocks_0_attn_add_k_proj.lora_up.weight" in keys
    assert all(k.startswith("lora_transformer_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert alpha.ndim == 0 and alpha.item() == 2.0 and len(keys) == 3 * len(ad.modules)


def test_foreign_file_without_alpha_defaults_to_rank(tmp_path, tiny_dir):
    from safetensors.torch import save_file

    bundle = load_bundle(tiny_dir("pixart"))
    ad = random_adapter(bundle, rank=2)
    save_file({f"transformer.{k}": v for k, v in ad.peft_state_dict().items()}, str(tmp_path / "f.safetensors"))
    loaded = load_adapter(tmp_path / "f.safetensors")
    assert loaded.alpha == 2.0 and "rank" in loaded.info["alpha_source"]


def diffusers_pipe(family, path):
    import diffusers

    from ditkit.formats.families import get_family

    cls = getattr(diffusers, get_family(family).pipeline_class)
    expected, _ = cls._get_signature_keys(cls)
    return cls.from_pretrained(path, **{k: None for k in expected if k not in ("transformer", "vae", "scheduler")})


def _lora_loader_families() -> list[str]:
    """Every family whose diffusers pipeline has a LoRA loader (LuminaPipeline, PixArt and DiT have none)."""
    import diffusers

    return [f for f in FAMILY_NAMES if hasattr(getattr(diffusers, FAMILIES[f].pipeline_class), "load_lora_weights")]


@pytest.mark.parametrize("family,fmt", [(f, "peft") for f in _lora_loader_families()]
                         + [("flux", "kohya")])  # diffusers maps kohya names back for flux only
def test_diffusers_load_lora_weights_reads_ditkit_adapters(family, fmt, tiny_dir, tmp_path):
    bundle = load_bundle(tiny_dir(family))
    base = outputs(bundle)
    ad = random_adapter(bundle, rank=4, alpha=8.0)  # alpha != rank: diffusers must read it from the metadata
    path = save_adapter(tmp_path / "a.safetensors", ad, fmt)
    apply_lora(bundle, ad)
    ours = outputs(bundle)
    pipe = diffusers_pipe(family, tiny_dir(family))
    pipe.load_lora_weights(str(path))
    theirs = outputs(type(bundle)(family=bundle.family, transformer=pipe.transformer))
    assert not torch.equal(theirs, base)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


def test_unmatched_adapters_are_errors(tiny_dir):
    bundle = load_bundle(tiny_dir("pixart"))
    ad = random_adapter(bundle)
    partial = Adapter(A={**ad.A, "transformer_blocks.9.attn1.to_q": ad.A["transformer_blocks.0.attn1.to_q"]},
                      B={**ad.B, "transformer_blocks.9.attn1.to_q": ad.B["transformer_blocks.0.attn1.to_q"]},
                      rank=4, alpha=4.0)
    with pytest.raises(FormatError, match=r"matches only 16 of its 17 modules; unmatched keys: "
                                          r"transformer_blocks\.9\.attn1\.to_q"):
        apply_lora(bundle, partial)
    assert not any(".lora_" in k for k in bundle.transformer.state_dict())  # nothing half-applied
    foreign = random_adapter(load_bundle(tiny_dir("sd3")))
    foreign.family = None
    with pytest.raises(FormatError, match="matches no module of this model"):
        apply_lora(bundle, foreign)
    foreign.family = "sd3"
    with pytest.raises(FormatError, match="trained for the sd3 family; this model is pixart"):
        apply_lora(bundle, foreign)


def test_fuse_equals_applied_adapter_and_leaves_input(tiny_dir):
    bundle = load_bundle(tiny_dir("dit"))
    base = outputs(bundle)
    ad = random_adapter(bundle, targets=("attention", "modulation"))
    fused = fuse_lora(bundle, [ad], [0.7])
    assert torch.equal(outputs(bundle), base)
    apply_lora(bundle, ad, 0.7)
    torch.testing.assert_close(outputs(fused), outputs(bundle), rtol=0, atol=2e-6)


def test_two_adapters_stack_with_their_scales(tiny_dir):
    bundle = load_bundle(tiny_dir("sd3"))
    a, b = random_adapter(bundle, seed=1), random_adapter(bundle, seed=2)
    fused = fuse_lora(bundle, [a, b], [1.0, -0.5])
    apply_lora(bundle, [a, b], [1.0, -0.5])
    torch.testing.assert_close(outputs(fused), outputs(bundle), rtol=0, atol=2e-6)
    with pytest.raises(ConfigError, match="2 --lora-scale values for 1 adapters"):
        apply_lora(bundle, a, [1.0, 2.0])


# -- data --------------------------------------------------------------------------------------------

def test_image_folder_layouts(tmp_path):
    img = np.zeros((20, 10, 3), dtype=np.uint8)
    caps = tmp_path / "caps"
    caps.mkdir()
    for i in range(2):
        Image.fromarray(img).save(caps / f"{i}.png")
        (caps / f"{i}.txt").write_text(f"caption {i}\n")
    f = read_image_folder(caps, size=(8, 8))
    assert f.layout == "captions" and f.captions == ["caption 0", "caption 1"] and f.images.shape == (2, 8, 8, 3)
    classes = tmp_path / "classes"
    for c in (3, 7):
        (classes / str(c)).mkdir(parents=True)
        Image.fromarray(img).save(classes / str(c) / "a.png")
    f = read_image_folder(classes)
    assert f.layout == "class-folders" and f.labels == [3, 7] and f.captions is None
    (caps / "1.txt").unlink()
    with pytest.raises(FormatError, match="images without a caption file: 1.png"):
        read_image_folder(caps)
    (caps / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "a typed one", "label": 1}\n'
                                         '{"file_name": "1.png", "text": "a typed two", "label": 2}\n')
    f = read_image_folder(caps)
    assert f.layout == "metadata.jsonl" and f.labels == [1, 2] and f.captions[1] == "a typed two"
    assert f.digest != read_image_folder(classes).digest


def test_trigger_placement():
    from ditkit.ops.lora import add_trigger, strip_trigger

    assert add_trigger("a seven", "typed") == "typed a seven"
    assert add_trigger("a {trigger} seven", "typed") == "a typed seven"
    assert add_trigger("a typed seven", "typed") == "a typed seven"
    assert strip_trigger("a typed seven", "typed") == "a seven"


# -- CLI ---------------------------------------------------------------------------------------------

def test_cli_train_generate_fuse_export(cli, tiny_dir, tmp_path):
    src = tiny_dir("dit")
    data = make_data(tmp_path / "data", load_bundle(src), labels=True)
    out = tmp_path / "a.safetensors"
    r = cli("lora-train", src, "--data", data, "-o", out, "--steps", "2", "--batch-size", "4", "--rank", "2",
            "--alpha", "4", "--validation-images", "1", "--validation-steps", "2", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["rank"] == 2 and doc["alpha"] == 4.0 and doc["base_unchanged"] is True and doc["steps"] == 2
    assert (tmp_path / "a.ckpt" / "log.jsonl").is_file() and (tmp_path / "a.ckpt" / "data.safetensors").is_file()
    assert list((tmp_path / "a.ckpt" / "validation").glob("step-000002.png"))
    assert "effective scale alpha/rank = 2" in r.err and "estimated peak memory" in r.err
    r = cli("lora-train", src, "--data", data, "-o", out, "--steps", "2")
    assert r.code == 2 and r.error_line.startswith("Error: output") and "--force" in r.error_line

    g0 = cli("generate", src, "-o", tmp_path / "g0", "--labels", "1,2", "--steps", "2", "--json")
    g1 = cli("generate", src, "-o", tmp_path / "g1", "--labels", "1,2", "--steps", "2", "--lora", out,
             "--lora-scale", "3", "--json")
    assert g0.code == 0 and g1.code == 0, g1.err
    assert g1.json()["lora"][0]["scale"] == 3.0 and g1.json()["lora"][0]["rank"] == 2
    from ditkit.formats.images import read_images

    assert not np.array_equal(read_images(tmp_path / "g0"), read_images(tmp_path / "g1"))

    fused = tmp_path / "fused"
    r = cli("lora-train", src, "--lora", out, "--lora-scale", "3", "--fuse-into", fused, "--json")
    assert r.code == 0, r.err
    g2 = cli("generate", fused, "-o", tmp_path / "g2", "--labels", "1,2", "--steps", "2", "--json")
    assert g2.code == 0
    diff = np.abs(read_images(tmp_path / "g2").astype(int) - read_images(tmp_path / "g1").astype(int)).max()
    assert diff <= 1  # fused weights == adapter at scale 3, up to float rounding
    assert json.loads((fused / "ditkit.json").read_text())["op"] == "lora-fuse"

    k = tmp_path / "k.safetensors"
    r = cli("lora-train", src, "--lora", out, "--format", "kohya", "-o", k, "--json")
    assert r.code == 0 and load_adapter(k).info["source_format"] == "kohya"


def test_cli_unmatched_adapter_line(cli, tiny_dir, tmp_path):
    other = random_adapter(load_bundle(tiny_dir("sd3")))
    other.family = None
    path = save_adapter(tmp_path / "sd3.safetensors", other)
    r = cli("generate", tiny_dir("pixart"), "-o", tmp_path / "g", "--lora", path, "--json")
    assert r.code == 2 and "matches no module of this model; unmatched keys: transformer_blocks.0.attn.add_k_proj" \
        in r.error_line
    r = cli("generate", tiny_dir("dit"), "-o", tmp_path / "g", "--lora-scale", "2")
    assert r.code == 2 and r.error_line == "Error: --lora-scale needs --lora ADAPTER"
