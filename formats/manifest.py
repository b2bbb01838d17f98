"""ditkit.json: the manifest every directory ditkit writes carries (format version, lineage, op, report)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path

from .errors import FormatError

MANIFEST = "ditkit.json"
FORMAT_VERSION = 1


def version(pkg: str = "ditkit") -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


def environment(device: str = "cpu") -> dict:
    import torch

    env = {
        "ditkit": version("ditkit"),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def sha256_files(paths: list[Path]) -> str:
    """One digest over the given weight files, in name order (the identity of a bundle's weights)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: str(p)):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_sha256(root: Path) -> str:
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.rglob("*.safetensors"))
    return sha256_files(files)


def read_manifest(root: Path) -> dict | None:
    p = Path(root) / MANIFEST
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{p} is not valid JSON ({e}); restore it or delete it to load the weights alone")
    if not isinstance(data, dict):
        raise FormatError(f"{p} must hold a JSON object; restore it or delete it")
    return data


def new_manifest(*, family: str, op: str, config: dict, report: dict, parent: dict | None,
                 device: str = "cpu", defaults: dict | None = None) -> dict:
    """A manifest for a directory produced by `op` from `parent` (the parent's manifest + location)."""
    lineage = []
    if parent is not None:
        lineage = list(parent.get("lineage", [])) + [
            {"op": parent.get("op"), "path": parent.get("path"), "sha256": parent.get("sha256")}
        ]
    return {
        "format_version": FORMAT_VERSION,
        "family": family,
        "op": op,
        "config": config,
        "report": report,
        "parent": None if parent is None else {"path": parent.get("path"), "sha256": parent.get("sha256")},
        "lineage": lineage,
        "defaults": defaults or {},
        "environment": environment(device),
    }


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = dict(manifest)
    manifest["sha256"] = weights_sha256(root)
    tmp = Path(root) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, Path(root) / MANIFEST)
