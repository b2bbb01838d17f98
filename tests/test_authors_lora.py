"""LoRA files written by other tools in the authors' module names (kohya / sd-scripts, ComfyUI): they change the
model exactly as merging them into the authors' weights does, which is what those tools do."""
from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import save_file

import authors_fixtures as F
from ditkit.formats import authors
from ditkit.formats.layouts import load_bundle
from ditkit.formats.lora import load_adapter
from ditkit.ops.lora.adapters import apply_lora

RANK = 4


def lora_pair(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, in_f, generator=g) * 0.1, torch.randn(out_f, RANK, generator=g) * 0.1


def merged_reference(layout, orig, targets, scale):
    """The model the writing tool gives: W_orig + scale * up @ down in the authors' weights, read into diffusers."""
    state = dict(orig)
    for mod, (down, up) in targets.items():
        state[f"{mod}.weight"] = state[f"{mod}.weight"] + scale * (up @ down)
    _, conf, converted = authors.read(state, "<merged>")
    b = authors.AUTHORS_LAYOUTS[layout]
    from ditkit.formats.families import get_family

    model = get_family(b.family).transformer_cls().from_config(conf)
    model.load_state_dict(converted)
    return model.eval()


CASES = {  # name -> (model, authors' writer, layout, modules, key style, alpha)
    "kohya-flux-bfl": (F.flux_model, F.bfl_flux, "bfl-flux",
                       ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0", "single_blocks.0.linear1",
                        "single_blocks.1.linear2", "double_blocks.0.img_mod.lin"], "kohya", 2.0),
    "kohya-sd3": (lambda: F.sd3_model(True, 16), F.stability_sd3, "stability-sd3",
                  ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn2.qkv",
                   "joint_blocks.1.context_block.mlp.fc1", "joint_blocks.2.context_block.adaLN_modulation.1"],
                  "kohya", 8.0),
    "comfyui-pixart-no-alpha": (F.pixart_model, F.pixart, "pixart-original",
                                ["blocks.0.attn.qkv", "blocks.1.cross_attn.kv_linear", "blocks.0.mlp.fc2"],
                                "comfyui", None),
    "comfyui-flux-peft-keys": (F.flux_model, F.bfl_flux, "bfl-flux",
                               ["double_blocks.0.txt_attn.qkv", "single_blocks.1.linear1"], "comfyui-peft", None),
}


def write_lora(path, style, orig, modules, alpha):
    tensors, targets = {}, {}
    for i, mod in enumerate(modules):
        w = orig[f"{mod}.weight"]
        down, up = lora_pair(w.shape[0], w.shape[1], i)
        targets[mod] = (down, up)
        if style == "kohya":
            key = "lora_unet_" + mod.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
            if alpha is not None:
                tensors[f"{key}.alpha"] = torch.tensor(alpha)
        elif style == "comfyui":
            tensors[f"diffusion_model.{mod}.lora_down.weight"], tensors[f"diffusion_model.{mod}.lora_up.weight"] = down, up
        else:
            tensors[f"diffusion_model.{mod}.lora_A.weight"], tensors[f"diffusion_model.{mod}.lora_B.weight"] = down, up
    save_file(tensors, str(path))
    return targets


@pytest.mark.parametrize("name", CASES)
def test_foreign_lora_equals_merging_it_into_the_authors_weights(name, tmp_path, cli, tiny_embeddings):
    make, writer, layout, modules, style, alpha = CASES[name]
    model = make()
    orig = writer(model)
    targets = write_lora(tmp_path / "lora.safetensors", style, orig, modules, alpha)
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in orig.items()}, str(ckpt))
    ad = load_adapter(tmp_path / "lora.safetensors")
    scale = (alpha if alpha is not None else RANK) / RANK
    assert ad.scale == scale
    ref = merged_reference(layout, orig, targets, scale)
    b = apply_lora(load_bundle(ckpt), ad)
    fam = b.family
    x, t, cond = fam.dummy_inputs(ref, 2, seed=1)
    with torch.no_grad():
        got, want = fam.predict(b.transformer, x, t, cond, 3.5), fam.predict(ref, x, t, cond, 3.5)
        base = fam.predict(model, x, t, cond, 3.5)
    assert float((got - want).abs().max()) < 1e-4
    assert float((base - want).abs().max()) > 1e-3  # the LoRA changes the output
    r = cli("generate", ckpt, "-o", tmp_path / "gen", "--lora", tmp_path / "lora.safetensors", "--steps", 2,
            "--num-images", 1, "--embeddings", tiny_embeddings(fam.name), "--json")
    assert r.code == 0, r.err


def test_kohya_flux_matches_diffusers_converter(tmp_path):
    """diffusers' kohya Flux converter (its widths 3072 / 12288 replaced by the fixture's) gives the same pieces."""
    from diffusers.loaders import lora_conversion_utils as lcu

    make, writer, layout, modules, style, alpha = CASES["kohya-flux-bfl"]
    model = make()
    orig = writer(model)
    write_lora(tmp_path / "l.safetensors", style, orig, modules, alpha)
    from safetensors.torch import load_file

    theirs_src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    assert "3072" in theirs_src
    ns = dict(lcu.__dict__)
    exec(theirs_src.replace("12288", str(4 * width)).replace("3072", str(width)), ns)
    theirs = ns["_convert_kohya_flux_lora_to_diffusers"](load_file(tmp_path / "l.safetensors"))
    ad = load_adapter(tmp_path / "l.safetensors")
    from ditkit.formats.lora import match
    from ditkit.ops.lora.targets import linear_modules

    mine = match(ad, linear_modules(model))
    for key, v in theirs.items():
        mod = key.removeprefix("transformer.").rsplit(".lora_", 1)[0]
        ours = (mine.A if ".lora_A." in key else mine.B)[mod]
        scale = ad.scale if ".lora_A." in key else 1.0  # diffusers folds alpha / rank into lora_A
        assert torch.allclose(ours * scale, v, atol=1e-6), key
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in theirs} == set(mine.modules)


def test_lora_train_fuses_a_kohya_bfl_lora(tmp_path, cli):
    make, writer, layout, modules, style, alpha = CASES["kohya-flux-bfl"]
    model = make()
    orig = writer(model)
    targets = write_lora(tmp_path / "lora.safetensors", style, orig, modules, alpha)
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in orig.items()}, str(ckpt))
    r = cli("lora-train", ckpt, "--lora", tmp_path / "lora.safetensors", "--fuse-into", tmp_path / "fused", "--json")
    assert r.code == 0, r.err
    fused = load_bundle(tmp_path / "fused")
    ref = merged_reference(layout, orig, targets, alpha / RANK)
    fam = fused.family
    x, t, cond = fam.dummy_inputs(ref, 2, seed=1)
    with torch.no_grad():
        got, want = fam.predict(fused.transformer, x, t, cond, 3.5), fam.predict(ref, x, t, cond, 3.5)
    assert float((got - want).abs().max()) < 1e-4


# -- ditkit writing the authors' layout (--format original): what ComfyUI and sd-scripts read --------------------

WRITERS = {"pixart": (F.pixart_model, F.pixart), "flux": (F.flux_model, F.bfl_flux),
           "sd3": (lambda: F.sd3_model(True, 16), F.stability_sd3)}


def comfyui_merge(orig: dict, lora: dict) -> dict:
    """What ComfyUI does with a `lora_unet_` file: each key names `diffusion_model.<module>` of the model's own
    (authors') state dict, dots as underscores; W += alpha / rank * up @ down, rank = lora_down's rows."""
    flat = {k[:-len(".weight")].replace(".", "_"): k for k in orig if k.endswith(".weight")}
    state = dict(orig)
    for k, down in lora.items():
        if k.endswith(".lora_down.weight"):
            name = k[:-len(".lora_down.weight")]
            w = flat[name.removeprefix("lora_unet_")]
            up, alpha = lora[f"{name}.lora_up.weight"], float(lora[f"{name}.alpha"])
            state[w] = state[w] + (alpha / down.shape[0]) * (up @ down)
    return state


def original_case(family, root):
    """A model of `family` in its authors' layout (`root/model.safetensors`), a random adapter on its diffusers
    modules (`root/a.safetensors`, PEFT), and that adapter with --format original (`root/o.safetensors`)."""
    from test_lora import random_adapter

    from ditkit.formats.lora import save_adapter
    from ditkit.ops.lora.targets import linear_modules

    make, writer = WRITERS[family]
    orig = writer(make())
    ckpt = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in orig.items()}, str(ckpt))
    b = load_bundle(ckpt)
    ad = random_adapter(b, targets=("attention", "mlp"))
    save_adapter(root / "a.safetensors", ad)
    save_adapter(root / "o.safetensors", ad, "original", modules=linear_modules(b.transformer))
    return orig, ckpt, ad


def original_outputs(orig, ckpt, ad, lora_path):
    """(ComfyUI's merge of the file into the authors' weights, ditkit's adapter, the file read back by ditkit,
    no adapter): one model output each on the same inputs."""
    from safetensors.torch import load_file

    _, conf, converted = authors.read(comfyui_merge(orig, load_file(lora_path)), "<merged>")
    b = load_bundle(ckpt)
    ref = type(b.transformer).from_config(conf)
    ref.load_state_dict(converted)
    fam = b.family
    x, t, cond = fam.dummy_inputs(ref, 2, seed=1)
    models = [ref.eval(), apply_lora(load_bundle(ckpt), ad).transformer,
              apply_lora(load_bundle(ckpt), load_adapter(lora_path)).transformer, b.transformer]
    with torch.no_grad():
        return [fam.predict(m, x, t, cond, 3.5) for m in models]


@pytest.mark.parametrize("family", WRITERS)
def test_format_original_is_what_comfyui_merges_and_reads_back(family, tmp_path, cli):
    """`lora-train CKPT --lora A --format original`: the authors' module names (fused qkv / kv_linear / linear1 as
    one module, ranks stacked); merging it into the authors' weights as ComfyUI does equals ditkit's own adapter
    on the diffusers model, and ditkit reads the file back (mixed ranks padded) to the same output."""
    from safetensors.torch import load_file

    orig, ckpt, ad = original_case(family, tmp_path)
    r = cli("lora-train", ckpt, "--lora", tmp_path / "a.safetensors", "--format", "original",
            "-o", tmp_path / "cli.safetensors", "--json")
    assert r.code == 0, r.err
    lora = load_file(tmp_path / "cli.safetensors")
    api = load_file(tmp_path / "o.safetensors")
    assert lora.keys() == api.keys() and all(torch.equal(lora[k], api[k]) for k in lora)  # the CLI writes the same
    fused = {"pixart": "lora_unet_blocks_0_attn_qkv", "flux": "lora_unet_double_blocks_0_img_attn_qkv",
             "sd3": "lora_unet_joint_blocks_0_x_block_attn_qkv"}[family]
    assert lora[f"{fused}.lora_down.weight"].shape[0] == 3 * ad.rank and float(lora[f"{fused}.alpha"]) == 3 * ad.alpha
    assert all(k.startswith("lora_unet_") for k in lora)
    want, got, again, base = original_outputs(orig, ckpt, ad, tmp_path / "cli.safetensors")
    assert float((got - want).abs().max()) < 1e-5  # 4-6e-7 here
    assert float((again - got).abs().max()) < 1e-5 and float((base - got).abs().max()) > 0.05  # effect 0.18-0.45
    back = load_adapter(tmp_path / "cli.safetensors")
    largest = max(v.shape[0] for k, v in lora.items() if k.endswith(".lora_down.weight"))  # flux linear1: 4 pieces
    assert back.rank == largest and "padded" in back.info["alpha_source"]


def test_format_original_refuses_a_family_without_an_authors_layout(tiny_dir, tmp_path, cli):
    from test_lora import random_adapter

    from ditkit.formats.lora import save_adapter

    src = tiny_dir("dit")
    save_adapter(tmp_path / "a.safetensors", random_adapter(load_bundle(src)))
    r = cli("lora-train", src, "--lora", tmp_path / "a.safetensors", "--format", "original", "-o", tmp_path / "o.safetensors")
    assert r.code == 2 and "the dit family has no authors' LoRA layout" in r.error_line and "--format peft" in r.error_line
    assert not (tmp_path / "o.safetensors").exists()
    g = torch.Generator().manual_seed(0)  # mixed ranks in a PEFT file (no per-module alpha): refused by name
    save_file({"transformer.a.lora_A.weight": torch.randn(2, 8, generator=g), "transformer.a.lora_B.weight": torch.randn(8, 2),
               "transformer.b.lora_A.weight": torch.randn(4, 8), "transformer.b.lora_B.weight": torch.randn(8, 4)},
              str(tmp_path / "mixed.safetensors"))
    r = cli("generate", src, "-o", tmp_path / "g", "--lora", tmp_path / "mixed.safetensors", "--steps", 1)
    assert r.code == 2 and "mixes ranks [2, 4]" in r.error_line and not (tmp_path / "g").exists()
