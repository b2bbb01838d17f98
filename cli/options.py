"""Options shared by every command, and option groups shared by several, each declared once.

Only typer is imported here: a command's module and its --help import no op and no torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ditkit.formats.errors import ConfigError

# -- every command ---------------------------------------------------------------------------------------------
ModelArg = Annotated[Optional[str], typer.Argument(
    help="Checkpoint: a diffusers pipeline or transformer directory, a .safetensors or DiT .pt file, "
         "or an embedded model name (default: tiny-digits).", show_default=False)]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")]
OptionalOutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (written atomically).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="fp32, or bf16/fp16 on CUDA.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan, write nothing.")]
FamilyOpt = Annotated[Optional[str], typer.Option("--family", help="Model family of a bare .safetensors file.")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", help="config.json for a bare .safetensors file.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed; each image's noise depends only on it and its index.")]
# One default for every command: torch's own (one thread per physical core), the right count on a machine of any
# size to itself. On a CPU shared with other jobs, contended OpenMP threads wait for each other (docs/bench.md,
# docs/distill.md measured 3-10x slower at 2 threads than at 1): pass --threads 1 there; with 1 thread bench and
# prune also time CPU time, which other jobs do not disturb. Keep the same value for a distill --resume.
ThreadsOpt = Annotated[Optional[int], typer.Option(
    "--threads", help="CPU threads for torch (default: torch's own, one per core; on a busy machine --threads 1 is "
                      "often several times faster, and bench and prune then time CPU time; keep it for --resume).")]

# -- torch.compile (generate, bench): ops/compile.py; docs/generate.md#compile ---------------------------------------
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile (inductor) the transformer, PyTorch backend, CPU or CUDA; the first call compiles "
                      "(seconds to minutes). Exit 2 when no kernel can be built here (no C++ compiler).")]
CompileModeOpt = Annotated[str, typer.Option(
    "--compile-mode", help="regional: each repeated block compiled once for all (fast to compile); full: the whole "
                           "transformer as one graph.")]

# -- work across processes (generate, bench): ops/parallel.py; docs/parallel.md ---------------------------------------
ParallelOpt = Annotated[str, typer.Option(
    "--parallel", help="Under torchrun: images (each process makes its share of the images) or context (every image's "
                       "tokens split across the processes, sequence-parallel attention; dit, pixart, sd3, flux).")]

# -- step caching (generate, bench): ops/cache; docs/accelerate.md ----------------------------------------------
NoCacheOpt = Annotated[bool, typer.Option(
    "--no-cache", help="Ignore the model's step-caching policy (ditkit cache): run every block at every step (a model "
                       "without a policy runs as it would anyway; a note says so).")]

# -- prompt options (generate, bench) ------------------------------------------------------------------------
LabelsOpt = Annotated[Optional[str], typer.Option(help="Class ids, comma-separated (dit), e.g. 3,7.")]
PromptOpt = Annotated[Optional[list[str]], typer.Option(help="A prompt (repeatable; text families).")]
PromptsFileOpt = Annotated[Optional[Path], typer.Option(help="A file with one prompt per line.")]
EmbeddingsOpt = Annotated[Optional[Path], typer.Option(help="Precomputed text embeddings (.safetensors).")]

# -- training options (distill, lora-train) --------------------------------------------------------------------
WarmupStepsOpt = Annotated[Optional[int], typer.Option(help="Linear LR warm-up steps.")]
GradAccumOpt = Annotated[int, typer.Option(help="Gradient accumulation: micro-batches per step (the batch is "
                                                "split into them).")]
MixedPrecisionOpt = Annotated[str, typer.Option(help="no, bf16 or fp16 (CUDA).")]
GradCheckpointingOpt = Annotated[bool, typer.Option("--grad-checkpointing", help="Recompute activations in "
                                                    "backward (less memory).")]
ShardingOpt = Annotated[str, typer.Option(
    help="Under torchrun: ddp (every process holds the whole model and optimizer state) or fsdp (PyTorch FSDP2: "
         "parameters, gradients, optimizer state and EMA sharded across the processes; 2+ processes, bf16 mixed "
         "precision on CUDA). Checkpoints are the same either way (docs/scale.md).")]
ValidateEveryOpt = Annotated[int, typer.Option(help="Validate every N steps (0 = at the end only).")]
CheckpointEveryOpt = Annotated[int, typer.Option(help="Checkpoint every N steps.")]
CheckpointDirOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint-dir", help="Resumable state, log.jsonl and validation images (default: OUT.ckpt beside OUT).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in the checkpoint "
                                                          "directory.")]


# -- parsing helpers -------------------------------------------------------------------------------------------
def parse_ints(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, e.g. 3,7 (got {text!r})")


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str] | None:
    if prompts_file is not None:
        from ditkit.formats.reading import read_text

        lines = [l.strip() for l in read_text(prompts_file, "--prompts-file").splitlines() if l.strip()]
        if not lines:
            raise ConfigError(f"--prompts-file {prompts_file} holds no prompts; write one prompt per line")
        prompts = prompts + lines
    return prompts or None
