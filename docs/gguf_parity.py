"""Re-run the GGUF parity figures quoted in docs/export.md: the output SQNR (dB) of each family's transformer
rebuilt from a GGUF of each quant type, against the float model, on export's own parity inputs
(ops/export/gguf.check_gguf: batch 2, seed 3). Random weights, seed 0.

    .venv/bin/python docs/gguf_parity.py            # width 32 (tiny_config) and width 256 (heads 2 x 128)
Prints one JSON line per (family, width, quant).
"""
from __future__ import annotations

import json
import warnings


def main() -> None:
    import torch

    from ditkit.formats.bundle import Bundle
    from ditkit.formats.families import FAMILIES
    from ditkit.formats.gguf import QUANTS
    from ditkit.ops.export import ExportConfig, ExportReport
    from ditkit.ops.export.gguf import check_gguf

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    wide = {"attention_head_dim": 128}
    extra = {"sd3": {"joint_attention_dim": 256, "caption_projection_dim": 256, "pooled_projection_dim": 256},
             "flux": {"joint_attention_dim": 256, "pooled_projection_dim": 256, "axes_dims_rope": (16, 56, 56)},
             "pixart": {"cross_attention_dim": 256, "caption_channels": 256}, "dit": {}}
    for name, fam in FAMILIES.items():
        for width, over in ((32, {}), (256, {**wide, **extra.get(name, {})})):
            torch.manual_seed(0)
            tr = fam.transformer_cls()(**{**fam.tiny_config(), **over}).eval()
            for quant in QUANTS:
                rep = ExportReport(format="gguf", family=name, precision="fp32", output="file")
                _, rep = check_gguf(Bundle(family=fam, transformer=tr), ExportConfig(format="gguf", quant=quant), rep)
                print(json.dumps({"family": name, "width": width, "quant": quant, "sqnr_db": rep.sqnr_db,
                                  "types": rep.tensor_types}), flush=True)


if __name__ == "__main__":
    main()
