#!/usr/bin/env bash
# DDG (Huo et al., ICML 2018): ResNet-56/110 on CIFAR-10 with K = 2..4, accuracy against BP
# and DNI, the paper's decoupled baseline (the FDG README's reruns sit next to them in the
# report), and speed over 1..4 GPUs
# (the paper's figure: about 1.40x / 1.69x / 1.87x for ResNet-110 at K = 2/3/4).
source "$(dirname "$0")/common.sh"
if $quick; then models=resnet20 gpus=2; bench=(algos=[bp,ddg,dni] gpus=[1,2] "${bench_quick[@]}")
else models=resnet56,resnet110 gpus=2,3,4; bench=(algos=[bp,ddg,dni] gpus=[1,2,3,4] device=cuda
                                                  model=resnet110); fi
extra=(); $quick || extra=(experiment=ddg_cifar)
$dpbp train -m "${extra[@]}" algo=bp gpus=1 model=$models seed=$seeds "${recipe[@]}" \
  hydra.sweep.dir="$out/accuracy"
$dpbp train -m "${extra[@]}" algo=ddg,dni gpus=$gpus model=$models seed=$seeds "${recipe[@]}" \
  hydra.sweep.dir="$out/accuracy"
$dpbp report "$out/accuracy" --out "$out/accuracy_table"
$dpbp bench "${bench[@]}" hydra.run.dir="$out/speed"
