"""ditkit info: what a checkpoint is, its size, FLOPs per step and lineage."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from .options import ConfigOpt, FamilyOpt, JsonOpt, ModelArg, ThreadsOpt
from .run import Common, run_op


def info_cmd(
    src: ModelArg = None,
    height: Annotated[Optional[int], typer.Option(help="Resolution in pixels for the FLOP count.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Resolution in pixels for the FLOP count.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size for the FLOP count.")] = 1,
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
):
    """Family, path, parameters, bytes on disk, FLOPs per denoising step, lineage."""
    from ditkit.ops.info import InfoConfig, info

    common = Common(src, family=family, config=config, json_=json_, threads=threads)
    run_op(common, info, InfoConfig(height=height, width=width, batch=batch), name="info",
           title=lambda doc: f"info: {doc['path']}")
