"""Start-up fit for shell one-liners: `ditkit --help` and `--version` import no heavy library, and the static
command table of cli/main.py agrees with the command modules."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "bitsandbytes", "onnx", "onnxruntime", "peft", "accelerate",
         "matplotlib", "numpy")

PROBE = """
import json, sys
from ditkit.cli.main import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted({m.split('.')[0] for m in sys.modules})}), file=sys.stderr)
"""


def imported(*args: str) -> tuple[int, set[str]]:
    """The exit code and the top-level packages imported by `ditkit ARGS` in a fresh interpreter."""
    p = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    doc = json.loads(p.stderr.strip().splitlines()[-1])
    return doc["code"], set(doc["modules"])


@pytest.mark.parametrize("args", [["--help"], ["--version"], []])
def test_help_and_version_import_no_heavy_library(args):
    code, modules = imported(*args)
    assert code == (2 if not args else 0)
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_static_command_table_matches_the_modules():
    from ditkit.cli.main import COMMANDS, command_function

    for name, (_, help_) in COMMANDS.items():
        doc = inspect.getdoc(command_function(name))
        assert help_ == " ".join(doc.split("\n\n")[0].split()), f"cli/main.py COMMANDS[{name!r}] help is stale"


def test_a_command_prints_no_library_chatter_on_stderr():
    """`ditkit info` on the embedded default: stdout has the table, stderr nothing (the libraries that log on
    import, torchao through transformers, bitsandbytes, kernels, torch's pytree, are quieted in cli/main.py)."""
    p = subprocess.run([sys.executable, "-m", "ditkit.cli.main", "info", "tiny-digits"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "tiny-digits" in p.stdout
    assert p.stderr == "", p.stderr
