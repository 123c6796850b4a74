#!/usr/bin/env bash
# Memory per module: what each algorithm holds for its in-flight batches (ResNet-20, synthetic
# 32x32, batch 128), K = 2..4, one process (the numbers do not depend on the executor on CPU:
# they are the bytes of the tensors held, measured once per graph; on CUDA, with one GPU per
# module, summary.json has the allocator's peak instead).
#   scripts/memory_table.sh [OUT_DIR]
set -euo pipefail
out=${1:-multirun/memory_table}
dpbp=${DPBP:-dpbp}
$dpbp train -m algo=bp,ddg,fr,fdg gpus=2,3,4 executor=local data=synthetic \
  data.train_size=1536 data.test_size=128 trainer.batch_size=128 trainer.epochs=1 \
  trainer.checkpoint=false trainer.progress=false device=cpu hydra.sweep.dir="$out" > /dev/null
$dpbp report "$out" --out "$out/table"
