#!/usr/bin/env bash
# The device check (issue 15): one command for a lent machine with one GPU (H100, 16 cores,
# python3 with torch but without hydra-core/omegaconf/antlr4, no network); ends inside 8 minutes.
#
#   scripts/device_check.sh [--quick] [--cpu-only] [--seconds N] [OUT]      (OUT: ./device-out)
#
# Writes to OUT, each as .md and .json stating the command, machine, torch version and date:
#   device_cuda        every algo that runs on one GPU against the same run on the CPU, what
#                      cannot run on one GPU and why, dpbp's overhead against a plain loop
#                      (python -m dpbp.cuda_check)
#   device_papers      ResNet-110, WRN-28-10 (and ResNet-56) profiled on the GPU, K = 2..4
#                      simulated, next to the papers' speed tables (python -m dpbp.paper_predict)
#   device_cpu_scaling dpbp bench on the CPU at W = 1, 2, 4, 8, one thread per process, with the
#                      ceiling and the simulator's prediction and error beside each row
# and device_check.log (all of the output), with a summary table last. Each part has its own time limit; a failing part does not stop the
# others (the exit status is 1 if any failed). The CUDA parts run first: their time is bounded,
# and the CPU bench takes what is left (its repeats adapt to it: time_budget_s).
#
# Before the parts: wheels in the repo's .whl/ (hydra-core, omegaconf, antlr4) are installed to
# /tmp/site without network, and dpbp is made importable with its configs (dpbp.conf).
# PYTHON picks the interpreter (default python3).
set -euo pipefail

usage() {
  sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Options:
  --quick      tiny settings: the CPU bench at W <= 2 on a small MLP, 4 of the CUDA checks
  --cpu-only   skip the CUDA parts; the papers' profile then runs on the CPU with a tiny batch
               (as it does wherever there is no CUDA: a check that it runs, not a prediction)
  --seconds N  the whole check ends inside N seconds (default 450)
  -h, --help   this text
EOF
}

quick=false
cpu_only=false
total=450
out=""
args_given="$*"
while (( $# )); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --quick) quick=true ;;
    --cpu-only) cpu_only=true ;;
    --seconds)
      if [[ $# -lt 2 || ! "$2" =~ ^[0-9]+$ ]]; then
        echo "device_check.sh: --seconds needs a whole number of seconds; see --help." >&2
        exit 2
      fi
      total=$2; shift ;;
    --) shift; break ;;
    -*) echo "device_check.sh: unknown option '$1'; see --help." >&2; exit 2 ;;
    *)
      if [[ -n "$out" ]]; then
        echo "device_check.sh: one OUT folder only (got '$out' and '$1'); see --help." >&2
        exit 2
      fi
      out=$1 ;;
  esac
  shift
done
if (( $# )); then
  if [[ -n "$out" || $# -gt 1 ]]; then
    echo "device_check.sh: one OUT folder only; see --help." >&2
    exit 2
  fi
  out=$1
fi
out=${out:-./device-out}

start=$SECONDS
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd -P)
# OUT holds only the tables and this log (the device tool brings back 8 files); the runs, the
# bench's folder and the part logs go to a work folder beside
work=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")
exec > >(tee "$out/device_check.log") 2>&1
parts="$work/parts.tsv"
: > "$parts"
here="(run by: scripts/device_check.sh${args_given:+ $args_given})"

# --- make hydra and dpbp importable, without network --------------------------------------
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if compgen -G "$repo/.whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$repo"/.whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# dpbp must be importable with dpbp.conf (conf/ ships as that package), from any folder
dpbp_from() {  # prints where dpbp is imported from; fails if it or its configs are missing
  (cd "$work" && "$py" -c 'import os, dpbp, dpbp.conf, dpbp.cli
print(os.path.realpath(os.path.dirname(dpbp.__file__)))') 2> /dev/null
}
site=/tmp/dpbp-site
install_pip() {  # a regular install into $site (needs setuptools and wheel, no network)
  "$py" -c 'import setuptools, wheel' 2> /dev/null \
    && "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
         --target "$site" "$repo" > "$work/install.log" 2>&1
}
install_links() {  # needs nothing: the package by links, its configs linked in as dpbp/conf
  mkdir -p "$site/dpbp"
  for f in "$repo"/dpbp/*; do ln -s "$f" "$site/dpbp/"; done
  ln -s "$repo/conf" "$site/dpbp/conf"
}
if ! where=$(dpbp_from) || [[ "$where" != "$repo/dpbp" ]]; then
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  for how in pip links; do
    rm -rf "$site"
    if "install_$how" && where=$(dpbp_from); then
      break
    fi
    where=""
  done
  if [[ -z "$where" ]]; then
    echo "device_check.sh: cannot import dpbp with its configs (tried pip install --target" \
      "$site, see $work/install.log, and links); is hydra-core installed or in .whl/?" >&2
    exit 1
  fi
  echo "device_check: dpbp from $where (installed to $site by $how)"
fi
cd "$work"  # not the repo root: there ./dpbp (without conf) would shadow the installed one

cuda=false
if ! $cpu_only && "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
    2> /dev/null; then
  cuda=true
fi
echo "device_check: OUT=$out (work: $work), cuda=$cuda, quick=$quick, $(nproc) CPUs," \
  "budget ${total}s"

left() { echo $(( total - (SECONDS - start) )); }
at_most() { echo $(( $1 < $2 ? $1 : $2 )); }  # the smaller of two numbers

# part NAME LIMIT CMD...: run CMD under `timeout LIMIT`, log to the work folder, record
# NAME, exit status and seconds in parts.tsv; never stops the script
part() {
  local name=$1 limit=$2 t0=$SECONDS status=0
  shift 2
  if (( limit < 10 )); then
    echo "device_check: no time left for part $name" | tee "$work/$name.log"
    status=124
  else
    echo "device_check: part $name (at most ${limit}s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$work/$name.log" || status=${PIPESTATUS[0]}
  fi
  printf '%s\t%s\t%s\n' "$name" "$status" $(( SECONDS - t0 )) >> "$parts"
}

# --- 2. CUDA: every algo that runs on one GPU, against the CPU; harness overhead ------------
cuda_cmd=("$py" -m dpbp.cuda_check "$out" --work "$work/cuda")
$quick && cuda_cmd+=(--only bp-k1,fdg-k2,fdg-k2-amp,pdasgd-k1 --overhead-steps 20)
if $cpu_only; then
  # device_cuda.md/json say so, as they do on a machine without CUDA
  echo "device_check: --cpu-only: the CUDA parts are skipped" | tee "$work/cuda.log"
  printf 'cuda\tskipped\t0\n' >> "$parts"
  "$py" -m dpbp.device_report skipped "$out" device_cuda "--cpu-only was given" \
    "scripts/device_check.sh $args_given" || true
else  # at most 150 s, leaving 260 s for the rest
  part cuda "$(at_most 150 $(( $(left) - 260 )))" "${cuda_cmd[@]}" \
    --command "${cuda_cmd[*]} $here"
fi

# --- 3. the papers' settings, predicted ------------------------------------------------------
papers_cmd=("$py" -m dpbp.paper_predict "$out")
if ! $cuda; then
  # a check that the part runs, in seconds: one of the papers' models, a tiny batch
  papers_cmd+=(--device cpu --models resnet56 --batch 2 --repeats 1)
fi
# at most 60 s, leaving 200 s for the CPU bench
part papers "$(at_most 60 $(( $(left) - 200 )))" "${papers_cmd[@]}" \
  --command "${papers_cmd[*]} $here"

# --- 1. CPU scaling: dpbp bench at W = 1, 2, 4, 8, ceiling and prediction beside each row ---
cpu_limit=$(( $(left) - 20 ))
budget=$(( cpu_limit - 60 > cpu_limit / 2 ? cpu_limit - 60 : cpu_limit / 2 ))  # room to predict
# ResNet-20 (11 blocks: K = 8 fits), batch 128 per worker; 22 cases a repeat, each one process
# start (3-7 s) plus 16 steps; the second repeat runs only if it fits in time_budget_s
if $quick; then
  bench=('algos=[bp,ddg,fr,fdg,ddp,gpipe]' 'gpus=[1,2]' model=mlp data=synthetic
         'data.shape=[1,8,8]' batch_size=16 steps_per_epoch=2 epochs=2 repeats=1)
else
  bench=('algos=[bp,ddg,fr,fdg,ddp,gpipe]' 'gpus=[1,2,4,8]' model=resnet20 data=synthetic
         batch_size=128 steps_per_epoch=8 epochs=2 repeats=2 'predict_gpus=[]')
fi
bench+=(device=cpu threads=1 ceiling=true predict=true time_budget_s=$budget
        hydra.run.dir="$work/bench")
bench_cmd=("$py" -m dpbp.cli bench "${bench[@]}")
part cpu "$cpu_limit" "${bench_cmd[@]}"
report_cmd=("$py" -m dpbp.device_report cpu-scaling "$work/bench" "$out"
            --command "${bench_cmd[*]} $here")
"${report_cmd[@]}" 2>&1 | tee -a "$work/cpu.log" || true

# --- summary -----------------------------------------------------------------------------
echo
echo "device_check: done in $(( SECONDS - start ))s; tables in $out"
"$py" -m dpbp.device_report summary "$out" "$parts" || cat "$parts"
ls "$out"/device_*.md || true
if cut -f2 "$parts" | grep -qv -e '^0$' -e '^skipped$'; then
  exit 1
fi
