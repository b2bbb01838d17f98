"""ditkit export: ONNX parity for every family, the onnxruntime backend, and the diffusers / single-file /
facebookresearch-DiT layouts (round trips bit-exact)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAMILY_NAMES
from ditkit.formats.families import FAMILIES
from ditkit.formats.layouts import DEFAULT_MODELS, load_bundle
from ditkit.formats.images import read_images
from ditkit.formats.errors import QualityGateError, UnsupportedModelError
from ditkit.formats.safetensors_check import read_header
from ditkit.ops.export import ExportConfig, ExportReport, _summarize, check_gate, export
from ditkit.ops.generate import GenerateConfig, generate
from ditkit.ops.metrics import psnr

TINY_DIGITS = DEFAULT_MODELS["tiny-digits"]
needs_tiny_digits = pytest.mark.skipif(not (TINY_DIGITS / "model_index.json").is_file(),
                                       reason="the tiny-digits asset is not built")


@pytest.fixture(scope="session")
def onnx_dit(tiny_dir, tmp_path_factory):
    """The tiny DiT pipeline exported to ONNX (with its VAE decoder) through the CLI: (dir, --json report)."""
    from ditkit.cli.main import main
    import contextlib
    import io

    out = tmp_path_factory.mktemp("onnx") / "dit"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["export", str(tiny_dir("dit")), "-o", str(out), "--vae", "onnx", "--json"])
    assert code == 0
    return out, json.loads(buf.getvalue())


# -- ONNX ------------------------------------------------------------------------------------------

def test_onnx_dit_parity_and_manifest(onnx_dit):
    out, doc = onnx_dit
    assert doc["passed"] and doc["out"] == str(out)
    assert doc["max_abs_error"] <= 1e-4 and doc["max_rel_error"] <= 1e-4
    assert sorted({r["batch"] for r in doc["parity"]}) == [1, 3]
    # diffusers' DiT computes its token grid as int(sqrt(N)) and fails at non-square sizes: fixed resolution
    assert doc["resolution"] == "fixed" and "does not run at" in doc["resolution_note"]
    assert doc["dynamic_axes"] == {"hidden_states": {"0": "batch"}, "timestep": {"0": "batch"},
                                   "class_labels": {"0": "batch"}}
    assert [i["name"] for i in doc["inputs"]] == ["hidden_states", "timestep", "class_labels"]
    assert doc["inputs"][0]["shape"] == ["batch", 4, 8, 8] and doc["outputs"][0]["name"] == "sample"
    m = json.loads((out / "ditkit.json").read_text())
    assert m["op"] == "export" and m["onnx"]["opset"] >= 17 and m["onnx"]["precision"] == "fp32"
    assert m["onnx"]["transformer"]["dynamic_axes"]["hidden_states"] == {"0": "batch"}
    assert m["lineage"][-1]["sha256"] and len(m["sha256"]) == 64
    import onnx

    graph = onnx.load(str(out / "transformer.onnx"), load_external_data=False)
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in graph.graph.input] == ["hidden_states", "timestep", "class_labels"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert (out / "scheduler" / "scheduler_config.json").is_file() and (out / "vae_decoder.onnx").is_file()
    vae = doc["vae_decoder"]
    assert vae["inputs"][0]["shape"] == ["batch", 4, "latent_height", "latent_width"]
    assert len({tuple(r["latent_hw"]) for r in vae["parity"]}) == 2 and max(r["max_abs"] for r in vae["parity"]) <= 1e-4
    assert not list(out.parent.glob(".ditkit-export-*"))  # the staging directory is gone


def test_onnx_bundle_is_a_drop_in_transformer(onnx_dit, tiny_dir):
    from ditkit.formats.onnx_bundle import OnnxVaeDecoder

    ob, pb = load_bundle(onnx_dit[0]), load_bundle(tiny_dir("dit"))
    assert ob.kind == "onnx" and ob.family.name == "dit" and ob.scheduler is not None
    assert isinstance(ob.vae, OnnxVaeDecoder) and not list(ob.transformer.parameters())[0].numel()
    assert ob.transformer.config.num_embeds_ada_norm == 1000
    fam = ob.family
    for batch in (2, 5):  # what bench times: family.predict on the family's dummy inputs
        x, t, cond = fam.dummy_inputs(ob.transformer, batch, seed=batch)
        got = fam.predict(ob.transformer, x, t, cond)
        ref = fam.predict(pb.transformer, x, t, cond)
        assert got.shape == ref.shape == (batch, 4, 8, 8)
        assert float((got - ref).abs().max()) <= 1e-4


def test_onnx_bundle_with_pytorch_vae_round_trips(onnx_dit, tiny_dir, tmp_path):
    """The writer/reader path of the default --vae pytorch: the VAE kept as diffusers safetensors."""
    import shutil

    from diffusers import AutoencoderKL

    from ditkit.formats.bundle import Bundle
    from ditkit.formats.layouts.onnx import save_onnx_bundle

    ob, pb = load_bundle(onnx_dit[0]), load_bundle(tiny_dir("dit"))
    stage = tmp_path / "stage"
    stage.mkdir()
    shutil.copy(onnx_dit[0] / "transformer.onnx", stage)
    spec = {**ob.manifest["onnx"], "vae_decoder": None}
    b = Bundle(family=ob.family, transformer=ob.transformer, components={"vae": pb.vae, "scheduler": pb.scheduler},
               pipeline_class="DiTPipeline", manifest={"onnx": spec}, path=stage, kind="onnx")
    save_onnx_bundle(b, tmp_path / "out", {"op": "export"})
    back = load_bundle(tmp_path / "out")
    assert isinstance(back.vae, AutoencoderKL) and _same_weights(back.vae, pb.vae)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ditkit.json", "scheduler", "transformer.onnx", "transformer_config.json", "vae"]
    cfg = GenerateConfig(labels=[5], num_images=2, steps=2)
    assert psnr(generate(back, cfg)[0], generate(pb, cfg)[0]) >= 40.0


def test_generate_backends_match(onnx_dit, tiny_dir, cli, tmp_path):
    cfg = GenerateConfig(labels=[1, 2, 3], num_images=6, steps=4, batch_size=4)
    a, ra = generate(load_bundle(tiny_dir("dit")), cfg)
    b, rb = generate(load_bundle(onnx_dit[0]), cfg)
    assert ra.backend == "pytorch" and rb.backend == "onnxruntime"
    assert a.shape == b.shape and psnr(a, b) >= 40.0
    r = cli("generate", onnx_dit[0], "-o", tmp_path / "g", "--backend", "onnxruntime", "--steps", 2,
            "--labels", "1,2", "--json")
    assert r.code == 0, r.err
    assert r.json()["backend"] == "onnxruntime" and (tmp_path / "g" / "00001.png").is_file()


def test_backend_mismatch_and_fixed_size_errors(onnx_dit, tiny_dir, cli, tmp_path):
    r = cli("generate", onnx_dit[0], "-o", tmp_path / "a", "--backend", "pytorch")
    assert r.code == 2
    assert r.error_line == ("Error: dit is an ONNX bundle (no PyTorch weights): use --backend onnxruntime, "
                            "or generate from the checkpoint it was exported from")
    r = cli("generate", tiny_dir("dit"), "-o", tmp_path / "b", "--backend", "onnxruntime")
    assert r.code == 2 and r.error_line.startswith("Error: --backend onnxruntime runs ONNX bundles;")
    r = cli("generate", tiny_dir("dit"), "-o", tmp_path / "c", "--backend", "tensorrt")
    assert r.code == 2 and r.error_line == "Error: unknown backend 'tensorrt', choose one of: onnxruntime, pytorch"
    r = cli("generate", onnx_dit[0], "-o", tmp_path / "d", "--height", 64, "--width", 64, "--steps", 1)
    assert r.code == 2
    assert "exported at fixed 8x8 latents; re-export with ditkit export --height/--width" in r.error_line
    assert not (tmp_path / "d").exists()


ONNX = [f for f in FAMILY_NAMES if FAMILIES[f].onnx_unsupported is None]


# sana: the dynamic-resolution graph fails its parity check and the export falls back to a fixed-resolution graph
# (which passes, max error 2.9e-6); why is not found yet
SANA_FIXED = pytest.mark.xfail(strict=True, reason="sana exports at fixed resolution only (dynamic graph fails parity)")
DYNAMIC = [f for f in ONNX if f != "dit" and FAMILIES[f].onnx_fixed_batch is None]  # dit: onnx_dit above


@pytest.mark.slow
@pytest.mark.parametrize("family", [pytest.param(f, marks=SANA_FIXED) if f == "sana" else f for f in DYNAMIC])
def test_onnx_parity_every_family(family, tiny_dir, tmp_path):
    """Dynamic batch, prompt length and resolution (two sizes) in onnxruntime vs PyTorch."""
    bundle = load_bundle(tiny_dir(family))
    exported, rep = export(bundle, ExportConfig(workdir=str(tmp_path)))
    try:
        assert rep.passed and rep.max_abs_error <= 1e-4, rep.failures
        assert rep.resolution == "dynamic"
        assert len({tuple(r["latent_hw"]) for r in rep.parity}) == 2
        assert {r["batch"] for r in rep.parity} == {1, 3}
        assert len({r["text_tokens"] for r in rep.parity}) == 2
        axes = set().union(*(v.values() for v in rep.dynamic_axes.values()))
        assert {"batch", "text_tokens"} <= axes
        assert ({"latent_height", "latent_width"} <= axes) or "image_tokens" in axes
    finally:
        import shutil

        shutil.rmtree(exported.path, ignore_errors=True)


@pytest.mark.parametrize("family", [f for f in ONNX if FAMILIES[f].onnx_fixed_batch])
def test_onnx_fixed_batch_family_runs_a_batch_row_by_row(family, tiny_dir, tiny_embeddings, cli, tmp_path):
    """lumina: traced at batch 1 (its patch embedder pins the batch), the complex RoPE table as view_as_real; the
    ONNX bundle gives PyTorch's output at batch 1 and 3 (onnxruntime runs each row), and generate runs on it.
    Its proportional attention reads the token count as a Python number, so the graph is fixed-resolution."""
    r = cli("export", tiny_dir(family), "-o", tmp_path / "x", "--format", "onnx", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["passed"] and doc["max_abs_error"] < 1e-5  # 7.2e-7 here
    assert doc["batch"].startswith("1 ") and {c["batch"] for c in doc["parity"]} == {1, 3}
    assert doc["resolution"] == "fixed" and "text_tokens" in doc["dynamic_axes"]["encoder_hidden_states"].values()
    assert all(i["shape"][0] == 1 for i in doc["inputs"] if i["name"] != "image_rotary_emb")
    assert_generate_matches(cli, tiny_dir(family), tmp_path / "x", tiny_embeddings(family), tmp_path)


def assert_generate_matches(cli, src, onnx_dir, embeddings, tmp_path):
    """`generate` on the ONNX bundle gives the PyTorch model's images (uint8 rounding at most)."""
    args = ["--embeddings", embeddings, "--num-images", 2, "--steps", 2, "--seed", 0, "--json"]
    a, b = cli("generate", src, "-o", tmp_path / "pt", *args), cli("generate", onnx_dir, "-o", tmp_path / "ox", *args)
    assert a.code == b.code == 0, a.err + b.err
    assert np.abs(read_images(tmp_path / "pt").astype(int) - read_images(tmp_path / "ox").astype(int)).max() <= 1


def _mixed_lengths(cond: dict) -> dict:
    """Row 0 keeps 5 caption tokens, row 2 keeps 3, the rest all: what a batch of real prompts looks like."""
    m = cond["prompt_attention_mask"].clone()
    m[0, 5:], m[-1, 3:] = 0, 0
    return {**cond, "prompt_attention_mask": m}


def test_lumina2_traceable_forward_equals_diffusers_with_mixed_caption_lengths():
    """The forward the lumina2 ONNX export traces (no data-dependent Python lengths) gives diffusers' output when
    the rows' caption lengths differ (the export's own parity run has all-ones masks)."""
    fam = FAMILIES["lumina2"]
    tr = fam.transformer_cls().from_config(fam.tiny_config()).eval()
    x, t, cond = fam.dummy_inputs(tr, 3, seed=0)
    cond = _mixed_lengths(cond)
    with torch.no_grad():
        want = fam.predict(tr, x, t, cond)
        with fam.onnx_tracing():
            got = fam.predict(tr, x, t, cond)
    assert float((got - want).abs().max()) < 1e-5  # 4.8e-7 here (outputs of magnitude 1.9)


def test_lumina2_onnx_graph_is_dynamic_and_equals_diffusers(tiny_dir, tiny_embeddings, cli, tmp_path):
    r = cli("export", tiny_dir("lumina2"), "-o", tmp_path / "x", "--format", "onnx", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["passed"] and doc["max_abs_error"] < 1e-5 and doc["batch"] == "dynamic" and doc["resolution"] == "dynamic"
    onnx, ref = load_bundle(tmp_path / "x"), load_bundle(tiny_dir("lumina2"))
    fam = ref.family
    x, t, cond = fam.dummy_inputs(ref.transformer, 3, seed=1)
    cond = _mixed_lengths(cond)
    with torch.no_grad():
        want = fam.predict(ref.transformer, x, t, cond)
    got = fam.predict(onnx.transformer, x, t, cond)
    assert float((got - want).abs().max()) < 1e-4
    assert_generate_matches(cli, tiny_dir("lumina2"), tmp_path / "x", tiny_embeddings("lumina2"), tmp_path)


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f not in ONNX])
def test_onnx_refused_families_say_why_and_write_nothing(family, tiny_dir, cli, tmp_path):
    r = cli("export", tiny_dir(family), "-o", tmp_path / "x", "--format", "onnx")
    assert r.code == 2 and r.error_line == (f"Error: --format onnx cannot trace the {family} family: "
                                            f"{FAMILIES[family].onnx_unsupported}; export --format diffusers or "
                                            "safetensors instead")
    assert not (tmp_path / "x").exists()
    r = cli("export", tiny_dir(family), "-o", tmp_path / "d", "--format", "diffusers", "--json")
    assert r.code == 0, r.err
    again = load_bundle(tmp_path / "d")
    strip = lambda c: {k: v for k, v in c.items() if k != "_name_or_path"}  # noqa: E731
    assert again.family.name == family
    assert strip(again.transformer.config) == strip(load_bundle(tiny_dir(family)).transformer.config)


@pytest.mark.slow
def test_parity_gate_exits_1_and_writes_nothing(tiny_dir, cli, tmp_path):
    r = cli("export", tiny_dir("dit"), "-o", tmp_path / "x", "--atol", 0, "--json")
    assert r.code == 1
    doc = r.json()
    assert not doc["passed"] and doc["out"] is None and doc["failures"]
    assert r.error_line.startswith("Error: export check failed: transformer at batch 1, 8x8 latents: max abs")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".ditkit-export-*"))


def test_gate_summary_rules():
    rep = ExportReport(format="onnx", family="dit", precision="fp32", output="dir")
    rows = [{"batch": 1, "latent_hw": [8, 8], "text_tokens": None, "max_abs": 2e-6, "max_rel": 1e-6},
            {"batch": 3, "latent_hw": [8, 8], "text_tokens": None, "max_abs": 3e-4, "max_rel": 1e-4}]
    _summarize(rep, rows, 1e-4, 1e-3)
    assert not rep.passed and rep.max_abs_error == 3e-4 and len(rep.failures) == 1
    assert rep.failures[0] == "transformer at batch 3, 8x8 latents: max abs 0.0003 (atol 0.0001), rel 0.0001 (rtol 0.001)"
    with pytest.raises(QualityGateError):
        check_gate(rep)
    crashed = ExportReport(format="onnx", family="dit", precision="fp32", output="dir")
    _summarize(crashed, rows[:1] + [{"batch": 3, "latent_hw": [12, 16], "text_tokens": None, "max_abs": None,
                                     "max_rel": None, "error": "Attempting to broadcast an axis"}], 1e-4, 1e-4)
    assert not crashed.passed and crashed.max_abs_error is None
    assert crashed.failures == ["transformer at batch 3, 12x16 latents: Attempting to broadcast an axis"]
    ok = ExportReport(format="onnx", family="dit", precision="fp32", output="dir")
    _summarize(ok, rows[:1], 1e-4, 1e-4)
    assert ok.passed
    check_gate(ok)


def test_cli_refuses_bad_options(tiny_dir, cli, tmp_path):
    src = tiny_dir("dit")
    r = cli("export", src, "-o", tmp_path / "a", "--format", "tensorrt")
    assert r.code == 2 and r.error_line == ("Error: unknown format 'tensorrt', choose one of: bfl-flux, "
                                            "diffusers, dit-original, gguf, onnx, pixart-original, safetensors, "
                                            "stability-sd3")
    r = cli("export", src, "-o", tmp_path / "a.onnx")
    assert r.code == 2 and r.error_line == ("Error: --format onnx writes a directory; give -o a directory name, "
                                            "not a.onnx")
    r = cli("export", src, "-o", tmp_path / "a", "--format", "safetensors")
    assert r.code == 2 and r.error_line == "Error: --format safetensors writes one .safetensors file; give -o NAME.safetensors"
    r = cli("export", src, "-o", tmp_path / "a", "--format", "diffusers", "--precision", "fp16")
    assert r.code == 2 and "--precision and --vae apply to --format onnx" in r.error_line
    r = cli("export", src, "-o", tmp_path / "a", "--opset", 17)
    assert r.code == 2 and r.error_line == "Error: --opset must be in 18..21 (got 17)"
    r = cli("export", tiny_dir("sd3"), "-o", tmp_path / "a.pt", "--format", "dit-original")
    assert r.code == 2 and r.error_line == ("Error: --format dit-original holds the dit family only (this model is "
                                            "sd3); choose another --format")
    assert not list(tmp_path.iterdir())


def test_quantized_models_are_refused(tiny_dir):
    from ditkit.ops.quantize import QuantizeConfig, quantize

    bundle, _ = quantize(load_bundle(tiny_dir("dit")), QuantizeConfig(scheme="int8-weight-only"))
    for fmt in ("onnx", "diffusers", "safetensors", "dit-original"):
        with pytest.raises(UnsupportedModelError, match="cannot hold ditkit-quantized modules"):
            export(bundle, ExportConfig(format=fmt))


# -- diffusers / safetensors / dit-original --------------------------------------------------------

def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _depth_pruned_copy(src: Path, dst: Path, keep: int) -> Path:
    """A pipeline whose transformer keeps its first `keep` blocks (num_layers fixed to match)."""
    bundle = load_bundle(src)
    tr = bundle.transformer
    tr.transformer_blocks = torch.nn.ModuleList(list(tr.transformer_blocks)[:keep])
    tr.register_to_config(num_layers=keep)
    from ditkit.formats.layouts import write_bundle_dir

    dst.mkdir(parents=True)
    write_bundle_dir(bundle, dst)
    return dst


@pytest.mark.parametrize("source", ["tiny", pytest.param("tiny-digits", marks=needs_tiny_digits)])
def test_depth_pruned_diffusers_export_loads_with_from_pretrained(source, tiny_dir, cli, tmp_path):
    from diffusers import DiTPipeline

    if source == "tiny":
        keep, pruned = 1, _depth_pruned_copy(tiny_dir("dit"), tmp_path / "pruned", 1)
    else:  # what a user runs: ditkit prune, 6 -> 3 blocks
        keep, pruned = 3, tmp_path / "pruned"
        r = cli("prune", "tiny-digits", "-o", pruned, "--method", "depth", "--ratio", 0.5, "--calib-samples", 2,
                "--json")
        assert r.code == 0, r.err
    r = cli("export", pruned, "-o", tmp_path / "out", "--format", "diffusers", "--json")
    assert r.code == 0, r.err
    assert r.json()["bit_exact"] and r.json()["num_blocks"] == keep
    pipe = DiTPipeline.from_pretrained(tmp_path / "out")
    assert pipe.transformer.config.num_layers == keep == len(pipe.transformer.transformer_blocks)
    assert _same_weights(pipe.transformer, load_bundle(pruned).transformer)
    images = pipe(class_labels=[1], num_inference_steps=2, output_type="np").images
    assert images.shape[0] == 1 and np.isfinite(images).all()
    assert json.loads((tmp_path / "out" / "ditkit.json").read_text())["op"] == "export"


def test_lora_is_fused_before_export(tiny_dir):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    bundle = load_bundle(tiny_dir("dit"))
    tr = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"]), bundle.transformer)
    torch.manual_seed(3)
    for n, p in tr.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)  # lora_B starts at zero; make the adapter change the output
    fam = bundle.family
    x, t, cond = fam.dummy_inputs(tr, 2)
    with torch.no_grad():
        with_lora = fam.predict(tr, x, t, cond)
        plain = load_bundle(tiny_dir("dit"))
        base = fam.predict(plain.transformer, x, t, cond)
    assert float((with_lora - base).abs().max()) > 1e-3
    out, rep = export(bundle, ExportConfig(format="diffusers"))
    assert rep.lora_fused == 4 and rep.bit_exact  # 2 blocks x (to_q, to_v)
    assert not any(isinstance(m, BaseTunerLayer) for m in out.transformer.modules())
    with torch.no_grad():
        fused = fam.predict(out.transformer, x, t, cond)
    assert float((fused - with_lora).abs().max()) <= 1e-5


def test_safetensors_single_file_round_trip(tiny_dir, cli, tmp_path):
    f = tmp_path / "dit.safetensors"
    r = cli("export", tiny_dir("dit"), "-o", f, "--format", "safetensors", "--json")
    assert r.code == 0, r.err
    assert r.json()["bit_exact"] and r.json()["output"] == "file"
    meta = read_header(f)["__metadata__"]
    assert meta["family"] == "dit" and json.loads(meta["config"])["_class_name"] == "DiTTransformer2DModel"
    assert json.loads(meta["ditkit"])["op"] == "export"
    loaded = load_bundle(f)  # no --family / --config: the metadata carries them
    assert loaded.family.name == "dit" and loaded.manifest["op"] == "export"
    assert _same_weights(loaded.transformer, load_bundle(tiny_dir("dit")).transformer)


def _dit_s_width_model():
    """A 2-block DiT at DiT-S's width (6 heads x 64: the original layout stores no head count, and ditkit
    reads it back from the published widths) whose blocks share one timestep/label embedder, as the
    original DiT does (diffusers initialises a copy per block)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    blocks = m.transformer_blocks
    for b in blocks[1:]:
        b.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    return m.eval()


def test_dit_original_round_trip_is_bit_exact(cli, tmp_path):
    model = _dit_s_width_model()
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    pt = tmp_path / "dit.pt"
    r = cli("export", tmp_path / "src", "-o", pt, "--format", "dit-original", "--json")
    assert r.code == 0, r.err
    # the weights are written exactly; the authors' code embeds timesteps with shift 0 where this diffusers
    # model uses 1, and the report says by how much their outputs differ
    assert r.json()["bit_exact"] is None and r.json()["passed"] and "timestep_shift" in r.json()["note"]
    raw = torch.load(pt, weights_only=True)  # a plain dict of tensors under the original names
    assert "blocks.0.attn.qkv.weight" in raw and "t_embedder.mlp.0.weight" in raw and "pos_embed" in raw
    assert not any(k.startswith("transformer_blocks") for k in raw)
    back = load_bundle(pt)
    assert back.kind == "dit-original"
    assert _same_weights(back.transformer, model)
    for k in ("num_attention_heads", "attention_head_dim", "num_layers", "sample_size", "out_channels",
              "num_embeds_ada_norm", "patch_size"):
        assert back.transformer.config[k] == model.config[k]
    # ... and on to a ditkit (diffusers) checkpoint again
    r = cli("export", pt, "-o", tmp_path / "again", "--format", "diffusers", "--json")
    assert r.code == 0, r.err
    assert _same_weights(load_bundle(tmp_path / "again").transformer, model)


def test_dit_original_refuses_per_block_embedders(tiny_dir, cli, tmp_path):
    r = cli("export", tiny_dir("dit"), "-o", tmp_path / "x.pt", "--format", "dit-original")
    assert r.code == 2
    assert r.error_line == ("Error: the blocks' timestep/label embedders differ; the original DiT layout holds one "
                            "shared copy, so this model cannot be written as dit-original")
    assert not (tmp_path / "x.pt").exists()


# -- tiny-digits -----------------------------------------------------------------------------------

@needs_tiny_digits
@pytest.mark.slow
def test_tiny_digits_onnx_same_digits(tmp_path):
    bundle = load_bundle("tiny-digits")
    exported, rep = export(bundle, ExportConfig(workdir=str(tmp_path)))
    try:
        assert rep.passed and rep.max_abs_error <= 1e-4
        cfg = GenerateConfig(num_images=20, batch_size=10)
        a, ra = generate(load_bundle("tiny-digits"), cfg)
        b, rb = generate(exported, cfg)
        assert psnr(a, b) >= 40.0
        assert ra.judge is not None and rb.judge["accuracy"] == ra.judge["accuracy"]
    finally:
        import shutil

        shutil.rmtree(exported.path, ignore_errors=True)
