#!/usr/bin/env bash
# The transformer (model=gpt) on character-level text: test perplexity of bp (K = 1 and 2), ddg
# and fdg at K = 2, then the report (results/transformer_text.md).
# The text: the topics of Python's reference documentation that ship with the interpreter
# (pydoc_data.topics, CPython's own docs), sorted by topic name and joined, first CHARS characters.
#   scripts/transformer_text.sh OUT [EPOCHS] [SEEDS]
set -euo pipefail
out=${1:?usage: scripts/transformer_text.sh OUT [EPOCHS] [SEEDS]}
epochs=${2:-5}
seeds=${3:-0}
chars=${CHARS:-200000}
bin=$(dirname "$(command -v python)")
dpbp=${DPBP:-$bin/dpbp}
mkdir -p "$out"
python - "$out/corpus.txt" "$chars" <<'PY'
import sys
from pydoc_data.topics import topics
text = "\n\n".join(topics[k] for k in sorted(topics))[: int(sys.argv[2])]
open(sys.argv[1], "w", encoding="utf-8").write(text)
PY
common=(model=gpt data=text "data.path=$out/corpus.txt" data.context=64 model.layers=4
        model.dim=128 model.heads=4 trainer.batch_size=32 "trainer.epochs=$epochs"
        sched=cosine optim.lr=0.1 optim.momentum=0.9 optim.weight_decay=0 device=cpu
        executor=local trainer.progress=false "seed=$seeds")
# executor=local: every module in one process (the numbers of executor=dist, tests/test_lm.py);
# the K = 1 run goes beside the K = 2 sweep (2 cores)
"$dpbp" train -m algo=bp gpus=1 "${common[@]}" hydra.sweep.dir="$out/runs/k1" &
"$dpbp" train -m algo=bp,ddg,fdg gpus=2 "${common[@]}" hydra.sweep.dir="$out/runs/k2"
wait
"$dpbp" report "$out/runs" --out "$out/table"
