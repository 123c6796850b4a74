#!/usr/bin/env bash
# Speed on this machine's CPU: BP in one process against ddg, fr and fdg with 2 modules in two
# processes (one thread each), ResNet-20 on digits. Repeats are interleaved so that drift of a
# shared machine hits every row alike; `dpbp report` gives the median images/s per row.
#   scripts/cpu_speed_digits.sh [OUT_DIR] [REPEATS] [EXTRA OVERRIDES...]
set -euo pipefail
out=${1:-multirun/cpu_speed_digits}
repeats=${2:-3}
shift $(( $# > 2 ? 2 : $# ))
dpbp=${DPBP:-dpbp}
for rep in $(seq "$repeats"); do
  for run in "algo=bp gpus=1" "algo=ddg gpus=2" "algo=fr gpus=2" "algo=fdg gpus=2"; do
    name=$(echo "$run" | tr ' =' '-_')
    # shellcheck disable=SC2086
    $dpbp train $run device=cpu trainer.epochs=6 trainer.checkpoint=false \
      trainer.progress=false "$@" hydra.run.dir="$out/$name/repeat$rep" > /dev/null
  done
done
$dpbp report "$out"
