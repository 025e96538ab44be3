#!/usr/bin/env bash
# The 3.5B model on one GPU in one prepared run (issue 13); see bench/gpu_check.py for the stages.
#
#   bench/gpu_check.sh --cpu                 tiny preset on CPU (what tests/test_gpu_check.py runs)
#   bench/gpu_check.sh --fetch-wheels        here, before a GPU call: DeepSpeed and the packages the
#                                            device image lacks, as wheels in build/gpu_wheels
#   bench/gpu_check.sh                       on the GPU machine (device tool: carry build/gpu_wheels)
#
# Python: $GIBLET_PYTHON, else .venv/bin/python when it exists, else python3 (the device image's,
# which holds CUDA torch but no DeepSpeed: the wheels from --fetch-wheels are installed into
# /tmp/giblet_site when `import deepspeed` fails). Output: $OUT (else runs/gpu_check).
set -u -o pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
WHEELS="$REPO/build/gpu_wheels"
SITE=/tmp/giblet_site

if [ -n "${GIBLET_PYTHON:-}" ]; then PY="$GIBLET_PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

if [ "${1:-}" = "--fetch-wheels" ]; then
    # Exact versions of what this checkout's venv runs, for the device image's CPython 3.12.
    mkdir -p "$WHEELS"
    pins=$("$PY" - <<'EOF'
from importlib.metadata import version
names = ["deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types",
         "typing_inspection", "typing_extensions"]
print(" ".join(f"{n}=={version(n)}" for n in names))
EOF
    ) || { echo "gpu_check: cannot read the venv's package versions" >&2; exit 2; }
    ds_pin=${pins%% *}
    # DeepSpeed publishes only a source archive: build its pure-Python wheel (no ops compiled;
    # FusedAdam is JIT-built on the GPU at the first step).
    DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed \
        -w "$WHEELS" "$ds_pin" || { echo "gpu_check: building the $ds_pin wheel failed" >&2; exit 2; }
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" ${pins#* } \
        || { echo "gpu_check: downloading wheels failed" >&2; exit 2; }
    ls -l "$WHEELS"
    echo "carry build/gpu_wheels in the device call (it is ignored by git: /build/)"
    exit 0
fi

cpu=0
for arg in "$@"; do [ "$arg" = "--cpu" ] && cpu=1; done
if [ "$cpu" = 1 ]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
else
    unset DS_ACCELERATOR
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# Stage "setup": DeepSpeed importable. On failure the other stages still run and report.
GIBLET_GPU_CHECK_SETUP="ok: $PY imports deepspeed"
if ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu_check: installing $(ls "$WHEELS" | wc -l) wheels from build/gpu_wheels into $SITE"
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl; then
            export PYTHONPATH="$REPO:$SITE${PYTHONPATH#"$REPO"}"
            GIBLET_GPU_CHECK_SETUP="ok: installed build/gpu_wheels into $SITE"
        fi
    fi
    if ! err=$("$PY" -c "import deepspeed" 2>&1); then
        GIBLET_GPU_CHECK_SETUP="failed: $PY cannot import deepspeed ($(echo "$err" | tail -1)); run \
'bench/gpu_check.sh --fetch-wheels' on a machine with PyPI and carry build/gpu_wheels"
        echo "gpu_check: stage setup $GIBLET_GPU_CHECK_SETUP" >&2
    fi
fi
export GIBLET_GPU_CHECK_SETUP
exec "$PY" bench/gpu_check.py "$@"
