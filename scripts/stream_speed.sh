#!/usr/bin/env bash
# The streaming path (DataLoader) next to the in-memory path on the same data: images/s of
# `dpbp train` (BP, ResNet-20, synthetic 3x32x32 images, one worker), REPEATS runs of each,
# interleaved; prints one line per run and the min-max of each path (results/transformer_text.md).
#   scripts/stream_speed.sh OUT [REPEATS] [EXTRA OVERRIDES...]
set -euo pipefail
out=${1:?usage: scripts/stream_speed.sh OUT [REPEATS] [KEY=VALUE ...]}
repeats=${2:-3}
shift $(( $# >= 2 ? 2 : 1 ))
bin=$(dirname "$(command -v python)")
dpbp=${DPBP:-$bin/dpbp}
common=(algo=bp gpus=1 model=resnet20 data=synthetic data.train_size=3840 data.test_size=128
        trainer.batch_size=128 trainer.epochs=1 trainer.progress=false trainer.checkpoint=false
        data.loader_workers=2 "$@")
for r in $(seq 1 "$repeats"); do
  for path in false true; do
    "$dpbp" train "${common[@]}" data.stream=$path hydra.run.dir="$out/stream_$path/$r" \
      > /dev/null 2>&1
  done
done
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for path, name in (("false", "in memory (on the device)"), ("true", "streamed (DataLoader)")):
    ips = []
    for run in sorted(out.glob(f"stream_{path}/*/summary.json")):
        s = json.loads(run.read_text())
        ips.append(s["images_per_second"])
        print(f"{name:28s} run {run.parent.name}: {s['images_per_second']:.1f} images/s "
              f"({s['data_loading']})")
    print(f"{name:28s} min-max over {len(ips)}: {min(ips):.1f}-{max(ips):.1f} images/s")
PY
