"""What ran: the kernel paths of a model's linear layers, and whether its speedup is a real one."""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn


def _linear_like(m: nn.Module) -> bool:
    name = type(m).__name__
    return isinstance(m, nn.Linear) or ("Linear" in name and not name.endswith("PackedParams"))


def kernels(module: nn.Module) -> dict:
    """The linear-layer kernel paths of a transformer: class counts, weight dtypes, declared kernels.

    A module may declare its path with a `ditkit_kernel` string attribute, and a fake-quantized or
    dense-fallback path with `fake_quant = True` / `kernel_fallback = True` (or a class name with
    'Fake'); any of these marks the model's speedup as not real.
    """
    classes, dtypes, declared = Counter(), Counter(), Counter()
    fake = fallback = False
    for m in module.modules():
        k = getattr(m, "ditkit_kernel", None)
        if isinstance(k, str):
            declared[k] += 1
            fake |= "fake" in k.lower()
            fallback |= "fallback" in k.lower()
        fake |= bool(getattr(m, "fake_quant", False)) or "Fake" in type(m).__name__
        fallback |= bool(getattr(m, "kernel_fallback", False))
        session = getattr(m, "session", None)  # an onnxruntime session wrapped as a module (ONNX bundles)
        if hasattr(session, "get_providers"):
            declared[f"onnxruntime {session.get_providers()[0]}"] += 1
        if not _linear_like(m) or any(_linear_like(c) for c in m.modules() if c is not m):
            continue  # count the layer that does the matmul, not wrappers around it
        cls = type(m)
        classes[f"{cls.__module__}.{cls.__qualname__}"] += 1
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            dtypes[str(w.dtype).replace("torch.", "")] += 1
    dense = sum(n for c, n in classes.items() if c == "torch.nn.modules.linear.Linear")
    parts = []
    if dense == sum(classes.values()) and dtypes:
        parts.append("dense " + "/".join(_short_dtype(d) for d in sorted(dtypes)))
    else:
        parts += [f"{c.rsplit('.', 1)[-1]} x{n}" for c, n in sorted(classes.items()) if not c.startswith("torch.nn.")]
        if dense:
            parts.append(f"dense x{dense}")
    parts += [f"{k} x{n}" for k, n in sorted(declared.items())]
    summary = ", ".join(parts) or "no linear layers"
    if fake:
        summary = "FAKE-QUANT: " + summary
    elif fallback:
        summary = "FALLBACK: " + summary
    return {"summary": summary, "linear_classes": dict(classes), "weight_dtypes": dict(dtypes),
            "declared": dict(declared), "fake_quant": fake, "fallback": fallback, "real": not (fake or fallback)}


def _short_dtype(d: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(d, d)
