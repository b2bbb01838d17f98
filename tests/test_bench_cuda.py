"""tools/bench_cuda.py (make bench-cuda), checked on CPU: the dry run lists every step within 8 minutes, every
ditkit command it would run parses, a step over its budget is killed and reported, and the slimmed
bitsandbytes wheel keeps a consistent RECORD."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_cuda  # noqa: E402

EXPECTED = ["install", "gpu-tests", "archs", "dit:depth50", "dit:width30", "dit:int8", "dit:fp8", "dit:nf4",
            "pixart:int8", "pixart:fp8", "pixart:nf4", "tiny:feedback", "bench:dit",
            "bench:dit:compile", "bench:pixart", "bench:tiny"]


@pytest.fixture(scope="module")
def dry_run():
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_cuda.py"), "--dry-run"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    return p


def test_dry_run_lists_every_step_within_8_minutes(dry_run):
    assert dry_run.returncode == 0, dry_run.stderr
    out = dry_run.stdout
    m = re.search(r"(\d+) steps, budgets (\d+) s of 480 s", out)
    assert m and int(m.group(1)) == len(EXPECTED) and int(m.group(2)) <= 480, out
    listed = re.findall(r"^\s*(\d+) s  (\S+)", out, flags=re.M)
    assert [name for _, name in listed] == EXPECTED
    assert sum(int(b) for b, _ in listed) == int(m.group(2))
    # the compile steps are there either way; the dry run says whether this ditkit has the flag
    assert re.search(r"ditkit bench --compile: (present|absent)", out)
    for line in ("not benched:", "onnxruntime-gpu is not carried"):
        assert line in out


def test_plan_budgets_and_dependencies(tmp_path):
    steps = bench_cuda.plan(tmp_path, tmp_path / "whl")
    assert [s.name for s in steps] == EXPECTED
    assert sum(s.budget_s for s in steps) <= bench_cuda.TOTAL_BUDGET_S == 480
    assert all(s.budget_s > 0 for s in steps)
    names = [s.name for s in steps]
    for i, s in enumerate(steps):
        assert all(n in names[:i] for n in s.needs), s.name  # a step only needs earlier ones
    assert bench_cuda.plan(tmp_path, tmp_path, install=False)[0].name == "gpu-tests"


def test_bench_commands_take_only_built_variants(tmp_path):
    steps = {s.name: s for s in bench_cuda.plan(tmp_path, tmp_path)}
    for n in ("dit:int8", "dit:depth50"):
        steps[n].status = "passed"
    steps["dit:fp8"].status = "timed out"
    argv, _ = bench_cuda.bench_argv(steps["bench:dit"], steps, tmp_path)
    models = [a for a in argv if a.startswith(str(tmp_path))]
    assert models == [str(tmp_path / "archs" / "dit-xl-2-256"), str(tmp_path / "variants" / "dit-depth50"),
                      str(tmp_path / "variants" / "dit-int8")]
    assert "--compile" not in argv and ["--device", "cuda"] == argv[argv.index("--device"):argv.index("--device") + 2]
    argv, _ = bench_cuda.bench_argv(steps["bench:dit:compile"], steps, tmp_path)
    assert argv[-1] == "--compile" and str(tmp_path / "variants" / "dit-depth50") not in argv
    assert bench_cuda.bench_argv(steps["bench:tiny"], steps, tmp_path)[0] is None  # nothing built


def test_every_ditkit_command_parses(tmp_path, cli):
    """Each option a step passes exists in that command's --help (a typo would cost device time)."""
    steps = bench_cuda.plan(tmp_path, tmp_path)
    by_name = {s.name: s for s in steps}
    argvs = [s.argv for s in steps if s.argv and s.argv[1:3] == ["-m", "ditkit.cli.main"]]
    argvs += [bench_cuda.bench_argv(s, by_name, tmp_path, assume_built=True)[0] for s in steps if s.argv is None]
    helps = {}
    for argv in argvs:
        command = argv[3]
        if command not in helps:
            r = cli(command, "--help")
            assert r.code == 0, r.err
            helps[command] = r.out
        for opt in (a for a in argv[4:] if a.startswith("--")):
            if opt == "--compile":
                continue  # optional: skipped at run time where bench lacks it
            assert re.search(rf"{re.escape(opt)}\b", helps[command]), f"ditkit {command} has no {opt}"


def test_step_over_budget_is_killed_and_reported(tmp_path):
    step = bench_cuda.Step("sleeper", 1, None, "sleeps past its budget")
    lines = []
    bench_cuda.run_step(step, [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                        1, {}, lines.append)
    assert step.status == "timed out" and step.seconds < 30 and "started" in step.stdout
    ok = bench_cuda.Step("fails", 5, None, "exits 3")
    bench_cuda.run_step(ok, [sys.executable, "-c", "import sys; sys.exit(3)"], 5, {}, lines.append)
    assert ok.status == "failed" and ok.note == "exit 3"


def test_slim_bnb_drops_other_cuda_libraries(tmp_path):
    w = tmp_path / "bitsandbytes-0.0-py3-none-manylinux_2_24_x86_64.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda118.so",
             "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_rocm64.so"]
    record = "".join(f"{n},sha256=x,1\n" for n in names) + "bitsandbytes-0.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(w, "w") as z:
        for n in names:
            z.writestr(n, b"x" * 100)
        z.writestr("bitsandbytes-0.0.dist-info/RECORD", record)
    bench_cuda.slim_bnb(w)
    with zipfile.ZipFile(w) as z:
        kept = set(z.namelist())
        rec = z.read("bitsandbytes-0.0.dist-info/RECORD").decode()
    assert kept == {names[0], names[1], names[3], "bitsandbytes-0.0.dist-info/RECORD"}
    assert "cuda118" not in rec and "rocm64" not in rec and "cuda130" in rec


def test_gpu_tests_collect_and_skip_with_reason():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU tests run instead of skipping")
    p = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "test_gpu.py")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:]
    skips = re.findall(r"^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$", p.stdout, flags=re.M)
    assert skips and all("no CUDA device" in why for _, why in skips), p.stdout
    assert sum(int(n) for n, _ in skips) >= 15
    assert re.search(r"(\d+) skipped", p.stdout)


def test_pixart_1024_shape():
    import torch

    import archs

    with torch.device("meta"):  # the published shape, without allocating 611M weights
        m = archs.build("pixart-alpha-1024")
    c = m.config
    assert (c.sample_size // c.patch_size) ** 2 == 4096 and c.num_layers == 28 and c.use_additional_conditions
    assert 600e6 < sum(p.numel() for p in m.parameters()) < 620e6


def test_driver_reports_every_step(tmp_path, monkeypatch):
    """The run loop, on CPU with stand-in steps: a pass, a failure, a step needing the failure, one over budget."""
    py = sys.executable
    steps = [bench_cuda.Step("ok", 20, [py, "-c", "print('fine')"], "passes"),
             bench_cuda.Step("bad", 20, [py, "-c", "import sys; sys.exit(2)"], "fails"),
             bench_cuda.Step("after-bad", 20, [py, "-c", "print('never')"], "needs bad", needs=["bad"]),
             bench_cuda.Step("slow", 1, [py, "-c", "import time; time.sleep(30)"], "over budget")]
    monkeypatch.setattr(bench_cuda, "plan", lambda work, wheels, install=True: steps)
    code = bench_cuda.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--no-install"])
    assert code == 1  # a step failed
    doc = __import__("json").loads((tmp_path / "out" / "results.json").read_text())
    got = {s["name"]: (s["status"], s["note"]) for s in doc["steps"]}
    assert got == {"ok": ("passed", ""), "bad": ("failed", "exit 2"), "after-bad": ("skipped", "needs bad"),
                   "slow": ("timed out", "killed at its 1 s budget")}
    md = (tmp_path / "out" / "bench-cuda.md").read_text()
    assert "| slow | 1 s | timed out |" in md and "Not benched:" in md
    assert "fine" in (tmp_path / "out" / "bench-cuda.log").read_text()
