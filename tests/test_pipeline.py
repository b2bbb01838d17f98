"""The whole chain (docs/examples/pipeline, quick setting) builds from the embedded default, its gated bench
passes, and make's dependencies hold: a re-run does nothing, a deleted output rebuilds only what needs it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "pipeline"
BIN = Path(sys.executable).parent


def make(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(PIPELINE), f"OUT={out}", f"VENV={BIN}/", *args],
                          capture_output=True, text=True, timeout=1800)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_quick_pipeline_builds_gates_and_rebuilds_only_what_changed(tmp_path):
    out = tmp_path / "quick"
    r = make(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "bench.json").read_text())
    assert doc["passed"] is True
    names = [m["name"] for m in doc["models"]]
    assert names == ["tiny-digits", "recovered", "fewstep", "quantized", "onnx"]
    fewstep = doc["models"][2]
    assert fewstep["steps"] == 4 and fewstep["speedup_per_image"] > 2  # 4 steps against the base's 25
    # the LoRA product is an adapter on the text default (issue 9), fused into a bundle and benched against it
    from ditkit.formats.lora import load_adapter

    adapter = load_adapter(out / "typed.safetensors")
    assert adapter.family == "pixart" and adapter.rank == 4 and adapter.info.get("trigger") == "typed"
    lora = json.loads((out / "lora-bench.json").read_text())["models"]
    assert [(m["name"], m["family"]) for m in lora] == [("tiny-digits-text", "pixart"), ("lora-fused", "pixart")]
    assert lora[1]["quality"]["identical"] is False  # the fused adapter changes the weights
    assert "Nothing to be done" in make(out).stdout
    shutil.rmtree(out / "quantized")
    plan = make(out, "-n").stdout
    assert "ditkit quantize" in plan and "ditkit bench" in plan
    assert not any(f"ditkit {c}" in plan for c in ("prune", "distill", "export", "lora-train"))
