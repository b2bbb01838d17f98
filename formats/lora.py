"""LoRA adapters on disk: one safetensors file, in the diffusers/PEFT layout or kohya's.

PEFT layout (the default, what diffusers' `pipe.load_lora_weights` reads for sd3 and flux):
    transformer.<module>.lora_A.weight   (rank, in)
    transformer.<module>.lora_B.weight   (out, rank)
  header metadata:
    lora_adapter_metadata   JSON {"transformer.r", "transformer.lora_alpha", "transformer.target_modules", ...}:
                            diffusers builds its peft LoraConfig from it, so alpha survives the trip
    ditkit_lora             JSON {rank, alpha, targets, family, base_sha256, modules, format, ditkit, ...}
    rank, alpha, targets, family, base_sha256   the same, as plain strings (readable by any safetensors tool)

kohya layout (`--format kohya`):
    lora_transformer_<module with '.' -> '_'>.lora_down.weight   (= lora_A)
    lora_transformer_<module with '.' -> '_'>.lora_up.weight     (= lora_B)
    lora_transformer_<module with '.' -> '_'>.alpha              0-d tensor (the effective scale is alpha / rank)
  header metadata: ss_network_dim, ss_network_alpha, ss_network_module, plus ditkit's keys above. These are
  the names diffusers' kohya converter maps back for flux ("lora_transformer_" + diffusers names); dit, pixart
  and sd3 files use the same scheme and load with ditkit.

authors' layout (`--format original`; flux, sd3, pixart):
    lora_unet_<authors' module with '.' -> '_'>.lora_down.weight / .lora_up.weight / .alpha
  the names kohya's sd-scripts writes for Flux and SD3 (lora_unet_double_blocks_0_img_attn_qkv) and the names
  ComfyUI finds for every model from its own state dict, PixArt's included (lora_unet_blocks_0_attn_qkv): the
  only kohya-style names ComfyUI reads for PixArt. A module the authors fuse (qkv, kv_linear, Flux's linear1)
  gets the pieces' lora_down stacked (rank n*r) and their lora_up block-diagonal, with alpha n*alpha, so
  alpha / rank and the product are the pieces' exactly; (shift, scale) projections get their lora_up halves
  swapped. Ranks then differ between modules, as kohya's block-wise dims do: reading pads every module to the
  largest rank with zeros and folds each module's alpha / rank into its lora_up (`_pad_ranks`).

Reading accepts both layouts and foreign files of either (alpha defaults to the rank when a file has none,
as diffusers does, and the Adapter says so), with ComfyUI's `diffusion_model.` prefix too; module names in the
authors' layouts (kohya / sd-scripts Flux LoRAs: lora_unet_double_blocks_0_img_attn_qkv, fused qkv; SD3's
lora_unet_joint_blocks_0_x_block_attn_qkv; PixArt's blocks.N.attn.qkv) are mapped onto the diffusers modules by
the families' key tables (`from_authors_names`). Matching an adapter to a model is strict: a key that names no
module of the model, or a shape that does not fit, is a FormatError listing the keys.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_file
from .errors import ConfigError, FormatError
from .manifest import version
from .reading import loads, regular_file
from .safetensors_check import read_header

ADAPTER_FORMATS = ("peft", "kohya", "original")
PEFT_PREFIX = "transformer."
KOHYA_PREFIXES = ("lora_transformer_", "lora_unet_")
DIFFUSERS_META_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
DITKIT_META_KEY = "ditkit_lora"


def effective_scale(alpha: float, rank: int, scale: float = 1.0) -> float:
    """The one LoRA-scale rule: the factor on B A is the user's scale times alpha / rank (the file's metadata)."""
    return float(scale) * (alpha / rank)


@dataclass
class Adapter:
    """A LoRA adapter: per target module, A (rank, in) and B (out, rank); output += (alpha / rank) * B A x."""
    A: dict[str, torch.Tensor]  # module name -> lora_A weight
    B: dict[str, torch.Tensor]  # module name -> lora_B weight
    rank: int
    alpha: float
    family: str | None = None
    targets: list[str] = field(default_factory=list)  # target groups it was trained on (attention, mlp, ...)
    base_sha256: str | None = None
    info: dict = field(default_factory=dict)  # trigger, training config, report, source format
    path: Path | None = None

    @property
    def modules(self) -> list[str]:
        return sorted(self.A)

    @property
    def scale(self) -> float:
        return effective_scale(self.alpha, self.rank)

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.A.values()) + sum(t.numel() for t in self.B.values())

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys as peft's get/set_peft_model_state_dict use them (no adapter name, no prefix)."""
        sd = {f"{m}.lora_A.weight": a for m, a in self.A.items()}
        sd.update({f"{m}.lora_B.weight": b for m, b in self.B.items()})
        return sd

    def summary(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "scale": self.scale, "family": self.family,
                "targets": self.targets, "modules": len(self.A), "params": self.num_params,
                "base_sha256": self.base_sha256, "path": str(self.path) if self.path else None}


def adapter_from_peft_state(state: dict[str, torch.Tensor], rank: int, alpha: float, **kw) -> Adapter:
    A, B = {}, {}
    for k, v in state.items():
        m = re.match(r"^(.*)\.lora_([AB])\.weight$", k)
        if m is None:
            raise FormatError(f"unexpected LoRA key {k!r}: expected <module>.lora_A.weight / lora_B.weight")
        (A if m.group(2) == "A" else B)[m.group(1)] = v.detach().cpu().contiguous()
    _check_pairs(A, B, "adapter")
    return Adapter(A=A, B=B, rank=rank, alpha=float(alpha), **kw)


def _check_pairs(A: dict, B: dict, where) -> None:
    lonely = sorted(set(A) ^ set(B))
    if lonely:
        raise FormatError(f"{where}: LoRA modules without both A and B matrices: {', '.join(lonely[:5])}; "
                          "the file is incomplete")
    for m in A:
        if A[m].ndim != 2 or B[m].ndim != 2 or A[m].shape[0] != B[m].shape[1]:
            raise FormatError(f"{where}: {m} has lora_A {tuple(A[m].shape)} and lora_B {tuple(B[m].shape)}, "
                              "which do not form a rank-r product; the file is damaged")


# -- writing ---------------------------------------------------------------------------------------

def _ditkit_meta(adapter: Adapter, fmt: str) -> dict[str, str]:
    doc = {"format": fmt, "rank": adapter.rank, "alpha": adapter.alpha, "targets": adapter.targets,
           "family": adapter.family, "base_sha256": adapter.base_sha256, "modules": adapter.modules,
           "ditkit": version("ditkit"), **{k: v for k, v in adapter.info.items() if k != "source_format"}}
    return {DITKIT_META_KEY: json.dumps(doc, sort_keys=True, default=str), "rank": str(adapter.rank),
            "alpha": repr(float(adapter.alpha)), "targets": json.dumps(adapter.targets),
            "family": adapter.family or "", "base_sha256": adapter.base_sha256 or ""}


def kohya_name(module: str) -> str:
    return KOHYA_PREFIXES[0] + module.replace(".", "_")


def to_tensors(adapter: Adapter, fmt: str = "peft",
               modules: dict[str, tuple[int, int]] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the file `save_adapter` writes; `modules` (the model's Linear layers {name: (out,
    in)}) for fmt "original", whose fused modules need every piece's shape."""
    if fmt not in ADAPTER_FORMATS:
        raise ConfigError(f"unknown adapter format {fmt!r}, choose one of: {', '.join(ADAPTER_FORMATS)}")
    meta = {"format": "pt", **_ditkit_meta(adapter, fmt)}
    tensors: dict[str, torch.Tensor] = {}
    if fmt == "original":
        if modules is None:
            raise ValueError("to_tensors(fmt='original') needs the model's Linear modules")
        down, up, alphas, layout = to_authors_names(adapter, modules)
        for name in down:
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down[name], up[name]
            tensors[f"{name}.alpha"] = torch.tensor(alphas[name])
        meta.update({"ss_network_dim": str(adapter.rank), "ss_network_alpha": repr(float(adapter.alpha)),
                     "ss_network_module": "networks.lora", "key_layout": layout})
    elif fmt == "peft":
        for m in adapter.modules:
            tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"] = adapter.A[m]
            tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = adapter.B[m]
        peft_config = {"r": adapter.rank, "lora_alpha": adapter.alpha, "target_modules": adapter.modules,
                       "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True, "use_dora": False}
        meta[DIFFUSERS_META_KEY] = json.dumps({f"transformer.{k}": v for k, v in peft_config.items()},
                                              sort_keys=True)
    else:
        for m in adapter.modules:
            name = kohya_name(m)
            tensors[f"{name}.lora_down.weight"] = adapter.A[m]
            tensors[f"{name}.lora_up.weight"] = adapter.B[m]
            tensors[f"{name}.alpha"] = torch.tensor(float(adapter.alpha))
        meta.update({"ss_network_dim": str(adapter.rank), "ss_network_alpha": repr(float(adapter.alpha)),
                     "ss_network_module": "networks.lora"})
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta


def save_adapter(path: Path, adapter: Adapter, fmt: str = "peft", force: bool = False,
                 modules: dict[str, tuple[int, int]] | None = None) -> Path:
    """Write the adapter atomically to `path` (.safetensors) in `fmt` (peft, kohya, or original with the model's
    Linear `modules`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"adapter output {path} must end in .safetensors")
    tensors, meta = to_tensors(adapter, fmt, modules)
    with atomic_file(path, force=force) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


# -- reading ---------------------------------------------------------------------------------------

def load_adapter(path: Path) -> Adapter:
    """Read a PEFT/diffusers or kohya LoRA file. kohya module names stay flat (`_`-joined) until `match`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise FormatError(f"adapter {path} does not exist; give a .safetensors file written by lora-train")
    regular_file(path, "adapter")  # a FIFO or device is refused before it is opened
    header = read_header(path)
    meta = header.get("__metadata__") or {}
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise FormatError(f"adapter {path} could not be read ({str(e)[:120]}); re-copy it")
    if not tensors:
        raise FormatError(f"adapter {path} holds no tensors")
    doc = {}
    if DITKIT_META_KEY in meta:
        try:
            doc = loads(meta[DITKIT_META_KEY], path)
        except FormatError:
            raise FormatError(f"adapter {path}: its {DITKIT_META_KEY} metadata is not JSON; re-export it") from None
        if not isinstance(doc, dict):
            raise FormatError(f"adapter {path}: its {DITKIT_META_KEY} metadata must be a JSON object; re-export it")
    keys = list(tensors)
    if any(k.endswith(".lora_down.weight") for k in keys):
        A, B, alphas, fmt = _read_kohya(tensors, path)
    elif any(".lora_A." in k for k in keys):
        (A, B), alphas, fmt = _read_peft(tensors, path), {}, "peft"
    else:
        raise FormatError(f"adapter {path} is not a LoRA file: no lora_A/lora_B or lora_down/lora_up keys "
                          f"(first key: {keys[0]})")
    _check_pairs(A, B, path)
    ranks = {a.shape[0] for a in A.values()}
    if min(ranks) < 1:
        raise FormatError(f"adapter {path} has rank 0 (empty lora_A matrices); it adapts nothing: re-train it")
    _check_values(A, B, path)
    if len(ranks) != 1:  # kohya block-wise dims, or a fused authors' module (--format original)
        if fmt != "kohya":
            raise FormatError(f"adapter {path} mixes ranks {sorted(ranks)}; ditkit reads mixed ranks only from "
                              "kohya-style files (lora_down / lora_up / alpha per module)")
        A, B = _pad_ranks(A, B, alphas, path)
        rank = max(ranks)
        alpha, alpha_source = float(rank), f"kohya .alpha per module (ranks {sorted(ranks)} padded to {rank})"
        alphas = {}
    else:
        rank = ranks.pop()
        alpha, alpha_source = _alpha(meta, doc, alphas, rank, path)
    if not math.isfinite(alpha):
        raise FormatError(f"adapter {path}: alpha ({alpha_source}) is {alpha}; it must be a finite number")
    if alphas and len(set(alphas.values())) > 1:  # per-module kohya alphas: fold each into its B
        if alpha == 0 or not all(math.isfinite(a) for a in alphas.values()):
            raise FormatError(f"adapter {path}: its per-module .alpha values {sorted(set(alphas.values()))[:4]} "
                              "must be finite, and the first nonzero; re-export it")
        for m, a in alphas.items():
            B[m] = B[m] * (a / alpha)
    info = {k: v for k, v in doc.items()
            if k not in ("format", "rank", "alpha", "targets", "family", "base_sha256", "modules")}
    info.update({"source_format": fmt, "alpha_source": alpha_source})
    targets = doc.get("targets") or _json_list(meta.get("targets"))
    return Adapter(A=A, B=B, rank=rank, alpha=alpha, family=doc.get("family") or meta.get("family") or None,
                   targets=list(targets or []), base_sha256=doc.get("base_sha256") or meta.get("base_sha256") or None,
                   info=info, path=path)


def _pad_ranks(A: dict, B: dict, alphas: dict, path) -> tuple[dict, dict]:
    """Mixed ranks: every module padded with zeros to the largest rank R, its alpha_m / r_m folded into its B (a
    module without .alpha has alpha = its rank, kohya's default), so the adapter's one scale is R / R = 1."""
    R = max(a.shape[0] for a in A.values())
    A2, B2 = {}, {}
    for m, a in A.items():
        r = a.shape[0]
        alpha = alphas.get(m, float(r))
        if not math.isfinite(alpha):
            raise FormatError(f"adapter {path}: {m}.alpha is {alpha}; it must be a finite number")
        b = B[m] * (alpha / r)
        A2[m] = torch.cat([a, a.new_zeros(R - r, a.shape[1])]) if r < R else a
        B2[m] = torch.cat([b, b.new_zeros(b.shape[0], R - r)], dim=1) if r < R else b
    return A2, B2


def _check_values(A: dict, B: dict, path) -> None:
    """LoRA matrices are floating point and finite (a NaN in one turns every image blank)."""
    for kind, mats in (("lora_A", A), ("lora_B", B)):
        for m, t in mats.items():
            if not t.is_floating_point():
                raise FormatError(f"adapter {path}: {m} {kind} is {str(t.dtype).removeprefix('torch.')}, not floating "
                                  "point; re-save it as float tensors")
            if not bool(torch.isfinite(t).all()):
                raise FormatError(f"adapter {path}: {m} {kind} holds NaN or inf values; re-train or re-copy it")


def _number(value, what: str, path) -> float:
    """A metadata alpha: a JSON number or a numeric string (safetensors metadata values are strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise FormatError(f"adapter {path}: {what} must be a number (got {str(value)[:40]!r})")
    try:
        return float(value)
    except (ValueError, OverflowError):
        raise FormatError(f"adapter {path}: {what} must be a number (got {str(value)[:40]!r})") from None


def _json_list(text):
    try:
        v = loads(text, "metadata") if text else None
    except FormatError:
        return None
    return v if isinstance(v, list) else None


def _read_peft(tensors: dict, path: Path):
    A, B = {}, {}
    for k, v in tensors.items():
        m = re.match(r"^(?:base_model\.model\.|transformer\.|model\.diffusion_model\.|diffusion_model\.)?(.*)"
                     r"\.lora_([AB])(?:\.[^.]+)?\.weight$", k)
        if m is None:
            raise FormatError(f"adapter {path}: unexpected key {k!r} (expected transformer.<module>.lora_A.weight); "
                              "it may hold text-encoder or DoRA weights, which ditkit does not load")
        (A if m.group(2) == "A" else B)[m.group(1)] = v
    return A, B


def _read_kohya(tensors: dict, path: Path):
    A, B, alphas = {}, {}, {}
    for k, v in tensors.items():
        m = re.match(r"^(lora_[a-z0-9]+_|model\.diffusion_model\.|diffusion_model\.)(.*)"
                     r"\.(lora_down\.weight|lora_up\.weight|alpha)$", k)
        if m is None or m.group(1) not in KOHYA_PREFIXES + FOREIGN_PREFIXES[:2]:
            raise FormatError(f"adapter {path}: unexpected kohya key {k!r} (expected lora_transformer_<module>."
                              "lora_down.weight / lora_up.weight / alpha); text-encoder LoRAs are not loaded")
        flat = m.group(2)
        if m.group(3) == "alpha":
            if v.numel() != 1 or not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64, torch.int16)):
                raise FormatError(f"adapter {path}: {k} must be one number (got a {v.dtype} tensor of shape "
                                  f"{list(v.shape)}); re-export it")
            alphas[flat] = float(v.float().reshape(()).item())
        else:
            (A if m.group(3) == "lora_down.weight" else B)[flat] = v
    return A, B, alphas, "kohya"


def _alpha(meta: dict, doc: dict, alphas: dict, rank: int, path=None) -> tuple[float, str]:
    if "alpha" in doc:
        return _number(doc["alpha"], "alpha (ditkit metadata)", path), "ditkit metadata"
    if alphas:
        return float(next(iter(alphas.values()))), "kohya .alpha tensors"
    if DIFFUSERS_META_KEY in meta:
        try:
            d = loads(meta[DIFFUSERS_META_KEY], path)
            a = d.get("transformer.lora_alpha", d.get("lora_alpha"))
        except (FormatError, AttributeError):
            a = None
        if a is not None:
            return _number(a, "lora_alpha (diffusers metadata)", path), "diffusers lora_adapter_metadata"
    if meta.get("ss_network_alpha"):
        return _number(meta["ss_network_alpha"], "ss_network_alpha", path), "ss_network_alpha metadata"
    return float(rank), "none in the file: alpha = rank (diffusers' default)"


FOREIGN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")  # ComfyUI / sd-scripts / diffusers


def _authors_tables():
    """(family, layout table) of every authors' key layout (BFL Flux, Stability SD3, PixArt) LoRA files may name."""
    from .families import FAMILIES
    from .families.pixart import AUTHORS_LAYOUT

    tables = [(f.name, None) for f in FAMILIES.values() if f.original_layout is not None]
    return tables + [("pixart", AUTHORS_LAYOUT)]


def authors_table(family: str | None):
    """The authors' key table (None: the family's own original layout) LoRA files use for `family`; ConfigError
    for a family without one (checked before a training run that is to be written with --format original)."""
    tables = dict(_authors_tables())
    if family not in tables:
        raise ConfigError(f"--format original: the {family or 'unknown'} family has no authors' LoRA layout "
                          f"({', '.join(sorted(tables))} have one); use --format peft or kohya")
    return tables[family]


def to_authors_names(adapter: Adapter, modules: dict[str, tuple[int, int]]) -> tuple[dict, dict, dict, str]:
    """The adapter (diffusers module names) in its family's authors' layout: (lora_down, lora_up, alpha) per
    `lora_unet_<authors' module>` key, and the layout's name (the inverse of `from_authors_names`). A fused
    authors' module stacks its pieces' lora_down and puts their lora_up on the block diagonal (a piece the
    adapter does not train gets zero rows), with alpha scaled by the pieces stacked, so alpha / rank is kept."""
    from . import original_keys
    from .families.keys import SWAP

    table = authors_table(adapter.family)
    layout = original_keys.layout_name(adapter.family, layout=table)
    groups = original_keys.module_groups(adapter.family, modules, table)
    owner = {d: o for o, g in groups.items() for _, d in g}
    stray = [m for m in adapter.modules if m not in owner]
    if stray:
        raise ConfigError(f"--format original: {', '.join(stray[:4])} {'has' if len(stray) == 1 else 'have'} no place "
                          f"in the {layout} layout (is the adapter for this model?); use --format peft or kohya")
    down, up, alphas = {}, {}, {}
    for orig in sorted({owner[m] for m in adapter.modules}):
        group = groups[orig]
        present = [d for _, d in group if d in adapter.A]
        a = torch.cat([adapter.A[d] for d in present])
        r, blocks = adapter.rank, []
        for _, d in group:
            blk = a.new_zeros(modules[d][0], a.shape[0])
            if d in adapter.B:
                j = present.index(d) * r
                blk[:, j:j + r] = adapter.B[d]
            blocks.append(blk)
        b = torch.cat(blocks)
        if len(group) == 1 and group[0][0] == SWAP:
            lo, hi = b.chunk(2, dim=0)
            b = torch.cat([hi, lo])
        name = KOHYA_PREFIXES[1] + orig.replace(".", "_")
        down[name], up[name], alphas[name] = a, b, float(adapter.alpha) * len(present)
    return down, up, alphas, layout


def from_authors_names(adapter: Adapter, modules: dict[str, tuple[int, int]]) -> Adapter | None:
    """The adapter with module names in the authors' layout (kohya's lora_unet_double_blocks_0_img_attn_qkv, ComfyUI's
    diffusion_model.double_blocks.0.img_attn.qkv) put on the model's diffusers modules: a fused original module
    (qkv, Flux's linear1) keeps its lora_down for every piece and splits its lora_up by the pieces' rows; a
    (shift, scale) projection has its lora_up halves swapped. None when no authors' layout names every module."""
    from . import original_keys
    from .families.keys import SWAP

    for family, table in _authors_tables():
        try:
            groups = original_keys.module_groups(family, modules, table)
        except FormatError:
            continue  # the model is not of this family
        flat = {o.replace(".", "_"): o for o in groups}
        names = {m: (m if m in groups else flat.get(m)) for m in adapter.modules}
        if any(v is None for v in names.values()):
            continue
        A, B = {}, {}
        for m, orig in names.items():
            group, a, b = groups[orig], adapter.A[m], adapter.B[m]
            sizes = [modules[d][0] for _, d in group]
            if b.shape[0] != sum(sizes):
                raise FormatError(f"{adapter.path or 'adapter'}: {m} has {b.shape[0]} output rows where this model's "
                                  f"{orig} has {sum(sizes)}; it was trained on a different architecture")
            if len(group) == 1 and group[0][0] == SWAP:
                lo, hi = b.chunk(2, dim=0)
                b = torch.cat([hi, lo], dim=0)
            for (_, d), piece in zip(group, torch.split(b, sizes, dim=0)):
                A[d], B[d] = a, piece.contiguous()
        info = {**adapter.info, "key_layout": original_keys.layout_name(family, layout=table)}
        return Adapter(A=A, B=B, rank=adapter.rank, alpha=adapter.alpha, family=adapter.family,
                       targets=adapter.targets, base_sha256=adapter.base_sha256, info=info, path=adapter.path)
    return None


def match(adapter: Adapter, modules: dict[str, tuple[int, int]]) -> Adapter:
    """Resolve the adapter's module names against a model's Linear layers {name: (out, in)}.

    kohya's flat names (dots replaced by underscores) are mapped back to the model's names. Every key must
    name a module and fit its shape; otherwise FormatError lists the keys that did not match.
    """
    flat = {name.replace(".", "_"): name for name in modules}
    if any(m not in modules and m not in flat for m in adapter.modules):
        foreign = from_authors_names(adapter, modules)
        if foreign is not None:
            adapter = foreign
    resolved_A, resolved_B, unmatched, misfit = {}, {}, [], []
    for m in adapter.modules:
        name = m if m in modules else flat.get(m)
        if name is None:
            unmatched.append(m)
            continue
        out_f, in_f = modules[name]
        a, b = adapter.A[m], adapter.B[m]
        if a.shape[1] != in_f or b.shape[0] != out_f:
            misfit.append(f"{name} (adapter {b.shape[0]}x{a.shape[1]}, model {out_f}x{in_f})")
            continue
        resolved_A[name], resolved_B[name] = a, b
    where = adapter.path or "adapter"
    if unmatched:
        n = len(unmatched)
        what = "matches no module of this model" if n == len(adapter.modules) else \
            f"matches only {len(adapter.modules) - n} of its {len(adapter.modules)} modules"
        raise FormatError(f"{where} {what}; unmatched keys: {', '.join(unmatched[:8])}"
                          f"{' ...' if n > 8 else ''} (trained for family {adapter.family or 'unknown'}: "
                          "use it with the model it was trained on)")
    if misfit:
        raise FormatError(f"{where} does not fit this model's shapes: {', '.join(misfit[:5])}; "
                          "it was trained on a different architecture")
    return Adapter(A=resolved_A, B=resolved_B, rank=adapter.rank, alpha=adapter.alpha, family=adapter.family,
                   targets=adapter.targets, base_sha256=adapter.base_sha256, info=adapter.info, path=adapter.path)
