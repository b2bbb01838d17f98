"""ditkit prune: every method on tiny models of every family; the results reload (fresh process too) and say
what was removed; bad input exits 2 with one line; --dry-run writes nothing."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAMILY_NAMES
from ditkit.formats.families import FAMILIES
from ditkit.cli.errors import EXIT_INPUT
from ditkit.cli.prune import summary
from ditkit.formats import dit_original
from ditkit.formats.layouts import load_bundle, save_bundle
from ditkit.formats.errors import ConfigError
from ditkit.formats.manifest import MANIFEST, new_manifest, weights_sha256
from ditkit.ops.info import count_params
from ditkit.ops.prune import PRUNE_METHODS, PruneConfig, prune
from ditkit.ops.prune import depth as depth_mod
from ditkit.ops.prune import semi24, width
from ditkit.ops.prune.calibration import calibration_set, output_error
from ditkit.ops.prune.magnitude import prunable_linears
import tiny

FAST = dict(calib_samples=2, calib_steps=4, calib_points=2, timing=False)


def cfg(method, **kw):
    return PruneConfig(method=method, **{**FAST, **kw})


def outputs(bundle, tr=None, seed=0):
    fam = bundle.family
    tr = tr or bundle.transformer
    x, t, c = fam.dummy_inputs(tr, 2, seed=seed)
    return fam.predict(tr, x, t, c)


def assert_bad_input(r, needle):
    assert r.code == EXIT_INPUT, (r.code, r.err)
    lines = [l for l in r.err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.err
    assert needle in lines[0], lines[0]
    assert r.out == ""


# -- config ---------------------------------------------------------------------------------------------

def test_registry_and_defaults():
    assert list(PRUNE_METHODS) == ["depth", "width", "magnitude", "2:4"]
    assert PruneConfig(method="depth").ratio == 0.5
    assert PruneConfig(method="width").importance == "taylor"
    c = PruneConfig(method="magnitude")
    assert (c.sparsity, c.scope) == (0.4, "per-layer")
    assert PruneConfig.from_dict(c.to_dict()) == c  # round-trips through its dict (the manifest's config)


@pytest.mark.parametrize("kw,needle", [
    (dict(method="prune-everything"), "unknown method 'prune-everything', choose one of"),
    (dict(method="depth", ratio=1.5), "--ratio must be in (0, 1)"),
    (dict(method="width", ratio=0.0), "--ratio must be in (0, 1)"),
    (dict(method="magnitude", sparsity=1.0), "--sparsity must be in (0, 1)"),
    (dict(method="depth", sparsity=0.5), "--sparsity does not apply to --method depth"),
    (dict(method="2:4", ratio=0.5), "--ratio does not apply to --method 2:4"),
    (dict(method="depth", ratio=0.5, keep=3), "takes one of --ratio, --keep, --blocks"),
    (dict(method="magnitude", scope="row"), "unknown scope 'row'"),
    (dict(method="width", importance="random"), "unknown importance 'random'"),
    (dict(method="depth", calib_steps=2, calib_points=3), "cannot exceed"),
])
def test_config_rejects(kw, needle):
    with pytest.raises(ConfigError, match=None) as e:
        PruneConfig(**kw)
    assert needle in str(e.value)


@pytest.mark.parametrize("args,needle", [
    (["--method", "foo"], "unknown method 'foo', choose one of: 2:4, depth, magnitude, width"),
    (["--method", "depth", "--ratio", "1.5"], "--ratio must be in (0, 1)"),
    (["--method", "width", "--ratio", "-0.2"], "--ratio must be in (0, 1)"),
    (["--method", "depth", "--family", "unet"], "unknown family 'unet'"),
    (["--method", "depth", "--family", "pixart"], "--family pixart does not match the checkpoint"),
    (["--method", "depth", "--blocks", "0,9"], "--blocks [9] out of range"),
    (["--method", "depth", "--keep", "0"], "--keep must be >= 1"),
    ([], "--method is required"),
    (["--method", "depth", "--threads", "0"], "--threads must be >= 1"),
])
def test_cli_bad_input_exits_2_with_one_line(args, needle, cli, tiny_dir, tmp_path):
    r = cli("prune", tiny_dir("dit"), "-o", tmp_path / "out", "--calib-steps", "2", "--calib-points", "1", *args)
    assert_bad_input(r, needle)
    assert not (tmp_path / "out").exists()


def test_cli_needs_out_and_refuses_existing(cli, tiny_dir, tmp_path):
    assert_bad_input(cli("prune", tiny_dir("dit"), "--method", "depth"), "prune needs -o OUT")
    (tmp_path / "out").mkdir()
    assert_bad_input(cli("prune", tiny_dir("dit"), "-o", tmp_path / "out", "--method", "depth"), "already exists")


# -- depth ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_depth_every_family_reloads(family, tiny_dir, tmp_path):
    b = load_bundle(tiny_dir(family))
    n_blocks = len(depth_mod.block_names(b.family, b.transformer))
    out, rep = prune(b, cfg("depth", ratio=0.5))
    plan = rep.plan
    assert plan["blocks_after"] == n_blocks - len(plan["removed_blocks"]) and plan["removed_blocks"]
    assert rep.params_after < rep.params_before and rep.flops_after < rep.flops_before
    assert set(plan["scores"]) == (set(plan["kept_blocks"]) | set(plan["removed_blocks"])) - set(plan["protected"])
    # the removed blocks are those whose removal moved the output least
    worst_removed = max(plan["scores"][n] for n in plan["removed_blocks"])
    assert all(plan["scores"][n] >= worst_removed for n in plan["kept_blocks"] if n in plan["scores"])
    for key, n in plan["config"].items():
        assert out.transformer.config[key] == n
    m = new_manifest(family=family, op="prune", config={}, report=rep.to_dict(), parent=b.parent_record())
    again = load_bundle(save_bundle(out, tmp_path / "p", m))
    assert torch.equal(outputs(again), outputs(out))
    if family == "sd3":  # the last block is built differently (context_pre_only) and always stays
        assert plan["protected"] == [f"transformer_blocks.{n_blocks - 1}"]


def test_depth_by_hand_removes_those_blocks(tiny_dir):
    b = load_bundle(tiny_dir("dit"))
    out, rep = prune(b, cfg("depth", blocks=[0]))
    assert rep.plan["removed_blocks"] == ["transformer_blocks.0"] and rep.plan["scores"] == {}
    assert out.transformer.config.num_layers == 1
    kept = b.transformer.transformer_blocks[1].state_dict()
    got = out.transformer.transformer_blocks[0].state_dict()
    assert all(torch.equal(kept[k], got[k]) for k in kept)


def test_depth_keep_and_protected_block(tiny_dir):
    b = load_bundle(tiny_dir("dit"))
    assert prune(b, cfg("depth", keep=1))[0].transformer.config.num_layers == 1
    sd3 = load_bundle(tiny_dir("sd3"))
    with pytest.raises(ConfigError, match="cannot be removed"):
        prune(sd3, cfg("depth", blocks=[1]))


def test_depth_score_is_the_real_effect(tiny_dir):
    """A block's score is exactly the calibration error of the model without it (the LD-Pruner criterion)."""
    b = load_bundle(tiny_dir("dit"))
    out, rep = prune(b, cfg("depth", blocks=[1]))
    cal = calibration_set(b, **{k[6:]: v for k, v in FAST.items() if k.startswith("calib_")})
    score = depth_mod.score_blocks(b.family, b.transformer, cal, ["transformer_blocks.1"])["transformer_blocks.1"]
    assert score == pytest.approx(rep.calibration["rel_mse"], rel=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_depth_scoring_replays_the_prefix_exactly(family, tiny_dir, monkeypatch):
    """Replaying the base's outputs of the blocks before the removed one gives the same scores, bit for bit, as
    running the whole model without that block; also when the byte budget keeps only part of the prefix."""
    b = load_bundle(tiny_dir(family))
    fam, tr = b.family, b.transformer
    cal = calibration_set(b, 2, 4, 2, seed=0)
    names = depth_mod.block_names(fam, tr)
    cands = [n for n in names if n not in depth_mod.protected(fam, tr)]
    plain = {}
    for n in cands:
        with depth_mod._without(tr, fam, {n}):
            plain[n] = output_error(fam, tr, cal)["rel_mse"]
    assert depth_mod.score_blocks(fam, tr, cal, cands) == plain
    one = depth_mod._Prefix(fam, tr, cal, names, budget=10 ** 9)
    assert one.depth == len(names)
    first = max(depth_mod._nbytes(outs[0]) for outs in one.outputs)  # the first block's output on one batch
    monkeypatch.setattr(depth_mod, "CACHE_BYTES", (first + 1) * len(cal.batches))
    assert depth_mod._Prefix(fam, tr, cal, names).depth == 1
    assert depth_mod.score_blocks(fam, tr, cal, cands) == plain
    assert not any(isinstance(m, depth_mod._Replay) for m in tr.modules())  # the base has its blocks back


def test_calibration_is_seeded(tiny_dir):
    b = load_bundle(tiny_dir("dit"))
    c1, c2 = calibration_set(b, 2, 4, 2, seed=3), calibration_set(b, 2, 4, 2, seed=3)
    c3 = calibration_set(b, 2, 4, 2, seed=4)
    assert all(torch.equal(x.latents, y.latents) and torch.equal(x.output, y.output) for x, y in zip(c1.batches, c2.batches))
    assert not torch.equal(c1.batches[0].latents, c3.batches[0].latents)
    assert c1.cfg and c1.batches[0].latents.shape[0] == 4  # conditional + unconditional rows


# -- width ----------------------------------------------------------------------------------------------

WIDTH = [f for f in FAMILY_NAMES if FAMILIES[f].width is not None and FAMILIES[f].width.mlp_only is None]
MLP_ONLY = [f for f in FAMILY_NAMES if FAMILIES[f].width is not None and FAMILIES[f].width.mlp_only is not None]
NO_WIDTH = [f for f in FAMILY_NAMES if FAMILIES[f].width is None]
# calibration SQNR (dB) of MLP-only width pruning at --ratio 0.5, magnitude importance, on the tiny random models
# (measured: lumina 10.9, lumina2 13.3, sana 46.7; Sana's gated MLP adds little to its tiny blocks' outputs)
MLP_ONLY_FLOOR = 9.5


@pytest.mark.parametrize("family", WIDTH)
def test_width_every_family_rewrites_config_and_reloads(family, tiny_dir, tmp_path):
    b = load_bundle(tiny_dir(family))
    out, rep = prune(b, cfg("width", ratio=0.5))
    c = out.transformer.config
    assert c.num_attention_heads == 1 and rep.plan["heads"] == [2, 1] and rep.plan["width"] == [32, 16]
    assert rep.params_ratio <= 0.55 and rep.flops_ratio <= 0.55
    for attn in (m for m in out.transformer.modules() if hasattr(m, "heads") and hasattr(m, "to_q")):
        assert attn.heads == 1
    again = load_bundle(save_bundle(out, tmp_path / "w", new_manifest(family=family, op="prune", config={},
                                                                      report={}, parent=None)))
    assert again.transformer.config.num_attention_heads == 1
    assert torch.equal(outputs(again), outputs(out))


@pytest.mark.parametrize("family", MLP_ONLY)
def test_width_mlp_only_families_cut_the_mlp_and_reload(family, tiny_dir, tmp_path):
    """Lumina-Next, Lumina 2, Sana: every MLP keeps the same hidden units (written in the config), heads and the
    width D stay, the result reloads to the same outputs and stays close to the base."""
    b = load_bundle(tiny_dir(family))
    fam, tr = b.family, b.transformer
    f = fam.mlp_hidden(tr)
    out, rep = prune(b, cfg("width", ratio=0.5, importance="magnitude"))
    p = out.transformer
    assert rep.plan["mlp_hidden"] == [f, f // 2] and fam.mlp_hidden(p) == f // 2
    assert rep.plan["heads"][0] == rep.plan["heads"][1] == tr.config.num_attention_heads
    assert rep.plan["width"] == [fam.hidden_size(tr)] * 2 and rep.plan["cut"].startswith("MLP hidden units only")
    assert all(p.config[k] == v for k, v in rep.plan["config"].items())
    # one MLP per block of every block list (Lumina 2's refiners included)
    assert len(rep.plan["removed_mlp_units"]) == sum(len(c) for c in tr.children() if isinstance(c, torch.nn.ModuleList))
    assert all(len(v) == f - f // 2 for v in rep.plan["removed_mlp_units"].values())
    assert 0.6 < rep.params_ratio < 0.95
    assert rep.calibration["sqnr_db"] > MLP_ONLY_FLOOR
    again = load_bundle(save_bundle(out, tmp_path / "w", new_manifest(family=family, op="prune", config={},
                                                                      report={}, parent=None)))
    assert fam.mlp_hidden(again.transformer) == f // 2
    assert torch.equal(outputs(again), outputs(out))
    # a ratio that rounds to no unit is refused (one that removes a few units removes a multiple_of for Lumina)
    with pytest.raises(ConfigError, match="removes no MLP hidden unit"):
        prune(b, cfg("width", ratio=0.003))


def test_width_sana_glumbconv_keeps_both_halves_of_each_unit(tiny_dir):
    """Unit k of GLUMBConv is the inverted conv's output rows k and h + k (value, gate), the depthwise conv's
    channels k and h + k, and the pointwise conv's input column k."""
    b = load_bundle(tiny_dir("sana"))
    out, rep = prune(b, cfg("width", ratio=0.5, importance="magnitude"))
    old, new = b.transformer.transformer_blocks[1].ff, out.transformer.transformer_blocks[1].ff
    h = old.conv_point.in_channels
    gone = set(rep.plan["removed_mlp_units"]["transformer_blocks.1.ff.conv_point"])
    kept = [k for k in range(h) if k not in gone]
    rows = kept + [h + k for k in kept]
    assert torch.equal(new.conv_inverted.weight, old.conv_inverted.weight[rows])
    assert torch.equal(new.conv_inverted.bias, old.conv_inverted.bias[rows])
    assert torch.equal(new.conv_depth.weight, old.conv_depth.weight[rows])
    assert torch.equal(new.conv_point.weight, old.conv_point.weight[:, kept])
    a, z = b.transformer.transformer_blocks[1], out.transformer.transformer_blocks[1]
    assert torch.equal(z.attn1.to_q.weight, a.attn1.to_q.weight)  # the linear attention is untouched


def test_width_lumina_keeps_gate_and_value_rows_together(tiny_dir):
    b = load_bundle(tiny_dir("lumina2"))
    out, rep = prune(b, cfg("width", ratio=0.5, importance="magnitude"))
    old, new = b.transformer.noise_refiner[0].feed_forward, out.transformer.noise_refiner[0].feed_forward
    gone = set(rep.plan["removed_mlp_units"]["noise_refiner.0.feed_forward.linear_1"])
    kept = [k for k in range(old.linear_1.out_features) if k not in gone]
    assert torch.equal(new.linear_1.weight, old.linear_1.weight[kept])
    assert torch.equal(new.linear_3.weight, old.linear_3.weight[kept])
    assert torch.equal(new.linear_2.weight, old.linear_2.weight[:, kept])
    a, z = b.transformer.layers[0].attn, out.transformer.layers[0].attn
    assert all(torch.equal(getattr(z, n).weight, getattr(a, n).weight) for n in ("to_q", "to_k", "to_v"))  # GQA heads


@pytest.mark.parametrize("family", NO_WIDTH)
def test_width_refused_families_say_why_and_write_nothing(family, tiny_dir, cli, tmp_path):
    src = tiny_dir(family)
    before = {p: p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
    r = cli("prune", src, "-o", tmp_path / "w", "--method", "width", "--ratio", 0.5)
    why = FAMILIES[family].width_unsupported(load_bundle(src).transformer)
    assert r.code == EXIT_INPUT and why
    assert r.error_line == (f"Error: width pruning does not support the {family} family: {why} are not supported; "
                            "use --method depth")
    assert not (tmp_path / "w").exists() and before == {p: p.read_bytes() for p in before}


def test_width_slices_the_coupled_channels(tiny_dir):
    """Kept rows/columns are the original ones: adaLN's 6 chunks, heads' q/k/v rows, MLP units, sin-cos table."""
    b = load_bundle(tiny_dir("dit"))
    tr = b.transformer
    out, rep = prune(b, cfg("width", ratio=0.5))
    p = out.transformer
    removed = rep.plan["removed_channels"]
    res = [i for i in range(32) if i not in removed["res"]]
    emb = [i for i in range(32) if i not in removed["transformer_blocks.0.norm1.emb.timestep_embedder.linear_2"]]
    assert res == width.sincos_aligned(32, 16).tolist()
    w0 = tr.transformer_blocks[0].norm1.linear.weight
    rows = [k * 32 + r for k in range(6) for r in res]
    assert torch.equal(p.transformer_blocks[0].norm1.linear.weight, w0[rows][:, emb])
    head = 1 - rep.plan["removed_heads"]["transformer_blocks.0.attn1"][0]
    q0 = tr.transformer_blocks[0].attn1.to_q.weight
    assert torch.equal(p.transformer_blocks[0].attn1.to_q.weight, q0[head * 16:(head + 1) * 16][:, res])
    units = [i for i in range(128) if i not in rep.plan["removed_mlp_units"]["transformer_blocks.0.ff.net.0.proj"]]
    assert torch.equal(p.transformer_blocks[0].ff.net[2].weight, tr.transformer_blocks[0].ff.net[2].weight[res][:, units])
    # the position table diffusers rebuilds for width 16 is the old one at the kept channels (D/D' = 2: exact)
    assert torch.allclose(p.pos_embed.pos_embed, tr.pos_embed.pos_embed[..., res], atol=1e-6)


def test_width_taylor_uses_gradients(tiny_dir):
    b = load_bundle(tiny_dir("pixart"))
    out, rep = prune(b, cfg("width", ratio=0.5, importance="taylor"))
    assert rep.plan["importance"] == "taylor" and out.transformer.config.cross_attention_dim == 16
    assert not any(p.requires_grad for p in b.transformer.parameters())  # the base is left as it was


def test_width_ratio_that_removes_nothing(tiny_dir):
    with pytest.raises(ConfigError, match="removes no head"):
        prune(load_bundle(tiny_dir("dit")), cfg("width", ratio=0.1))


# -- magnitude and 2:4 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_magnitude_per_layer_spares_protected_layers(family, tiny_dir):
    b = load_bundle(tiny_dir(family))
    out, rep = prune(b, cfg("magnitude", sparsity=0.4))
    layers, protected = prunable_linears(b.family, out.transformer)
    assert layers and protected
    for name, m in layers.items():
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.4, abs=0.01), name
    base = dict(b.transformer.named_modules())
    new = dict(out.transformer.named_modules())
    assert all(torch.equal(new[n].weight, base[n].weight) for n in protected)
    assert rep.params_after == rep.params_before and 0 < rep.sparsity < 0.4
    assert rep.calibration["sqnr_db"] > 5
    assert not any((base[n].weight == 0).any() for n in layers)  # the base is untouched


def test_magnitude_global_threshold(tiny_dir):
    b = load_bundle(tiny_dir("dit"))
    out, rep = prune(b, cfg("magnitude", sparsity=0.5, scope="global"))
    assert rep.plan["sparsity_prunable"] == pytest.approx(0.5, abs=0.01)
    per = rep.plan["per_layer_sparsity"].values()
    assert max(per) - min(per) > 0.01  # one threshold: layers differ


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_2_4_pattern_and_dense_kernel_on_cpu(family, tiny_dir):
    b = load_bundle(tiny_dir(family))
    out, rep = prune(b, PruneConfig(method="2:4", calib_samples=1, calib_steps=2, calib_points=1,
                                    timing_repeats=1, timing_batch=1))
    layers, _ = prunable_linears(b.family, out.transformer)
    for name in rep.plan["pruned_layers"]:
        assert semi24.is_2_4(layers[name].weight), name
    assert rep.plan["sparsity_prunable"] == pytest.approx(0.5)
    assert rep.speed["kernel"] == "dense (2:4 sparse kernels need CUDA cc>=8.0)"
    assert rep.speed["ms_base"] > 0 and rep.speed["ms_pruned"] > 0


def test_mask_2_4_keeps_the_two_largest():
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 0.1, 0.2, -0.3, 0.4]])
    assert semi24.mask_2_4(w).tolist() == [[False, True, True, False, False, False, True, True]]


# -- original DiT checkpoints, CLI, manifest, fresh process ------------------------------------------------

def test_original_dit_checkpoint(tmp_path):
    tr = tiny.tiny_transformer("dit")
    first = tr.transformer_blocks[0].norm1.emb.state_dict()
    for blk in tr.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(first)  # the original layout shares one embedder
    dit_original.HEADS_BY_HIDDEN[32] = 2
    try:
        torch.save(dit_original.from_diffusers(tr), tmp_path / "DiT.pt")
        b = load_bundle(tmp_path / "DiT.pt")
        for method, kw in (("depth", {"ratio": 0.5}), ("width", {"ratio": 0.5})):
            out, rep = prune(b, cfg(method, **kw))
            saved = save_bundle(out, tmp_path / method, new_manifest(family="dit", op="prune", config={},
                                                                     report={}, parent=b.parent_record()))
            again = load_bundle(saved)
            assert again.kind == "transformer" and torch.equal(outputs(again), outputs(out))
    finally:
        del dit_original.HEADS_BY_HIDDEN[32]


def test_cli_writes_bundle_with_manifest(cli, tiny_dir, tmp_path):
    r = cli("prune", tiny_dir("dit"), "-o", tmp_path / "p", "--method", "depth", "--ratio", "0.5",
            "--calib-samples", "2", "--calib-steps", "4", "--calib-points", "2", "--timing-repeats", "2",
            "--threads", "1", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["out"] == str(tmp_path / "p") and doc["speed"]["repeats"] == 2 and doc["speed"]["ms_base"] > 0
    sp = doc["speed"]  # one thread: the ratio is one of CPU times, which other jobs on the machine do not inflate
    assert (sp["threads"], sp["basis"]) == (1, "cpu-time") and len(sp["cpu_samples_ms"]["pruned"]) == 2
    assert sp["ms_pruned"] == pytest.approx(statistics.median(sp["cpu_samples_ms"]["pruned"]), abs=1e-3)
    m = json.loads((tmp_path / "p" / MANIFEST).read_text())
    assert m["op"] == "prune" and m["config"]["method"] == "depth" and m["config"]["ratio"] == 0.5
    assert m["report"]["plan"]["removed_blocks"] == doc["plan"]["removed_blocks"]
    assert m["parent"]["sha256"] == weights_sha256(tiny_dir("dit")) and m["defaults"]["sampler"] == "ddim"
    assert (tmp_path / "p" / "vae").is_dir() and (tmp_path / "p" / "scheduler").is_dir()
    assert not list((tmp_path / "p").rglob("*.bin")) and not list((tmp_path / "p").rglob("*.pt"))
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(tmp_path / "p")
    assert pipe.transformer.config.num_layers == 1


def test_cli_dry_run_writes_nothing(cli, tiny_dir, tmp_path):
    r = cli("prune", tiny_dir("dit"), "-o", tmp_path / "sub" / "p", "--method", "width", "--ratio", "0.5",
            "--calib-samples", "1", "--calib-steps", "2", "--calib-points", "1", "--dry-run", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["dry_run"] and doc["out"] is None and doc["speed"] is None
    assert doc["plan"]["heads"] == [2, 1] and doc["params_after"] < doc["params_before"]
    assert doc["flops_after"] < doc["flops_before"]
    assert list(tmp_path.iterdir()) == []
    rows = summary(doc)  # the human-readable table (print_kv) shows the plan
    assert rows["heads / width / MLP"] == "2->1 heads, width 32->16, MLP 128->64" and "per-step latency" not in rows


def test_pruned_bundles_reload_in_a_fresh_process(tiny_dir, tmp_path):
    b = load_bundle(tiny_dir("dit"))
    expected = {}
    for method, kw in (("depth", {"ratio": 0.5}), ("width", {"ratio": 0.5}), ("magnitude", {"sparsity": 0.4}),
                       ("2:4", {})):
        out, rep = prune(b, cfg(method, **kw))
        name = method.replace(":", "-")
        save_bundle(out, tmp_path / name, new_manifest(family="dit", op="prune", config={}, report=rep.to_dict(),
                                                       parent=b.parent_record()))
        expected[name] = outputs(out).tolist()
    code = (
        "import json, sys, torch\n"
        "from ditkit.formats.layouts import load_bundle\n"
        "res = {}\n"
        "for name in sys.argv[2:]:\n"
        "    b = load_bundle(sys.argv[1] + '/' + name)\n"
        "    x, t, c = b.family.dummy_inputs(b.transformer, 2, seed=0)\n"
        "    res[name] = b.family.predict(b.transformer, x, t, c).tolist()\n"
        "print(json.dumps(res))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path), *expected], capture_output=True, text=True,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for name in expected:
        assert torch.equal(torch.tensor(got[name]), torch.tensor(expected[name])), name
