#!/usr/bin/env bash
# The GPU measurement (tests/gpu, and `cl-flat bench` of every variant) on a CUDA machine whose image has
# torch, transformers and peft but not DeepSpeed (nor, possibly, the tool's small pure-Python dependencies),
# with no network:
#   launch/gpu_check.sh                      # from the repository root
#   OUT=/some/dir launch/gpu_check.sh        # outputs there (default results/bench)
#
# What it does, each step with its own time limit so that a rerun still fits the machine's lease:
#   1. installs every wheel of $WHEELS into a private folder (/tmp/cl-flat-site, first on PYTHONPATH;
#      --no-index --no-deps: nothing is downloaded, the image's torch/transformers/peft stay as they are)
#   2. records the card, the driver and the library versions   -> $OUT/gpu_env.txt
#   3. pytest tests/gpu                                          -> $OUT/gpu_tests.log
#   4. cl-flat bench configs/bench_gpu.yaml (every variant, ratios to none AND to the floor)
#                                                                -> $OUT/bench_gpu-<card>.{json,md}, bench_gpu.log
#
# Wheels: $WHEELS, default the first of shared/wheels/, launch/wheels/, .whl/ that holds *.whl.
# Never commit them. Build them once on a machine with network access and the same Python
# (major.minor) as the GPU image; all are pure Python (DeepSpeed builds its ops at run time, and
# the bench and tests need none of them):
#   mkdir -p shared/wheels && cd shared/wheels
#   pip wheel --no-deps deepspeed==0.19.8          # an sdist: pip builds a py3-none-any wheel from it
#   pip wheel --no-deps hjson py-cpuinfo ninja msgpack einops   # DeepSpeed's deps an image may lack
#   # only if the image lacks them too (check with: python3 -c "import pydantic, typer, yaml, rich"):
#   pip wheel --no-deps pydantic pydantic-core annotated-types typing-inspection typer rich pyyaml \
#       shellingham markdown-it-py mdurl pygments
# (pydantic-core, pyyaml, msgpack and ninja have platform wheels: build those with the image's Python
# and platform, e.g. `pip download --only-binary=:all: --python-version 3.11 --platform
# manylinux2014_x86_64 --no-deps NAME`.) A wheel whose package the image already has is installed
# into the private folder too and shadows the image's copy, so leave out what the image provides.
# The device machine gets untracked, non-ignored files of the working tree: shared/wheels/ (or
# launch/wheels/) travels with it as long as no .gitignore rule covers it.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-results/bench}
mkdir -p "$OUT"
if [ -z "${WHEELS:-}" ]; then
  for candidate in shared/wheels launch/wheels .whl; do
    if compgen -G "$candidate/*.whl" > /dev/null; then WHEELS=$candidate; break; fi
  done
fi
SITE=${SITE:-/tmp/cl-flat-site}

if ! "$PYTHON" -c "import deepspeed" 2> /dev/null; then
  if [ -z "${WHEELS:-}" ]; then
    echo "gpu_check: deepspeed is not installed and no wheels were found (shared/wheels/, launch/wheels/, .whl/;" \
         "or set WHEELS); see the head of this script for how to build them" >&2
    exit 2
  fi
  echo "+ installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || exit 1
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
       PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || nvidia-smi -L
  "$PYTHON" -c "import sys, torch, deepspeed, peft, transformers; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, 'peft', peft.__version__,
'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/gpu_env.txt"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1

status=0
echo "+ pytest tests/gpu"
timeout "${TESTS_TIMEOUT:-200}" "$PYTHON" -m pytest tests/gpu -q -x -p no:cacheprovider 2>&1 \
  | tail -25 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "+ cl-flat bench configs/bench_gpu.yaml"
timeout "${BENCH_TIMEOUT:-330}" "$PYTHON" -m cl_flat.cli bench configs/bench_gpu.yaml \
  --updates "${UPDATES:-5}" --warmup "${WARMUP:-2}" --rounds "${ROUNDS:-1}" --out "$OUT" --overwrite \
  --methods "${METHODS:-none,floor,sam,asam,rwp_lora,rwp_full,rwp_base,rwp_full_one_pass,rwp_full_stored_noise,lpf_sgd,flat_lora}" \
  2>&1 | tail -40 | tee "$OUT/bench_gpu.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
exit $status
