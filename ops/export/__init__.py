"""export(bundle, ExportConfig) -> (bundle, ExportReport): the transformer as a graph or another layout, proven.

Formats (EXPORT_FORMATS):
  onnx          transformer.onnx through torch.export (opset >= 17), dynamic batch / text length /
                resolution where the family's forward allows it, fp32 (fp16 converted after export),
                checked in onnxruntime against PyTorch at two batch sizes and two resolutions;
  diffusers     a plain diffusers directory (LoRA fused, pruned configs kept) that from_pretrained loads;
  safetensors   one .safetensors file: the transformer, its config and family in the header metadata;
  dit-original  a facebookresearch/DiT .pt state dict (dit family only);
  bfl-flux, stability-sd3, pixart-original  one .safetensors file in the authors' keys (formats/authors.py);
  gguf          one .gguf file (formats/gguf.py), checked by the output SQNR of its dequantized model (gguf.py).

The op builds everything in memory or in a staging directory (ONNX: onnxruntime needs files) and checks
it; formats/ writes it (formats.export_files.WRITERS). A failed check is reported (passed = False) and the
CLI exits 1 without writing the output.
"""
from __future__ import annotations

from typing import Callable

from .config import (EXPORT_FORMATS, GGUF_QUANTS, OPSETS, PARITY_BATCHES, PRECISIONS, TOLERANCE, VAE_CHOICES, ExportConfig,
                     ExportFormat, ExportReport, check_gate)
from .layouts import _export_layout
from .onnx_graph import _export_onnx
from .parity import _summarize, transformer_parity
from .trace import capture_call, check_exportable, export_graph, fuse_lora_, infer_axes

__all__ = ["EXPORT_FORMATS", "GGUF_QUANTS", "OPSETS", "PARITY_BATCHES", "PRECISIONS", "TOLERANCE", "VAE_CHOICES", "ExportConfig",
           "ExportFormat", "ExportReport", "_summarize", "capture_call", "check_exportable", "check_gate", "export",
           "export_graph", "fuse_lora_", "infer_axes", "transformer_parity"]


def export(bundle, cfg: ExportConfig, log: Callable[[str], None] | None = None):
    """Build `cfg.format` from `bundle` and check it. Returns (the exported bundle, report).

    LoRA layers are fused into the bundle's transformer first (in place: the bundle is consumed).
    ONNX: the returned bundle's path is a staging directory holding the graphs (formats.export_files.WRITERS
    moves them into the output); other formats return the (fused) input bundle. `log` gets one line per phase.
    """
    log = log or (lambda msg: None)
    fmt = EXPORT_FORMATS[cfg.format]
    check_exportable(bundle, fmt)
    if fmt.name != "diffusers":
        from ditkit.ops.feedback import refuse

        refuse(bundle, "export", f"--format {fmt.name} cannot carry this bundle's feedback module (distill --mode "
                                 "feedback); use --format diffusers, or export the model it was distilled from")
    tr = bundle.transformer
    report = ExportReport(format=fmt.name, family=bundle.family.name, precision=cfg.precision, output=fmt.output,
                          lora_fused=fuse_lora_(tr), num_blocks=len(bundle.family.blocks(tr)),
                          params=sum(p.numel() for p in tr.parameters()))
    if fmt.name == "onnx":
        report.opset = cfg.opset
        return _export_onnx(bundle, cfg, report, log)
    if fmt.name == "gguf":
        from .gguf import check_gguf

        log(f"quantizing to {cfg.quant} and checking the dequantized model's output against the source")
        return check_gguf(bundle, cfg, report)
    log(f"checking that the {fmt.name} layout reloads bit-exact")
    return _export_layout(bundle, cfg, report)
