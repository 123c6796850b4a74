#!/usr/bin/env bash
# Features Replay (Huo et al., NeurIPS 2018): ResNet-56/110 (K = 2..4) and ResNet-18 (K = 2) on
# CIFAR-10 and CIFAR-100, against BP, DDG and DNI (the paper's baselines) under DDG's recipe,
# plus the speed of the four.
source "$(dirname "$0")/common.sh"
if $quick; then models=resnet20 data=digits gpus=2; bench=(algos=[bp,ddg,fr,dni] gpus=[1,2] "${bench_quick[@]}")
else models=resnet56,resnet110 data=cifar10,cifar100 gpus=2,3,4
     bench=(algos=[bp,ddg,fr,dni] gpus=[1,2,3,4] device=cuda model=resnet110); fi
extra=(); $quick || extra=(experiment=ddg_cifar)
$dpbp train -m "${extra[@]}" algo=bp gpus=1 model=$models data=$data seed=$seeds "${recipe[@]}" \
  hydra.sweep.dir="$out/accuracy"
$dpbp train -m "${extra[@]}" algo=ddg,fr,dni gpus=$gpus model=$models data=$data seed=$seeds \
  "${recipe[@]}" hydra.sweep.dir="$out/accuracy"
$quick || $dpbp train -m experiment=ddg_cifar algo=bp,ddg,fr,dni gpus=2 model=resnet18 \
  data=cifar10,cifar100 seed=$seeds "${recipe[@]}" hydra.sweep.dir="$out/accuracy"
$dpbp report "$out/accuracy" --out "$out/accuracy_table"
$dpbp bench "${bench[@]}" hydra.run.dir="$out/speed"
