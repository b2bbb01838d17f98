"""ditkit quantize: int8 / 4-bit / fp8 variants that reload, with their size, kernels and measured error."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.layouts import save_quantized
from ditkit.formats.atomic import check_output
from ditkit.formats.layouts import load_bundle
from ditkit.formats.manifest import new_manifest
from ditkit.ops.quantize import QUANT_SCHEMES, QuantizeConfig, check_hardware, quantize

from . import output
from .options import ConfigOpt, DeviceOpt, FamilyOpt, ForceOpt, JsonOpt, ModelArg, OutOpt, SeedOpt

SchemeOpt = Annotated[str, typer.Option("--scheme", help="One of: " + ", ".join(
    f"{n} ({s.doc})" for n, s in QUANT_SCHEMES.items()) + ".")]


def quantize_cmd(
    out: OutOpt,
    src: ModelArg = None,
    scheme: SchemeOpt = "int8-dynamic",
    skip: Annotated[Optional[list[str]], typer.Option(
        "--skip", help="Regex of module names to keep in full precision (repeatable), e.g. 'attn1\\.to_out'.")] = None,
    modulation: Annotated[Optional[str], typer.Option(
        help="quantize or keep the adaLN modulation linears (default: the scheme's measured choice).")] = None,
    sensitive: Annotated[str, typer.Option(
        help="int8-in-blocks: sensitive layers repeated in every block (DiT's timestep MLP and label table) are "
             "stored int8 weight-only; fp32: every sensitive layer stays fp32.")] = "int8-in-blocks",
    compute_dtype: Annotated[Optional[str], typer.Option(
        help="Matmul dtype for bnb-nf4/fp4, int8-weight-only and fp8: fp32, bf16 or fp16.")] = None,
    calib_batches: Annotated[int, typer.Option(help="Calibration batches (seeds seed, seed+1, ...).")] = 4,
    calib_batch_size: Annotated[int, typer.Option(help="Samples per calibration batch.")] = 2,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Quantize the transformer; report bytes, per-layer and output SQNR, and the kernel each layer runs."""
    cfg = QuantizeConfig(scheme=scheme, skip=list(skip or []), modulation=modulation, sensitive=sensitive,
                         compute_dtype=compute_dtype, device=device, calib_batches=calib_batches,
                         calib_batch_size=calib_batch_size, seed=seed)
    cfg.device = check_hardware(cfg)  # fp8 on CPU etc. fails here, before any loading
    check_output(out, force, inputs=(Path(src),) if src else ())
    bundle = load_bundle(src, family=family, config=config, device=cfg.device)
    parent = bundle.parent_record()
    # typer.echo finds the current stderr (output.log's console keeps the one from import time)
    variant, report = quantize(bundle, cfg, progress=lambda msg: typer.echo(msg, err=True))

    def manifest(disk_bytes: int) -> dict:
        report.set_disk_after(disk_bytes)
        return new_manifest(family=bundle.family.name, op="quantize", config=cfg.to_dict(), report=report.to_dict(),
                            parent=parent, device=cfg.device, defaults=bundle.manifest.get("defaults"))

    save_quantized(variant, out, manifest, force=force)
    doc = {"out": str(out), **report.to_dict()}
    if json_:
        output.print_json(doc)
    else:
        for k in ("layers", "full_precision", "calibration"):
            doc.pop(k)
        output.print_kv(f"quantize ({cfg.scheme}) -> {out}", doc)
