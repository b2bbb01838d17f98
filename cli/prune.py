"""ditkit prune: depth, width, magnitude and 2:4 pruning, saved as a reloadable bundle."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.errors import ConfigError, choice_error
from ditkit.ops.prune import IMPORTANCE, PRUNE_METHODS, SCOPES, PruneConfig

from .options import (ConfigOpt, DeviceOpt, DryRunOpt, DtypeOpt, FamilyOpt, ForceOpt, JsonOpt, ModelArg,
                      OptionalOutOpt, SeedOpt, ThreadsOpt, parse_ints)
from .run import Common, Run, log, run_op

METHOD_HELP = "; ".join(f"{name}: {m.help}" for name, m in PRUNE_METHODS.items())


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
    out: OptionalOutOpt = None,
    method: Annotated[Optional[str], typer.Option(help=f"Pruning method. {METHOD_HELP}.")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="depth: fraction of blocks removed (0.5); width: fraction "
                                                        "of attention heads removed (0.3).")] = None,
    keep: Annotated[Optional[int], typer.Option(help="depth: number of blocks to keep.")] = None,
    blocks: Annotated[Optional[str], typer.Option(help="depth: block indices to remove, e.g. 3,7.")] = None,
    sparsity: Annotated[Optional[float], typer.Option(help="magnitude: fraction of weights zeroed (0.4).")] = None,
    scope: Annotated[Optional[str], typer.Option(help=f"magnitude: {' or '.join(SCOPES)} (per-layer).")] = None,
    importance: Annotated[Optional[str], typer.Option(
        help=f"width: Torch-Pruning importance criterion, {' | '.join(IMPORTANCE)} "
             f"({PRUNE_METHODS['width'].options['importance']}).")] = None,
    embeddings: Annotated[Optional[Path], typer.Option(help="Text families: prompt embeddings (.safetensors) to "
                                                            "calibrate on (default: random embeddings).")] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration images sampled by the base model.")] = 4,
    calib_steps: Annotated[int, typer.Option(help="Steps of those sampling trajectories.")] = 10,
    calib_points: Annotated[int, typer.Option(help="Trajectory steps kept as calibration inputs.")] = 3,
    timing_batch: Annotated[int, typer.Option(help="Batch of the per-step latency measurement.")] = 2,
    timing_repeats: Annotated[int, typer.Option(help="Interleaved repeats of the latency measurement.")] = 5,
    no_timing: Annotated[bool, typer.Option("--no-timing", help="Skip the latency measurement.")] = False,
    threads: ThreadsOpt = None,
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
    from ditkit.ops.runtime import resolve_device

    method, device = check_method(method), resolve_device(device)
    cfg = PruneConfig(method=method, ratio=ratio, keep=keep, blocks=parse_ints(blocks, "--blocks"),
                      sparsity=sparsity, scope=scope, importance=importance, calib_samples=calib_samples,
                      calib_steps=calib_steps, calib_points=calib_points, seed=seed,
                      timing=not (dry_run or no_timing), timing_batch=timing_batch, timing_repeats=timing_repeats,
                      device=device)
    common = Common(src, family=family, config=config, device=device, dtype=dtype, force=force, json_=json_,
                    threads=threads)
    check_plan(common, out, dry_run)
    run_op(common, partial(op, family, embeddings), cfg, name="prune", outputs=[] if dry_run else [out],
           inputs=[embeddings], device=device, write=partial(write, out, dry_run), rows=summary,
           title=f"prune {'(dry run)' if dry_run else '-> ' + str(out)}")


def check_method(method: str | None) -> str:
    if method is None:
        raise ConfigError(f"--method is required, choose one of: {', '.join(PRUNE_METHODS)}")
    if method not in PRUNE_METHODS:
        raise choice_error("method", method, PRUNE_METHODS)
    return method


def check_plan(common: Common, out: Path | None, dry_run: bool) -> None:
    from ditkit.formats.families import get_family

    if common.family is not None:
        get_family(common.family)
    if not dry_run and out is None:
        raise ConfigError("prune needs -o OUT (or --dry-run to print the plan only)")


def op(family: str | None, embeddings: Path | None, bundle, cfg):
    from ditkit.formats.embeddings import load_embeddings
    from ditkit.ops.prune import prune

    if family is not None and bundle.family.name != family:
        raise ConfigError(f"--family {family} does not match the checkpoint, which is {bundle.family.name}; "
                          "drop --family")
    emb = None
    if embeddings is not None:
        if bundle.family.conditioning != "text":
            raise ConfigError(f"--embeddings is for text families; {bundle.family.name} is class-conditional")
        emb = load_embeddings(embeddings)
    return prune(bundle, cfg, emb, log=log)


def write(out: Path | None, dry_run: bool, run: Run, pruned, report) -> dict:
    from ditkit.formats.layouts import save_bundle

    if dry_run:
        log("dry run: nothing was written")
    else:
        save_bundle(pruned, out, run.manifest(report), force=run.common.force)
    return {"out": None if dry_run else str(out), "dry_run": dry_run, **report.to_dict()}
