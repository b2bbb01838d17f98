"""Checkpoints in the model authors' own layouts (tests/authors_fixtures.py writes them): read with no flags,
outputs equal to the diffusers model they came from, every op runs on them, every refusal has its line."""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import save_file

import authors_fixtures as F
from ditkit.formats import authors
from ditkit.formats.errors import ConfigError, FormatError
from ditkit.formats.families import get_family
from ditkit.formats.layouts import load_bundle


def save_st(path, state, prefix=False, dtype=None):
    state = {(F.PREFIX + k if prefix else k): (v.to(dtype) if dtype else v).contiguous() for k, v in state.items()}
    save_file(state, str(path))
    return path


def outputs(fam, model, ref, seed=3):
    x, t, cond = fam.dummy_inputs(ref, 2, seed=seed)
    with torch.no_grad():
        return fam.predict(model, x, t, cond, 3.5), fam.predict(ref, x, t, cond, 3.5)


def as_authors(model, layout):
    """The diffusers model run as the authors' code runs it (DiT: the timestep shift 0, Family.conventions)."""
    import copy

    lay = authors.AUTHORS_LAYOUTS[layout]
    model = copy.deepcopy(model)
    get_family(lay.family).apply_conventions(model, lay.conventions or {})
    return model


def bf16(model):
    """The diffusers model as a bf16 file holds it (bf16 weights, fp32 compute)."""
    sd = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    model = type(model).from_config(model.config)
    model.load_state_dict(sd)
    return model.eval()


# name -> (diffusers model, writer of the authors' file, suffix, expected layout)
def _cases():
    def pth(obj):
        return lambda path: torch.save(obj, path)

    def st(state, **kw):
        return lambda path: save_st(path, state, **kw)

    flux, flux_s, sd3, sd35 = F.flux_model(), F.flux_model(guidance=False), F.sd3_model(), F.sd3_model(True, 16)
    pix, pix_ms, dit = F.pixart_model(), F.pixart_model(ms=True), F.dit_model()
    dit_ema = F.dit_model(seed=1)
    return {
        "flux-dev-bf16-prefixed": (bf16(flux), st(F.bfl_flux(flux), prefix=True, dtype=torch.bfloat16), ".safetensors",
                                   "bfl-flux"),
        "flux-dev-fp32": (flux, st(F.bfl_flux(flux)), ".safetensors", "bfl-flux"),
        "flux-schnell": (flux_s, st(F.bfl_flux(flux_s)), ".safetensors", "bfl-flux"),
        "sd3-medium": (sd3, st(F.stability_sd3(sd3), prefix=True), ".safetensors", "stability-sd3"),
        "sd3.5-qknorm-dual": (sd35, st(F.stability_sd3(sd35), prefix=True), ".safetensors", "stability-sd3"),
        "pixart-alpha-pth": (pix, pth({"state_dict": F.pixart(pix)}), ".pth", "pixart-original"),
        "pixart-train-pth": (pix, pth({"state_dict": F.pixart(pix), "state_dict_ema": F.pixart(F.pixart_model(seed=4)),
                                       "epoch": 3}), ".pth", "pixart-original"),
        "pixart-ms-pth": (pix_ms, pth({"state_dict": F.pixart(pix_ms)}), ".pth", "pixart-original"),
        "pixart-bare-pth": (pix, pth(F.pixart(pix)), ".pth", "pixart-original"),
        "pixart-safetensors": (pix, st(F.pixart(pix)), ".safetensors", "pixart-original"),
        "dit-s-pt": (dit, pth(F.dit(dit)), ".pt", "dit-original"),
        "dit-train-pt": (dit_ema, pth(F.dit_train_checkpoint(F.dit(dit), F.dit(dit_ema))), ".pt", "dit-original"),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("authors")
    out = {}
    for name, (_, write, suffix, _) in CASES.items():
        write(root / f"{name}{suffix}")
        out[name] = root / f"{name}{suffix}"
    return out


@pytest.mark.parametrize("name", CASES)
def test_read_with_no_flags_matches_the_diffusers_model(name, files, cli):
    ref, _, _, layout = CASES[name]
    r = cli("info", files[name], "--json")
    assert r.code == 0, r.err
    fam = get_family(authors.AUTHORS_LAYOUTS[layout].family)
    assert r.json()["family"] == fam.name and r.json()["kind"] == layout
    assert r.json()["params"] == sum(p.numel() for p in ref.parameters())
    b = load_bundle(files[name])
    ref = as_authors(ref, layout)
    for k, v in ref.config.items():
        if not k.startswith("_") and k not in ("sample_size", "interpolation_scale"):
            got = b.transformer.config[k]
            assert (list(got) if isinstance(got, tuple) else got) == (list(v) if isinstance(v, tuple) else v), k
    got, want = outputs(fam, b.transformer, ref)
    assert float((got - want).abs().max()) < 1e-4


def test_dit_train_checkpoint_reads_ema_and_allows_only_namespace(files, tmp_path):
    b = load_bundle(files["dit-train-pt"])
    ema, model = CASES["dit-train-pt"][0], CASES["dit-s-pt"][0]
    assert torch.equal(b.transformer.proj_out_2.weight, ema.proj_out_2.weight)
    assert not torch.equal(b.transformer.proj_out_2.weight, model.proj_out_2.weight)
    # any other class in the pickle is still refused without running it
    obj = F.dit_train_checkpoint(F.dit(model), F.dit(model))
    obj["args"] = torch.optim.AdamW  # a global that is not argparse.Namespace
    torch.save(obj, tmp_path / "other.pt")
    with pytest.raises(FormatError, match="holds objects other than tensors.*torch.optim"):
        load_bundle(tmp_path / "other.pt")


def test_pixart_reads_the_state_dict_its_authors_sampler_reads(files):
    b = load_bundle(files["pixart-train-pth"])
    assert torch.equal(b.transformer.proj_out.weight, CASES["pixart-train-pth"][0].proj_out.weight)


def test_fixtures_match_diffusers_own_converters():
    """The hand-written fixtures agree with diffusers' single-file converters (Flux's with its width constant
    3072 replaced by the fixture's), so the layouts tested are the ones diffusers and ComfyUI read."""
    from diffusers.loaders import single_file_utils as sfu

    for model, state, conv in ((CASES["flux-dev-fp32"][0], F.bfl_flux(CASES["flux-dev-fp32"][0]), "flux"),
                               (CASES["sd3.5-qknorm-dual"][0], F.stability_sd3(CASES["sd3.5-qknorm-dual"][0]), "sd3")):
        if conv == "flux":
            src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
            ns = dict(sfu.__dict__)
            exec(src.replace("inner_dim = 3072", f"inner_dim = {model.config.attention_head_dim * model.config.num_attention_heads}"), ns)
            fn = ns["convert_flux_transformer_checkpoint_to_diffusers"]
        else:
            fn = sfu.convert_sd3_transformer_checkpoint_to_diffusers
        out = fn({F.PREFIX + k: v for k, v in state.items()})
        sd = model.state_dict()
        assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name", ["flux-dev-bf16-prefixed", "sd3.5-qknorm-dual", "pixart-ms-pth", "dit-train-pt"])
def test_every_op_runs_on_an_authors_file(name, files, cli, tmp_path, tiny_embeddings):
    fam = get_family(authors.AUTHORS_LAYOUTS[CASES[name][3]].family)
    cond = ["--labels", "1,2"] if fam.conditioning == "class" else ["--embeddings", tiny_embeddings(fam.name)]
    src = files[name]
    r = cli("generate", src, "-o", tmp_path / "gen", "--steps", 2, "--num-images", 2, *cond, "--json")
    assert r.code == 0, r.err
    r = cli("prune", src, "-o", tmp_path / "pruned", "--method", "depth", "--ratio", 0.5, "--calib-steps", 2,
            "--calib-points", 1, "--json")
    assert r.code == 0, r.err
    assert load_bundle(tmp_path / "pruned").kind == "transformer"
    r = cli("quantize", src, "-o", tmp_path / "q", "--scheme", "int8-dynamic", "--calib-batches", 1, "--json")
    assert r.code == 0, r.err
    r = cli("export", src, "-o", tmp_path / "d", "--format", "diffusers", "--json")
    assert r.code == 0, r.err
    assert r.json()["bit_exact"]
    ref = as_authors(CASES[name][0], CASES[name][3])
    again = load_bundle(tmp_path / "d")
    got, want = outputs(fam, again.transformer, ref)
    assert float((got - want).abs().max()) < 1e-4


# -- refusals ---------------------------------------------------------------------------------------------

def test_widths_the_shapes_do_not_decide_need_a_config(cli, tmp_path):
    cases = [
        (F.flux_model(head_dim=16), F.bfl_flux, "bfl-flux checkpoint with head size 16: its rotary axes "
         "(axes_dims_rope) are not in the weights"),
        (F.sd3_model(head_dim=16), F.stability_sd3, "stability-sd3 checkpoint of width 32 without qk-norm: its "
         "head count is not in the weights"),
        (F.pixart_model(heads=2, head_dim=16), F.pixart, "pixart-original checkpoint of width 32: its head count"),
        (F.dit_model(heads=2, head_dim=16), F.dit, "dit-original checkpoint of width 32: its head count"),
    ]
    for i, (model, write, needle) in enumerate(cases):
        path = save_st(tmp_path / f"m{i}.safetensors", write(model))
        r = cli("info", path)
        assert r.code == 2 and r.error_line.startswith("Error: ") and needle in r.error_line, r.error_line
        assert "--config" in r.error_line
        conf = tmp_path / f"c{i}.json"
        conf.write_text(model.to_json_string())
        r = cli("info", path, "--config", conf, "--json")
        assert r.code == 0, r.err
        b = load_bundle(path, config=str(conf))
        fam = b.family
        got, want = outputs(fam, b.transformer, as_authors(model, b.kind))
        assert float((got - want).abs().max()) < 1e-4


def test_an_incomplete_file_names_its_layout_and_what_is_missing(cli, tmp_path):
    state = F.bfl_flux(F.flux_model())
    del state["double_blocks.0.txt_attn.proj.weight"]
    r = cli("info", save_st(tmp_path / "cut.safetensors", state, prefix=True))
    assert r.code == 2
    assert "in the bfl-flux layout (1 missing, 0 unexpected, e.g. double_blocks.0.txt_attn.proj.weight)" in r.error_line
    state = F.stability_sd3(F.sd3_model())
    del state["x_embedder.proj.weight"]
    r = cli("info", save_st(tmp_path / "sd3.safetensors", state))
    assert r.code == 2 and r.error_line == (f"Error: {tmp_path / 'sd3.safetensors'}: a stability-sd3 checkpoint without "
                                            "x_embedder.proj.weight (its patch embedding); the file is incomplete or "
                                            "not in that layout")


def test_a_wrong_family_and_foreign_pickles_are_refused(files, cli, tmp_path):
    r = cli("info", files["flux-dev-fp32"], "--family", "sd3")
    assert r.code == 2 and r.error_line == (f"Error: {files['flux-dev-fp32']} is a flux checkpoint in the bfl-flux "
                                            "layout; drop --family sd3")
    r = cli("info", files["pixart-alpha-pth"], "--family", "dit")
    assert r.code == 2 and "is a pixart checkpoint in the pixart-original layout" in r.error_line
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    r = cli("info", tmp_path / "other.pt")
    assert r.code == 2 and "keys are in none of the layouts ditkit reads from .pt/.pth files" in r.error_line
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "empty.pth")
    r = cli("info", tmp_path / "empty.pth")
    assert r.code == 2 and "is not a state dict" in r.error_line


def test_identify_needs_every_marker():
    assert authors.identify(["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]).name == "bfl-flux"
    assert authors.identify(["blocks.0.cross_attn.q_linear.weight"]) is None  # t_block missing: not PixArt
    assert authors.identify(["transformer_blocks.0.attn.to_q.weight"]) is None  # diffusers keys
    with pytest.raises(ConfigError):
        authors.read(F.dit(F.dit_model(heads=2, head_dim=16)), "<dit>")


# -- exact DiT: the authors' timestep embedding, recorded and kept ------------------------------------------

def dit_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    return x, torch.tensor([999.0, 37.0]), torch.tensor([3, 7])


def raw(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y, return_dict=False)[0]


def test_a_dit_read_from_the_authors_layout_is_the_authors_model(files, cli, tmp_path):
    sd = torch.load(files["dit-s-pt"], weights_only=True)
    x, t, y = dit_inputs(CASES["dit-s-pt"][0])
    want = F.dit_forward(sd, x, t, y, heads=6)
    b = load_bundle(files["dit-s-pt"])
    assert float((raw(b.transformer, x, t, y) - want).abs().max()) < 1e-4
    gap = float((raw(CASES["dit-s-pt"][0], x, t, y) - want).abs().max())  # diffusers' class as it is: shift 1
    assert gap > 1e-2
    # recorded in the manifest and kept through an op and an export to diffusers
    r = cli("prune", files["dit-s-pt"], "-o", tmp_path / "p", "--method", "depth", "--ratio", 0.5,
            "--calib-steps", 2, "--calib-points", 1, "--json")
    assert r.code == 0, r.err
    assert json.loads((tmp_path / "p" / "ditkit.json").read_text())["conventions"] == {"timestep_shift": 0}
    r = cli("export", tmp_path / "p", "-o", tmp_path / "p.pt", "--format", "dit-original", "--json")
    assert r.code == 0 and r.json()["bit_exact"] and r.json()["note"] is None, r.err
    pruned = load_bundle(tmp_path / "p")
    assert float((raw(pruned.transformer, x, t, y) -
                  F.dit_forward(torch.load(tmp_path / "p.pt", weights_only=True), x, t, y, heads=6)).abs().max()) < 1e-4
    r = cli("export", files["dit-s-pt"], "-o", tmp_path / "d", "--format", "diffusers", "--json")
    assert r.code == 0, r.err
    assert float((raw(load_bundle(tmp_path / "d").transformer, x, t, y) - want).abs().max()) < 1e-4


def test_a_diffusers_dit_written_in_the_authors_layout_says_what_changes(cli, tmp_path):
    model = CASES["dit-s-pt"][0]
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    r = cli("export", tmp_path / "src", "-o", tmp_path / "x.pt", "--format", "dit-original", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["bit_exact"] is None and doc["passed"]
    assert "{'timestep_shift': 0} where this model uses {'timestep_shift': 1}" in doc["note"]
    assert doc["max_abs_error"] > 1e-2


@pytest.mark.parametrize("sample_size", [6, 8, 16, 32])
def test_dit_original_pos_embed_is_the_authors_table_at_every_grid(sample_size):
    from ditkit.formats import dit_original

    torch.manual_seed(0)
    import diffusers

    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=10)
    pos = dit_original.from_diffusers(m)["pos_embed"]
    want = torch.from_numpy(F.sincos_2d(32, sample_size // 2)).float().unsqueeze(0)
    assert float((pos - want).abs().max()) < 1e-6
    assert float((pos - m.pos_embed.pos_embed).abs().max()) < 1e-6  # what the diffusers model itself adds


# -- writing the authors' layouts ----------------------------------------------------------------------------

WRITE = {"bfl-flux": ("flux-dev-fp32", F.bfl_flux), "stability-sd3": ("sd3.5-qknorm-dual", F.stability_sd3),
         "pixart-original": ("pixart-ms-pth", F.pixart)}


@pytest.mark.parametrize("fmt", WRITE)
def test_export_writes_the_authors_keys_and_round_trips(fmt, files, cli, tmp_path):
    from safetensors.torch import load_file

    name, writer = WRITE[fmt]
    ref = CASES[name][0]
    out = tmp_path / f"{fmt}.safetensors"
    r = cli("export", files[name], "-o", out, "--format", fmt, "--json")
    assert r.code == 0, r.err
    assert r.json()["bit_exact"]
    lay = authors.AUTHORS_LAYOUTS[fmt]
    got = load_file(out)
    want = {lay.file_prefix + k: v for k, v in writer(ref).items() if k != "y_embedder.y_embedding"}
    assert got.keys() == want.keys()  # the hand-written authors' naming, tensor for tensor
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    back = load_bundle(out)
    assert back.kind == fmt and back.manifest["op"] == "export"
    sd, bd = ref.state_dict(), back.transformer.state_dict()
    assert sd.keys() == bd.keys() and all(torch.equal(sd[k], bd[k]) for k in sd)
    r = cli("export", out, "-o", tmp_path / "d", "--format", "diffusers", "--json")
    assert r.code == 0, r.err


@pytest.mark.parametrize("fmt,name,method", [("bfl-flux", "flux-dev-fp32", "depth"),
                                              ("stability-sd3", "sd3.5-qknorm-dual", "depth"),
                                              ("pixart-original", "pixart-alpha-pth", "width")])
def test_pruned_models_export_with_their_real_shapes(fmt, name, method, files, cli, tmp_path):
    method = ["--method", method, "--ratio", 0.5]
    r = cli("prune", files[name], "-o", tmp_path / "p", *method, "--calib-steps", 2, "--calib-points", 1, "--json")
    assert r.code == 0, r.err
    out = tmp_path / "p.safetensors"
    r = cli("export", tmp_path / "p", "-o", out, "--format", fmt, "--json")
    assert r.code == 0, r.err
    assert r.json()["bit_exact"]
    pruned = load_bundle(tmp_path / "p").transformer
    # read as an authors' file without ditkit's metadata: the architecture comes from the shapes alone
    from safetensors.torch import load_file

    bare = save_st(tmp_path / "bare.safetensors", load_file(out))
    b = load_bundle(bare)
    fam = b.family
    got, want = outputs(fam, b.transformer, pruned)
    assert float((got - want).abs().max()) < 1e-4


def test_export_to_an_authors_layout_of_another_family_is_refused(files, cli, tmp_path):
    r = cli("export", files["flux-dev-fp32"], "-o", tmp_path / "x.safetensors", "--format", "stability-sd3")
    assert r.code == 2 and "--format stability-sd3 holds the sd3 family only" in r.error_line
    assert not (tmp_path / "x.safetensors").exists()
