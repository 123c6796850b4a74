#!/usr/bin/env bash
# PD-ASGD (Fokam et al. 2024) against its Hogwild! and LPP-SGD baselines and DDP: ResNet-18 on
# CIFAR-10/100 on 1..3 devices (the paper used 3 A100s), accuracy and images/s.
source "$(dirname "$0")/common.sh"
if $quick; then gpus=1,2 data=digits model=resnet20; bench=(algos=[bp,pdasgd,hogwild,lpp_sgd] gpus=[1,2]
                                                            "${bench_quick[@]}")
else gpus=1,2,3 data=cifar10,cifar100 model=resnet18
     bench=(algos=[bp,ddp,pdasgd,hogwild,lpp_sgd] gpus=[1,2,3] device=cuda model=resnet18); fi
extra=(); $quick || extra=(trainer.epochs=100 trainer.batch_size=128 sched=cosine)
$dpbp train -m "${extra[@]}" algo=bp gpus=1 data=$data model=$model seed=$seeds "${recipe[@]}" \
  hydra.sweep.dir="$out/accuracy"
$dpbp train -m "${extra[@]}" algo=pdasgd,hogwild,lpp_sgd gpus=$gpus data=$data model=$model \
  seed=$seeds "${recipe[@]}" hydra.sweep.dir="$out/accuracy"
$dpbp report "$out/accuracy" --out "$out/accuracy_table"
$dpbp bench "${bench[@]}" hydra.run.dir="$out/speed"
