"""ditkit cache: calibrate which blocks to reuse at which steps, and write the policy into a new bundle."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from .options import (ConfigOpt, EmbeddingsOpt, FamilyOpt, ForceOpt, JsonOpt, ModelArg, OutOpt, PromptOpt, SeedOpt,
                      ThreadsOpt)
from .run import Common, Run, log, run_op


def cache_cmd(
    out: OutOpt,
    src: ModelArg = None,
    target_speedup: Annotated[float, typer.Option(help="Speedup per image to reach (> 1): predicted by the cost "
                                                       "model, then measured end to end on one image.")] = 1.5,
    method: Annotated[str, typer.Option(help="auto (calibrate every method, keep the best PSNR at the target), or one "
                                             "of: blocks, forecast, teacache, fbcache, magcache, taylorseer, pab.")] = "auto",
    images: Annotated[int, typer.Option(help="Calibration trajectories (seeded, cycling through the labels).")] = 4,
    steps: Annotated[Optional[int], typer.Option(help="Steps the policy is for (default: the model's own).")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="Sampler the policy is for (default: the model's own).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance of the calibration runs (default: the model's).")] = None,
    prompt: PromptOpt = None,
    embeddings: EmbeddingsOpt = None,
    seed: SeedOpt = 1234,
    no_timing: Annotated[bool, typer.Option(
        "--no-timing", help="Count FLOPs instead of timing: the policy depends only on the model, the settings and "
                            "the seed, not on the machine's load (reproducible builds); the speedup reported is "
                            "then the FLOP prediction, an upper bound (no per-call overhead), not measured.")] = False,
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Calibrate training-free step caching to a target speedup (every method, or one); weights unchanged."""
    from ditkit.ops.cache import CacheConfig

    cfg = CacheConfig(target_speedup=target_speedup, method=method, images=images, steps=steps, sampler=sampler,
                      guidance=guidance, prompts=list(prompt) if prompt else None, seed=seed,
                      timing=not no_timing)
    common = Common(src, family=family, config=config, force=force, json_=json_, threads=threads)
    run_op(common, partial(calibrate, embeddings), cfg, inputs=[embeddings], name="cache", outputs=[out], write=partial(write, out), rows=rows,
           title=f"cache -> {out}")


def calibrate(embeddings, bundle, cfg):
    from ditkit.formats.embeddings import load_embeddings
    from ditkit.ops.cache import cache

    log(f"calibrating {cfg.method} on {cfg.images} seeded trajectories (target {cfg.target_speedup}x"
        + ("" if cfg.timing else ", FLOP cost model, not timed") + ")")
    return cache(bundle, cfg, load_embeddings(embeddings) if embeddings else None, log=log)


def write(out: Path, run: Run, bundle, report) -> dict:
    from ditkit.formats.layouts import save_bundle

    manifest = {**run.manifest(report), "cache": bundle.manifest["cache"]}
    save_bundle(bundle, out, manifest, force=run.common.force)
    return {"out": str(out), **report.to_dict()}


def rows(doc: dict) -> dict:
    rows = {k: v for k, v in doc.items() if k not in ("rounds", "methods", "params", "policy", "checks")}
    p = doc["params"]
    if "skip" in p:
        rows["policy"] = " ".join("-" if r is None else f"{r[0]}:{r[1]}" for r in p["skip"])
    elif "full" in p:
        rows["policy"] = "".join("F" if f else str(o) for f, o in zip(p["full"], p["order"]))
    else:
        rows["params"] = {k: v for k, v in p.items() if not isinstance(v, list)}
    for m in doc["methods"]:
        speed = (f"{m['measured_speedup']:.2f}x measured" if m.get("measured_speedup") is not None
                 else f"{m.get('predicted_speedup', 0):.2f}x predicted (FLOPs)")
        rows[f"method {m['method']}"] = m.get("skipped") or f"{speed}, PSNR {m['image_psnr']} dB, {m.get('params')}"
    return rows
