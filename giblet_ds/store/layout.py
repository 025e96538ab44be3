"""``StoreLayout``: the sizes of one store, from which every dataset's shape follows.

One table for both sides of the file: the builder writes datasets of these shapes and
``open_store`` checks a file against the same table, then describes it with a ``StoreInfo`` that
extends the layout (so the sizes are declared once, here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from giblet_ds.store import schema

__all__ = ["StoreLayout"]


@dataclass(frozen=True)
class StoreLayout:
    """Sizes of one store: T TRs of F frames of H x W RGB, n_q EnCodec codebooks of C frames per
    TR, K text slots of D floats, S subjects over V mask voxels of a 3-D grid."""

    n_trs: int
    n_frames: int
    height: int
    width: int
    n_q: int
    code_frames: int
    text_slots: int
    text_dim: int
    subjects: tuple[str, ...]
    n_voxels: int
    mask_shape: tuple[int, int, int]
    n_runs: int = field(default=1, kw_only=True)
    """R runs concatenated along T (schema 2's ``/runs`` table)."""

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every required dataset, by its path in the file."""
        t, s, v = self.n_trs, self.n_subjects, self.n_voxels
        return {
            schema.VIDEO: (t, self.n_frames, self.height, self.width, 3),
            schema.AUDIO_CODES: (t, self.n_q, self.code_frames),
            schema.TEXT: (t, self.text_slots, self.text_dim),
            schema.TEXT_MASK: (t, self.text_slots),
            schema.FMRI_SUBJECTS: (s, t, v),
            schema.FMRI_MEAN: (t, v),
            schema.FMRI_STATS_MEAN: (s, v),
            schema.FMRI_STATS_STD: (s, v),
            schema.MASK: self.mask_shape,
        }

    def runs_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of the numeric ``/runs`` columns (schema 2; ids and stimuli are strings)."""
        r, s, v = self.n_runs, self.n_subjects, self.n_voxels
        return {
            schema.RUNS_FIRST: (r,),
            schema.RUNS_N_TRS: (r,),
            schema.RUNS_SUBJECTS: (r, s),
            schema.RUNS_FMRI_MEAN: (r, s, v),
            schema.RUNS_FMRI_STD: (r, s, v),
        }

    def stats_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every training statistic under ``/stats`` (docs/design.md, "Store
        statistics"): per element of one reconstructed frame, of the text slots, of the voxels;
        a code histogram per codebook."""
        frame = self.height * self.width * 3
        text = self.text_slots * self.text_dim
        return {
            "stats/video/mean": (frame,),
            "stats/video/var": (frame,),
            "stats/text/mean": (text,),
            "stats/text/var": (text,),
            "stats/fmri/mean": (self.n_voxels,),
            "stats/fmri/var": (self.n_voxels,),
            "stats/audio/counts": (self.n_q, schema.N_CODES),
        }

    def nbytes(self) -> int:
        """Bytes of every dataset's data (stores are uncompressed), splits included; HDF5's own
        metadata comes on top (see ``builder.writer.store_bytes``)."""
        total = 0
        every = {**self.shapes(), **self.stats_shapes(), **self.runs_shapes()}
        for name, shape in every.items():
            total += math.prod(shape) * schema.DTYPES[name].itemsize
        return total + self.n_trs * schema.DTYPES["splits"].itemsize  # at most one index per TR

    def n_chunks(self) -> int:
        """Number of chunks of the chunked datasets (one per TR, per subject for the subjects)."""
        return self.n_trs * (5 + self.n_subjects)
