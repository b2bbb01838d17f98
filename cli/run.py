"""The one runner every command hands its config to: `run_op(common, op, cfg, ...)`.

Its steps, always in this order:
  1. outputs vs inputs: every path the command writes (`-o`, `--plot`, `--checkpoint-dir`, a fused bundle ...)
     is checked by formats.atomic.check_output against every path it reads (the sources, resolved; a teacher,
     `--data`, `--embeddings`, `--lora`, `--config`, `--prompts-file`), on rank 0, before anything is loaded;
  2. memory: the weights the sources will take once loaded, against what is free on the device; then
     `prepare` (a checkpoint directory's resume/--force policy);
  3. load: one bundle per source (a lineage record of the first is taken here, before the op can change it),
     then the memory the op itself will need (`estimate`), now that the weights are known;
  4. threads and process group: `--threads` (when given) and, for commands that shard work, the launcher's
     process group, both for the op only;
  5. op: `op(bundles, cfg) -> (result, report)`; on ranks other than 0 the run ends here;
  6. manifest + atomic write: `write(run, result, report) -> doc`, with `run.manifest(report)` the one way a
     command builds its output's ditkit.json;
  7. emit: one JSON document with --json, else the table (`rows(doc)`), then the gate, if any.
Commands keep only parsing and their config; ops never print: they get `output.log` as their `log`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ditkit.formats.errors import ConfigError

from . import output

log = output.log  # the one stderr writer


def note_no_policy(bundles: list) -> None:
    """--no-cache where no model has a step-caching policy changes nothing (not an error): say so on stderr."""
    if not any((b.manifest or {}).get("cache") for b in bundles):
        names = ", ".join(b.name for b in bundles)
        log(f"note: --no-cache changes nothing here: {names} has no step-caching policy (ditkit cache)")


@dataclass
class Common:
    """The options every command shares (cli/options.py declares them)."""
    src: str | None = None  # the checkpoint (None: the embedded default)
    family: str | None = None
    config: str | None = None  # --config of a bare .safetensors (an input too)
    device: str = "cpu"  # where the sources are loaded
    dtype: str = "fp32"
    force: bool = False
    json_: bool = False
    threads: int | None = None  # None: torch's own (see options.ThreadsOpt)

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1 (got {self.threads})")


@dataclass
class Run:
    """What `write` gets: the loaded bundles, their lineage record and the manifest builder."""
    common: Common
    name: str  # the op recorded in the manifest
    cfg: Any
    bundles: list
    outputs: list[Path]
    parent: dict | None = None
    device: str = "cpu"

    @property
    def bundle(self):
        return self.bundles[0]

    def manifest(self, report, *, op: str | None = None, config: dict | None = None,
                 defaults: dict | None = None) -> dict:
        """The ditkit.json of an output made from the first source: its config, report and lineage. The sampling
        defaults are the op's (`defaults`, e.g. a distilled student's), else those the parent records in its
        ditkit.json, else its family's (what generate would use for the parent)."""
        from ditkit.formats.manifest import new_manifest

        report = report if isinstance(report, dict) else report.to_dict()
        return new_manifest(family=self.bundle.family.name, op=op or self.name,
                            config=self.cfg.to_dict() if config is None else config, report=report,
                            parent=self.parent, device=self.device,
                            defaults=self.defaults() if defaults is None else defaults,
                            conventions=self.conventions())

    def conventions(self) -> dict:
        """What the model does that its config does not say (DiT's timestep shift): ops keep it, so the source's."""
        import torch

        tr = self.bundle.transformer
        return self.bundle.family.conventions(tr) if isinstance(tr, torch.nn.Module) else {}

    def defaults(self) -> dict:
        return self.bundle.manifest.get("defaults") or self.bundle.defaults()


def check_outputs(outputs: Sequence, inputs: Sequence, force: bool) -> list[Path]:
    """formats.atomic.check_outputs: each output against every input and against the other outputs."""
    from ditkit.formats.atomic import check_outputs as check_all

    return check_all(outputs, force, inputs)


def check_work_dirs(work_dirs: Sequence, outputs: Sequence, inputs: Sequence) -> None:
    """A training checkpoint directory: apart from inputs and outputs, and never a directory ditkit did not write."""
    from ditkit.formats.atomic import check_apart
    from ditkit.formats.checkpoint import CheckpointStore

    for d in work_dirs:
        CheckpointStore(d).check(inputs)
        for o in outputs:
            check_apart(Path(o), "output", Path(d), "--checkpoint-dir")


def resolved(sources: Sequence) -> list[Path]:
    from ditkit.formats.layouts import resolve_source

    return [resolve_source(s) for s in sources]


def torch_dtype(dtype: str, device: str):
    from ditkit.ops.runtime import resolve_dtype

    return resolve_dtype(dtype, device)


def quiet_diffusers() -> None:
    """diffusers draws its own bars while loading; ditkit draws its own progress (called once diffusers is needed)."""
    import logging
    import os
    import sys

    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars

    diffusers_logging.disable_progress_bar()
    disable_progress_bars()  # transformers reads this when imported: no "Loading weights" bar for text encoders
    if "transformers" in sys.modules:  # already imported (in-process callers): switch its own flag too
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if os.environ.get("DITKIT_DEBUG") != "1":
        # diffusers logs "An error occurred while trying to fetch ..." before raising what ditkit reports as
        # its one Error: line; every diffusers failure reaches the user as that exception
        diffusers_logging.set_verbosity(logging.CRITICAL)


def load(common: Common, sources: Sequence, device: str, dtype) -> list:
    from ditkit.formats.layouts import load_bundle

    quiet_diffusers()
    return [load_bundle(s, family=common.family, config=common.config, device=device, dtype=dtype)
            for s in sources]


@contextlib.contextmanager
def threads(n: int | None):
    """torch's thread count for the block (None: leave torch's own)."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rank() -> int:
    from ditkit.ops.distributed import world

    return world()[0]


def run_op(common: Common, op: Callable, cfg, *, name: str, title: str | Callable[[dict], str] = "",
           sources: Sequence | None = None, outputs: Sequence = (), work_dirs: Sequence = (),
           inputs: Sequence = (), prepare: Callable | None = None, device: str = "cpu",
           estimate: Callable | None = None, write: Callable | None = None, rows: Callable[[dict], dict] | None = None,
           show: Callable[[dict], None] | None = None, gate: Callable | None = None, distributed: bool = False,
           lineage: bool = True) -> dict | None:
    """Run one command (the steps in this module's docstring); returns the document it printed (None on ranks
    other than 0).

    op(bundles, cfg) -> (result, report): `bundles` is the bundle of common.src, or the list of bundles when the
    command names its `sources` (bench's models; none for a command that loads nothing). write(run, result, report) -> doc writes the outputs (atomically) and returns the document;
    without it the document is report.to_dict(). estimate(bundles) -> ops.memory.Estimate: the op's own memory,
    checked after loading. rows(doc) -> dict: the table without --json (default: doc);
    show(doc): a command's own rendering instead. gate(report) raises QualityGateError after printing.
    inputs: paths the command reads besides its sources; a str is a checkpoint as given on the command line (a
    teacher), resolved like SRC.
    work_dirs: directories a run keeps between runs (a training checkpoint): checked against the inputs like an
    output, but they may exist; prepare() (rank 0, after the memory check, before loading) applies their policy.
    `lineage` False: no parent record is taken (bench reads many checkpoints and writes none).
    """
    if distributed:  # under a launcher with --device cuda: this rank's GPU (cuda:LOCAL_RANK) is the current device
        _use_rank_device(device)
    one = sources is None  # the op gets the one bundle of common.src, or the list of `sources`
    sources = [common.src] if one else list(sources)
    dtype = torch_dtype(common.dtype, device)
    # 1. outputs vs inputs (rank 0 owns the outputs)
    outs = [o for o in outputs if o is not None]
    if rank() == 0:
        ins = [*resolved(sources), *(resolved([p])[0] if isinstance(p, str) else p for p in inputs if p is not None),
               common.config]
        outs = check_outputs(outs, ins, common.force)
        check_work_dirs(work_dirs, outs, ins)  # kept between runs (checkpoints): `prepare` decides what they may hold
    # 2. memory, before allocating
    if sources:
        from ditkit.ops import memory

        memory.check(memory.load_estimate(*sources, dtype=dtype), device, common.force, log)
    if prepare is not None and rank() == 0:
        prepare()
    # 3. load (and the memory of the work itself, once the weights are known)
    bundles = load(common, sources, device, dtype)
    if estimate is not None:
        from ditkit.ops import memory

        memory.check(estimate(bundles), device, common.force, log)
    run = Run(common, name, cfg, bundles, outs, device=getattr(cfg, "device", device))
    if lineage and bundles:
        run.parent = bundles[0].parent_record()
    # 4. threads and process group, 5. op
    with threads(common.threads), _process_group(distributed, run.device):
        result, report = op(bundles[0] if one else bundles, cfg)
    if rank() != 0:
        return None  # rank 0 writes and reports
    # 6. manifest + atomic write
    doc = write(run, result, report) if write is not None else report.to_dict()
    # 7. emit, then the gate
    if show is not None and not common.json_:
        show(doc)
    else:
        output.emit(doc, common.json_, title(doc) if callable(title) else title,
                    None if rows is None else rows(doc))
    if gate is not None:
        gate(report)
    return doc


def _use_rank_device(device: str) -> None:
    from ditkit.ops.distributed import use_rank_device

    use_rank_device(device)


def _process_group(distributed: bool, device: str):
    if not distributed:
        return contextlib.nullcontext()
    from ditkit.ops import distributed as dist

    return dist.process_group(device)


def split_csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


__all__ = ["Common", "Run", "run_op", "check_outputs", "log", "threads"]
