"""ditkit.json: the manifest every directory ditkit writes carries (format version, lineage, op, report)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path

from .errors import FormatError
from .reading import MAX_JSON, loads, read_bytes

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


def bundle_sha256(root: Path, onnx: bool = False) -> str:
    """The digest a manifest's `sha256` records: the safetensors weights (write_manifest), or for an ONNX bundle
    its graphs, external data and safetensors (formats/onnx_bundle.py)."""
    root = Path(root)
    if not onnx or root.is_file():
        return weights_sha256(root)
    return sha256_files(sorted([*root.glob("*.onnx"), *root.glob("*.onnx.data"), *root.rglob("*.safetensors")]))


def verified_sha256(root: Path | None, claimed: str | None, onnx: bool = False) -> dict:
    """{"sha256": ...} for a record copied into a child's manifest or a sidecar: the digest of the weights as they
    are (computed, never copied), plus `sha256_verified: false` and the `claimed_sha256` when the manifest claims
    another (a forged or stale ditkit.json); a note goes to stderr then. Without a path the claim is all there is."""
    if root is None:
        return {"sha256": claimed}
    actual = bundle_sha256(root, onnx)
    if claimed is None or claimed == actual:
        return {"sha256": actual}
    import sys

    print(f"note: {root}: its ditkit.json claims sha256 {str(claimed)[:16]}, the weights hash to {actual[:16]}; "
          "recording the computed digest (sha256_verified: false)", file=sys.stderr, flush=True)
    return {"sha256": actual, "sha256_verified": False, "claimed_sha256": claimed}


def read_manifest(root: Path) -> dict | None:
    p = Path(root) / MANIFEST
    if not p.is_file():
        return None
    return parse_manifest(read_bytes(p, "manifest", MAX_JSON), p)


def parse_manifest(text: bytes | str, where) -> dict:
    """A manifest from its JSON text (a ditkit.json file, or a single .safetensors file's "ditkit" metadata)."""
    return check_manifest(loads(text, where, "manifest (or delete it to load the weights alone)"), where)


def _is_number(v) -> bool:
    return type(v) in (int, float)


# field -> (check, what it must be); only fields ditkit reads back are checked (extra fields are kept as they are)
_FIELDS = {
    "format_version": (lambda v: type(v) is int and 1 <= v, "a positive integer"),
    "family": (lambda v: isinstance(v, str), "a string"),
    "op": (lambda v: v is None or isinstance(v, str), "a string"),
    "sha256": (lambda v: v is None or isinstance(v, str), "a string"),
    "config": (lambda v: v is None or isinstance(v, dict), "an object"),
    "report": (lambda v: v is None or isinstance(v, dict), "an object"),
    "environment": (lambda v: v is None or isinstance(v, dict), "an object"),
    "parent": (lambda v: v is None or (isinstance(v, dict) and all(v.get(k) is None or isinstance(v.get(k), str)
                                                                    for k in ("path", "sha256", "op"))),
               "null or an object with string path and sha256"),
    "lineage": (lambda v: isinstance(v, list) and all(isinstance(e, dict) and all(
        e.get(k) is None or isinstance(e.get(k), str) for k in ("path", "sha256", "op")) for e in v),
                "a list of objects with string op, path and sha256"),
    "defaults": (lambda v: isinstance(v, dict), "an object"),
}

# sampling defaults a manifest stores, checked by the rules the CLI applies to --sampler, --steps and --guidance
# (ops/generate.py GenerateConfig): a stored guidance of -999999 or NaN must not be used where the option is refused
DEFAULTS_RULES = {
    "sampler": (lambda x: isinstance(x, str) and 0 < len(x) <= 64, "a sampler name"),
    "steps": (lambda x: type(x) is int and 1 <= x <= 1000, "an integer in 1..1000"),
    "guidance": (lambda x: _is_number(x) and math.isfinite(x) and x >= 0, "a finite number >= 0"),
}


def check_manifest(data, where) -> dict:
    """Type-check the fields ditkit reads from a ditkit.json (lineage paths are records only: ditkit never opens
    them on its own, see docs/reliability.md); raise FormatError naming the first bad field."""
    if not isinstance(data, dict):
        raise FormatError(f"{where} must hold a JSON object; restore it or delete it")
    for name, (ok, what) in _FIELDS.items():
        if name in data and not ok(data[name]):
            raise FormatError(f"{where}: field {name!r} must be {what}; restore the file or delete it")
    defaults = data.get("defaults") or {}
    for name, (ok, what) in DEFAULTS_RULES.items():
        if name in defaults and not ok(defaults[name]):
            raise FormatError(f"{where}: defaults.{name} is {str(defaults[name])[:40]}, it must be {what} (as the "
                              f"--{name} option); fix or delete the stored default")
    if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise FormatError(f"{where} has format_version {data['format_version']}, newer than this ditkit reads "
                          f"({FORMAT_VERSION}); upgrade ditkit")
    return data


def new_manifest(*, family: str, op: str, config: dict, report: dict, parent: dict | None,
                 device: str = "cpu", defaults: dict | None = None, conventions: dict | None = None) -> dict:
    """A manifest for a directory produced by `op` from `parent` (the parent's manifest + location)."""
    lineage, checked = [], {}
    if parent is not None:
        checked = {k: parent[k] for k in ("sha256_verified", "claimed_sha256") if k in parent}
        lineage = list(parent.get("lineage", [])) + [
            {"op": parent.get("op"), "path": parent.get("path"), "sha256": parent.get("sha256"), **checked}
        ]
    return {
        "format_version": FORMAT_VERSION,
        "family": family,
        "op": op,
        "config": config,
        "report": report,
        "parent": None if parent is None else {"path": parent.get("path"), "sha256": parent.get("sha256"), **checked},
        "lineage": lineage,
        "defaults": defaults or {},
        "environment": environment(device),
        **({"conventions": conventions} if conventions else {}),  # Family.conventions: what the config does not hold
    }


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = dict(manifest)
    manifest["sha256"] = weights_sha256(root)
    tmp = Path(root) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, Path(root) / MANIFEST)
