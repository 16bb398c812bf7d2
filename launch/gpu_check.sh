#!/usr/bin/env bash
# The GPU check of a development session (device machine: torch/transformers/peft present,
# DeepSpeed and pydantic carried as wheels in .whl/): CUDA tests + configs/bench_gpu.yaml.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export OMP_NUM_THREADS=4 WANDB_MODE=disabled HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-results/bench}
nvidia-smi -L
python3 -c "import torch, deepspeed, peft, transformers; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)"
timeout 220 python3 -m pytest tests/gpu -q -x -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
timeout 330 python3 -m cl_flat.cli bench configs/bench_gpu.yaml --updates 5 --warmup 2 --out "$OUT" \
  --methods none,floor,sam,asam,rwp_lora,rwp_full,rwp_base,rwp_full_stored_noise,lpf_sgd,flat_lora 2>&1 | tail -30
