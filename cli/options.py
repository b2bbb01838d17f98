"""Options shared by every command, declared once."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelArg = Annotated[Optional[str], typer.Argument(
    help="Checkpoint: a diffusers pipeline or transformer directory, a .safetensors or DiT .pt file, "
         "or an embedded model name (default: tiny-digits).", show_default=False)]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="fp32, or bf16/fp16 on CUDA.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan, write nothing.")]
FamilyOpt = Annotated[Optional[str], typer.Option("--family", help="Model family of a bare .safetensors file.")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="config.json for a bare .safetensors file.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed; each image's noise depends only on it and its index.")]
