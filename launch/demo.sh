#!/usr/bin/env bash
# The whole pipeline on a laptop-class CPU, end to end (make demo). Outputs land in $1 (demo_out).
#   1. dry run of the 3.5B model      4. train the small preset, 2 CPU ranks, ZeRO-2
#   2. demo raw data (planted truth)  5. evaluate best on the test split (model, ridge, ceiling,
#   3. build the feature store           oracle), consolidate, audit, plot, health report
#                                     6. export best, predict a new clip it never saw
#                                     7. the evaluation table on test
set -euo pipefail
OUT=${1:-demo_out}
PY=.venv/bin/python
RAW=$OUT/raw
STORE=$OUT/store.h5
RUN=$OUT/run_small
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-offline}
mkdir -p "$OUT"
SECONDS=0
step() { printf '\n=== [%3ds] %s\n' "$SECONDS" "$*"; }

step "1/7 dry run of the 3.5B model (nothing is allocated)"
$PY launch/train.py --dry-run --num-gpus 8 2>/dev/null | tee "$OUT/dry_run.txt"

step "2/7 demo raw data in the Sherlock formats -> $RAW"
if [ -f "$RAW/ground_truth.json" ]; then
  echo "already there (delete $RAW to remake it)"
else
  $PY tools/make_demo_data.py "$RAW"
fi

step "3/7 feature store -> $STORE (a rebuild with the same inputs is a no-op)"
$PY tools/build_store.py --video "$RAW/stimuli_demo.m4v" --annotations "$RAW/annotations.xlsx" \
  --fmri "$RAW"/demo_nii/*.nii.gz --config "$RAW/demo_build.yaml" --out "$STORE" --no-pretrained

step "4/7 train the small preset (15 epochs, early stopping): deepspeed --num_gpus 2, CPU, ZeRO-2 fp32 -> $RUN"
rm -rf "$RUN"
.venv/bin/deepspeed --num_gpus 2 launch/train.py --config launch/configs/small.yaml \
  --deepspeed_config ds_configs/zero2_fp32_cpu.json \
  --set data.store="$STORE" --set checkpoint.run_dir="$RUN" 2>&1 \
  | grep -v -E "FutureWarning|return func|^\[20..-..-.. ..:..:..,...\] \[INFO\]"

step "5/7 tools on the run: evaluation of best on the test split, consolidation, audit, plots, health"
EVAL=$RUN/evaluation
$PY tools/evaluate.py "$RUN" --store "$STORE" --split test --out "$EVAL" --roi "$RAW/roi_mask.nii.gz" \
  --device cpu > "$OUT/evaluation_table.txt"
$PY tools/zero_to_fp32.py "$RUN/checkpoints" "$OUT/consolidated" -t best --safe_serialization
$PY tools/audit_weights.py "$RUN" --json "$OUT/audit.json" --flagged-only || true  # report, not gate
$PY tools/plot_reconstructions.py --checkpoint "$RUN/checkpoints/best" --store "$STORE" \
  --out "$OUT/plots" --split val --num-samples 3 --device cpu
$PY tools/health_report.py "$RUN" --out "$OUT/health_report.md" --plot "$OUT/loss_curves.png"

step "6/7 export best as a self-contained model; predict a 60 s clip it never saw"
MODEL=$OUT/model
CLIP=$OUT/new_clip
rm -rf "$MODEL"
$PY tools/export_model.py "$RUN" --out "$MODEL" --training-video "$RAW/stimuli_demo.m4v" \
  --evaluation "$EVAL"
if [ ! -f "$CLIP/stimuli_demo.m4v" ]; then
  $PY tools/make_demo_data.py "$CLIP" --seconds 60 --seed 7 > /dev/null  # another movie
fi
$PY tools/predict.py "$MODEL" --video "$CLIP/stimuli_demo.m4v" --out "$OUT/new_clip_prediction.nii.gz"

step "7/7 summary: the held-out evaluation of best (tools/evaluate.py)"
$PY - "$RUN" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
end = [r for r in rows if r["kind"] == "end"][-1]
best = [r for r in rows if r["kind"] == "val" and r["is_best"]][-1]
print(f"run {end['status']} at step {end['step']}: {end['reason']}")
print(f"best: step {best['step']} (validation r on {best['fmri_n_reliable']:,} reliable voxels "
      f"{best['fmri_r_reliable']:+.4f}; it chose the checkpoint, so the test split below scores it)")
PY
cat "$OUT/evaluation_table.txt"
cat <<MSG

Outputs ($SECONDS s in all):
  $OUT/dry_run.txt               3.5B parameter counts and memory per GPU
  $RAW/                   demo movie, annotations.xlsx, NIfTI, ground_truth.json
  $STORE                 the HDF5 feature store (EnCodec and CLIP with RANDOM weights: offline)
  $RUN/              metrics.jsonl, train.log, config.resolved.yaml, checkpoints/
  $OUT/consolidated/            model.safetensors of the best tag (tools/zero_to_fp32.py)
  $OUT/audit.json               weight audit of latest and best (tools/audit_weights.py)
  $OUT/plots/index.html         reconstructions and the per-voxel r map (tools/plot_reconstructions.py)
  $EVAL/   evaluation.json, r maps (NIfTI), model_r.png: model, ridge, ceiling, oracle on test
  $OUT/health_report.md         the training health report, with $OUT/loss_curves.png
  $MODEL/README.md          the model card of the exported model (load: giblet_ds.load_pretrained)
  $OUT/new_clip_prediction.nii.gz  predicted BOLD for a 60 s clip the model never saw (tools/predict.py)
MSG
