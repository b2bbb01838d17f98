"""ditkit prune: depth, width, magnitude and 2:4 pruning, saved as a reloadable bundle."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from ditkit.formats.atomic import check_output
from ditkit.formats.layouts import load_bundle, resolve_source, save_bundle
from ditkit.formats.embeddings import load_embeddings
from ditkit.formats.errors import ConfigError, choice_error
from ditkit.formats.families import get_family
from ditkit.formats.manifest import new_manifest
from ditkit.ops.prune import IMPORTANCE, PRUNE_METHODS, SCOPES, PruneConfig, prune
from ditkit.ops.runtime import resolve_device, resolve_dtype

from . import output
from .generate import parse_ints
from .options import (ConfigOpt, DeviceOpt, DryRunOpt, DtypeOpt, FamilyOpt, ForceOpt, JsonOpt, ModelArg, SeedOpt)

METHOD_HELP = "; ".join(f"{name}: {m.help}" for name, m in PRUNE_METHODS.items())


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # talk; resolved at call time (works under captured stderr)


def summary(report: dict) -> dict:
    """The human-readable rows (the JSON has everything)."""
    plan, cal, speed = report["plan"], report["calibration"], report["speed"]
    rows = {
        "method": report["method"], "family": report["family"],
        "params": f"{report['params_before']:,} -> {report['params_after']:,} ({report['params_ratio']:.3f}x)",
        "FLOPs/step": f"{report['flops_before']:,} -> {report['flops_after']:,} ({report['flops_ratio']:.3f}x)",
        "sparsity": f"{report['sparsity']:.4f} of the weights are zero",
        "calibration error": f"rel. MSE {cal['rel_mse']:.4g}, SQNR {cal['sqnr_db']} dB "
                             f"({cal['samples']} samples, timesteps {cal['timesteps']})",
    }
    if speed:
        rows["per-step latency"] = (f"{speed['ms_base']:.2f} ms -> {speed['ms_pruned']:.2f} ms "
                                    f"({speed['latency_ratio']:.3f}x, {speed['basis']}, batch {speed['batch']}, "
                                    f"{speed['kernel']})")
    if "removed_blocks" in plan:
        rows["removed blocks"] = ", ".join(plan["removed_blocks"])
    if "heads" in plan:
        rows["heads / width / MLP"] = (f"{plan['heads'][0]}->{plan['heads'][1]} heads, width {plan['width'][0]}->"
                                       f"{plan['width'][1]}, MLP {plan['mlp_hidden'][0]}->{plan['mlp_hidden'][1]}")
        rows["removed heads"] = "; ".join(f"{k}: {v}" for k, v in plan["removed_heads"].items())
    if "sparsity_prunable" in plan:
        rows["pruned layers"] = f"{plan.get('prunable_layers', len(plan.get('pruned_layers', [])))}, " \
                                f"{plan['sparsity_prunable']:.4f} of their weights zeroed"
    return rows


def prune_cmd(
    src: ModelArg = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (written atomically).")] = None,
    method: Annotated[Optional[str], typer.Option(help=f"Pruning method. {METHOD_HELP}.")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="depth: fraction of blocks removed (0.5); width: fraction "
                                                        "of attention heads removed (0.3).")] = None,
    keep: Annotated[Optional[int], typer.Option(help="depth: number of blocks to keep.")] = None,
    blocks: Annotated[Optional[str], typer.Option(help="depth: block indices to remove, e.g. 3,7.")] = None,
    sparsity: Annotated[Optional[float], typer.Option(help="magnitude: fraction of weights zeroed (0.4).")] = None,
    scope: Annotated[Optional[str], typer.Option(help=f"magnitude: {' or '.join(SCOPES)} (per-layer).")] = None,
    importance: Annotated[Optional[str], typer.Option(help=f"width: {' or '.join(IMPORTANCE)} (magnitude).")] = None,
    embeddings: Annotated[Optional[Path], typer.Option(help="Text families: prompt embeddings (.safetensors) to "
                                                            "calibrate on (default: random embeddings).")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration images sampled by the base model.")] = 4,
    calib_steps: Annotated[int, typer.Option(help="Steps of those sampling trajectories.")] = 10,
    calib_points: Annotated[int, typer.Option(help="Trajectory steps kept as calibration inputs.")] = 3,
    timing_batch: Annotated[int, typer.Option(help="Batch of the per-step latency measurement.")] = 2,
    timing_repeats: Annotated[int, typer.Option(help="Interleaved repeats of the latency measurement.")] = 5,
    no_timing: Annotated[bool, typer.Option("--no-timing", help="Skip the latency measurement.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's own; with 1, the "
                                                        "latency ratio is one of CPU times, steady on a busy machine).")] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
):
    """Prune a transformer (depth, width, magnitude, 2:4) and save it as a bundle that records what was removed."""
    if method is None:
        raise ConfigError(f"--method is required, choose one of: {', '.join(PRUNE_METHODS)}")
    if method not in PRUNE_METHODS:
        raise choice_error("method", method, PRUNE_METHODS)
    device = resolve_device(device)
    cfg = PruneConfig(method=method, ratio=ratio, keep=keep, blocks=parse_ints(blocks, "--blocks"),
                      sparsity=sparsity, scope=scope, importance=importance, calib_samples=calib_samples,
                      calib_steps=calib_steps, calib_points=calib_points, seed=seed,
                      timing=not (dry_run or no_timing), timing_batch=timing_batch, timing_repeats=timing_repeats,
                      device=device)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1 (got {threads})")
    if family is not None:
        get_family(family)
    if not dry_run:
        if out is None:
            raise ConfigError("prune needs -o OUT (or --dry-run to print the plan only)")
        check_output(out, force, inputs=(resolve_source(src),))
    bundle = load_bundle(src, family=family, config=config, device=device, dtype=resolve_dtype(dtype, device))
    if family is not None and bundle.family.name != family:
        raise ConfigError(f"--family {family} does not match the checkpoint, which is {bundle.family.name}; "
                          "drop --family")
    emb = None
    if embeddings is not None:
        if bundle.family.conditioning != "text":
            raise ConfigError(f"--embeddings is for text families; {bundle.family.name} is class-conditional")
        emb = load_embeddings(embeddings)
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or threads_before)
        pruned, report = prune(bundle, cfg, emb, log=log)
    finally:
        torch.set_num_threads(threads_before)
    doc = {"out": None if dry_run else str(out), "dry_run": dry_run, **report.to_dict()}
    if not dry_run:
        manifest = new_manifest(family=bundle.family.name, op="prune", config=cfg.to_dict(), report=report.to_dict(),
                                parent=bundle.parent_record(), device=device, defaults=bundle.defaults())
        save_bundle(pruned, out, manifest, force=force)
    else:
        log("dry run: nothing was written")
    if json_:
        output.print_json(doc)
    else:
        output.print_kv(f"prune {'(dry run)' if dry_run else '-> ' + str(out)}", summary(doc))
