"""Reports on a run: the health report, loss curves, reconstruction and brain-map figures.

Reads run directories through :mod:`giblet_ds.run` and checkpoints through :mod:`giblet_ds.checkpoint`.
"""

from giblet_ds.report.brain_maps import plot_brain_map, save_voxel_map
from giblet_ds.report.health import HealthReport, build_health_report
from giblet_ds.report.loss_curves import plot_loss_curves
from giblet_ds.report.reconstructions import ReconstructionResult, render_reconstructions

__all__ = [
    "HealthReport",
    "ReconstructionResult",
    "build_health_report",
    "plot_brain_map",
    "plot_loss_curves",
    "render_reconstructions",
    "save_voxel_map",
]
