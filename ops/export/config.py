"""What export makes and how it is checked: the formats (EXPORT_FORMATS), ExportConfig, ExportReport, tolerances."""
from __future__ import annotations

from typing import ClassVar

import math
from dataclasses import asdict, dataclass, field

from ditkit.formats.errors import ConfigError, QualityGateError, check_options, choice_error
from ditkit.ops.config import OpConfig


PRECISIONS = ("fp32", "fp16")
# torch.onnx's torchlib is written for opset 18; its down-conversion to 17 produced an invalid graph here
# (Split with num_outputs), and 21 is the newest we have checked
OPSETS = (18, 21)
# per precision: (atol, rtol). fp32 graphs match PyTorch to ~1e-6 on the tiny models; fp16 rounds every
# activation to 11 bits, so its bound is set by the output scale rather than the exporter.
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (5e-2, 2e-2)}
VAE_CHOICES = ("pytorch", "onnx")  # the ONNX bundle's VAE: kept as PyTorch safetensors, or decoder exported
PARITY_BATCHES = (1, 3)  # neither is the traced batch (2), so both exercise the dynamic batch axis
TRACE_BATCH = 2
PARITY_GUIDANCE = 4.0  # guidance-embedding families (flux-dev) take it as an input
# cond entries with a token axis at dim 1 whose length varies with the prompt (exported dynamic)
SEQUENCE_COND = ("prompt_embeds", "prompt_attention_mask")
AXIS_NAMES = {"batch": "batch", "text": "text_tokens"}


@dataclass(frozen=True)
class ExportFormat:
    name: str
    output: str  # "dir" or "file"
    suffix: str | None  # the output file's required suffix
    families: tuple[str, ...] | None  # None: every family
    holds_quantized: bool
    help: str


EXPORT_FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("onnx", "dir", None, None, False,
                 "transformer.onnx (+ vae_decoder.onnx), scheduler, judge, ditkit.json; runs with --backend onnxruntime"),
    ExportFormat("diffusers", "dir", None, None, False,
                 "a plain diffusers directory (LoRA fused) that from_pretrained loads"),
    ExportFormat("safetensors", "file", ".safetensors", None, False,
                 "one file: the transformer with its config and family in the header metadata"),
    ExportFormat("dit-original", "file", ".pt", ("dit",), False,
                 "the facebookresearch/DiT key layout as a .pt state dict of tensors"),
    ExportFormat("bfl-flux", "file", ".safetensors", ("flux",), False,
                 "Black Forest Labs' Flux.1 keys (flux1-dev.safetensors), as ComfyUI and BFL's code read them"),
    ExportFormat("stability-sd3", "file", ".safetensors", ("sd3",), False,
                 "Stability's SD3/SD3.5 keys with the model.diffusion_model. prefix (sd3_medium.safetensors)"),
    ExportFormat("pixart-original", "file", ".safetensors", ("pixart",), False,
                 "PixArt-alpha/sigma keys (PixArt.py / PixArtMS.py), as safetensors instead of .pth"),
    ExportFormat("gguf", "file", ".gguf", None, False,
                 "one .gguf file quantized with --quant, in the layout ComfyUI-GGUF and diffusers read"),
)}
GGUF_QUANTS = ("Q8_0", "Q5_K", "Q4_K", "Q4_0", "BF16")  # formats.gguf.QUANTS (not imported: keeps gguf lazy)


@dataclass
class ExportConfig(OpConfig):
    TYPE: ClassVar[str] = "export"
    NOT_SAVED: ClassVar[tuple[str, ...]] = ("workdir",)  # where graphs are staged: a run-time choice

    format: str = "onnx"
    precision: str = "fp32"  # onnx only: fp16 is converted from the verified fp32 graph (fp16 export is fragile)
    opset: int = 18  # torch.onnx's native opset (OPSETS: the range checked)
    height: int | None = None  # pixels; the resolution traced, and the only one for fixed-resolution graphs
    width: int | None = None
    vae: str = "pytorch"  # onnx only: "onnx" also exports the VAE decoder
    atol: float | None = None  # default: TOLERANCE[precision]
    rtol: float | None = None  # max |onnx - torch| / max |torch|
    workdir: str | None = None  # where graphs are staged (the CLI passes the output's parent: moving is a rename)
    device: str = "cpu"  # onnxruntime's execution provider for the parity check (cuda: CUDA EP)
    quant: str | None = None  # gguf only: Q8_0 when not given (the near-lossless GGUF type)
    min_sqnr: float | None = None  # gguf only: fail (write nothing) under this output SQNR in dB

    def __post_init__(self):
        check_options(self)  # floats finite, seeds and counts in range (formats/errors.py)
        if self.format not in EXPORT_FORMATS:
            raise choice_error("format", self.format, EXPORT_FORMATS)
        if self.format == "gguf":
            self.quant = self.quant or "Q8_0"
            if self.quant not in GGUF_QUANTS:
                raise choice_error("--quant", self.quant, GGUF_QUANTS)
        elif self.quant is not None or self.min_sqnr is not None:
            raise ConfigError(f"--quant and --min-sqnr apply to --format gguf; drop them for {self.format}")
        if self.min_sqnr is not None and not math.isfinite(self.min_sqnr):
            raise ConfigError(f"--min-sqnr must be a finite number of dB (got {self.min_sqnr})")
        if self.precision not in PRECISIONS:
            raise choice_error("precision", self.precision, PRECISIONS)
        if self.vae not in VAE_CHOICES:
            raise choice_error("--vae", self.vae, VAE_CHOICES)
        if self.format != "onnx" and (self.precision != "fp32" or self.vae != "pytorch"):
            raise ConfigError(f"--precision and --vae apply to --format onnx; {self.format} keeps the checkpoint's "
                              "own weights (drop them)")
        if not OPSETS[0] <= self.opset <= OPSETS[1]:
            raise ConfigError(f"--opset must be in {OPSETS[0]}..{OPSETS[1]} (got {self.opset})")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise ConfigError(f"--{name} must be a positive multiple of 8 (got {v})")
        for name in ("atol", "rtol"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"--{name} must be a finite number >= 0 (got {v})")

    def tolerance(self) -> tuple[float, float]:
        atol, rtol = TOLERANCE[self.precision]
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)



@dataclass
class ExportReport:
    format: str
    family: str
    precision: str
    output: str  # "dir" or "file"
    lora_fused: int = 0  # LoRA layers merged into their base weights before export
    num_blocks: int = 0
    params: int = 0
    # onnx
    opset: int | None = None
    resolution: str | None = None  # "dynamic" or "fixed"
    batch: str | None = None  # "dynamic", or a graph traced at batch 1 that onnxruntime runs row by row
    batch_note: str | None = None  # why the batch is fixed (the family's onnx_fixed_batch)
    resolution_note: str | None = None  # why fixed
    latent_hw: list[int] = field(default_factory=list)  # the traced (fixed: the only) latent size
    inputs: list[dict] = field(default_factory=list)  # name, dtype, shape (axis names for dynamic dims)
    outputs: list[dict] = field(default_factory=list)
    dynamic_axes: dict = field(default_factory=dict)  # input -> {dim: axis name}
    external_data: bool = False
    graph_bytes: int = 0
    vae_decoder: dict | None = None  # its inputs, axes and parity when exported
    # the check: onnx parity against PyTorch, or the reload round trip of the other formats
    parity: list[dict] = field(default_factory=list)  # per case: batch, latent_hw, text_tokens, max_abs, max_rel
    max_abs_error: float | None = 0.0  # None when a case did not run (its error is in parity and failures)
    max_rel_error: float | None = 0.0  # max |got - ref| / max |ref|
    atol: float = 0.0
    rtol: float = 0.0
    bit_exact: bool | None = None  # non-onnx formats: the reloaded model's outputs are identical
    # gguf: the quant type, the GGML type of each tensor written (counts), the key layout, output SQNR (dB)
    quant: str | None = None
    tensor_types: dict = field(default_factory=dict)
    layout: str | None = None
    sqnr_db: float | None = None
    note: str | None = None  # a difference the format cannot hold, measured (e.g. DiT's timestep shift)
    passed: bool = True
    failures: list[str] = field(default_factory=list)
    seconds_export: float = 0.0
    seconds_check: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def check_gate(report: ExportReport) -> None:
    """QualityGateError when the exported artifact failed its check (the CLI prints the report first)."""
    if not report.passed:
        raise QualityGateError(f"export check failed: {'; '.join(report.failures)}")
