"""ditkit export: the transformer as ONNX (checked in onnxruntime), a diffusers dir, one file, or DiT's layout."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.atomic import check_output
from ditkit.formats.layouts import load_bundle
from ditkit.formats.errors import ConfigError
from ditkit.formats.export_files import WRITERS
from ditkit.formats.manifest import new_manifest
from ditkit.ops.export import EXPORT_FORMATS, PRECISIONS, VAE_CHOICES, ExportConfig, check_gate, export
from ditkit.ops.runtime import resolve_device

from . import output
from .options import ConfigOpt, DeviceOpt, FamilyOpt, ForceOpt, JsonOpt, ModelArg

FORMAT_HELP = "; ".join(f"{f.name}: {f.help}" for f in EXPORT_FORMATS.values())
SHOWN = {  # the table without --json; --json prints the whole report
    "onnx": ("format", "family", "precision", "opset", "resolution", "resolution_note", "latent_hw", "dynamic_axes",
             "external_data", "graph_bytes", "lora_fused", "max_abs_error", "max_rel_error", "atol", "rtol", "passed",
             "failures", "seconds_export", "seconds_check"),
    "layout": ("format", "family", "num_blocks", "params", "lora_fused", "bit_exact", "max_abs_error", "passed",
               "failures", "seconds_check"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # talk; resolved at call time (works under captured stderr)


def export_cmd(
    src: ModelArg = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: a directory (onnx, diffusers) or a file "
                                      "(.safetensors, .pt for dit-original); written atomically.")] = ...,
    format_: Annotated[str, typer.Option("--format", help=FORMAT_HELP)] = "onnx",
    precision: Annotated[str, typer.Option(help=f"onnx: {', '.join(PRECISIONS)} (fp16 is converted from the "
                                           "checked fp32 graph).")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset, 17..23.")] = 18,
    height: Annotated[Optional[int], typer.Option(help="Pixels to trace at (default: native); the only size of "
                                                  "fixed-resolution graphs.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Pixels to trace at (default: native).")] = None,
    vae: Annotated[str, typer.Option(help=f"onnx: the VAE as {' or '.join(VAE_CHOICES)} "
                                     "(onnx exports its decoder too).")] = "pytorch",
    atol: Annotated[Optional[float], typer.Option(help="Max |onnx - torch| (default: 1e-4 fp32, 5e-2 fp16).")] = None,
    rtol: Annotated[Optional[float], typer.Option(help="Max |onnx - torch| / max |torch| (default: 1e-4 fp32, "
                                                  "2e-2 fp16).")] = None,
    device: DeviceOpt = "cpu",
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
):
    """Export a checkpoint; ONNX graphs are checked against PyTorch (exit 1 over --atol/--rtol, nothing written)."""
    cfg = ExportConfig(format=format_, precision=precision, opset=opset, height=height, width=width, vae=vae,
                       atol=atol, rtol=rtol, device=resolve_device(device))
    fmt = EXPORT_FORMATS[cfg.format]
    if fmt.suffix is not None and out.suffix != fmt.suffix:
        raise ConfigError(f"--format {fmt.name} writes one {fmt.suffix} file; give -o NAME{fmt.suffix}")
    if fmt.suffix is None and out.suffix in (".safetensors", ".pt", ".onnx"):
        raise ConfigError(f"--format {fmt.name} writes a directory; give -o a directory name, not {out.name}")
    out = check_output(out, force, inputs=(Path(src),) if src else ())
    cfg.workdir = str(out.resolve().parent)
    bundle = load_bundle(src, family=family, config=config)
    parent = bundle.parent_record()
    exported, report = export(bundle, cfg, log=log)
    try:
        if report.passed:
            log(f"writing {out}")
            manifest = new_manifest(family=bundle.family.name, op="export", config=cfg.to_dict(),
                                    report=report.to_dict(), parent=parent, device=cfg.device,
                                    defaults=bundle.manifest.get("defaults", {}))
            WRITERS[cfg.format](exported, out, manifest, force)
    finally:
        if exported.kind == "onnx" and exported.path is not None:
            shutil.rmtree(exported.path, ignore_errors=True)  # the staging directory
    doc = {"out": str(out) if report.passed else None, **report.to_dict()}
    if json_:
        output.print_json(doc)
    else:
        output.print_kv(f"export -> {out}" if report.passed else "export (nothing written)",
                        {k: doc[k] for k in ("out", *SHOWN["onnx" if fmt.name == "onnx" else "layout"])
                         if doc.get(k) not in (None, [], {})})
    check_gate(report)
