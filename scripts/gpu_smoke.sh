#!/usr/bin/env bash
# First checks on a CUDA machine (no GPU has run dpbp yet): every algorithm on CUDA with the
# local executor (all modules on one GPU) and, with 2+ GPUs, over NCCL with one process per GPU;
# bf16 autocast and channels_last; then the report. Compare the dist and local rows: they must
# agree (on CPU they are bit-identical; cuDNN may differ in the last bits).
#   scripts/gpu_smoke.sh [OUT_DIR]
set -euo pipefail
out=${1:-/tmp/dpbp-gpu-smoke}
dpbp=${DPBP:-dpbp}
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
k=$(( gpus >= 2 ? 2 : 1 ))
common=(device=cuda model=resnet20 data=synthetic data.train_size=8192 data.test_size=1024
        trainer.epochs=2 trainer.batch_size=128 trainer.progress=false)
for algo in bp ddg fr fdg; do
  $dpbp train algo=$algo gpus=2 executor=local "${common[@]}" hydra.run.dir="$out/$algo-local"
  if (( k == 2 )); then
    $dpbp train algo=$algo gpus=2 "${common[@]}" hydra.run.dir="$out/$algo-dist"
  fi
done
$dpbp train algo=fdg gpus=$k trainer.amp=true trainer.channels_last=true "${common[@]}" \
  hydra.run.dir="$out/fdg-amp"
$dpbp report "$out"
