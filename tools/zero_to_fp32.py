#!/usr/bin/env python
"""giblet-ds's zero_to_fp32.py: a drop-in for DeepSpeed's script of that name (same arguments,
file names, tensors and module-level functions), which never unpickles code (weights_only loads)
and streams one tensor at a time. Needs giblet_ds importable (pip install -e the giblet-ds repo).

    python zero_to_fp32.py . consolidated/ -t best --safe_serialization
    python zero_to_torch.py . consolidated/ --dtype bf16      # DeepSpeed's wrapper, uses this file
"""

import sys

from giblet_ds.checkpoint.zero_to_fp32 import *  # noqa: F403  (DeepSpeed's module-level names)
from giblet_ds.checkpoint.zero_to_fp32 import main

if __name__ == "__main__":
    sys.exit(main())
