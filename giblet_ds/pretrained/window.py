"""Run a model over a movie's TRs, each TR with the window of context it was trained with.

The window rule is the store dataset's (``giblet_ds.store.dataset``: ``window_lead``,
``window_slots``): rows t-k+1+L..t+L, TR t in the last slot, rows outside [first, stop) padded
with zeros and masked; the same arithmetic on in-memory arrays instead of an HDF5 file.
"""

from __future__ import annotations

import numpy as np
import torch

from giblet_ds.pretrained.features import StimulusFeatures
from giblet_ds.store.dataset import window_lead, window_slots

__all__ = ["predict_windows"]


def _window(array: np.ndarray, t: int, first: int, stop: int, k: int, lead: int) -> np.ndarray:
    lo = max(t - (k - 1 - lead), first)
    hi = min(t + lead, stop - 1)
    out = np.zeros((k, *array.shape[1:]), dtype=array.dtype)
    out[window_slots(np.arange(lo, hi + 1) - t, k, lead)] = array[lo : hi + 1]
    return out


def _mask(t: int, first: int, stop: int, k: int, lead: int) -> np.ndarray:
    lo = max(t - (k - 1 - lead), first)
    hi = min(t + lead, stop - 1)
    mask = np.zeros(k, dtype=bool)
    mask[window_slots(np.arange(lo, hi + 1) - t, k, lead)] = True
    return mask


def predict_windows(
    model: torch.nn.Module,
    features: StimulusFeatures,
    *,
    first: int,
    stop: int,
    context_trs: int,
    context_end: str,
    lag: int,
    batch_size: int = 16,
    subject: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """fMRI (T, V) and TR t's bottleneck code (T, D), float32, for TRs first..stop-1. fMRI is
    the model's ``fmri`` output, or with ``subject`` its subject head's own,
    ``fmri_subjects[:, subject]`` (ValueError for a model without subject heads)."""
    params = next(model.parameters())
    device, dtype = params.device, params.dtype
    k = context_trs
    lead = window_lead(k, context_end, lag)
    fmri: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(first, stop, batch_size):
            trs = range(start, min(stop, start + batch_size))
            if k == 1:
                video = features.video[start : trs.stop]
                audio = features.audio_codes[start : trs.stop]
                text = features.text[start : trs.stop]
                mask = None
            else:
                video = np.stack([_window(features.video, t, first, stop, k, lead) for t in trs])
                audio = np.stack(
                    [_window(features.audio_codes, t, first, stop, k, lead) for t in trs]
                )
                text = np.stack([_window(features.text, t, first, stop, k, lead) for t in trs])
                mask = np.stack([_mask(t, first, stop, k, lead) for t in trs])
            # As the store dataset does: uint8 -> [0, 1] in numpy float32, codes as int64.
            args = [
                torch.from_numpy(np.divide(video, 255.0, dtype=np.float32)).to(device, dtype),
                torch.from_numpy(audio.astype(np.int64)).to(device),
                torch.from_numpy(np.ascontiguousarray(text)).to(device, dtype),
            ]
            if mask is not None:
                args.append(torch.from_numpy(mask).to(device))
            out = model(*args)
            if subject is None:
                fmri.append(out.fmri.float().cpu().numpy())
            elif out.fmri_subjects is None:
                raise ValueError(f"subject {subject}: the model has no subject heads")
            else:
                fmri.append(out.fmri_subjects[:, subject].float().cpu().numpy())
            codes.append(out.bottleneck.float().cpu().numpy())
    return np.concatenate(fmri), np.concatenate(codes)
