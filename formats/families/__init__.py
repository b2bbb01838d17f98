"""FAMILIES: the registry of model families. Adding a family is one file and one line here."""
from __future__ import annotations

from ..errors import UnsupportedModelError, choice_error
from . import dit, flux, lumina, pixart, sana, sd3
from .base import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (dit.FAMILY, pixart.FAMILY, sd3.FAMILY, flux.FAMILY,
                                                     lumina.FAMILY, lumina.LUMINA2, sana.FAMILY)}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise choice_error("family", name, FAMILIES)
    return FAMILIES[name]


def detect_family(config: dict, where: str = "config") -> Family:
    from ..safetensors_check import check_config

    check_config(config, where)  # a wrong architecture field is a FormatError naming it
    for fam in FAMILIES.values():
        if fam.detect(config):
            return fam
    cls = config.get("_class_name", "<missing _class_name>")
    raise UnsupportedModelError(
        f"{where}: transformer class {cls} is not a supported family; supported: "
        + ", ".join(f"{f.name} ({f.transformer_class})" for f in FAMILIES.values())
    )
