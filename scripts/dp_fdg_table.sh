#!/usr/bin/env bash
# Data parallelism + FDG: R replicas of a K = 2 FDG pipeline (gpus = 2R) against DDP on the same
# number of devices, accuracy and speed.
source "$(dirname "$0")/common.sh"
if $quick; then gpus=4 bench=(algos=[bp,ddp,dp_fdg] gpus=[1,2,4] "${bench_quick[@]}")
else gpus=4,8; bench=(algos=[bp,ddp,fdg,dp_fdg] gpus=[1,2,4,8] device=cuda model=resnet56); fi
extra=(); $quick || extra=(experiment=fdg_cifar model=resnet56)
$dpbp train -m "${extra[@]}" algo=bp gpus=1 seed=$seeds "${recipe[@]}" \
  hydra.sweep.dir="$out/accuracy"
$dpbp train -m "${extra[@]}" algo=ddp gpus=$gpus seed=$seeds "${recipe[@]}" \
  hydra.sweep.dir="$out/accuracy"
$dpbp train -m "${extra[@]}" algo=dp_fdg algo.replicas=2 gpus=4 seed=$seeds "${recipe[@]}" \
  hydra.sweep.dir="$out/accuracy"
$dpbp report "$out/accuracy" --out "$out/accuracy_table"
$dpbp bench "${bench[@]}" hydra.run.dir="$out/speed"
