"""How a bench report is shown: rich tables, markdown (docs, PR comments), and a quality-vs-speed plot."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ditkit.formats.atomic import atomic_file


METRIC_LABELS = {"clip": "CLIP score (higher is better)", "fid": "FID (lower is better)",
                 "kid": "KID (lower is better)", "lpips": "LPIPS vs base (lower is better)"}


def _f(v, fmt: str = "{:.3g}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def _mb(v) -> str:
    return _f(None if v is None else v / 1e6, "{:.1f} MB")


def _count(v) -> str:
    return f"{v / 1e6:.2f}M" if v >= 1e5 else str(v)


def _speedup(m: dict, key: str) -> str:
    v = m[key]
    if v is None:
        return "-"
    return f"{v:.2f}x" + ("" if m["speedup_is_real"] else " (not real)")


def header(r: dict) -> str:
    cuda = f", CUDA {r['cuda']}" if r["cuda"] else ""
    return (f"{r['device']} ({r['device_name']}), {r['dtype']}, torch {r['torch']}{cuda}, {r['threads']} threads, "
            f"{r['world_size']} process(es); dense matmul peak {r['peak_flops'] / 1e9:.1f} GFLOP/s "
            f"({r['peak_flops_dtype']}, n={r['peak_flops_matmul']}, measured in this run); timing: "
            f"{r['timing']['warmup_rounds']} warm-up + {r['timing']['step_repeats']} per-step rounds, "
            f"1 + {r['timing']['image_repeats']} end-to-end rounds, interleaved; medians (p90); speedups: "
            f"median per-round ratios of {'CPU time' if r['speedup_basis'] == 'cpu-time' else 'wall time'}")


def sections(r: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of every table, shared by the rich and markdown renderers."""
    models = r["models"]
    b0 = models[0]["batch_size"]
    out = [("models", ["model", "role", "family", "kernels", "params", "disk (transformer / all)", "sampler", "steps"],
            [[m["name"], m["role"], m["family"], m["kernels"]["summary"], _count(m["params"]),
              f"{_mb(m['disk_bytes'])} / {_mb(m['disk_bytes_total'])}", m["sampler"] or "-", _f(m["steps"], "{}")]
             for m in models])]
    cpu = r["speedup_basis"] == "cpu-time"
    speed_cols = ["model", "ms/step (p90)", "ms/image (p90)"] + (["CPU ms/step", "CPU ms/image"] if cpu else []) + \
        ["images/s", "peak memory", "GFLOP/step", "MFU", "speedup/step", "speedup/image"]

    def speed_row(name, m, row):
        step = f"{row['latency_ms_per_step']:.3f} ({row['latency_ms_per_step_p90']:.3f})"
        image = ("-" if row["latency_ms_per_image"] is None else
                 f"{row['latency_ms_per_image']:.2f} ({row['latency_ms_per_image_p90']:.2f})")
        cpu_cells = [_f(row["cpu_ms_per_step"], "{:.3f}"), _f(row["cpu_ms_per_image"], "{:.2f}")] if cpu else []
        gflop = None if row["flops_per_step"] is None else row["flops_per_step"] / 1e9
        mfu = None if row["mfu"] is None else 100 * row["mfu"]
        real = {**row, "speedup_is_real": m["speedup_is_real"]}
        return [name, step, image, *cpu_cells, _f(row["images_per_s"], "{:.2f}"), _mb(row["peak_memory_bytes"]),
                _f(gflop, "{:.3f}"), _f(mfu, "{:.1f}%"), _speedup(real, "speedup_per_step"),
                _speedup(real, "speedup_per_image")]
    out.append((f"speed at batch {b0} (a step: 2 x batch rows where CFG is on)", speed_cols,
                [speed_row(m["name"], m, m["by_batch_size"][0]) for m in models]))
    if len(models[0]["by_batch_size"]) > 1:
        out.append(("speed by batch size", ["batch"] + speed_cols,
                    [[str(row["batch_size"])] + speed_row(m["name"], m, row)
                     for m in models for row in m["by_batch_size"]]))
    if any(m["quality"] for m in models):
        out.append(("quality vs the base, identical seeds", ["model", "images", "identical", "PSNR dB", "SSIM",
                                                              "judge accuracy", "judge FD"],
                    [[m["name"]] + ([str(q["n_images"]), "reference" if q["reference"] else _f(q["identical"], "{}"),
                                     _f(q["psnr"], "{:.2f}"), _f(q["ssim"], "{:.4f}"), _f(q["judge_accuracy"], "{:.3f}"),
                                     _f(q["judge_fd"], "{:.3f}")] if (q := m["quality"]) else ["-"] * 6)
                     for m in models]))
    names = _metric_names(models)
    if names:
        out.append(("quality metrics (--metric; ratio = model / base)", ["model"] + names,
                    [[m["name"]] + [_metric_cell(m["quality"], n) for n in names] for m in models]))
    if r.get("compile"):
        out.append(compile_section(r))
    if r.get("context"):
        c = r["context"]
        out.append((f"--parallel context ({c['engine']} plan, {c['world_size']} processes, batch {c['batch_size']}, "
                     f"median of {c['rounds']} rounds; one process: rank 0 alone)",
                     ["model", "tokens/process", "ms/image split", "ms/image one process", "speedup"],
                     [[name, str(m["tokens_per_process"]), _f(m["latency_ms_per_image"], "{:.1f}"),
                       _f(m.get("latency_ms_per_image_one_process"), "{:.1f}"), _f(m.get("speedup"), "{:.2f}x")]
                      for name, m in c["models"].items()]))
    if r["gates"]:
        out.append(("gates", ["gate", "model", "metric", "value", "threshold", "result"],
                    [[g["name"], g["model"], g["metric"], _f(g["value"], "{:g}", "n/a"), f"{g['threshold']:g}",
                      "pass" if g["passed"] else "FAIL" + (f" ({g['note']})" if g["note"] else "")]
                     for g in r["gates"]]))
    return out


def _metric_names(models: list[dict]) -> list[str]:
    names: list[str] = []
    for m in models:
        for n in ((m["quality"] or {}).get("metrics") or {}):
            if n not in names:
                names.append(n)
    return names


def _metric_cell(q: dict | None, name: str) -> str:
    v = ((q or {}).get("metrics") or {}).get(name)
    ratio = ((q or {}).get("metric_ratios") or {}).get(name)
    return _f(v, "{:.4g}") + ("" if ratio is None else f" ({ratio:.3f}x)")
def compile_section(r: dict) -> tuple[str, list[str], list[list[str]]]:
    """--compile: per model and batch size, compile time, compiled vs eager step (and image) time, the speedups."""
    c = r["compile"]
    cols = ["model", "batch", "compiled", "compile s", "graphs", "wall ms/step eager", "wall ms/step compiled",
            "compile speedup/step", "speedup/step eager", "speedup/step compiled", "compile speedup/image",
            "speedup/image eager", "speedup/image compiled", "max abs diff"]
    rows = []
    for m in c["models"]:
        state = m["mode"] if m["compiled"] else "no: " + (m["reason"] or "")
        if m["compiled"] and m["note"]:
            state += f" ({m['note']})"
        for i, row in enumerate(m["by_batch_size"]):
            x = [_f(row.get(k), "{:.2f}x") for k in ("speedup_from_compile_per_step", "speedup_per_step_uncompiled",
                                                     "speedup_per_step", "speedup_from_compile_per_image",
                                                     "speedup_per_image_uncompiled", "speedup_per_image")]
            rows.append([m["name"], str(row["batch_size"]), state if i == 0 else "",
                         _f(m["compile_seconds"], "{:.1f}") if i == 0 else "", str(m["graphs"]) if i == 0 else "",
                         _f(row["latency_ms_per_step_uncompiled"], "{:.3f}"), _f(row["latency_ms_per_step"], "{:.3f}"),
                         *x, _f(m["max_abs_diff"], "{:.1e}") if i == 0 else ""])
    title = (f"torch.compile ({c['backend']}, dynamic=False; compile s: first compiled calls, trace + build + one run; "
             f"preflight {c['preflight_seconds']:.1f} s; graphs built while timing: {c['graphs_during_timing']})")
    return title, cols, rows


def print_tables(r: dict) -> None:
    import sys

    from rich.console import Console

    console = Console(file=sys.stdout, soft_wrap=True)
    if not console.is_terminal:  # a pipe or file: wide enough that no cell wraps
        console = Console(file=sys.stdout, width=200, soft_wrap=True)
    console.print(header(r))
    for w in r["warnings"]:
        console.print(f"warning: {w}")
    for title, cols, rows in sections(r):
        table = Table(title=title, title_justify="left")
        for c in cols:
            table.add_column(c, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def markdown(r: dict, command: str | None = None) -> str:
    lines = []
    if command:
        lines += [f"`{command}`", ""]
    lines += [header(r) + ".", ""]
    lines += [f"> warning: {w}" for w in r["warnings"]] + ([""] if r["warnings"] else [])
    for title, cols, rows in sections(r):
        lines += [f"**{title}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> list[str]:
    """Quality against speed (and latency against size) for every model; returns the labels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = r["models"]
    judged = any(m["quality"] and m["quality"]["judge_accuracy"] is not None for m in models)
    metric_panels = _metric_names(models)
    panels = ["ssim"] + (["judge"] if judged else []) + metric_panels + ["latency"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    drawn = []

    def speed(m):
        return m["speedup_per_image"] if m["speedup_per_image"] is not None else m["speedup_per_step"]

    for ax, panel in zip(axes[0], panels):
        for m in models:
            q = m["quality"] or {}
            if panel == "latency":
                x, y = m["params"] / 1e6, m["latency_ms_per_step"]
            elif panel == "ssim":
                x, y = speed(m), 1.0 if q.get("reference") else q.get("ssim")
            elif panel in metric_panels:
                x, y = speed(m), (q.get("metrics") or {}).get(panel)
            else:
                x, y = speed(m), q.get("judge_accuracy")
            if y is None:
                continue
            marker = "s" if m["role"] == "base" else "o"
            ax.scatter([x], [y], marker=marker, s=50, zorder=3)
            ax.annotate(m["name"] + ("" if m["speedup_is_real"] else " (not real)"), (x, y),
                        textcoords="offset points", xytext=(6, 6), fontsize=9)
            drawn.append(f"{panel}:{m['name']}")
        if panel == "latency":
            ax.set(xlabel="transformer parameters (M)", ylabel="ms per step (median)", title="latency vs size")
            ys = [m["latency_ms_per_step"] for m in models]
            if max(ys) > 20 * min(ys):
                ax.set_yscale("log")
        else:
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
            ylabel, title = {"ssim": ("SSIM vs base", "quality vs speed"),
                             "judge": ("judge class accuracy", "judge accuracy vs speed")}.get(
                panel, (METRIC_LABELS.get(panel, panel), f"{panel} vs speed"))
            ax.set(xlabel="speedup vs base (per image; per step for bare transformers)", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.margins(0.25)
    fig.suptitle(f"ditkit bench: {r['device_name']}, {r['dtype']}, batch {models[0]['batch_size']}", fontsize=10)
    fig.tight_layout()
    with atomic_file(Path(path), force=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return drawn
