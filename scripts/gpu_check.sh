#!/usr/bin/env bash
# One-command GPU check of uae_fast on a machine with one NVIDIA GPU and no network.
#
#   scripts/gpu_check.sh                   # install from ./wheels, pytest -m cuda, the GPU rows of four benchmarks
#   scripts/gpu_check.sh --no-install      # the project is installed already
#   scripts/gpu_check.sh --dry-run         # print the plan (every command), run nothing
#   scripts/gpu_check.sh --allow-no-gpu    # on a machine without CUDA: run what skips cleanly, exit 0
#   scripts/gpu_check.sh --print-download  # the `pip download` command that fills wheels/ (run it where there is network)
#
# Parts, in order (every part runs even when an earlier one failed; the exit status is non-zero if any failed):
#   install     pip install --no-index --find-links wheels/ --no-build-isolation ".[bench]" (+ DALI if its wheel is there)
#   pytest      TRITON_INTERPRET=0 pytest -m cuda tests (every Triton kernel in bf16 and fp32, the bf16 stage-2a step,
#               DALI's GPU decoder, FlashAttention vs SDPA)
#   grpo_loss   benchmarks/bench_grpo_loss.py --device cuda (bf16, N=2048 tokens, H=2048, V=151,936)
#   reward      benchmarks/bench_reward.py --device cuda (ViT-B-like backbone, B=16 x G=8, 1024² reconstructions)
#   rollout     benchmarks/bench_rollout.py --quick --device cuda (if it has that flag)
#   stage2a     benchmarks/bench_stage2a.py --quick --device cuda (both shapes, TRL with checkpointing on and off)
# Sizes are chosen to finish in under 8 minutes in total on one H200; each part also has a timeout (seconds, in
# TIMEOUT_<PART> below, overridable from the environment) so a hang cannot stall the rest. Logs and tables go to
# $GPU_CHECK_OUT (default /tmp/uae_gpu_check); the tables are printed at the end with a PASS/FAIL/SKIP summary.
#
# Filling wheels/ (on a machine WITH network, same CPU architecture; the GPU machine's Python is 3.12):
#   scripts/gpu_check.sh --print-download | bash
# downloads, without their dependencies, the wheels of the packages this project needs beyond a CUDA PyTorch image
# (torch, torchvision, transformers, peft, accelerate, numpy, scikit-image, pybind11, scikit-build-core, cmake and
# ninja are expected there already). Check what the target lacks with `python3 -m pip list` there and add names to
# WHEELS below if needed; keep one version of each. Then copy wheels/ next to this checkout's pyproject.toml.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEEL_DIR="${GPU_CHECK_WHEELS:-$ROOT/wheels}"
OUT_DIR="${GPU_CHECK_OUT:-${TMPDIR:-/tmp}/uae_gpu_check}"
TIMEOUT_INSTALL="${TIMEOUT_INSTALL:-300}"
TIMEOUT_PYTEST="${TIMEOUT_PYTEST:-150}"
TIMEOUT_GRPO_LOSS="${TIMEOUT_GRPO_LOSS:-75}"
TIMEOUT_REWARD="${TIMEOUT_REWARD:-45}"
TIMEOUT_ROLLOUT="${TIMEOUT_ROLLOUT:-60}"
TIMEOUT_STAGE2A="${TIMEOUT_STAGE2A:-180}"
# Wheels a CUDA PyTorch image usually lacks: the project's own dependencies, the benchmark peers (TRL, Liger) and
# what they pull in, and DALI (optional: its test skips without it).
WHEELS=(
  "diffusers>=0.35" importlib-metadata "open-clip-torch>=2.24" ftfy wcwidth "simplejpeg>=1.7" "webdataset>=1.0"
  braceexpand "trl>=1.0" "liger-kernel>=0.6" datasets dill multiprocess
  nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 astunparse gast libcst makefun nvtx optree
)

DRY_RUN=0 INSTALL=1 ALLOW_NO_GPU=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --no-install) INSTALL=0 ;;
    --allow-no-gpu) ALLOW_NO_GPU=1 ;;
    --print-download)
      printf 'mkdir -p wheels && %s -m pip download --no-deps --only-binary=:all: --python-version 3.12 ' "$PY"
      printf -- '--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 '
      printf -- '--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels'
      printf " '%s'" "${WHEELS[@]}"
      printf '\n'
      exit 0 ;;
    -h|--help) sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

cd "$ROOT" || exit 2
mkdir -p "$OUT_DIR"
declare -a SUMMARY=()
FAILED=0

# run_part NAME TIMEOUT COMMAND...: run one part with a timeout, log to $OUT_DIR/NAME.log, record PASS/FAIL.
run_part() {
  local name="$1" limit="$2"
  shift 2
  echo
  echo "=== [$name] $* (timeout ${limit}s)"
  if [ "$DRY_RUN" = 1 ]; then
    SUMMARY+=("| $name | DRY-RUN | - | $* |")
    return 0
  fi
  local start rc
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - start ))
  if [ "$rc" = 0 ]; then
    SUMMARY+=("| $name | PASS | ${took}s | |")
  else
    local why="exit $rc"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && why="timed out after ${limit}s"
    SUMMARY+=("| $name | FAIL | ${took}s | $why, log: $OUT_DIR/$name.log |")
    FAILED=1
  fi
}

skip_part() {
  echo
  echo "=== [$1] SKIPPED: $2"
  SUMMARY+=("| $1 | SKIP | - | $2 |")
}

# --- install -------------------------------------------------------------------------------------------------------
if [ "$INSTALL" = 1 ]; then
  if [ -d "$WHEEL_DIR" ]; then
    run_part install "$TIMEOUT_INSTALL" "$PY" -m pip install --no-index --find-links "$WHEEL_DIR" \
      --no-build-isolation ".[bench]"
    # DALI is optional (the GPU-decoder test skips without it): a missing wheel is not a failure.
    if [ "$DRY_RUN" = 1 ] || ls "$WHEEL_DIR"/nvidia_dali_cuda130-*.whl >/dev/null 2>&1; then
      run_part install_dali "$TIMEOUT_INSTALL" "$PY" -m pip install --no-index --find-links "$WHEEL_DIR" \
        nvidia-dali-cuda130
    else
      skip_part install_dali "no nvidia_dali_cuda130 wheel in $WHEEL_DIR"
    fi
  else
    # No wheels folder: everything the project needs must be installed already (pip says what is missing).
    run_part install "$TIMEOUT_INSTALL" "$PY" -m pip install --no-index --no-build-isolation ".[bench]"
  fi
else
  skip_part install "--no-install"
fi

# --- is there a GPU? ------------------------------------------------------------------------------------------------
HAVE_CUDA=0
if [ "$DRY_RUN" = 1 ]; then
  HAVE_CUDA=1
elif "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  HAVE_CUDA=1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name(0))'
fi
if [ "$HAVE_CUDA" = 0 ]; then
  echo
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False)."
  if [ "$ALLOW_NO_GPU" = 0 ]; then
    echo "gpu_check: nothing to check without a GPU; --allow-no-gpu runs what skips cleanly here." >&2
    exit 3
  fi
fi

# --- pytest -m cuda -------------------------------------------------------------------------------------------------
# TRITON_INTERPRET=0: the kernels must be compiled for the GPU (the CPU suite interprets them). Without CUDA every test
# skips with its one-line reason, which is what --allow-no-gpu shows.
if [ "$HAVE_CUDA" = 1 ]; then
  run_part pytest "$TIMEOUT_PYTEST" env TRITON_INTERPRET=0 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests
else
  run_part pytest "$TIMEOUT_PYTEST" "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider tests
fi

# --- benchmarks' GPU rows -------------------------------------------------------------------------------------------
if [ "$HAVE_CUDA" = 1 ]; then
  run_part grpo_loss "$TIMEOUT_GRPO_LOSS" "$PY" benchmarks/bench_grpo_loss.py --device cuda --dtype bf16 \
    --n 2048 --hidden 2048 --repeats 5
  run_part reward "$TIMEOUT_REWARD" "$PY" benchmarks/bench_reward.py --device cuda --kinds vit-b --repeats 5
  if [ "$DRY_RUN" = 1 ] || "$PY" benchmarks/bench_rollout.py --help 2>/dev/null | grep -q -- '--device'; then
    run_part rollout "$TIMEOUT_ROLLOUT" "$PY" benchmarks/bench_rollout.py --quick --device cuda --dtype bfloat16
  else
    echo
    echo "=== [rollout] FAIL: benchmarks/bench_rollout.py has no --device flag, so it has no GPU rows to run"
    SUMMARY+=("| rollout | FAIL | - | bench_rollout.py has no --device flag (no GPU rows) |")
    FAILED=1
  fi
  run_part stage2a "$TIMEOUT_STAGE2A" "$PY" benchmarks/bench_stage2a.py --quick --device cuda \
    --workdir "$OUT_DIR/stage2a_inputs"
else
  for part in grpo_loss reward rollout stage2a; do skip_part "$part" "no CUDA GPU"; done
fi

# --- tables and summary ---------------------------------------------------------------------------------------------
if [ "$DRY_RUN" = 0 ]; then
  echo
  echo "=============================== tables ==============================="
  for part in grpo_loss reward rollout stage2a; do
    [ -f "$OUT_DIR/$part.log" ] || continue
    echo
    echo "## $part"
    grep -E '^(#|\||targets:|Bare-GEMM|- (frozen|trainable)|CUDA|CPU)' "$OUT_DIR/$part.log" || echo "(no table: see the log)"
  done
fi
echo
echo "=============================== summary =============================="
echo "| part | result | time | note |"
echo "|---|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
echo
if [ "$FAILED" = 1 ]; then
  echo "gpu_check: FAILED (logs in $OUT_DIR)"
  exit 1
fi
echo "gpu_check: OK"
exit 0
