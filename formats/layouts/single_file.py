"""A single .safetensors file: the transformer's weights; its family and config from --family/--config, else from
the metadata ditkit writes (config, family, ditkit), else (DiT only) from the keys."""
from __future__ import annotations

from pathlib import Path

from ..bundle import Bundle
from ..errors import ConfigError, FormatError
from ..families import FAMILIES, detect_family, get_family
from ..manifest import parse_manifest
from ..reading import loads
from ..safetensors_check import read_header, read_json
from .base import Layout, from_state_dict


def detect(path: Path) -> bool:
    return not path.is_dir() and path.suffix == ".safetensors"


def load(path: Path, *, family: str | None = None, config: str | None = None, device: str = "cpu") -> Bundle:
    from safetensors.torch import load_file

    header = read_header(path)
    meta = header.get("__metadata__") or {}
    conf = None
    if config is not None:
        conf = read_json(Path(config), "--config")
    elif "config" in meta:  # files ditkit writes carry their config
        try:
            conf = loads(meta["config"], f"{path} metadata")
        except FormatError:
            raise FormatError(f"{path}: the config in its metadata is not JSON; pass --config") from None
    if family is None:
        family = meta.get("family") or (detect_family(conf).name if conf else None)
    if family is None:
        raise ConfigError(f"{path}: cannot tell the model family from a bare .safetensors file; "
                          f"pass --family ({', '.join(FAMILIES)})")
    fam = get_family(family)
    state = load_file(path)
    if conf is None:
        conf = fam.config_from_state(state)
    if conf is None:
        raise ConfigError(f"{path}: the {fam.name} architecture cannot be read from its keys; "
                          "pass --config config.json")
    model = from_state_dict(fam, conf, state, path)
    return Bundle(family=fam, transformer=model, path=path, kind="safetensors",
                  manifest=parse_manifest(meta["ditkit"], f"{path} metadata") if "ditkit" in meta else {})


LAYOUT = Layout("safetensors", "a single .safetensors file (--family, --config where the keys do not tell)", detect, load)
