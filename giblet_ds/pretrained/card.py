"""The export's ``README.md``: a model card written from what the export knows, nothing else."""

from __future__ import annotations

from typing import Any

from giblet_ds.pretrained.settings import FeatureSettings

__all__ = ["render_card"]


def render_card(
    *,
    source: dict[str, Any],
    features: FeatureSettings,
    model_summary: dict[str, Any],
    evaluation: dict[str, Any] | None,
    table: str | None,
) -> str:
    """Markdown: what the model predicts, from which features, trained on what, how well it
    scores on held-out TRs, how to use it, and its limits (random-weight features said first)."""
    build = features.build_settings
    random = not all(features.pretrained.values())
    lines = [f"# giblet encoding model ({source['checkpoint_name']})", ""]
    if random:
        lines += [
            "> **WARNING: the audio and text features of this model come from RANDOM-WEIGHT "
            "EnCodec and CLIP networks** (the store was built with `--no-pretrained`). They carry "
            "no learned meaning; this model is for demos and tests only.",
            "",
        ]
    lines += [
        "## What it does",
        "",
        f"Predicts fMRI BOLD ({source['target']}, z-scored per voxel on the training TRs) in "
        f"{model_summary['n_voxels']:,} voxels of the mask in `mask.nii.gz` from a movie: "
        f"{features.frames_per_tr} frames of {build['frame_height']} x {build['frame_width']} "
        f"per TR of {build['tr']} s, EnCodec 24 kHz codes at {build['encodec_bandwidth']} kbps "
        f"({features.n_codebooks} codebooks), and up to {build['annotations_per_tr']} CLIP "
        f"`{build['clip_model']}` text embeddings of annotations per TR. Stimulus TR t predicts "
        f"the volume acquired at (t + {build['lag']}) x TR (lag {build['lag']} TRs), from a "
        f"window of {model_summary['context_trs']} TRs "
        f"(`model.context_end: {model_summary['context_end']}`).",
        "",
        "```bash",
        "python tools/predict.py MODEL_DIR --video NEW.mp4 [--annotations NOTES.xlsx] "
        "--out pred.nii.gz",
        "python tools/predict.py MODEL_DIR --video A.mp4 --contrast B.mp4 --out contrast_dir",
        "```",
        "",
        "```python",
        "import giblet_ds",
        "m = giblet_ds.load_pretrained(MODEL_DIR, device='cpu', dtype='fp32')  # no DeepSpeed",
        "```",
        "",
        "## Training data",
        "",
        f"- store build hash `{source['store_build_hash']}`",
        f"- subjects: {', '.join(source['subjects'])} (target: {source['target']})",
        f"- TRs: {source['n_trs']} ({source['n_trs'] * build['tr']:.1f} s of movie at "
        f"{features.training_fps:g} fps); splits train {source['splits']['train']}, "
        f"val {source['splits']['val']}, test {source['splits']['test']} TRs",
        f"- checkpoint: `{source['checkpoint']}` (step {source.get('step')})",
        f"- feature weights: EnCodec {_weights(features, 'encodec')}; CLIP "
        f"{_weights(features, 'clip')}",
        "",
        "## Held-out evaluation",
        "",
    ]
    if evaluation is not None and table:
        lines += [
            f"`tools/evaluate.py` on the {evaluation['split']} split ({evaluation['n_trs']} TRs), "
            "with the ridge baseline and the noise ceiling (every number in a column on the "
            "same TRs and voxels):",
            "",
            "```",
            table.rstrip(),
            "```",
            "",
        ]
    else:
        lines += [
            "None: the run has no evaluation of this checkpoint (`tools/evaluate.py` writes "
            "one; export again with `--evaluation DIR`). Do not use it without one.",
            "",
        ]
    lines += [
        "## Intended use",
        "",
        "In-silico experiments on movies like the training movie: predicted responses to new "
        "clips, and contrasts between two clips (`--contrast`). The prediction is the response "
        "of the average of the training subjects in their common space, not of a new person.",
        "",
        "## Limits",
        "",
    ]
    if random:
        lines.append(
            "- **RANDOM-WEIGHT FEATURES**: EnCodec and CLIP had random weights (seed 0; EnCodec's "
            "codebooks by k-means on the training movie's first 30 s, kept in "
            "`encodec_codebooks.safetensors`). Audio and text enter only as what those random "
            "networks make of them."
        )
    lines += [
        f"- Trained on {source['n_trs'] * build['tr'] / 60:.1f} minutes of one movie and "
        f"{len(source['subjects'])} subject(s): expect it to generalize poorly to stimuli "
        "unlike that movie.",
        "- Subject-specific heads do not exist: only the training target is predicted.",
    ]
    fwhm = source.get("target_smoothing_fwhm_mm") or 0.0
    if fwhm:
        lines.append(
            f"- Trained on volumes smoothed at FWHM {fwhm:g} mm inside the mask "
            "(`data.smoothing_fwhm_mm`): its predictions are spatially smooth; its r on held-out "
            "data was computed against the unsmoothed volumes."
        )
    lines += [
        "- Without annotations, the text slots are empty (as before the training movie's first "
        "annotation); predictions then rest on video and audio alone.",
        f"- The first {build['lag']} TRs of a movie have no predicted volume (the lag).",
        "",
        "## Files",
        "",
        "`model.safetensors` (weights), `run_config.yaml` (model config), `features.json` "
        "(feature settings and weight hashes), `mask.nii.gz` (voxels and affine), "
        "`fmri_stats.safetensors` (training statistics: z-scored and raw units), "
        "`manifest.json` (size and SHA-256 of every file)"
        + (", `evaluation.json`" if evaluation is not None else "")
        + (", `encodec_codebooks.safetensors`" if random else "")
        + ".",
        "",
    ]
    return "\n".join(lines)


def _weights(features: FeatureSettings, role: str) -> str:
    record = features.extractors.get(role, {})
    digest = record.get("state_sha256")
    file = features.weight_files.get(role)
    if file:
        return f"pretrained from {file['name']} (sha256 `{file['sha256'][:16]}...`)"
    text = record.get("source", "")
    return f"{text} (sha256 `{digest[:16]}...`)" if digest else text
