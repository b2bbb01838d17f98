"""Building blocks of the authors' key tables that family adapters declare (formats/original_keys.py maps them)."""
from __future__ import annotations

SWAP = "swap"  # stored (shift, scale) in the original layout

_BLOCK = r"transformer_blocks\.(\d+)\."
_SINGLE = r"single_transformer_blocks\.(\d+)\."
_WB = r"(weight|bias)$"
