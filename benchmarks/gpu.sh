#!/usr/bin/env bash
# The GPU checks and benchmarks of this project, as they were run for benchmarks/results/:
#   bash benchmarks/gpu.sh tests          # pytest -m gpu: tiled loss on CUDA, Ray Train use_gpu (NCCL, bf16)
#   bash benchmarks/gpu.sh loss           # loss alone, global batch 32,768, width 768 x {32,72,128,256}
#   bash benchmarks/gpu.sh step           # one GPU's training step, ViT-B-32 / ViT-L-14, dense vs x72 / x128
#   bash benchmarks/gpu.sh step-global    # the same step as rank 0 of a 32,768 global batch, clip vs tiled
# Several parts may be named at once. Logs and results land in benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
results=benchmarks/results
mkdir -p "$results"
for part in "$@"; do
  case "$part" in tests|loss|step|step-global) ;;
    *) echo "unknown part '$part': expected tests, loss, step or step-global" >&2; exit 2 ;; esac
done
status=0
for part in "$@"; do
  case "$part" in
    tests) python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$results/gpu_tests.xml" ;;
    loss) python3 -m benchmarks.loss_memory --device cuda ;;
    step) python3 -m benchmarks.train_step_gpu --batch 256 --losses clip --steps 20 --warmup 5 --repeats 3 ;;
    step-global) python3 -m benchmarks.train_step_gpu --batch 256 --global-batch 32768 --losses clip,tiled \
                   --expansions 0,72,128,256 --steps 3 --warmup 1 ;;
  esac 2>&1 | tee "$results/gpu_$part.log" || status=1
done
exit $status
