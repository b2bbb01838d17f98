"""The check of an exported graph: its outputs against PyTorch's on the same inputs, per case, and the verdict."""
from __future__ import annotations

from typing import Callable

import torch

from .config import PARITY_GUIDANCE, ExportReport
from .trace import _first_line, _forward_inputs


def _compare(run: Callable[[], torch.Tensor], ref: torch.Tensor) -> dict:
    """{"max_abs", "max_rel"} of run() against ref; both None and an "error" when it fails or mismatches."""
    try:
        got = run().detach().float().cpu()
    except Exception as e:  # onnxruntime refuses shapes a graph baked in, with its own exception types
        return {"max_abs": None, "max_rel": None, "error": _first_line(e)}
    ref = ref.detach().float().cpu()
    if got.shape != ref.shape:
        return {"max_abs": None, "max_rel": None, "error": f"output shape {list(got.shape)} != {list(ref.shape)}"}
    if not torch.isfinite(got).all():
        return {"max_abs": None, "max_rel": None, "error": "non-finite outputs"}
    max_abs = float((got - ref).abs().max())
    return {"max_abs": max_abs, "max_rel": max_abs / max(float(ref.abs().max()), 1e-12)}


def transformer_parity(fam, tr, onnx_tr, cases: list[tuple[int, tuple[int, int], int | None]]) -> list[dict]:
    """Run `family.predict` on the PyTorch and the ONNX transformer on the same inputs, per case."""
    rows = []
    for i, (batch, hw, text) in enumerate(cases):
        latents, t, cond = _forward_inputs(fam, tr, batch, hw, text, seed=100 + i)
        with torch.no_grad():
            ref = fam.predict(tr, latents, t, cond, PARITY_GUIDANCE)
            errors = _compare(lambda: fam.predict(onnx_tr, latents, t, cond, PARITY_GUIDANCE), ref)
        rows.append({"batch": batch, "latent_hw": list(hw), "text_tokens": text, **errors})
    return rows


def _ok(row: dict, atol: float, rtol: float) -> bool:
    return row["max_abs"] is not None and row["max_abs"] <= atol and row["max_rel"] <= rtol


def _summarize(report: ExportReport, rows: list[dict], atol: float, rtol: float) -> None:
    report.atol, report.rtol = atol, rtol
    failed_to_run = any(r["max_abs"] is None for r in rows)
    report.max_abs_error = None if failed_to_run else max((r["max_abs"] for r in rows), default=0.0)
    report.max_rel_error = None if failed_to_run else max((r["max_rel"] for r in rows), default=0.0)
    for r in rows:
        if _ok(r, atol, rtol):
            continue
        where = f"{r.get('graph', 'transformer')} at batch {r['batch']}, {r['latent_hw'][0]}x{r['latent_hw'][1]} latents"
        if r["max_abs"] is None:
            report.failures.append(f"{where}: {r['error']}")
        else:
            report.failures.append(f"{where}: max abs {r['max_abs']:.3g} (atol {atol:g}), rel {r['max_rel']:.3g} "
                                   f"(rtol {rtol:g})")
    report.passed = not report.failures
