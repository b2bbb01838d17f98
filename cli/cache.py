"""ditkit cache: calibrate which blocks to reuse at which steps, and write the policy into a new bundle."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.atomic import check_output
from ditkit.formats.layouts import load_bundle, save_bundle
from ditkit.formats.manifest import new_manifest
from ditkit.ops.cache import CacheConfig, cache

from . import output
from .options import ConfigOpt, FamilyOpt, ForceOpt, JsonOpt, ModelArg, OutOpt, SeedOpt


def cache_cmd(
    out: OutOpt,
    src: ModelArg = None,
    target_speedup: Annotated[float, typer.Option(help="Speedup per image to reach (> 1): predicted by the cost "
                                                       "model, then measured end to end on one image.")] = 1.5,
    images: Annotated[int, typer.Option(help="Calibration trajectories (seeded, cycling through the labels).")] = 4,
    steps: Annotated[Optional[int], typer.Option(help="Steps the policy is for (default: the model's own).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="Sampler the policy is for (default: the model's own).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance of the calibration runs (default: the model's).")] = None,
    seed: SeedOpt = 1234,
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Calibrate training-free step caching (reuse blocks' residuals from the previous full step); weights unchanged."""
    cfg = CacheConfig(target_speedup=target_speedup, images=images, steps=steps, sampler=sampler, guidance=guidance,
                      seed=seed)
    check_output(out, force, inputs=(Path(src),) if src else ())
    bundle = load_bundle(src, family=family, config=config)
    parent = bundle.parent_record()
    print(f"calibrating on {cfg.images} seeded trajectories (target {cfg.target_speedup}x)", file=sys.stderr, flush=True)
    bundle, report = cache(bundle, cfg)
    manifest = new_manifest(family=bundle.family.name, op="cache", config=cfg.to_dict(), report=report.to_dict(),
                            parent=parent, defaults=bundle.manifest.get("defaults"))
    manifest["cache"] = bundle.manifest["cache"]
    save_bundle(bundle, out, manifest, force=force)
    doc = {"out": str(out), **report.to_dict()}
    if json_:
        output.print_json(doc)
    else:
        doc.pop("rounds")
        doc["policy"] = " ".join("-" if r is None else f"{r[0]}:{r[1]}" for r in report.policy["skip"])
        output.print_kv(f"cache -> {out}", doc)
