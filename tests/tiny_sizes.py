"""Model input sizes of the tiny synthetic store (write_synthetic_store's defaults): deliberately
unequal, so that a swapped axis changes a count or a shape."""

from __future__ import annotations

TINY_SIZES = {
    "frames_per_tr": 2,
    "frame_height": 6,
    "frame_width": 10,
    "n_codebooks": 2,
    "code_frames": 5,
    "text_slots": 2,
    "text_dim": 7,
    "n_voxels": 23,
}
# The same sizes as --set overrides.
TINY_OVERRIDES = [f"model.{key}={value}" for key, value in TINY_SIZES.items()]
