# Sourced by the paper scripts: `--quick` turns a paper sweep into a CPU-sized one on digits.
#   scripts/<table>.sh [--quick] [OUT_DIR]
# Full runs need CIFAR (downloaded on first use) and GPUs; --quick runs in minutes on a laptop.
set -euo pipefail
quick=false
if [[ "${1:-}" == "--quick" ]]; then quick=true; shift; fi
name=$(basename "$0" .sh)
out=${1:-multirun/$name$($quick && echo -quick)}
dpbp=${DPBP:-dpbp}
if $quick; then
  seeds=0
  # 3 epochs on the CPU; the scripts pick digits and ResNet-20 (the defaults) in this mode
  recipe=(trainer.epochs=3 trainer.batch_size=64 device=cpu trainer.progress=false)
  bench_quick=(repeats=1 epochs=3 steps_per_epoch=5 batch_size=32 device=cpu)
else
  seeds=0,1,2
  recipe=(trainer.progress=false)
fi
echo "$name: writing to $out (quick=$quick)" >&2
