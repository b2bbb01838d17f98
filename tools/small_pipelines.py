"""Small random SD3 and Flux pipelines (more blocks than the test suite's 2-block models, so that step caching
has blocks to skip): the models docs/accelerate.md calibrates `ditkit cache` on for those families.

    .venv/bin/python tools/small_pipelines.py OUT

writes OUT/sd3 and OUT/flux (diffusers pipeline directories: the transformer, the test suite's tiny VAE and
scheduler, no text encoder) and OUT/sd3-emb.safetensors, OUT/flux-emb.safetensors (prompt embeddings). Random
weights: for speed and for PSNR against the uncached run, not for images.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import tiny  # noqa: E402
from ditkit.formats.families import get_family  # noqa: E402

# family -> what changes from its tiny_config(): 8 joint blocks at width 64 (sd3), 4 double + 8 single (flux)
SMALL = {"sd3": dict(num_layers=8, num_attention_heads=4, sample_size=16, caption_projection_dim=64),
         "flux": dict(num_layers=4, num_single_layers=8, num_attention_heads=4)}


def main(out: Path) -> None:
    for name, changes in SMALL.items():
        fam = get_family(name)
        config = {**fam.tiny_config(), **changes}
        type(fam).tiny_config = lambda self, c=config: c  # what tiny.py builds from (this process only)
        tiny.write_tiny_pipeline(name, out / name)
        tiny.tiny_embeddings(name, out / f"{name}-emb.safetensors")
        print(f"{out / name}: {config}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
