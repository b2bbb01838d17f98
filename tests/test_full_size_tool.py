"""tools/full_size.py's full-size models: the published parameter counts (built on the meta device, no memory) in a
layout formats/authors.py reads for their family."""
import importlib.util
from pathlib import Path

import diffusers
import pytest
import torch

from ditkit.formats import authors
from ditkit.formats.families import get_family

TOOL = Path(__file__).resolve().parents[1] / "tools" / "full_size.py"
spec = importlib.util.spec_from_file_location("full_size", TOOL)
full_size = importlib.util.module_from_spec(spec)
spec.loader.exec_module(full_size)

PARAMS = {"pixart-xl-2-1024-ms": 611_349_152, "sd3-medium": 2_028_328_000, "flux-3072-2x2": 1_026_971_200}


@pytest.mark.parametrize("name", sorted(full_size.CONFIGS))
def test_full_size_models_have_the_published_sizes_and_an_authors_layout(name):
    cls, layout, suffix, prefix, _dims = full_size.KINDS[name]
    with torch.device("meta"):  # full size, no memory
        model = getattr(diffusers, cls)(**full_size.CONFIGS[name])
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    lay = authors.AUTHORS_LAYOUTS[layout]
    assert lay.file_prefix == prefix or suffix == ".pth"
    assert get_family(lay.family).transformer_class == cls
