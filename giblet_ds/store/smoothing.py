"""Gaussian spatial smoothing of fMRI inside the brain mask: the training targets' denoising.

A voxel's noise is nearly independent of its neighbours' while a stimulus drives whole patches of
cortex, so averaging each training volume over a few millimetres keeps the signal and cuts the
noise the fMRI readout would otherwise fit, voxel by voxel (docs/design.md, "Smoothed training
targets"). Only the targets the loss sees are smoothed; every r is computed against the
unsmoothed fMRI.

The kernel is a Gaussian of the given full width at half maximum (FWHM = sigma * sqrt(8 ln 2),
as in SPM, FSL and nilearn's ``smooth_img``), applied separably along the three voxel axes and
cut at 3 sigma. Smoothing is restricted to the mask as AFNI's ``3dBlurInMask`` does: values
outside the mask count as absent, not as zeros, so each output is the weighted mean of the mask
voxels around it (``blur(values) / blur(mask)``) and voxels at the brain's edge are not darkened.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from giblet_ds.config import RunConfig
from giblet_ds.errors import ConfigError
from giblet_ds.store.reader import StoreInfo, load_mask

__all__ = [
    "FWHM_PER_SIGMA",
    "MaskedGaussianSmoothing",
    "mask_smoothing",
    "target_smoothing",
    "voxel_sizes_mm",
]

FWHM_PER_SIGMA = math.sqrt(8.0 * math.log(2.0))  # 2.3548...
TRUNCATE_SIGMAS = 3.0


def voxel_sizes_mm(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel edge lengths (mm) along the three array axes of a 4 x 4 ``affine``."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def _kernel(sigma_voxels: float) -> torch.Tensor:
    radius = int(TRUNCATE_SIGMAS * sigma_voxels + 0.5)  # scipy.ndimage's rounding of the cut
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma_voxels) ** 2)
    return (kernel / kernel.sum()).float()


class MaskedGaussianSmoothing(nn.Module):
    """(..., V) values at the mask's voxels (C order, the store's voxel order) -> (..., V) smoothed.

    ``mask``: (X, Y, Z) bool, V true voxels; ``voxel_mm``: edge lengths (:func:`voxel_sizes_mm`);
    ``fwhm_mm`` > 0. Linear, so smoothing a prediction or smoothing the weights that made it is
    the same thing. Raises ValueError on a non-positive FWHM or voxel size.
    """

    def __init__(
        self, mask: np.ndarray, voxel_mm: tuple[float, float, float], fwhm_mm: float
    ) -> None:
        super().__init__()
        if not fwhm_mm > 0 or not all(v > 0 for v in voxel_mm):
            raise ValueError(f"need fwhm_mm > 0 and voxel sizes > 0, got {fwhm_mm}, {voxel_mm}")
        if fwhm_mm < min(voxel_mm):
            # below one voxel a neighbour weighs < 6% of the centre (under 1e-7 at 0.4 voxel):
            # a run would pay for smoothing that changes next to nothing
            raise ValueError(
                f"FWHM {fwhm_mm:g} mm is narrower than the finest voxel ({min(voxel_mm):g} mm) and "
                f"would barely smooth; use >= {min(voxel_mm):g} mm, or 0 for none"
            )
        kernels = [_kernel(fwhm_mm / FWHM_PER_SIGMA / size) for size in voxel_mm]
        mask = np.asarray(mask, dtype=bool)
        self.shape = mask.shape
        self.fwhm_mm = float(fwhm_mm)
        self.register_buffer("index", torch.from_numpy(np.flatnonzero(mask)), persistent=False)
        for axis, kernel in enumerate(kernels):
            self.register_buffer(f"kernel{axis}", kernel, persistent=False)
        ones = torch.ones(1, int(mask.sum()))
        self.register_buffer("weight", self._blur(ones)[0], persistent=False)

    def _kernels(self) -> list[torch.Tensor]:
        return [self.get_buffer(f"kernel{axis}") for axis in range(3)]

    def _blur(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, V) -> (N, V): the grid with zeros outside the mask, blurred, read at the mask."""
        n = flat.shape[0]
        grid = flat.new_zeros(n, math.prod(self.shape))
        grid[:, self.get_buffer("index")] = flat
        x = grid.view(n, 1, *self.shape)
        for axis, kernel in enumerate(self._kernels()):
            size = [1, 1, 1]
            size[axis] = len(kernel)
            padding = [0, 0, 0]
            padding[axis] = len(kernel) // 2
            weight = kernel.to(x.dtype).view(1, 1, *size)
            x = nn.functional.conv3d(x, weight, padding=tuple(padding))
        return x.view(n, -1)[:, self.get_buffer("index")]

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if values.shape[-1] != len(self.get_buffer("index")):
            raise ValueError(
                f"values have {values.shape[-1]} voxels, the smoothing mask "
                f"{len(self.get_buffer('index'))}"
            )
        if self.get_buffer("index").device != values.device:
            self.to(values.device)
        flat = values.reshape(-1, values.shape[-1]).float()
        smoothed = self._blur(flat) / self.get_buffer("weight")
        return smoothed.reshape(values.shape).to(values.dtype)

    @torch.no_grad()
    def smooth_array(self, values: np.ndarray) -> np.ndarray:
        """:meth:`forward` on a numpy array (..., V), float32 out: for fits outside autograd
        (the ridge's targets, the loss's variances)."""
        return self(torch.from_numpy(np.asarray(values, np.float32))).numpy()


def mask_smoothing(store: StoreInfo, fwhm_mm: float) -> MaskedGaussianSmoothing | None:
    """Smoothing at ``fwhm_mm`` over the store's mask and voxel size; None at 0. ConfigError
    naming data.smoothing_fwhm_mm when the FWHM cannot smooth that grid."""
    if not fwhm_mm:
        return None
    mask, affine = load_mask(store.path)
    try:
        return MaskedGaussianSmoothing(mask, voxel_sizes_mm(affine), fwhm_mm)
    except ValueError as exc:
        raise ConfigError(f"data.smoothing_fwhm_mm={fwhm_mm}: {exc}") from exc


def target_smoothing(cfg: RunConfig, store: StoreInfo) -> MaskedGaussianSmoothing | None:
    """The run's fMRI target smoothing (data.smoothing_fwhm_mm) over the store; None at 0."""
    return mask_smoothing(store, cfg.data.smoothing_fwhm_mm)
