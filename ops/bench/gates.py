"""Quality gates: refused before any work when they cannot be evaluated, then each variant checked against the base."""
from __future__ import annotations

import math

from ditkit.formats.errors import ConfigError

from ..image_metrics import METRIC_GATES
from .report import GATES, BenchConfig, BenchReport, Gate
from .subjects import _Subject


def _check_gates(cfg: BenchConfig, subjects: list[_Subject], judge) -> None:
    """Refuse gates that cannot be evaluated before any work is done."""
    gates = cfg.gates()
    if cfg.metrics:
        flag = f"--metric {next(iter(cfg.metrics))}"
        if cfg.num_images == 0:
            raise ConfigError(f"{flag} scores quality images; drop --num-images 0")
        if not subjects[0].makes_images:
            raise ConfigError(f"{flag} scores images, but the base {subjects[0].name} is a bare transformer (no VAE); "
                              "bench pipeline directories")
        if "clip" in cfg.metrics and subjects[0].bundle.family.conditioning == "class":
            raise ConfigError(f"--metric clip scores images against their prompts, and {subjects[0].name} is "
                              "class-conditional; use it on text families")
    if not gates:
        return
    if len(subjects) < 2:
        raise ConfigError(f"gates ({', '.join('--' + g.replace('_', '-') for g in gates)}) compare variants with "
                          "the base: give BASE and at least one VARIANT")
    needs_images = [g for g in gates if g in ("min_psnr", "max_accuracy_drop", "max_fd_ratio", *METRIC_GATES)]
    if needs_images:
        flag = "--" + needs_images[0].replace("_", "-")
        if cfg.num_images == 0:
            raise ConfigError(f"{flag} needs quality images; drop --num-images 0")
        bare = [s.name for s in subjects if not s.makes_images]
        if bare:
            raise ConfigError(f"{flag} needs images, but {bare[0]} is a bare transformer (no VAE); "
                              "bench pipeline directories")
    judged = [g for g in gates if g in ("max_accuracy_drop", "max_fd_ratio")]
    if judged and judge is None:
        raise ConfigError(f"--{judged[0].replace('_', '-')} needs a judge, and no model has one "
                          "(tiny-digits pipelines carry theirs in judge/)")


def _gates(cfg: BenchConfig, results: list[dict]) -> list[Gate]:
    gates = []
    base = results[0]
    bq = base["quality"] or {}
    for name, threshold in cfg.gates().items():
        for m in results[1:]:
            q, note = m["quality"] or {}, None
            if name == "min_speedup":
                value = m["speedup_per_image"] if m["speedup_per_image"] is not None else m["speedup_per_step"]
                metric = "speedup_per_image" if m["speedup_per_image"] is not None else "speedup_per_step"
                passed = value >= threshold and m["speedup_is_real"]
                if not m["speedup_is_real"]:
                    note = f"{m['kernels']['summary']}: not a real speedup"
            elif name == "min_psnr":
                metric, value = "psnr", q.get("psnr")
                passed = value is not None and value >= threshold
            elif name in METRIC_GATES:
                key, kind, op = METRIC_GATES[name]
                metric = key if kind == "value" else f"{key} ratio"
                value = (q.get("metrics") if kind == "value" else q.get("metric_ratios")) or {}
                value = value.get(key)
                passed = value is not None and (value >= threshold if op == ">=" else value <= threshold)
            elif name == "max_accuracy_drop":
                metric = "judge_accuracy drop"
                a, v = bq.get("judge_accuracy"), q.get("judge_accuracy")
                value = None if a is None or v is None else round(a - v, 6)
                passed = value is not None and value <= threshold
            else:  # max_fd_ratio
                metric = "judge_fd ratio"
                a, v = bq.get("judge_fd"), q.get("judge_fd")
                value = None if a is None or v is None else (v / a if a > 0 else (1.0 if v == 0 else math.inf))
                value = None if value is None or not math.isfinite(value) else round(value, 6)
                passed = value is not None and value <= threshold
            if value is None and note is None:
                note = "metric unavailable"
            gates.append(Gate(name=name, model=m["name"], metric=metric, value=value, threshold=threshold,
                              passed=bool(passed), note=note))
    return gates


def describe_failures(report: BenchReport) -> str:
    """One line naming each failed gate: 'min_speedup on x: 1.01 < 100; ...'."""
    parts = []
    for g in report.failed_gates():
        op = GATES[g["name"]][1].replace(">=", "<").replace("<=", ">")
        value = "n/a" if g["value"] is None else f"{g['value']:g}"
        extra = f" ({g['note']})" if g.get("note") else ""
        parts.append(f"{g['name']} on {g['model']}: {g['metric']} {value} {op} {g['threshold']:g}{extra}")
    return f"{len(parts)} quality gate(s) failed: " + "; ".join(parts)
