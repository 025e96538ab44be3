"""Per-voxel maps in the store's mask space: written as NIfTI, drawn with nilearn.

The store keeps its brain mask and affine (``giblet_ds.store.load_mask``); a vector of one value per
stored voxel goes back into that volume in the mask's C order. Figures are nilearn's
``plot_stat_map`` over its bundled MNI152 template (no download) and ``plot_glass_brain``: the views
researchers know, in world coordinates from the affine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from giblet_ds.errors import GibletError

__all__ = ["plot_brain_map", "save_voxel_map", "voxel_volume"]


def voxel_volume(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(X, Y, Z) float32 volume with ``values`` (V,) at the mask's voxels (C order), 0 elsewhere."""
    if values.shape != (int(mask.sum()),):
        raise GibletError(
            f"voxel map has shape {values.shape} but the store's mask holds {int(mask.sum())} voxels"
        )
    volume = np.zeros(mask.shape, dtype=np.float32)
    volume[mask] = values
    return volume


def save_voxel_map(values: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write ``values`` (V,) as a NIfTI volume in the store's mask space."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(voxel_volume(values, mask), affine), str(path))
    return path


def plot_brain_map(
    nifti: Path, path: Path, title: str, *, threshold: float | None = None, label: str = "r"
) -> Path:
    """A stat map over the MNI152 template (three orthogonal cuts at the peak) above a glass
    brain, as one PNG. ``threshold``: |value| below it is not drawn (default: none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import datasets, plotting

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5))
    plotting.plot_stat_map(
        str(nifti),
        bg_img=datasets.load_mni152_template(resolution=2),
        display_mode="ortho",
        threshold=threshold,
        colorbar=True,
        title=title,
        axes=top,
        cmap="RdBu_r",
    )
    plotting.plot_glass_brain(
        str(nifti),
        threshold=threshold,
        colorbar=True,
        plot_abs=False,
        axes=bottom,
        cmap="RdBu_r",
        title=f"{label}, glass brain",
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
