"""ditkit info: what a checkpoint is, its size, FLOPs per step and lineage."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from ditkit.formats.layouts import load_bundle
from ditkit.ops.info import InfoConfig, info

from . import output
from .options import ConfigOpt, FamilyOpt, JsonOpt, ModelArg


def info_cmd(
    src: ModelArg = None,
    height: Annotated[Optional[int], typer.Option(help="Resolution in pixels for the FLOP count.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Resolution in pixels for the FLOP count.")] = None,
    batch: Annotated[int, typer.Option(help="Batch size for the FLOP count.")] = 1,
    family: FamilyOpt = None,
    config: ConfigOpt = None,
    json_: JsonOpt = False,
):
    """Family, path, parameters, bytes on disk, FLOPs per denoising step, lineage."""
    cfg = InfoConfig(height=height, width=width, batch=batch)
    _, report = info(load_bundle(src, family=family, config=config), cfg)
    if json_:
        output.print_json(report.to_dict())
    else:
        output.print_kv(f"info: {report.path}", report.to_dict())
