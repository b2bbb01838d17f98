"""The Layout contract every checkpoint layout follows, and the helpers more than one layout uses."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from ..bundle import Bundle
from ..errors import FormatError
from ..families import Family


@dataclass(frozen=True)
class Layout:
    name: str
    doc: str
    detect: Callable[[Path], bool]  # (path) -> does it hold this layout (checked in LAYOUTS order, first wins)
    load: Callable[..., Bundle]  # (path, *, family, config, device) -> Bundle
    save: Callable[[Bundle, Path], None] | None = None  # (bundle, root) writes it into root; None: read only
    writes: Callable[[Bundle], bool] | None = None  # (bundle) -> does save_bundle write it so; None: never chosen


def wrap_load_error(path: Path, e: Exception) -> FormatError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return FormatError(f"{path} could not be loaded ({msg[:200]}); check that it is a complete, uncorrupted checkpoint")


def from_state_dict(fam: Family, config: dict, state: dict, where: Path) -> nn.Module:
    from .. import sanity
    from ..safetensors_check import check_config

    cls = fam.transformer_cls()
    sanity.check_against_weights(fam, check_config(config, str(where)), sanity.state_table(state), where)
    try:
        model = cls.from_config(config)
    except Exception as e:
        raise FormatError(f"{where}: the config does not build a {cls.__name__} ({str(e)[:200]}); fix --config")
    missing, unexpected = model.load_state_dict(state, strict=False), None
    missing, unexpected = missing.missing_keys, missing.unexpected_keys
    if missing or unexpected:
        raise FormatError(f"{where}: weights do not match the {fam.name} config ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]}); pass the right --config")
    return model


def write_parts(bundle: Bundle, root: Path) -> None:
    """The judge and the feedback module, beside the weights of a pipeline or transformer directory."""
    if bundle.judge is not None:
        from ..judge import DIR, save_judge

        save_judge(bundle.judge, dir=Path(root) / DIR)
    if bundle.feedback is not None:
        from ..feedback import save_feedback

        save_feedback(bundle.feedback, root, bundle.transformer)
