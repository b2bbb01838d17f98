"""A family is one file and one registry line: every adapter provides what the ops ask of it, no table keyed by
family misses a registered family, and a fifth family registered here alone is accepted by info, generate,
prune and quantize (tiny real models, numeric checks)."""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import sys

import numpy as np
import pytest
import torch

import diffusers
import tiny
from conftest import FAMILY_NAMES
from ditkit.formats.families import FAMILIES, dit, get_family
from ditkit.formats.families.base import Family
from ditkit.formats.families.coupling import WidthSpec

pytestmark = pytest.mark.usefixtures("one_thread")

# dicts deliberately keyed by a subset of the families: "module.NAME" -> why (none today)
PARTIAL_TABLES: dict[str, str] = {}
LAYERS = ("cli", "ops", "formats", "nn")


def _family_keyed_tables():
    """Every module-level dict in ditkit with a registered family name among its keys: {"module.NAME": keys}."""
    for layer in LAYERS:  # ditkit is a namespace package (editable installs): walk each layer's package
        pkg = importlib.import_module(f"ditkit.{layer}")
        for m in pkgutil.walk_packages(pkg.__path__, f"ditkit.{layer}."):
            importlib.import_module(m.name)
    out = {}
    for name, mod in sorted(sys.modules.items()):
        if not (name == "ditkit" or name.startswith("ditkit.")):
            continue
        for attr, value in vars(mod).items():
            if isinstance(value, dict) and any(isinstance(k, str) and k in FAMILIES for k in value):
                out[f"{name}.{attr}"] = set(value)
    return out


# -- coverage -----------------------------------------------------------------------------------------------

def test_family_keyed_tables_cover_every_family():
    tables = _family_keyed_tables()
    assert "ditkit.formats.families.FAMILIES" in tables  # the scan sees the registry itself
    assert sum(n.startswith("ditkit.") for n in sys.modules) > 40  # ... and every module
    missing = {t: sorted(set(FAMILIES) - keys) for t, keys in tables.items()
               if t not in PARTIAL_TABLES and set(FAMILIES) - keys}
    assert not missing, f"family-keyed tables miss registered families: {missing}"


def test_fixtures_take_the_family_list_from_the_registry():
    assert FAMILY_NAMES == list(FAMILIES) and len(FAMILY_NAMES) >= 4
    assert all(FAMILIES[n].name == n for n in FAMILIES)


def _first_block_tokens(fam, tr, latents, t, cond) -> int:
    """The sequence length the first block actually sees (image tokens; text tokens are a separate input)."""
    seen = []

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen.append(h.shape[1])

    handle = getattr(tr, fam.stacks[0].attr)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            fam.predict(tr, latents, t, cond)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_adapter_provides_what_the_ops_ask(family):
    fam = get_family(family)
    assert isinstance(fam, Family) and fam.conditioning in ("class", "text") and fam.prediction in ("epsilon", "flow")
    assert fam.default_sampler in fam.samplers and hasattr(diffusers, fam.pipeline_class)
    tr = tiny.tiny_transformer(family)  # tiny_config builds the family's own diffusers class
    assert type(tr).__name__ == fam.transformer_class and fam.detect({"_class_name": type(tr).__name__})
    names = {n for n, _ in tr.named_modules()}

    # depth pruning: every stack exists and its config field holds its length
    assert fam.stacks and fam.blocks(tr) is getattr(tr, fam.stacks[0].attr)
    for s in fam.stacks:
        assert len(getattr(tr, s.attr)) == tr.config[s.config_key] >= 1, s
    # width pruning: every coupling rule and width field names something the model has
    if fam.width is not None:
        assert isinstance(fam.width, WidthSpec)
        keys = list(tr.state_dict())
        declared = [p for p, _ in fam.width.unwrapped] + list(fam.width.ignored_params)
        unused = [p for p in declared if not any(re.fullmatch(p, k) for k in keys)]
        assert not unused, f"{family}: width declarations that match no tensor: {unused}"
        assert all(any(re.fullmatch(p, n) for n in names) for p in (*fam.width.ignored, fam.width.patch_embed))
        assert all(f in tr.config for f in fam.width.width_fields)
        assert fam.width_unsupported(tr) is None
        if fam.width.mlp_only is not None:  # the MLP width the config writes rebuilds that width
            h = fam.mlp_hidden(tr) - fam.mlp_multiple(tr)
            config = {k: v for k, v in tr.config.items() if not k.startswith("_")}  # as ops/prune/rebuild.py
            small = type(tr).from_config({**config, **fam.mlp_config(tr, h)})
            assert fam.mlp_hidden(small) == h and fam.hidden_size(small) == fam.hidden_size(tr)
    # LoRA's mlp target: the family's MLP classes exist and its blocks hold them
    import diffusers.models.attention as attention

    types = tuple(getattr(attention, t) for t in fam.mlp_types)
    assert not types or any(isinstance(m, types) for m in tr.modules()), f"{family}: no {fam.mlp_types} module"
    # quantize / LoRA: the regexes name real modules
    for pattern in (*fam.full_precision, *fam.modulation):
        assert any(re.search(pattern, n) for n in names), f"{family}: {pattern} matches no module"

    # one call: output shaped like the latents, finite; image_tokens is what the blocks see
    hw = (fam.latent_size(tr),) * 2  # native: DiT builds its position table for that size only
    latents, t, cond = fam.dummy_inputs(tr, 2, hw)
    assert latents.shape == (2, fam.latent_channels(tr), *hw)
    with torch.no_grad():
        out = fam.predict(tr, latents, t, cond)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    # ... or image + caption tokens where the first stack runs one joint sequence (Lumina 2's main blocks)
    seen, n_img = _first_block_tokens(fam, tr, latents, t, cond), fam.image_tokens(tr, hw)
    assert seen == n_img or (fam.conditioning == "text" and seen == n_img + cond["prompt_embeds"].shape[1])

    # conditions: shapes the sampler and the embeddings files rely on
    g = torch.Generator().manual_seed(0)
    c5 = fam.dummy_cond(tr, 3, g, tokens=5)
    assert all(v.shape[0] == 3 for v in c5.values())
    if fam.conditioning == "text":
        assert c5["prompt_embeds"].shape[1] == 5
    else:
        null = fam.null_cond(tr, c5)
        assert null.keys() == c5.keys() and not torch.equal(null["class_labels"], c5["class_labels"])


# -- a fifth family, registered for one test -----------------------------------------------------------------

class FakeFamily(dit.DiTFamily):
    """A DiT variant under its own name, three blocks deep: nothing outside this file knows it."""

    def tiny_config(self):
        return {**super().tiny_config(), "num_layers": 3}


FAKE = FakeFamily(**{**{f.name: getattr(dit.FAMILY, f.name) for f in dataclasses.fields(Family)},
                     "name": "fake", "stacks": None})


@pytest.fixture
def fake_family(monkeypatch, tmp_path):
    """The fake family in FAMILIES (removed afterwards) and a bundle of its tiny model."""
    from ditkit.formats.layouts import load_bundle

    monkeypatch.setitem(FAMILIES, FAKE.name, FAKE)
    root = tiny.write_tiny_pipeline(FAKE.name, tmp_path / FAKE.name)  # tests/tiny.py asks the registry
    # same diffusers class as dit, so detection finds the dit entry first: hand the bundle the fake adapter
    bundle = dataclasses.replace(load_bundle(root), family=get_family(FAKE.name))
    assert len(bundle.family.blocks(bundle.transformer)) == 3
    yield bundle
    assert FAKE.name in FAMILIES


def test_a_new_family_is_one_adapter_and_one_registry_line(fake_family, tmp_path):
    from ditkit.ops.generate import GenerateConfig, generate
    from ditkit.ops.info import InfoConfig, count_flops, info
    from ditkit.ops.prune import PruneConfig, prune
    from ditkit.ops.quantize import QuantizeConfig, quantize

    b, tr = fake_family, fake_family.transformer
    params = sum(p.numel() for p in tr.parameters())

    # info: the family's name, its blocks, its cost (the same model under the dit adapter costs the same)
    _, rep = info(b, InfoConfig())
    assert rep.family == "fake" and rep.num_blocks == 3 and rep.params == params
    hw = tuple(rep.latent_shape[1:])
    assert rep.flops_per_step == count_flops(dataclasses.replace(b, family=get_family("dit")), 1, hw) > 2 * params

    # generate: decoded, seeded, label-dependent images at the native size
    cfg = GenerateConfig(labels=[1, 2], num_images=2, steps=2, seed=3)
    imgs, grep = generate(b, cfg)
    assert grep.family == "fake" and grep.decoded and imgs.shape == (2, rep.height, rep.width, 3)
    assert imgs.dtype == np.uint8 and imgs.std() > 0 and not np.array_equal(imgs[0], imgs[1])
    again, _ = generate(b, cfg)
    assert np.array_equal(again, imgs)

    # prune (depth): one block of three goes, the rebuilt model is smaller and finite
    small, prep = prune(b, PruneConfig(method="depth", keep=2, calib_samples=2, calib_steps=4, calib_points=2,
                                       timing=False))
    assert prep.family == "fake" and prep.plan["blocks_before"] == 3 and prep.plan["blocks_after"] == 2
    assert small.transformer.config["num_layers"] == 2 and prep.params_after < prep.params_before == params
    assert prep.flops_after < prep.flops_before and np.isfinite(prep.calibration["rel_mse"])
    x, t, c = FAKE.dummy_inputs(small.transformer, 2)
    with torch.no_grad():
        assert torch.isfinite(FAKE.predict(small.transformer, x, t, c)).all()

    # quantize: int8 weights, output close to the float model's
    variant, qrep = quantize(b, QuantizeConfig(scheme="int8-weight-only", calib_batches=1, calib_batch_size=2))
    assert variant.family.name == "fake" and qrep.sqnr_db >= 40.0, qrep.sqnr_db
    x, t, c = FAKE.dummy_inputs(tr, 2, seed=5)
    with torch.no_grad():
        ref, got = FAKE.predict(tr, x, t, c), FAKE.predict(variant.transformer, x, t, c)
    assert torch.isfinite(got).all() and (got - ref).norm() / ref.norm() < 0.05


def test_the_fake_family_is_gone_after_its_test():
    assert "fake" not in FAMILIES
