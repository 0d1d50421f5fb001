#!/usr/bin/env bash
# Decode a test set over N parallel jobs and score the joined output as one.
#
# Usage: bash scripts/decode.sh [--nj N] [--threads T] MODEL TARGET [key=value ...]
#   MODEL TARGET and the overrides are inference.py's (e.g. base exp/jp_demo decode.beam_size=5).
#   Each test set (decode.test_sets, or the experiment's) is split into N interleaved parts (decode.shard=k/N):
#   job k decodes part k into OUT/split<N>/<k>/ with T torch threads; then the parts' hyp.txt/ref.txt are joined
#   into OUT (the folder inference.py would write for the whole set) and rescored there. results.json then has
#   rtf (summed job time / audio seconds) and rtf_elapsed (this script's wall-clock time / audio seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "$(date '+%F %T') [decode.sh:${BASH_LINENO[0]}] $*"; }
die() { echo "decode.sh: error: $*" >&2; exit 1; }

nj=2
threads=1
while [ $# -gt 0 ]; do
  case "$1" in
    --nj) nj=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    --*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || die "usage: decode.sh [--nj N] [--threads T] MODEL TARGET [key=value ...]"
[[ "$nj" =~ ^[1-9][0-9]*$ ]] || die "--nj must be a positive integer, got '$nj'"
model=$1
target=$2
shift 2
python=.venv/bin/python
[ -x "$python" ] || python=python3

# one "test_set<TAB>out_dir" line per test set, as inference.py would write them
plan=$("$python" - "$target" "$@" <<'PY'
import sys
from dqwhisper import inference
from dqwhisper.utils import DQWhisperError
try:
    p = inference.plan(sys.argv[1], sys.argv[2:])
except DQWhisperError as e:
    sys.exit(f"decode.sh: error: {e}")
for test_set, out in zip(p.test_sets, p.out_dirs):
    print(f"{test_set}\t{out}")
PY
)

while IFS=$'\t' read -r test_set out; do
  split=$out/split$nj
  rm -rf "$split"
  mkdir -p "$split"
  log "decoding $test_set in $nj jobs -> $out"
  start=$(date +%s.%N)
  pids=()
  for k in $(seq 1 "$nj"); do
    "$python" inference.py "$model" "$target" "$@" "decode.test_sets=[$test_set]" "decode.shard=$k/$nj" \
      "decode.out_dir=$split/$k" "decode.num_threads=$threads" > "$split/$k.log" 2>&1 &
    pids+=($!)
  done
  failed=0
  for k in $(seq 1 "$nj"); do
    wait "${pids[$((k - 1))]}" || { failed=1; echo "decode.sh: job $k failed; its log:" >&2; tail -5 "$split/$k.log" >&2; }
  done
  [ $failed = 0 ] || die "some jobs failed (logs in $split/*.log)"
  elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { print e - s }')
  parts=()
  for k in $(seq 1 "$nj"); do parts+=("$split/$k"); done
  "$python" -m dqwhisper.scoring --data "$test_set" --merge "${parts[@]}" --out "$out" --elapsed "$elapsed"
done <<< "$plan"
