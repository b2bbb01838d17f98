"""ditkit quantize: int8 / 4-bit / fp8 variants that reload, with their size, kernels and measured error."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.errors import ConfigError
from ditkit.ops.quantize import QUANT_SCHEMES, QuantizeConfig, check_hardware, quantize

from .options import ConfigOpt, DeviceOpt, FamilyOpt, ForceOpt, JsonOpt, ModelArg, OutOpt, SeedOpt, ThreadsOpt
from .run import Common, Run, log, run_op

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
    lora: Annotated[Optional[list[Path]], typer.Option(
        help="A LoRA adapter .safetensors fused into the float weights before quantizing (repeatable); the report "
             "gives the fuse error and the quantization SQNR.")] = None,
    lora_scale: Annotated[Optional[list[float]], typer.Option(help="Scale of the adapters (one, or one per "
                                                                   "--lora; default 1).")] = None,
    device: DeviceOpt = "cpu",
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Quantize the transformer; report bytes, per-layer and output SQNR, and the kernel each layer runs."""
    cfg = QuantizeConfig(scheme=scheme, skip=list(skip or []), modulation=modulation, sensitive=sensitive,
                         compute_dtype=compute_dtype, device=device, calib_batches=calib_batches,
                         calib_batch_size=calib_batch_size, seed=seed)
    cfg.device = check_hardware(cfg)  # fp8 on CPU etc. fails here, before any loading
    common = Common(src, family=family, config=config, force=force, json_=json_, threads=threads)
    if lora_scale and not lora:
        raise ConfigError("--lora-scale needs --lora ADAPTER")
    op = partial(fused, lora, lora_scale or []) if lora else partial(quantize, progress=log)
    run_op(common, op, cfg, name="quantize", outputs=[out], inputs=list(lora or []), device=cfg.device,
           write=partial(write, out), rows=rows, title=f"quantize ({cfg.scheme}) -> {out}")


def fused(paths: list[Path], scales: list[float], bundle, cfg):
    """--lora: the adapters read, fused into the float weights, then the model quantized (ops.quantize_fused)."""
    from ditkit.formats.lora import load_adapter
    from ditkit.ops.quantize import quantize_fused

    return quantize_fused(bundle, cfg, [load_adapter(p) for p in paths], scales, progress=log)


def write(out: Path, run: Run, variant, report) -> dict:
    from ditkit.formats.layouts import save_quantized

    def manifest(disk_bytes: int) -> dict:  # the transformer's bytes on disk are known once it is written
        report.set_disk_after(disk_bytes)
        return run.manifest(report)

    save_quantized(variant, out, manifest, force=run.common.force)
    return {"out": str(out), **report.to_dict()}


def rows(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("layers", "full_precision", "calibration")}
