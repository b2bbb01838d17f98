"""The bench op: quality, the matmul peak, FLOPs, per-step and end-to-end latency, memory, then the report."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from ditkit.formats.errors import ConfigError

from .. import distributed
from ..flops import call_flops
from ..generate import generate, judge_labels
from ..image_metrics import load_metrics, ratios, score_all
from ..info import count_params
from ..metrics import MatmulProbe, memory_method, module_bytes, peak_growth, psnr, ssim
from ..runtime import resolve_device, resolve_dtype
from ..timing import Timer, interleaved, median, p90, paired_ratio, speedup_basis
from .compiled import SUFFIX, CompiledCalls, graph_count
from .gates import _check_gates, _gates
from .kernels import kernels
from .report import BatchResult, BenchConfig, BenchReport, ModelResult, Quality
from .subjects import _names, _resident_, _Subject


# diffusers' context parallelism cannot be turned off on a model, and bench times the same models on rank 0 alone
# after the context-parallel rounds: bench splits with ditkit's plan (ops/parallel.py)
DITKIT_ONLY = ("ditkit",)
STEP_SAMPLE_MS = 20.0  # shorter per-step calls are repeated within a round up to about this long


@torch.inference_mode()
def bench(bundles: list, cfg: BenchConfig, embeddings=None,
          log: Callable[[str], None] | None = None) -> tuple[list, BenchReport | None]:
    """Measure bundles[0] (the base) and bundles[1:] (variants); the report is None on ranks other than 0."""
    log = log or (lambda msg: None)
    if not bundles:
        raise ConfigError("bench needs at least one model")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    base_defaults = bundles[0].defaults()
    if cfg.prompts is None and embeddings is None and bundles[0].family.conditioning != "class" \
            and base_defaults.get("prompts"):
        cfg = replace(cfg, prompts=list(base_defaults["prompts"]))  # the base's own prompt set, for every model
    subjects = [_Subject(n, b, cfg, device, dtype, embeddings) for n, b in zip(_names(bundles), bundles)]
    # the judge (the base's, else the first variant's) scores a model's images against the class each condition
    # names: the label, or the class word of a prompt (its bundle's `prompt_labels`); prompts naming no single
    # class leave the judge out
    judged = next((b for b in bundles if b.judge is not None), None)
    judge = None if judged is None else judged.judge
    if judge is not None and judge_labels(judged, list(getattr(subjects[0], "values", None) or [])) is None:
        judge = None
    _check_gates(cfg, subjects, judge)
    metric_models = load_metrics(cfg.metrics)  # local weights only; a missing file fails here, before any work
    reference = None
    if cfg.fid_reference is not None:
        from ditkit.formats.image_folder import read_image_folder

        reference = read_image_folder(cfg.fid_reference, size=(299, 299), flag="--fid-reference").images
    if device == "cpu":
        for b in bundles:
            _resident_(b)

    # 1. Quality: every rank generates its shard; rank 0 gets all images.
    images: dict[str, np.ndarray | None] = {}
    if cfg.num_images:
        for s in subjects:
            if s.makes_images:
                log(f"quality: {cfg.num_images} images from {s.name}")
                images[s.name], rep = generate(s.bundle, s.gcfg, embeddings, engines=DITKIT_ONLY)
                s.conditions = rep.conditions
    rank, world_size = distributed.world()
    context = _context_latency(subjects, cfg, embeddings, world_size, log) if cfg.parallel == "context" else None
    if rank != 0:
        return bundles, None
    quality = _quality(subjects, images, judge, judged)
    if metric_models:
        made = {s.name: images[s.name] for s in subjects if images.get(s.name) is not None}
        values = score_all(metric_models, made, {s.name: getattr(s, "conditions", None) for s in subjects},
                           subjects[0].name, reference, cfg.seed, log)
        for name, v in values.items():
            quality[name]["metrics"], quality[name]["metric_ratios"] = v, ratios(v, values.get(subjects[0].name, {}))

    # 2. The device's dense matmul peak, measured now, on this machine.
    load_before = _load()
    log("probing the dense matmul peak")
    timer = Timer(device)
    probe = MatmulProbe(device)
    probe.burst(timer)  # and once more in every timing round below

    # 3. FLOPs of each timed call (one untimed call per model and batch size, also warming up).
    steps = {(s.name, b): s.step_call(b) for s in subjects for b in cfg.batch_sizes}
    flops = {key: call_flops(fn) for key, fn in steps.items()}
    step_sqnr = _step_sqnr(subjects, steps, cfg.batch_sizes[0])

    # 3b. --compile: each model that compiles gets compiled twins of its calls, warmed up here (ops/bench/compiled.py)
    imaging = [s for s in subjects if s.makes_images and cfg.image_repeats]
    calls = {(s.name, b): s.image_call(b) for s in imaging for b in cfg.batch_sizes}
    names = [s.name for s in subjects]
    step_calls, image_calls = dict(steps), dict(calls)
    comp = None
    if cfg.compile:
        comp = CompiledCalls(subjects, cfg.compile_mode, device, log)
        step_calls.update(comp.twins(steps))
        image_calls.update(comp.twins(calls))
        comp.parity(steps, cfg.batch_sizes[0])
        names += [s.name + SUFFIX for s in subjects if s.name in comp.compiled]
        graphs = graph_count()

    # 4. Per-step latency: interleaved rounds, alternating the order (A B, B A, ...).
    step_ms, step_cpu = _interleave(names, cfg.batch_sizes, step_calls, cfg.warmup, cfg.repeats, timer, log,
                                    "per-step", target_ms=STEP_SAMPLE_MS, probe=probe)

    # 5. End-to-end latency per image at each model's own sampler and steps.
    image_names = [n for n in names if (n, cfg.batch_sizes[0]) in image_calls]
    image_ms, image_cpu = _interleave(image_names, cfg.batch_sizes, image_calls, 1, cfg.image_repeats, timer, log,
                                      "end-to-end", probe=probe)
    peak = probe.peak
    # speedups: CPU time with one thread (= wall time on an idle core, and immune to other jobs on the
    # machine); wall time otherwise (with more threads, CPU time would count parallel work, not latency)
    basis = speedup_basis(device)
    by_cpu = basis == "cpu-time"
    step_basis, image_basis = (step_cpu, image_cpu) if by_cpu else (step_ms, image_ms)

    # 6. Peak memory, last (the CPU meter changes how glibc allocates, which would slow timed calls).
    log("measuring peak memory")
    memory = {}
    for s in subjects:
        for b in cfg.batch_sizes:
            fn = calls.get((s.name, b)) or steps[(s.name, b)]
            weights = module_bytes(s.bundle.transformer, s.bundle.vae if (s.name, b) in calls else None)
            growth = peak_growth(fn, device)
            memory[(s.name, b)] = None if growth is None else weights + growth

    load = {"before": load_before, "after": _load(), "cpus": os.cpu_count()}
    warnings = []
    busy = max((x for x in (load_before, load["after"]) if x is not None), default=None)
    if device == "cpu" and busy is not None and busy > 0.75 * (os.cpu_count() or 1):
        w = (f"the machine was busy (1-minute load average {busy:.1f} on {os.cpu_count()} cores): wall-clock "
             "latencies are inflated and noisy")
        if by_cpu:
            w += "; speedups use CPU time (one thread), which other jobs do not inflate"
        else:
            w += ("; speedups are wall-clock ratios; --threads 1 makes them CPU-time ratios, which other jobs do "
                  "not inflate, and avoids OpenMP threads waiting for each other")
        warnings.append(w)
    for w in warnings:
        log(f"warning: {w}")

    # 7. Assemble, with speedups against the base at each batch size.
    base = subjects[0]
    results = []
    for i, s in enumerate(subjects):
        rows = []
        for b in cfg.batch_sizes:
            sm, im = step_ms[(s.name, b)], image_ms.get((s.name, b))
            med = median(sm)
            r = BatchResult(batch_size=b, rows_per_call=2 * b if s.cfg else b, latency_ms_per_step=round(med, 4),
                            latency_ms_per_step_p90=round(p90(sm), 4), flops_per_step=flops[(s.name, b)] or None,
                            peak_memory_bytes=memory[(s.name, b)])
            if r.flops_per_step:
                r.achieved_flops = round(r.flops_per_step / (med / 1e3), 1)
                r.mfu = round(r.achieved_flops / peak, 6)
            if im:
                r.latency_ms_per_image = round(median(im) / b, 4)
                r.latency_ms_per_image_p90 = round(p90(im) / b, 4)
                r.images_per_s = round(1e3 / r.latency_ms_per_image, 4)
            if step_cpu:
                r.cpu_ms_per_step = round(median(step_cpu[(s.name, b)]), 4)
            if im and image_cpu:
                r.cpu_ms_per_image = round(median(image_cpu[(s.name, b)]) / b, 4)
            key, base_key = (s.name, b), (base.name, b)
            r.speedup_per_step = round(paired_ratio(step_basis[base_key], step_basis[key]), 4)
            if im and image_ms.get(base_key):
                r.speedup_per_image = round(paired_ratio(image_basis[base_key], image_basis[key]), 4)
            rows.append(asdict(r))
        results.append(_model_result(s, i, rows, quality.get(s.name), step_sqnr.get(s.name)))
    if any((row["mfu"] or 0) > 1 for m in results for row in m["by_batch_size"]):
        warnings.append("a model ran above the measured matmul peak (MFU > 1): the load on this machine changed "
                        "during the run, so its MFU figures are not meaningful")
        log(f"warning: {warnings[-1]}")
    compile_entry = None
    if comp is not None:
        compile_entry = comp.entry(subjects, cfg.batch_sizes, step_basis, step_ms, image_basis, image_ms,
                                   graph_count() - graphs)
        if compile_entry["graphs_during_timing"]:
            warnings.append(f"torch.compile built {compile_entry['graphs_during_timing']} graph(s) during the timed "
                            "rounds (a recompile): compiled latencies include compile time")
            log(f"warning: {warnings[-1]}")
    gates = _gates(cfg, results)
    report = BenchReport(
        device=device, device_name=_device_name(device), dtype=cfg.dtype, torch=torch.__version__,
        cuda=torch.version.cuda if device.startswith("cuda") else None, threads=torch.get_num_threads(),
        world_size=world_size, peak_flops=round(peak, 1), peak_flops_dtype=probe.dtype_name,
        peak_flops_matmul=probe.n,
        memory_method=memory_method(device), speedup_basis=basis, load_average=load, warnings=warnings,
        timing={"warmup_rounds": cfg.warmup, "step_repeats": cfg.repeats, "image_warmup_rounds": 1,
                "image_repeats": cfg.image_repeats, "order": "interleaved, alternating (A B, B A, ...)",
                "statistic": "median and p90 of the timed rounds; speedup = median of per-round base/model ratios "
                             "(of CPU time with one CPU thread, else of wall time)",
                "step_sample_ms": STEP_SAMPLE_MS,
                "peak_probe": f"best of {probe.samples} matmuls: a burst before timing, then one per round",
                "per_step": "one transformer call on the rows a sampler step needs: 2 x batch with CFG",
                "per_image": "denoise + VAE decode of a batch at the model's own sampler and steps, / batch"},
        config=cfg.to_dict(), models=results, gates=[asdict(g) for g in gates], passed=all(g.passed for g in gates),
        compile=compile_entry, context=_with_one_process(context, results))
    return bundles, report


def _interleave(names, batch_sizes, calls, warmup, repeats, timer, log, what, target_ms=0.0,
                probe=None) -> tuple[dict, dict]:
    """ops.timing.interleaved over every (model, batch size): the model order alternates (A B, then B A), batch
    sizes keep theirs, and the matmul probe runs once per round."""
    def on_round(r):
        if r == 0 or r == warmup:
            log(f"{what}: {'timing' if r >= warmup else 'warming up'} ({warmup} warm-up + {repeats} rounds)")
    groups = [[(n, b) for b in batch_sizes] for n in names]
    return interleaved(calls, repeats, warmup, timer=timer, groups=groups, target_ms=target_ms, on_round=on_round,
                       after_round=None if probe is None else lambda: probe.record(timer(probe)))


def _quality(subjects, images, judge, judged=None) -> dict[str, dict]:
    """Per model: its images compared with the base's on identical seeds, and judged."""
    from ..judge import score

    base = subjects[0]
    ref = images.get(base.name)
    out = {}
    for s in subjects:
        img = images.get(s.name)
        if img is None:
            continue
        q = Quality(n_images=len(img), reference=s is base)
        if s is not base:
            if ref is None:
                q.note = "the base makes no images"
            elif ref.shape != img.shape:
                q.note = f"image shape {list(img.shape[1:])} differs from the base's {list(ref.shape[1:])}"
            else:
                q.identical = bool(np.array_equal(ref, img))
                q.psnr, q.ssim = round(psnr(ref, img), 4), round(ssim(ref, img), 6)
        labels = None if judge is None else judge_labels(judged, list(s.conditions))
        if labels is not None:
            js = score(judge, img, labels)
            q.judge_accuracy, q.judge_fd = round(js.accuracy, 6), round(js.fd, 6)
        out[s.name] = asdict(q)
    return out


def _step_sqnr(subjects, steps, b: int) -> dict[str, float | None]:
    """Each model's timed step output against the base's, in dB (None when identical or shapes differ)."""
    from ..quantize.base import sqnr_db

    def out(s):
        y = steps[(s.name, b)]()
        return (y[0] if isinstance(y, (tuple, list)) else y).detach().double().cpu()
    ref, res = out(subjects[0]), {}
    for s in subjects[1:]:
        y = out(s)
        db = sqnr_db(float(ref.pow(2).sum()), float((y - ref).pow(2).sum())) if y.shape == ref.shape else float("nan")
        res[s.name] = round(db, 2) if np.isfinite(db) else None
    return res


def _model_result(s: _Subject, i: int, rows: list[dict], quality: dict | None, sqnr: float | None = None) -> dict:
    b = s.bundle
    modules = [b.transformer] + [c for c in b.components.values() if isinstance(c, nn.Module)]
    head = rows[0]
    k = kernels(b.transformer)
    p = next(b.transformer.parameters(), None)
    return asdict(ModelResult(
        name=s.name, path=str(b.path.resolve()) if b.path else None, family=b.family.name, kind=b.kind,
        role="base" if i == 0 else "variant", params=count_params(b.transformer),
        params_total=sum(count_params(m) for m in modules), disk_bytes=b.transformer_bytes_on_disk(),
        disk_bytes_total=b.bytes_on_disk(), dtype=str(p.dtype).replace("torch.", "") if p is not None else "",
        kernels=k, sampler=s.sampler if s.makes_images else None, steps=s.steps if s.makes_images else None,
        guidance=s.guidance, cfg=s.cfg, batch_size=head["batch_size"],
        latency_ms_per_step=head["latency_ms_per_step"], latency_ms_per_step_p90=head["latency_ms_per_step_p90"],
        latency_ms_per_image=head["latency_ms_per_image"], latency_ms_per_image_p90=head["latency_ms_per_image_p90"],
        images_per_s=head["images_per_s"], peak_memory_bytes=head["peak_memory_bytes"],
        flops_per_step=head["flops_per_step"], achieved_flops=head["achieved_flops"], mfu=head["mfu"],
        speedup_per_step=head["speedup_per_step"], speedup_per_image=head["speedup_per_image"],
        speedup_is_real=k["real"], by_batch_size=rows, quality=quality, weights_bytes=_weights_bytes(b.transformer),
        sqnr_db_step=sqnr))


def _weights_bytes(tr) -> int | None:
    from ditkit.nn.quantized import KINDS

    from ..peers import weights_bytes
    from ..quantize.base import memory_bytes

    if not isinstance(tr, nn.Module):
        return None
    return memory_bytes(tr, KINDS) if any(hasattr(m, "ditkit_spec") for m in tr.modules()) else weights_bytes(tr)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        i = torch.device(device).index or 0
        p = torch.cuda.get_device_properties(i)
        return f"{p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores"


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _context_latency(subjects, cfg: BenchConfig, embeddings, world_size: int, log) -> dict | None:
    """--parallel context under a launcher: end-to-end latency per image of each model with every image split
    across the processes (ops/parallel.py), on every rank in step (a fixed number of rounds: each call's
    collectives need every process); rank 0's wall clock. The rest of bench then times rank 0 alone."""
    if world_size == 1:
        return None
    import time

    b = cfg.batch_sizes[0]
    rounds = max(cfg.image_repeats, 1)
    out = {"world_size": world_size, "batch_size": b, "rounds": rounds, "models": {}}
    for s in subjects:
        gcfg = replace(s.gcfg, num_images=b, batch_size=b, cache=False, feedback=False)
        log(f"context parallel: {s.name}, {rounds} rounds of {b} image(s) on {world_size} processes")
        times, rep = [], None
        for i in range(rounds + 1):  # the first round warms up
            torch.distributed.barrier()
            t0 = time.perf_counter()
            _, rep = generate(s.bundle, gcfg, embeddings, engines=DITKIT_ONLY)
            if i:
                times.append((time.perf_counter() - t0) * 1e3)
        out["engine"] = rep.context["engine"]
        out["models"][s.name] = {"latency_ms_per_image": round(median(times) / b, 4),
                                 "tokens_per_process": rep.context["tokens_per_process"],
                                 "steps": rep.steps}
    return out


def _with_one_process(context: dict | None, results: list[dict]) -> dict | None:
    """The context latencies beside each model's one-process end-to-end latency (rank 0 alone, same batch)."""
    if context is None:
        return None
    for m in results:
        entry = context["models"].get(m["name"])
        one = m["by_batch_size"][0].get("latency_ms_per_image")
        if entry is not None:
            entry["latency_ms_per_image_one_process"] = one
            entry["speedup"] = round(one / entry["latency_ms_per_image"], 4) if one else None
    return context
