"""Op configs round-trip: from_dict(to_dict(cfg)) == cfg, with a type tag and a version; older dicts still read."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ditkit.formats.errors import ConfigError
from ditkit.ops.bench import BenchConfig
from ditkit.ops.cache import CacheConfig
from ditkit.ops.config import CONFIGS, OpConfig, same_run
from ditkit.ops.distill import DistillConfig
from ditkit.ops.export import ExportConfig
from ditkit.ops.generate import GenerateConfig
from ditkit.ops.info import InfoConfig
from ditkit.ops.lora import LoraConfig
from ditkit.ops.prune import PruneConfig
from ditkit.ops.quantize import QuantizeConfig
from ditkit.ops.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# every op config with values other than its defaults
NON_DEFAULT = [
    InfoConfig(height=64, width=32, batch=3),
    GenerateConfig(labels=[3, 7], num_images=5, steps=9, sampler="ddim", guidance=2.5, seed=11, batch_size=4),
    BenchConfig(batch_sizes=[1, 4], repeats=7, steps=6, num_images=12, seed=5),
    PruneConfig(method="width", ratio=0.3, importance="taylor", calib_samples=6, seed=2),
    QuantizeConfig(scheme="bnb-nf4"),
    ExportConfig(format="onnx", precision="fp16", opset=19, atol=1e-3),
    DistillConfig(mode="steps", steps=7, batch_size=8, lr=1e-3, seed=3),
    LoraConfig(rank=8, alpha=16.0, targets=("attention", "mlp"), steps=12, lr=2e-3),
    CacheConfig(target_speedup=2.0, steps=10, images=4),
    TrainConfig(steps=5, batch_size=4, lr=1e-2),
]


def test_every_op_config_is_covered():
    assert {type(c).TYPE for c in NON_DEFAULT} == set(CONFIGS)


@pytest.mark.parametrize("cfg", NON_DEFAULT, ids=lambda c: type(c).TYPE)
def test_round_trip_through_json(cfg):
    d = cfg.to_dict()
    assert d["_type"] == type(cfg).TYPE and d["_version"] == type(cfg).VERSION
    back = OpConfig.from_dict(json.loads(json.dumps(d)))  # the tag picks the class
    assert type(back) is type(cfg) and back == cfg
    assert type(cfg).from_dict(d) == cfg
    assert type(cfg)().to_dict() != d  # the values really differ from the defaults


def test_unknown_key_wrong_type_and_newer_version_are_refused():
    d = PruneConfig(method="depth", ratio=0.5).to_dict()
    with pytest.raises(ConfigError, match="unknown key 'ratioo'"):
        PruneConfig.from_dict({**{k: v for k, v in d.items() if k != "ratio"}, "ratioo": 0.5})
    with pytest.raises(ConfigError, match="a prune config is not a quantize config"):
        QuantizeConfig.from_dict(d)
    with pytest.raises(ConfigError, match="version 99"):
        OpConfig.from_dict({**d, "_version": 99})
    with pytest.raises(ConfigError, match="unknown config type"):
        OpConfig.from_dict({**d, "_type": "nope"})
    with pytest.raises(ConfigError, match="--ratio"):  # from_dict validates like the constructor
        PruneConfig.from_dict({**d, "ratio": 7.0})


def test_untagged_dicts_of_the_previous_format_still_read():
    """Configs written before the tag (version 1 without _type/_version): the embedded default's manifest."""
    manifest = json.loads((ROOT / "formats/assets/tiny-digits/ditkit.json").read_text())
    old = {k: v for k, v in GenerateConfig().to_dict().items() if not k.startswith("_")}  # today's keys, untagged
    assert GenerateConfig.from_dict(old) == GenerateConfig()
    assert manifest.get("format_version") is not None  # the manifest itself still parses as before
    prune_v1 = {"method": "depth", "ratio": 0.5, "keep": None, "blocks": None, "sparsity": None, "scope": None,
                "importance": None, "calib_samples": 4, "calib_steps": 10, "calib_points": 3, "seed": 0,
                "timing": True, "timing_batch": 2, "timing_repeats": 5, "device": "cpu"}
    known = {k: v for k, v in prune_v1.items() if k in PruneConfig().to_dict()}
    assert PruneConfig.from_dict(known) == PruneConfig(**known)


def test_resume_compares_configs_not_raw_dicts():
    cfg = DistillConfig(mode="steps", steps=7, batch_size=8)
    stored = json.loads(json.dumps(cfg.to_dict()))  # lists where the config has tuples, tags present
    assert same_run(stored, cfg, ()) == []
    untagged = {k: v for k, v in stored.items() if not k.startswith("_")}
    assert same_run(untagged, cfg, ()) == []
    assert same_run({**stored, "steps": 99}, cfg, ("steps",)) == []
    assert same_run({**stored, "lr": 0.5}, cfg, ("steps",)) == ["lr"]
