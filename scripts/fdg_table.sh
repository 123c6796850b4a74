#!/usr/bin/env bash
# FDG (Zhuang et al., TNNLS 2021): the CIFAR-10/100 accuracy tables with beta = 1 and the paper's
# best beta (ResNet-20/56/110/18, WRN-28-10 at K = 2; ResNet-56 at K = 3, 4), and the time table
# (WRN-28-10 seconds per epoch, BP 219.1 vs FDG 118.3 / 89.6 / 74.1 at K = 2/3/4) as a bench
# that also times data parallelism (ddp), dp_fdg and DGL on the same GPUs. DGL (the tables' DGL
# column, the FDG authors' reruns) runs wherever the paper has a DGL number.
source "$(dirname "$0")/common.sh"
if $quick; then
  $dpbp train -m algo=bp gpus=1 seed=$seeds "${recipe[@]}" hydra.sweep.dir="$out/accuracy"
  $dpbp train -m algo=fdg algo.beta=1.0,0.5 gpus=2,3 seed=$seeds "${recipe[@]}" \
    hydra.sweep.dir="$out/accuracy"
  $dpbp train -m algo=dgl gpus=2,3 seed=$seeds "${recipe[@]}" hydra.sweep.dir="$out/accuracy"
  $dpbp bench algos=[bp,fdg,ddp,dgl] gpus=[1,2] "${bench_quick[@]}" hydra.run.dir="$out/speed"
else
  for spec in "cifar10 resnet20 0.2" "cifar10 resnet56 0.5" "cifar10 resnet110 0.5" \
              "cifar10 resnet18 0.8" "cifar10 wrn28_10 0.7" "cifar100 resnet56 0.4" \
              "cifar100 resnet110 0.5" "cifar100 resnet18 0.5" "cifar100 wrn28_10 0.6"; do
    read -r data model beta <<< "$spec"
    $dpbp train -m experiment=fdg_cifar data=$data model=$model algo=bp gpus=1 seed=$seeds \
      "${recipe[@]}" hydra.sweep.dir="$out/accuracy"
    $dpbp train -m experiment=fdg_cifar data=$data model=$model algo=fdg algo.beta=1.0,$beta \
      gpus=2 seed=$seeds "${recipe[@]}" hydra.sweep.dir="$out/accuracy"
    case "$model" in resnet56|resnet110|resnet18)
      $dpbp train -m experiment=fdg_cifar data=$data model=$model algo=dgl gpus=2 seed=$seeds \
        "${recipe[@]}" hydra.sweep.dir="$out/accuracy";; esac
  done
  $dpbp train -m experiment=fdg_cifar model=resnet56 algo=dgl gpus=3,4 seed=$seeds \
    "${recipe[@]}" hydra.sweep.dir="$out/accuracy"
  $dpbp train -m experiment=fdg_cifar model=resnet56 algo=fdg algo.beta=1.0,0.5 gpus=3,4 \
    seed=$seeds "${recipe[@]}" hydra.sweep.dir="$out/accuracy"
  $dpbp bench algos=[bp,fdg,ddp,dp_fdg,gpipe,dgl] gpus=[1,2,3,4] model=wrn28_10 device=cuda \
    predict=true hydra.run.dir="$out/speed"
fi
$dpbp report "$out/accuracy" --out "$out/accuracy_table"
