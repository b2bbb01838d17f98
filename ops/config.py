"""OpConfig: the base of every op's config. Configs round-trip through JSON with a type tag and a version.

    cfg.to_dict()               -> {"_type": "prune", "_version": 1, ...the dataclass fields...}
    OpConfig.from_dict(d)       -> the config class the tag names (PruneConfig, ...), validated again
    PruneConfig.from_dict(d)    -> the same, refusing a dict of another op

A dict without `_type` / `_version` (written by ditkit before configs carried them: version 1) is read by the
class it is given to. Unknown keys are refused with the key named; a newer version than this ditkit knows is
refused rather than half-read. Modelled on torchao's `config_to_dict` / `config_from_dict`.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from ditkit.formats.errors import ConfigError

CONFIGS: dict[str, type] = {}  # type tag -> config class (filled as op modules are imported)
TAG_MODULES = {  # where each tag's class lives, for OpConfig.from_dict on a tag not yet imported
    "info": "ditkit.ops.info", "generate": "ditkit.ops.generate", "bench": "ditkit.ops.bench.report",
    "prune": "ditkit.ops.prune", "quantize": "ditkit.ops.quantize", "export": "ditkit.ops.export.config",
    "distill": "ditkit.ops.distill", "lora-train": "ditkit.ops.lora.config", "cache": "ditkit.ops.cache.calibrate",
    "train": "ditkit.ops.training",
}


class OpConfig:
    """Mixin for the op config dataclasses: `TYPE` (the tag), `VERSION` (bump when a field changes meaning)."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    NOT_SAVED: ClassVar[tuple[str, ...]] = ()  # run-time fields that do not belong in a manifest

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("TYPE"):
            CONFIGS[cls.TYPE] = cls

    def fields_dict(self) -> dict:
        """The fields as JSON values (subclasses adjust: tuples as lists, ...)."""
        d = dataclasses.asdict(self)
        for name in self.NOT_SAVED:
            d.pop(name, None)
        return d

    def to_dict(self) -> dict:
        return {"_type": self.TYPE, "_version": self.VERSION, **self.fields_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "OpConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object (got {type(d).__name__})")
        d = dict(d)
        tag, version = d.pop("_type", None), d.pop("_version", 1)
        target = cls if tag is None else config_class(tag)
        if target is OpConfig:
            raise ConfigError("this config has no _type; read it with the op's own config class")
        if cls is not OpConfig and not issubclass(target, cls):
            raise ConfigError(f"a {tag} config is not a {cls.TYPE} config")
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= target.VERSION:
            raise ConfigError(f"{target.TYPE} config version {version!r} is not one this ditkit reads "
                              f"(1..{target.VERSION}); upgrade ditkit")
        fields = {f.name: f for f in dataclasses.fields(target) if f.init}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"{target.TYPE} config: unknown key {unknown[0]!r}; known keys: {', '.join(fields)}")
        hints = typing.get_type_hints(target)
        return target(**{k: _from_json(hints.get(k), v) for k, v in d.items()})


def config_class(tag: str) -> type:
    if tag not in CONFIGS and tag in TAG_MODULES:
        import importlib

        importlib.import_module(TAG_MODULES[tag])
    if tag not in CONFIGS:
        raise ConfigError(f"unknown config type {str(tag)[:40]!r}; choose one of: {', '.join(sorted(TAG_MODULES))}")
    return CONFIGS[tag]


def _from_json(hint: Any, value: Any) -> Any:
    """JSON lists back to the tuples a field is declared as (the only type JSON does not keep)."""
    if isinstance(value, list) and _is_tuple(hint):
        return tuple(value)
    return value


def _is_tuple(hint: Any) -> bool:
    if hint is None:
        return False
    if typing.get_origin(hint) is tuple or hint is tuple:
        return True
    return any(_is_tuple(a) for a in typing.get_args(hint) if a is not type(None))


def same_run(stored: dict, cfg: OpConfig, may_change: tuple[str, ...]) -> list[str]:
    """The fields (outside `may_change`) in which a stored config differs from `cfg`, compared as configs
    (from_dict of the stored dict; a dict from an older version reads as it did)."""
    old = type(cfg).from_dict({k: v for k, v in stored.items() if k in _names(cfg) or k in ("_type", "_version")})
    return sorted(f for f in _names(cfg) if f not in may_change and getattr(old, f) != getattr(cfg, f))


def _names(cfg) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg) if f.init and f.name not in cfg.NOT_SAVED]
