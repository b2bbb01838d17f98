"""The folders install as one namespace: every source package is listed in pyproject's mapping."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_mapped():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = tool["package-dir"]
    on_disk = set()
    for top, name in (("cli", "ditkit.cli"), ("ops", "ditkit.ops"), ("formats", "ditkit.formats"), ("nn", "ditkit.nn")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            on_disk.add(".".join((name, *rel)))
    assert on_disk == set(tool["packages"]), "pyproject [tool.setuptools] packages is out of date"
    for pkg in on_disk:
        assert (ROOT / mapping[pkg] / "__init__.py").is_file(), pkg
    assert not any(p.split(".")[0] != "ditkit" for p in tool["packages"])  # no generic top-level names
