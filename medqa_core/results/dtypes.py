"""The compute dtypes' names, in one table: ``--dtype``'s short names and the names records carry.

A run record's ``numerics`` holds both (``requested: "bf16"``, ``compute_dtype: "bfloat16"``); a bench case
holds the long one. The engine builds its torch dtypes from this table and the compare layer reads old files
through it, so a new dtype is added here once. No torch here.
"""

from __future__ import annotations

# short name (--dtype, --nf4-quant-storage) -> torch's name (str(torch.bfloat16) without "torch.")
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
SHORT_NAMES = {name: short for short, name in DTYPE_NAMES.items()}
