"""The one-shot CUDA run: install from carried wheels, run the GPU tests, bench full-size shapes in bf16, write tables.

    python3 tools/bench_cuda.py [--out DIR] [--dry-run] [--wheels .whl] [--work /tmp/ditkit-bench-cuda]
    python3 tools/bench_cuda.py --make-wheels .whl      # here, with network: fill .whl (make wheels-cuda)

(`make bench-cuda` runs the first form, writing into $OUT.) Made for a bare GPU machine that has torch and CUDA
but not diffusers, bitsandbytes, torch-pruning or ditkit: every step is a subprocess with a time budget (killed
and reported when it runs over; the script moves on), and the budgets add up to at most 8 minutes. Steps:
  1. install: ditkit and its missing dependencies from the wheels in --wheels (pip --no-index --target);
  2. gpu-tests: `pytest -m gpu -rs tests/test_gpu.py`;
  3. archs: random-weight DiT-XL/2 256px and PixArt-alpha 1024px (tools/archs.py) written in bf16, and random
     T5-shaped prompt embeddings for PixArt;
  4. variants, each with the ditkit command a user would run (depth 0.5, width 0.3, int8, fp8, nf4; a
     feedback module on tiny-digits, the model it is trained for);
  5. bench: `ditkit bench --device cuda --dtype bf16` of each base against its variants, then again with
     `--compile` where ditkit bench has that flag (said in the output when it has not);
  6. DIR/bench-cuda.md: the tables for docs/benchmarks.md's CUDA section, and every step's status and time.
`--dry-run` prints every step with its budget and the command it would run, and runs nothing (CPU is fine).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 480  # the whole run: 8 minutes of a 10-minute device command, leaving time to copy results back
PY = sys.executable
PIXART_TOKENS = 120  # PixArt-alpha's T5 max_sequence_length
XL_CALIB = ["--calib-samples", "1", "--calib-steps", "4", "--calib-points", "2", "--no-timing"]
BENCH = ["--device", "cuda", "--dtype", "bf16", "--batch-sizes", "1,8", "--num-images", "0", "--warmup", "2",
         "--repeats", "10", "--json"]
TINY_BENCH = ["--device", "cuda", "--batch-sizes", "1", "--num-images", "20", "--warmup", "2", "--repeats", "10",
              "--image-repeats", "3", "--json"]

# what the device's image lacks, pinned to what the project is tested with (pip download --no-deps: their own
# needs are already there: huggingface_hub, numpy, safetensors, ...)
WHEELS = ["diffusers==0.42.1", "bitsandbytes==0.50.2", "torch-pruning==1.6.1", "gguf==0.19.0"]
WHEEL_PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                  *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                                "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64", "any")
                    for a in ("--platform", p)]]
# bitsandbytes ships one CUDA library per CUDA release (135 MB of them); the device's torch is built for CUDA 13,
# so only those (and the CPU one) travel: 43 MB -> about 4 MB
BNB_KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")
CARRY_LIMIT = 64 << 20  # what travels to the device machine: the working tree + the wheels
ORT_GPU_NOTE = ("onnxruntime-gpu is not carried: its cp312 manylinux wheel (1.31.1) alone is 244 MiB (the CUDA "
                "execution provider's libraries), far past the 64 MiB that travels; test_gpu.py's ORT CUDA parity "
                "test skips without it")


@dataclass
class Step:
    name: str
    budget_s: int
    argv: list[str] | None  # None: computed when the step runs (bench: the variants that were built)
    what: str
    needs: list[str] = field(default_factory=list)  # steps that must have passed
    compile: bool = False  # runs only where `ditkit bench` has --compile
    status: str = "pending"  # passed | failed | timed out | skipped
    seconds: float = 0.0
    note: str = ""
    stdout: str = ""
    stderr: str = ""


def ditkit(*args: str) -> list[str]:
    return [PY, "-m", "ditkit.cli.main", *args]


def plan(work: Path, wheels: Path, install: bool = True) -> list[Step]:
    """Every step, in order, with its budget (seconds). Variant steps are named ARCH:VARIANT."""
    a, v = work / "archs", work / "variants"
    dit, pix, emb = a / "dit-xl-2-256", a / "pixart-alpha-1024", a / "pixart-t5-120.safetensors"
    steps = []
    if install:
        steps.append(Step("install", 25, [PY, str(Path(__file__).resolve()), "--install", str(wheels),
                                          "--site", str(work / "site")],
                          "ditkit + diffusers, bitsandbytes, torch-pruning, gguf from the carried wheels"))
    steps += [
        Step("gpu-tests", 100, [PY, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider",
                                str(ROOT / "tests" / "test_gpu.py")], "pytest -m gpu (tests/test_gpu.py)"),
        Step("archs", 30, [PY, str(Path(__file__).resolve()), "--archs", str(a)],
             "random-weight DiT-XL/2 256px and PixArt-alpha 1024px in bf16, random T5-shaped embeddings"),
    ]
    variants = [  # (arch, variant, budget, the ditkit command)
        ("dit", "depth50", 20, ["prune", str(dit), "--method", "depth", "--ratio", "0.5", *XL_CALIB,
                                "--device", "cuda", "--dtype", "bf16"]),
        ("dit", "width30", 20, ["prune", str(dit), "--method", "width", "--ratio", "0.3", *XL_CALIB,
                                "--device", "cuda", "--dtype", "bf16"]),
        ("dit", "int8", 15, ["quantize", str(dit), "--scheme", "int8-dynamic", "--device", "cuda"]),
        ("dit", "fp8", 15, ["quantize", str(dit), "--scheme", "fp8", "--device", "cuda"]),
        ("dit", "nf4", 15, ["quantize", str(dit), "--scheme", "bnb-nf4", "--compute-dtype", "bf16",
                            "--device", "cuda"]),
        ("pixart", "int8", 15, ["quantize", str(pix), "--scheme", "int8-dynamic", "--device", "cuda"]),
        ("pixart", "fp8", 15, ["quantize", str(pix), "--scheme", "fp8", "--device", "cuda"]),
        ("pixart", "nf4", 15, ["quantize", str(pix), "--scheme", "bnb-nf4", "--compute-dtype", "bf16",
                               "--device", "cuda"]),
        ("tiny", "feedback", 35, ["distill", "tiny-digits", "--mode", "feedback", "--steps", "60",
                                  "--val-images", "8", "--validate-every", "0", "--checkpoint-every", "1000",
                                  "--device", "cuda"]),
    ]
    for arch, name, budget, args in variants:
        needs = ["archs"] if arch != "tiny" else []
        steps.append(Step(f"{arch}:{name}", budget, ditkit(*args, "-o", str(v / f"{arch}-{name}"), "--force"),
                          f"ditkit {args[0]} ({name})", needs=needs))
    for arch, budget, cbudget in (("dit", 35, 40), ("pixart", 30, 0), ("tiny", 20, 0)):
        steps.append(Step(f"bench:{arch}", budget, None, f"ditkit bench {arch} base vs its built variants, eager",
                          needs=["archs"] if arch != "tiny" else []))
        if cbudget:  # compile time is paid per model: only DiT-XL/2 (base and its int8 / fp8) fits the budget
            steps.append(Step(f"bench:{arch}:compile", cbudget, None,
                              f"ditkit bench {arch} base, int8, fp8 with --compile", needs=["archs"], compile=True))
    return steps


def skipped_variants() -> list[str]:
    return ["PixArt-alpha 1024px depth 0.5 / width 0.3: prune calibrates a text family on sampled trajectories "
            "from prompt embeddings, which does not fit the budget beside DiT-XL/2's (which show the same cut)",
            "cache policies: `ditkit cache` calibrates on one CPU thread (its cost model and end-to-end checks): "
            "325 s for tiny-digits at 1.5x (`--method forecast --images 2`, a loaded 2-core Xeon, 2026-12-03), "
            "minutes more for a 28-block model, past this run's budget; caching under --compile is tested on CPU "
            "(tests/test_compile.py)",
            "feedback on DiT-XL/2 and PixArt: needs training on the model's own trajectories (tens of minutes); "
            "a 60-step feedback module on tiny-digits is trained and benched instead",
            ORT_GPU_NOTE]


def bench_argv(step: Step, steps: dict[str, Step], work: Path, assume_built: bool = False) -> tuple[list[str] | None, str]:
    """The bench command for a bench step: its base and the variants whose build passed (all, with assume_built)."""
    parts = step.name.split(":")
    arch = parts[1]
    a, v = work / "archs", work / "variants"
    base = {"dit": str(a / "dit-xl-2-256"), "pixart": str(a / "pixart-alpha-1024"), "tiny": "tiny-digits"}[arch]
    built = [n.split(":")[1] for n, s in steps.items() if n.startswith(arch + ":") and s.argv is not None
             and (assume_built or s.status == "passed")]
    if step.compile:
        built = [n for n in built if n in ("int8", "fp8")]
    args = [base, *(str(v / f"{arch}-{n}") for n in built)]
    if arch == "pixart":
        args += ["--embeddings", str(a / "pixart-t5-120.safetensors")]
    args += TINY_BENCH if arch == "tiny" else BENCH
    if step.compile:
        args.append("--compile")
    if arch == "tiny" and not built:
        return None, "no tiny-digits variant was built"
    return ditkit("bench", *args), ""


def has_compile(env: dict) -> bool:
    try:
        p = subprocess.run(ditkit("bench", "--help"), capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--compile" in p.stdout


def run_step(step: Step, argv: list[str], budget: float, env: dict, log) -> None:
    """Run argv in its own process group; kill the group at the budget."""
    t0 = time.monotonic()
    log(f"\n=== {step.name} (budget {budget:.0f} s): {shlex.join(argv)}")
    p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=budget)
        step.status = "passed" if p.returncode == 0 else "failed"
        step.note = "" if p.returncode == 0 else f"exit {p.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        step.status, step.note = "timed out", f"killed at its {budget:.0f} s budget"
    step.seconds = round(time.monotonic() - t0, 1)
    step.stdout, step.stderr = out or "", err or ""
    json_out = step.stdout.lstrip().startswith("{")
    log((step.stderr + ("" if json_out else step.stdout)).rstrip())  # a JSON report goes to results.json
    log(f"=== {step.name}: {step.status} in {step.seconds} s {step.note}")


def dry_run(steps: list[Step], env: dict, check_compile: bool, work: Path) -> int:
    total = sum(s.budget_s for s in steps)
    print(f"bench-cuda plan: {len(steps)} steps, budgets {total} s of {TOTAL_BUDGET_S} s")
    compile_flag = has_compile(env) if check_compile else None
    if compile_flag is not None:
        print(f"ditkit bench --compile: {'present' if compile_flag else 'absent (the compile steps will be skipped)'}")
    for s in steps:
        argv = s.argv or bench_argv(s, {x.name: x for x in steps}, work, assume_built=True)[0]
        cmd = shlex.join(argv) + ("" if s.argv else "  (the variants whose build passed)")
        extra = ""
        if s.compile and compile_flag is False:
            extra = "  [skipped: ditkit bench has no --compile flag in this build]"
        print(f"{s.budget_s:>4} s  {s.name:<22} {s.what}{extra}\n        {cmd}")
    print("not benched:")
    for line in skipped_variants():
        print(f"  - {line}")
    if total > TOTAL_BUDGET_S:
        print(f"budgets add up to {total} s, over {TOTAL_BUDGET_S} s", file=sys.stderr)
        return 1
    return 0


# -- steps that run in their own process ---------------------------------------------------------------------

def install(wheels: Path, site: Path) -> int:
    """pip install --no-index --no-deps the carried wheels into `site`; ditkit from source when no wheel of it."""
    found = sorted(wheels.glob("*.whl"))
    pip = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site)]
    if found:
        subprocess.run([*pip, *map(str, found)], check=True)
    if not any(w.name.startswith("ditkit-") for w in found):
        subprocess.run([*pip, "--no-build-isolation", str(ROOT)], check=True)
    import importlib.metadata as md

    for d in sorted(md.distributions(path=[str(site)]), key=lambda d: d.metadata["Name"].lower()):
        print(f"installed {d.metadata['Name']} {d.version}")
    for name in ("torch", "onnxruntime", "onnxruntime-gpu"):  # the machine's own
        try:
            print(f"present {name} {md.version(name)}")
        except md.PackageNotFoundError:
            print(f"absent {name}")
    return 0


def build_archs(out: Path) -> int:
    """DiT-XL/2 and PixArt-alpha 1024px, random weights initialised on the GPU, saved in bf16."""
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    import archs
    from ditkit.formats.embeddings import save_embeddings

    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("dit-xl-2-256", "pixart-alpha-1024"):
        t0 = time.perf_counter()
        try:  # initialising 750M weights on the GPU takes a fraction of the CPU's time
            with torch.device(device):
                model = archs.build(name).to(torch.bfloat16)
        except (RuntimeError, NotImplementedError) as e:
            print(f"{name}: building on {device} failed ({e}); building on the CPU")
            device = "cpu"
            model = archs.build(name).to(torch.bfloat16)
        model.save_pretrained(out / name, safe_serialization=True)
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{time.perf_counter() - t0:.1f} s on {device} -> {out / name}")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(0)
    rows = {"prompt_embeds": torch.randn(1, PIXART_TOKENS, 4096, generator=g) * 0.1,
            "prompt_attention_mask": torch.ones(1, PIXART_TOKENS, dtype=torch.long)}
    save_embeddings(out / "pixart-t5-120.safetensors", ["random T5-shaped embedding"], rows,
                    {k: x.clone() for k, x in rows.items()})
    return 0


# -- here, with network: the wheels that travel ---------------------------------------------------------------

def slim_bnb(wheel: Path) -> Path:
    """Rewrite bitsandbytes' wheel without the CUDA libraries of other CUDA releases (and its RECORD to match)."""
    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        drop = {i.filename for i in src.infolist() if i.filename.endswith(".so")
                and not i.filename.endswith(BNB_KEEP)}
        for info in src.infolist():
            if info.filename in drop:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(l for l in data.decode().splitlines(True) if l.split(",")[0] not in drop).encode()
            dst.writestr(info, data)
    tmp.replace(wheel)
    return wheel


def make_wheels(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    subprocess.run([PY, "-m", "pip", "download", "-q", "--no-deps", *WHEEL_PLATFORM, "-d", str(out), *WHEELS],
                   check=True)
    # setuptools stages the package in build/ and reuses it: a module moved since the last build would stay in it
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    try:
        subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
                       check=True)
    finally:
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    for w in out.glob("bitsandbytes-*.whl"):
        slim_bnb(w)
    tree = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.split("\0")
    tree_bytes = sum((ROOT / f).stat().st_size for f in tree if f and (ROOT / f).is_file())
    total = 0
    for w in sorted(out.glob("*.whl")):
        total += w.stat().st_size
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    print(f"{total / 2**20:8.2f} MiB  wheels\n{tree_bytes / 2**20:8.2f} MiB  working tree\n"
          f"{(total + tree_bytes) / 2**20:8.2f} MiB  travels (limit {CARRY_LIMIT / 2**20:.0f} MiB)")
    print(ORT_GPU_NOTE)
    return 0 if total + tree_bytes <= CARRY_LIMIT else 1


# -- the report -----------------------------------------------------------------------------------------------

def render(steps: list[Step], reports: dict, compile_flag: bool, started: str) -> str:
    try:
        from ditkit.cli.bench_render import markdown
    except ImportError:
        markdown = None
    out = ["## CUDA", "", f"Ran {started} by `make bench-cuda` (tools/bench_cuda.py).", ""]
    device = next((r["report"]["device_name"] for r in reports.values()), None)
    if device:
        out += [f"Device: {device}; torch {next(iter(reports.values()))['report']['torch']}.", ""]
    if not compile_flag:
        out += ["`--compile` runs: skipped, `ditkit bench` has no `--compile` flag in this build.", ""]
    for name, rec in reports.items():
        out += [f"### {name}", ""]
        out += [markdown(rec["report"], command=rec["command"]) if markdown else "```json\n" +
                json.dumps(rec["report"], indent=1) + "\n```", ""]
    out += ["### Steps", "", "| step | budget | status | seconds | note |", "|---|---|---|---|---|"]
    out += [f"| {s.name} | {s.budget_s} s | {s.status} | {s.seconds} | {s.note} |" for s in steps]
    out += ["", "Not benched:", "", *[f"- {line}" for line in skipped_variants()], ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 tools/bench_cuda.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out/bench-cuda")))
    ap.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ditkit-bench-cuda"))
    ap.add_argument("--dry-run", action="store_true", help="print every step with its budget; run nothing")
    ap.add_argument("--no-install", action="store_true", help="ditkit and its dependencies are already installed")
    ap.add_argument("--no-compile-check", action="store_true",
                    help="--dry-run: do not ask `ditkit bench --help` whether --compile exists")
    ap.add_argument("--make-wheels", type=Path, metavar="DIR", help="download the wheels that travel into DIR")
    ap.add_argument("--install", type=Path, metavar="WHEELS", help=argparse.SUPPRESS)
    ap.add_argument("--site", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--archs", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.make_wheels:
        return make_wheels(a.make_wheels)
    if a.install:
        return install(a.install, a.site)
    if a.archs:
        return build_archs(a.archs)

    site = a.work / "site"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(a.work / "inductor")}
    if not a.no_install:
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    steps = plan(a.work, a.wheels, install=not a.no_install)
    if a.dry_run:
        return dry_run(steps, env, check_compile=not a.no_compile_check, work=a.work)

    a.out.mkdir(parents=True, exist_ok=True)
    logf = open(a.out / "bench-cuda.log", "w")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.monotonic()
    by_name = {s.name: s for s in steps}
    reports: dict[str, dict] = {}
    compile_flag = None
    for s in steps:
        left = TOTAL_BUDGET_S - (time.monotonic() - t_start)
        missing = [n for n in s.needs if by_name[n].status != "passed"]
        if missing:
            s.status, s.note = "skipped", f"needs {', '.join(missing)}"
        elif left < 5:
            s.status, s.note = "skipped", "the 8-minute budget is spent"
        if s.status == "skipped":
            log(f"\n=== {s.name}: skipped ({s.note})")
            continue
        argv = s.argv
        if argv is None:
            if s.compile:
                compile_flag = has_compile(env) if compile_flag is None else compile_flag
                if not compile_flag:
                    s.status, s.note = "skipped", "ditkit bench has no --compile flag in this build"
                    log(f"\n=== {s.name}: skipped ({s.note})")
                    continue
            argv, why = bench_argv(s, by_name, a.work)
            if argv is None:
                s.status, s.note = "skipped", why
                log(f"\n=== {s.name}: skipped ({why})")
                continue
        run_step(s, argv, min(s.budget_s, left), env, log)
        if s.name == "install" and s.status == "passed":
            sys.path.insert(0, str(site))  # the report renders with ditkit's own markdown tables
        if s.name == "gpu-tests":
            (a.out / "gpu-tests.txt").write_text(s.stdout + s.stderr)
        if s.name.startswith("bench:") and s.status == "passed":
            try:
                doc = json.loads(s.stdout)
            except ValueError:
                s.status, s.note = "failed", "no JSON report on stdout"
                continue
            reports[s.name] = {"command": "ditkit " + shlex.join(argv[3:]), "report": doc}
    compile_flag = bool(compile_flag)
    md = render(steps, reports, compile_flag, started)
    (a.out / "bench-cuda.md").write_text(md)
    (a.out / "results.json").write_text(json.dumps(
        {"started": started, "seconds": round(time.monotonic() - t_start, 1), "compile_flag": compile_flag,
         "steps": [{k: getattr(s, k) for k in ("name", "budget_s", "status", "seconds", "note", "what")}
                   for s in steps], "reports": reports}, indent=1))
    log(f"\nwrote {a.out / 'bench-cuda.md'}, results.json, gpu-tests.txt, bench-cuda.log "
        f"({time.monotonic() - t_start:.0f} s)")
    logf.close()
    return 0 if all(s.status in ("passed", "skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
