"""The dtype names ditkit accepts (--dtype, --compute-dtype, a quantized module's spec) and their torch dtypes."""
from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
