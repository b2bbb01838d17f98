"""`--parallel`: how generate and bench split their work across the processes of a launcher (torchrun).

`images` (the default) gives each process its share of the images (ops/distributed.shard). `context` splits every
image's tokens across the processes (sequence parallelism), for an image too slow or too big for one device:

1. where the family's `context_plan` says (formats/families/base.ContextPlan), after the patch embedding and the
   positional embedding, each process keeps its contiguous slice of the N image tokens (Flux: the packed tokens
   and their RoPE ids where they enter the transformer, so each process rotates its own positions);
2. every layer between is per token (MLPs, norms, adaLN modulation) except attention: in each attention layer of
   the plan, each process computes queries, keys and values of its own tokens, gathers the image keys and values
   of the others (torch.distributed.all_gather along the sequence), and attends its queries to all of them. The
   text tokens of a joint attention (SD3, Flux) are the same on every process and are kept once, where the
   family puts them (`text`: first or last), so the text stream stays identical on every process;
3. before the final projection (`gather`, the output norm) the processes gather the tokens, and each one
   unpatchifies the whole latent: every process holds the same model output, and the sampler steps alike.

The gathering happens at the attention kernel itself (a TorchFunctionMode around each planned attention module
intercepts torch's scaled_dot_product_attention, which diffusers' processors call for DiT, PixArt, SD3 and
Flux), after the processors have applied their q/k norms and rotary embeddings.

diffusers ships its own context parallelism (`ModelMixin.enable_parallelism(config=ContextParallelConfig(...))`)
for the classes with a `_cp_plan` (FluxTransformer2DModel, not SD3, PixArt or DiT). generate tries it first for
those classes (ENGINES); on CPU it fails while building its device mesh (diffusers 0.42:
`ZeroDivisionError: integer modulo by zero` in `ModelMixin._resolve_parallel_config`, which computes
`rank % torch.accelerator.device_count()` and there is no accelerator), and ditkit's plan runs instead; the
report records the reason.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ditkit.formats.errors import ConfigError, UnsupportedModelError, choice_error

PARALLEL_MODES: dict[str, str] = {
    "images": "each process makes its share of the images",
    "context": "every image's tokens split across the processes (sequence-parallel attention)",
}

# the engines `--parallel context` tries in order (generate); bench runs ditkit's own, see ops/bench/driver.py
ENGINES = ("diffusers", "ditkit")


def check_mode(mode: str) -> None:
    if mode not in PARALLEL_MODES:
        raise choice_error("parallel", mode, PARALLEL_MODES)


def check_context(bundle, hw: tuple[int, int], size: int) -> int:
    """The image tokens per process; refuses a family without a plan and a token count that does not divide."""
    fam, tr = bundle.family, bundle.transformer
    if fam.context_plan is None:
        raise UnsupportedModelError(f"--parallel context has no plan for the {fam.name} family (its blocks are not "
                                    "declared in formats/families/" f"{fam.name}.py's context_plan); run it with "
                                    "--parallel images, which shares the images between the processes")
    if not isinstance(tr, torch.nn.Module):
        raise ConfigError("--parallel context runs the PyTorch transformer; pass --backend pytorch (an ONNX graph "
                          "cannot be split)")
    n = fam.image_tokens(tr, hw)
    if n % size:
        raise ConfigError(f"--parallel context splits the {n} image tokens of a {hw[0]}x{hw[1]} latent into {size} "
                          f"equal parts, and {n} does not divide by {size}: choose --height/--width whose token "
                          "count does, or another process count")
    return n // size


SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Every process's `x`, concatenated along `dim` in rank order (torch.distributed's process group)."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=dim)


class _FullKeys(TorchFunctionMode):
    """Inside one planned attention module: scaled_dot_product_attention attends the local queries to the keys
    and values of every process's image tokens (and to the text tokens once)."""

    def __init__(self, local: int, text: str, gather):
        super().__init__()
        self.local, self.text, self.gather = local, text, gather

    def _full(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, T + n_local, D) keys or values; the text tokens T are the same on every process
        t = x.shape[-2] - self.local
        if t < 0 or (t and self.text == "none"):
            raise UnsupportedModelError(f"--parallel context: an attention layer saw {x.shape[-2]} keys where its plan "
                                        f"expects {self.local} image tokens per process"
                                        + (" and no text" if self.text == "none" else " and the text"))
        if self.text == "first":
            return torch.cat([x[..., :t, :], self.gather(x[..., t:, :], -2)], dim=-2)
        if self.text == "last":
            return torch.cat([self.gather(x[..., :self.local, :], -2), x[..., self.local:, :]], dim=-2)
        return self.gather(x, -2)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            # (query, key, value, attn_mask, ...) by position or by name (diffusers' native backend names them)
            named = dict(zip(SDPA_ARGS, args))
            named.update(kwargs)
            if named.get("attn_mask") is not None:
                raise UnsupportedModelError("--parallel context: an attention layer of the plan takes a mask, which "
                                            "the sequence split does not carry; run --parallel images")
            named["key"], named["value"] = self._full(named["key"]), self._full(named["value"])
            return func(**named)
        return func(*args, **kwargs)


class ContextParallel:
    """While open, the transformer runs on this process's slice of the image tokens (the module note). Forward
    hooks only: the model's weights and processors are untouched, and closing removes every hook. `gather(x, dim)`
    concatenates every process's `x` in rank order (torch.distributed's all_gather; the tests pass threads')."""

    def __init__(self, family, transformer, rank: int, size: int, local: int, gather=all_gather):
        self.plan, self.tr = family.context_plan, transformer
        self.rank, self.size, self.local, self.gather = rank, size, local, gather
        self.handles, self.modes = [], []

    # 1. the split
    def _slice(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if x.shape[dim] != self.local * self.size:
            raise UnsupportedModelError(f"--parallel context: {x.shape[dim]} tokens reached the split, the plan "
                                        f"expects {self.local * self.size}")
        return x.narrow(dim, self.rank * self.local, self.local).contiguous()

    def _split_inputs(self, module, args, kwargs):
        for name, dim in self.plan.split_inputs:
            if kwargs.get(name) is None:
                raise UnsupportedModelError(f"--parallel context: the transformer was called without {name}=, "
                                            "which its plan splits")
            kwargs[name] = self._slice(kwargs[name], dim)
        return args, kwargs

    def _split_output(self, module, args, out):
        return self._slice(out, 1)  # (B, N, D) -> (B, N / size, D)

    # 2. attention
    def _enter(self, module, args):
        mode = _FullKeys(self.local, self.plan.text, self.gather)
        mode.__enter__()
        self.modes.append(mode)

    def _exit(self, module, args, out):
        self.modes.pop().__exit__(None, None, None)

    # 3. the gather
    def _gather_output(self, module, args, out):
        return self.gather(out, 1)  # (B, N / size, D) -> (B, N, D)

    def __enter__(self):
        p, tr = self.plan, self.tr
        if p.split:
            self.handles.append(tr.get_submodule(p.split).register_forward_hook(self._split_output))
        else:
            self.handles.append(tr.register_forward_pre_hook(self._split_inputs, with_kwargs=True))
        attention = [m for name, m in tr.named_modules() if re.search(p.attention, name)]
        if not attention:
            raise UnsupportedModelError(f"--parallel context: no attention module matches the plan's {p.attention!r}")
        for m in attention:
            self.handles += [m.register_forward_pre_hook(self._enter),
                             m.register_forward_hook(self._exit, always_call=True)]
        self.handles.append(tr.get_submodule(p.gather).register_forward_hook(self._gather_output))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        while self.modes:
            self.modes.pop().__exit__(None, None, None)
        return False


def diffusers_engine(transformer, size: int) -> str | None:
    """Turn on diffusers' own context parallelism (Ulysses over `size` processes) where the class has a plan;
    None when it is on, else why not (the error text)."""
    if getattr(type(transformer), "_cp_plan", None) is None:
        return f"diffusers has no context-parallel plan for {type(transformer).__name__}"
    from diffusers import ContextParallelConfig

    try:
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=size))
    except Exception as e:  # noqa: BLE001 - any failure falls back to ditkit's plan, its text reported
        transformer._parallel_config = None
        return f"{type(e).__name__}: {e}"
    return None


def context_parallel(bundle, hw: tuple[int, int], rank: int, size: int, engines=ENGINES):
    """(the context manager that runs the transformer split across the processes, the report's note)."""
    import contextlib

    local = check_context(bundle, hw, size)
    note = {"world_size": size, "image_tokens": local * size, "tokens_per_process": local}
    if "diffusers" in engines:
        why = diffusers_engine(bundle.transformer, size)
        if why is None:
            return contextlib.nullcontext(), {**note, "engine": "diffusers"}
        note["diffusers"] = why
    return (ContextParallel(bundle.family, bundle.transformer, rank, size, local),
            {**note, "engine": "ditkit", "text": bundle.family.context_plan.text,
             "accelerators": "step caching and feedback modules are off: their per-step decisions read the local "
                             "tokens, which differ between processes"})
