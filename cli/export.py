"""ditkit export: the transformer as ONNX (checked in onnxruntime), a diffusers dir, one file, or DiT's layout."""
from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.errors import ConfigError
from ditkit.ops.export import EXPORT_FORMATS, GGUF_QUANTS, PRECISIONS, VAE_CHOICES, ExportConfig, check_gate, export

from .options import ConfigOpt, DeviceOpt, FamilyOpt, ForceOpt, JsonOpt, ModelArg, ThreadsOpt
from .run import Common, Run, log, run_op

FORMAT_HELP = "; ".join(f"{f.name}: {f.help}" for f in EXPORT_FORMATS.values())
SHOWN = {  # the table without --json; --json prints the whole report
    "onnx": ("format", "family", "precision", "opset", "batch", "resolution", "resolution_note", "latent_hw",
             "dynamic_axes",
             "external_data", "graph_bytes", "lora_fused", "max_abs_error", "max_rel_error", "atol", "rtol", "passed",
             "failures", "seconds_export", "seconds_check"),
    "gguf": ("format", "family", "quant", "layout", "tensor_types", "num_blocks", "params", "lora_fused", "sqnr_db",
             "max_abs_error", "passed", "failures", "seconds_check"),
    "layout": ("format", "family", "num_blocks", "params", "lora_fused", "bit_exact", "max_abs_error", "note", "passed",
               "failures", "seconds_check"),
}


def export_cmd(
    src: ModelArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: a directory (onnx, diffusers) or a file "
                                      "(.safetensors, .pt for dit-original, .gguf); written atomically.")] = ...,
    format_: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "onnx",
    precision: Annotated[str, typer.Option(help=f"onnx: {', '.join(PRECISIONS)} (fp16 is converted from the "
                                           "checked fp32 graph).")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset, 18..21.")] = 18,
    height: Annotated[Optional[int], typer.Option(help="Pixels to trace at (default: native); the only size of "
                                                  "fixed-resolution graphs.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Pixels to trace at (default: native).")] = None,
    vae: Annotated[str, typer.Option(help=f"onnx: the VAE as {' or '.join(VAE_CHOICES)} "
                                     "(onnx exports its decoder too).")] = "pytorch",
    atol: Annotated[Optional[float], typer.Option(help="Max |onnx - torch| (default: 1e-4 fp32, 5e-2 fp16).")] = None,
    rtol: Annotated[Optional[float], typer.Option(help="Max |onnx - torch| / max |torch| (default: 1e-4 fp32, "
                                                  "2e-2 fp16).")] = None,
    quant: Annotated[Optional[str], typer.Option(help=f"gguf: {', '.join(GGUF_QUANTS)} (default Q8_0); norms, "
                                                 "biases and embedders stay float.")] = None,
    min_sqnr: Annotated[Optional[float], typer.Option(help="gguf: exit 1, writing nothing, under this output "
                                                      "SQNR (dB).")] = None,
    device: DeviceOpt = "cpu",
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Export a checkpoint; ONNX graphs are checked against PyTorch (exit 1 over --atol/--rtol, nothing written)."""
    from ditkit.ops.runtime import resolve_device

    cfg = ExportConfig(format=format_, precision=precision, opset=opset, height=height, width=width, vae=vae,
                       atol=atol, rtol=rtol, device=resolve_device(device), quant=quant, min_sqnr=min_sqnr)
    check_suffix(EXPORT_FORMATS[cfg.format], out)
    cfg.workdir = str(Path(out).expanduser().resolve().parent)  # ONNX staging beside the output
    common = Common(src, family=family, config=config, force=force, json_=json_, threads=threads)
    run_op(common, partial(export, log=log), cfg, name="export", outputs=[out], write=partial(write, out),
           rows=rows, gate=check_gate,
           title=lambda doc: f"export -> {out}" if doc["passed"] else "export (nothing written)")


def check_suffix(fmt, out: Path) -> None:
    if fmt.suffix is not None and out.suffix != fmt.suffix:
        raise ConfigError(f"--format {fmt.name} writes one {fmt.suffix} file; give -o NAME{fmt.suffix}")
    if fmt.suffix is None and out.suffix in (".safetensors", ".pt", ".onnx", ".gguf"):
        raise ConfigError(f"--format {fmt.name} writes a directory; give -o a directory name, not {out.name}")


def write(out: Path, run: Run, exported, report) -> dict:
    """The export when its parity check passed (else nothing); the ONNX staging directory is always removed."""
    from ditkit.formats.export_files import WRITERS

    out = run.outputs[0] if run.outputs else out
    try:
        if report.passed:
            log(f"writing {out}")
            WRITERS[run.cfg.format](exported, out, run.manifest(report), run.common.force)
    finally:
        if exported.kind == "onnx" and exported.path is not None:
            shutil.rmtree(exported.path, ignore_errors=True)  # the staging directory
    return {"out": str(out) if report.passed else None, **report.to_dict()}


def rows(doc: dict) -> dict:
    shown = SHOWN[doc["format"] if doc["format"] in SHOWN else "layout"]
    return {k: doc[k] for k in ("out", *shown) if doc.get(k) not in (None, [], {})}
