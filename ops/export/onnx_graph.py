"""--format onnx: the transformer (and optionally the VAE decoder) as ONNX graphs in a staging directory, checked
in onnxruntime against PyTorch at two batch sizes and two resolutions (dynamic resolution where the model allows)."""
from __future__ import annotations

import inspect
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ditkit.formats.errors import ConfigError, UnsupportedModelError

from ..geometry import latent_hw
from .config import PARITY_BATCHES, TOLERANCE, TRACE_BATCH, ExportConfig, ExportReport
from .parity import _compare, _ok, _summarize, transformer_parity
from .trace import (_Decode, _alt_hw, _config_dict, _describe, _first_line, _text_tokens, _trace_transformer,
                    capture_call, export_graph)


def _export_onnx(bundle, cfg: ExportConfig, report: ExportReport, log: Callable[[str], None]):
    from ditkit.formats.bundle import Bundle
    from ditkit.formats.onnx_bundle import (TRANSFORMER_ONNX, VAE_DECODER_ONNX, OnnxTransformer, OnnxVaeDecoder,
                                            staging_dir, write_model_proto)

    fam, tr = bundle.family, bundle.transformer
    if fam.onnx_unsupported:
        raise UnsupportedModelError(f"--format onnx cannot trace the {fam.name} family: {fam.onnx_unsupported}; "
                                    "export --format diffusers or safetensors instead")
    hw = latent_hw(bundle, cfg.height, cfg.width)
    text = _text_tokens(fam, tr)
    atol, rtol = cfg.tolerance()
    stage = staging_dir(cfg.workdir)
    path = stage / TRANSFORMER_ONNX
    t0 = time.perf_counter()
    try:
        # 1. Dynamic resolution when the PyTorch forward runs at a second, non-square size: trace there (so a
        #    pos-embed table computed from the input size is in the graph), and check both sizes below.
        alt = _alt_hw(tr, hw)
        note = None
        try:
            capture_call(fam, tr, 1, alt, text[0] if text else None)
        except Exception as e:  # the PyTorch model itself rejects other sizes
            note = f"{tr.__class__.__name__} does not run at {alt[0]}x{alt[1]} latents ({_first_line(e)})"
        attempts = [(alt, hw)] if note is None else []
        attempts.append((hw, None))
        # whether the dynamic-resolution graph is right: fp32 defaults (a baked-in size errs by O(1), not 1e-5)
        check_tol = tuple(max(a, b) for a, b in zip(cfg.tolerance(), TOLERANCE["fp32"])) \
            if cfg.precision == "fp32" else TOLERANCE["fp32"]
        for trace_hw, other_hw in attempts:
            last = other_hw is None
            log(f"exporting the transformer at {trace_hw[0]}x{trace_hw[1]} latents, "
                f"{'dynamic' if not last else 'fixed'} resolution (torch.export + torch.onnx, opset {cfg.opset})")
            try:
                names, template, axes, files, batch_inputs = _trace_transformer(fam, tr, trace_hw, other_hw, text,
                                                                               cfg.opset, path)
            except Exception as e:
                if last:
                    raise UnsupportedModelError(f"torch.export could not export this {fam.name} transformer "
                                                f"({_first_line(e)}); rerun with DITKIT_DEBUG=1 and report it")
                note = f"the dynamic-resolution export failed ({_first_line(e)})"
                continue
            spec = _transformer_spec(fam, tr, names, template, axes, hw, not last)
            spec["batch_inputs"] = batch_inputs  # None: dynamic batch; else run row by row (batch 1 graph)
            onnx_tr = OnnxTransformer(path, spec, _config_dict(tr), cfg.device)
            sizes = [hw] if last else [hw, trace_hw]
            cases = [(b, s, (text[0] if b == PARITY_BATCHES[0] else text[1]) if text else None)
                     for s in sizes for b in PARITY_BATCHES]
            log(f"checking {len(cases)} cases in onnxruntime against PyTorch")
            t1 = time.perf_counter()
            rows = transformer_parity(fam, tr, onnx_tr, cases)
            report.seconds_check += time.perf_counter() - t1
            bad = [r for r in rows if not _ok(r, *check_tol)]
            if last or not bad:
                break
            # a size-dependent value got baked in (e.g. a pos-embed table): export at one fixed resolution
            note = (f"the dynamic-resolution graph failed parity at {bad[0]['latent_hw'][0]}x"
                    f"{bad[0]['latent_hw'][1]} latents ({bad[0].get('error') or 'max abs %.2e' % bad[0]['max_abs']})")
            del onnx_tr
        report.batch = "dynamic" if batch_inputs is None else "1 (onnxruntime runs a batch row by row)"
        report.batch_note = fam.onnx_fixed_batch
        report.resolution = "fixed" if last else "dynamic"
        report.resolution_note = note if last else None
        report.latent_hw = list(hw)
        # 2. fp16: convert the verified fp32 graph, keep fp32 inputs/outputs, check it again
        if cfg.precision == "fp16":
            del onnx_tr
            log("converting the checked fp32 graph to fp16 and checking it again")
            _to_fp16(path, write_model_proto)
            onnx_tr = OnnxTransformer(path, spec, _config_dict(tr), cfg.device)
            t1 = time.perf_counter()
            rows = transformer_parity(fam, tr, onnx_tr, cases)
            report.seconds_check += time.perf_counter() - t1
        report.parity = rows
        report.inputs = _describe(onnx_tr.session.get_inputs())
        report.outputs = _describe(onnx_tr.session.get_outputs())
        spec["inputs"], spec["outputs"] = report.inputs, report.outputs
        report.dynamic_axes = {k: {str(d): a for d, a in v.items()} for k, v in axes.items()}
        from ditkit.formats.onnx_bundle import onnx_files

        report.graph_bytes = sum(f.stat().st_size for f in onnx_files(path))
        report.external_data = len(onnx_files(path)) > 1
        # 3. the VAE decoder, optionally
        components = dict(bundle.components)
        vae_spec = None
        if cfg.vae == "onnx":
            if bundle.vae is None:
                raise ConfigError(f"{bundle.name} has no VAE to export; drop --vae onnx")
            log("exporting and checking the VAE decoder")
            vae_spec, vae_rows = _export_vae(bundle.vae, hw, alt, cfg, stage / VAE_DECODER_ONNX)
            components["vae"] = OnnxVaeDecoder(stage / VAE_DECODER_ONNX, vae_spec["config"], cfg.device)
            report.vae_decoder = {k: vae_spec[k] for k in ("inputs", "outputs", "dynamic_axes")}
            report.vae_decoder["parity"] = vae_rows
            rows = rows + vae_rows
        report.seconds_export = round(time.perf_counter() - t0 - report.seconds_check, 2)
        report.seconds_check = round(report.seconds_check, 2)
        _summarize(report, rows, atol, rtol)
        manifest = {"onnx": {
            "opset": cfg.opset, "precision": cfg.precision,
            "exporter": f"torch.export + torch.onnx (torch {torch.__version__})",
            "transformer": spec, "vae_decoder": vae_spec,
            "pipeline": {"class": bundle.pipeline_class, "extra": bundle.pipeline_extra},
        }, "defaults": bundle.manifest.get("defaults", {})}
        out = Bundle(family=fam, transformer=onnx_tr, components=components, pipeline_class=bundle.pipeline_class,
                     pipeline_extra=bundle.pipeline_extra, manifest=manifest, path=stage, kind="onnx",
                     judge=bundle.judge)
        return out, report
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _transformer_spec(fam, tr, names, template, axes, hw, dynamic_res) -> dict:
    from ditkit.formats.onnx_bundle import flatten_call

    consts = {k: v for k, v in flatten_call([], (), template).items() if not isinstance(v, torch.Tensor)}
    attributes = {}
    if hasattr(tr, "use_additional_conditions"):  # read by PixArt's predict
        attributes["use_additional_conditions"] = bool(tr.use_additional_conditions)
    if isinstance(getattr(tr, "head_dim", None), int):  # read by Lumina-Next's predict (its RoPE table)
        attributes["head_dim"] = tr.head_dim
    return {
        "file": "transformer.onnx", "family": fam.name,
        "signature": list(inspect.signature(tr.forward).parameters),
        "inputs": [{"name": n} for n in names], "outputs": [{"name": "sample"}],
        "constants": {k: v for k, v in consts.items() if v is None or isinstance(v, (bool, int, float, str))},
        "dynamic_axes": {k: {str(d): a for d, a in v.items()} for k, v in axes.items()},
        "resolution": "dynamic" if dynamic_res else "fixed", "latent_hw": list(hw),
        "attributes": attributes,
    }


def _to_fp16(path: Path, write_model_proto) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path), load_external_data=True)
    big = len(list(path.parent.glob(path.name + ".data"))) > 0
    model16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=big)
    for f in path.parent.glob(path.name + "*"):
        f.unlink()
    write_model_proto(model16, path)


def _export_vae(vae, hw, alt, cfg: ExportConfig, path: Path):
    """vae_decoder.onnx: dynamic batch, height and width; checked at two batch sizes and two sizes."""
    from ditkit.formats.onnx_bundle import OnnxVaeDecoder

    c = vae.config.latent_channels
    g = torch.Generator().manual_seed(7)
    z = torch.randn(TRACE_BATCH, c, *hw, generator=g)
    axes = {"latent_sample": {0: "batch", 2: "latent_height", 3: "latent_width"}}
    export_graph(_Decode(vae), (z,), ["latent_sample"], axes, cfg.opset, path, "sample")
    config = _config_dict(vae)
    if cfg.precision == "fp16":
        from ditkit.formats.onnx_bundle import write_model_proto

        _to_fp16(path, write_model_proto)
    dec = OnnxVaeDecoder(path, config, cfg.device)
    rows = []
    for size in (hw, alt):
        for b in PARITY_BATCHES:
            zz = torch.randn(b, c, *size, generator=g)
            with torch.no_grad():
                ref = vae.decode(zz, return_dict=False)[0]
            errors = _compare(lambda: dec.decode(zz, return_dict=False)[0], ref)
            rows.append({"graph": "vae_decoder", "batch": b, "latent_hw": list(size), "text_tokens": None, **errors})
    spec = {"file": "vae_decoder.onnx", "config": config, "inputs": _describe(dec.session.get_inputs()),
            "outputs": _describe(dec.session.get_outputs()),
            "dynamic_axes": {k: {str(d): a for d, a in v.items()} for k, v in axes.items()}}
    del dec
    return spec, rows
