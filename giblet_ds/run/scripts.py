"""The converter scripts beside a run's checkpoints.

DeepSpeed copies its own ``zero_to_fp32.py`` (which unpickles the rank files with
``weights_only=False``: opening a checkpoint can run code) and ``zero_to_torch.py`` (which imports
it) into every folder it saves to. giblet-ds saves into a staging folder, so DeepSpeed's copies
land there and are dropped; ``checkpoints/zero_to_fp32.py`` is this pointer to giblet-ds's safe,
streaming converter (same command line and module-level functions), and ``zero_to_torch.py`` is
DeepSpeed's own wrapper, which then imports the safe one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["ZERO_TO_FP32_SCRIPT", "write_converter_scripts"]

ZERO_TO_FP32_SCRIPT = '''#!/usr/bin/env python
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
'''


def write_converter_scripts(checkpoints: Path, deepspeed_copies: Path | None = None) -> None:
    """Write the safe ``zero_to_fp32.py`` into ``checkpoints`` and move DeepSpeed's
    ``zero_to_torch.py`` there from ``deepspeed_copies`` (the folder DeepSpeed saved into), if
    it put one there; DeepSpeed's ``zero_to_fp32.py`` copy is deleted."""
    target = checkpoints / "zero_to_fp32.py"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(ZERO_TO_FP32_SCRIPT)
    tmp.chmod(0o755)
    os.replace(tmp, target)
    if deepspeed_copies is None:
        return
    (deepspeed_copies / "zero_to_fp32.py").unlink(missing_ok=True)
    wrapper = deepspeed_copies / "zero_to_torch.py"
    if wrapper.is_file():
        shutil.move(str(wrapper), checkpoints / "zero_to_torch.py")
