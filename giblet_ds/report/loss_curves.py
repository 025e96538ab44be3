"""The loss-curve figure of a run directory (train/val loss, validation fMRI r, learning rate)."""

from __future__ import annotations

from pathlib import Path

from giblet_ds.run.records import as_float, read_metrics

__all__ = ["plot_loss_curves"]


def plot_loss_curves(run_dir: str | Path, out: str | Path) -> Path:
    """Train/val loss per step and validation fMRI r, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = read_metrics(run_dir)
    out = Path(out)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, constrained_layout=True)
    ts = [r.step for r in rec.train]
    ax1.plot(ts, [as_float(r.loss) for r in rec.train], lw=0.8, label="train loss")
    if rec.val:
        vs = [r.step for r in rec.val]
        ax1.plot(vs, [as_float(r.loss) for r in rec.val], "o-", label="val loss")
        ax2.plot(vs, [r.fmri_r_mean for r in rec.val], "o-", color="C2",
                 label="val fMRI r (mean per voxel)")  # fmt: skip
    for s in rec.skip:
        ax1.axvline(s.step, color="red", lw=0.5, alpha=0.5)
    ax1.set_ylabel("normalized loss")
    ax1.legend(loc="upper right")
    ax1.grid(alpha=0.3)
    ax2.axhline(0.0, color="black", lw=0.5)
    ax2.set_ylabel("fMRI r")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    if rec.train:
        ax3 = ax2.twinx()
        ax3.plot(ts, [r.lr for r in rec.train], color="C1", lw=0.8, label="lr")
        ax3.set_ylabel("learning rate", color="C1")
    ax2.legend(loc="upper left")
    fig.suptitle(f"{rec.run_dir.resolve().name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
