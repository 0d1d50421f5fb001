#!/usr/bin/env bash
# Train (distil) with the CE + CTC (+ KD + layer matching) loss, as the paper's command does:
#   bash scripts/train_ce_ctc.sh --nj 1 --expdir exp/X --conf conf/jap_ts.yaml checkpoint_dir=exp/X \
#     data.data_dir=data/demo optim.lr=3e-5 data.collector.minibatch_size=20 loss.alpha=0
# --nj N     processes (torchrun DDP: gloo on the CPU, nccl on GPUs; each rank reads its share of the batches)
# --expdir   the experiment dir: config.yaml (resolved), train.log, tensorboard/, checkpoints; also checkpoint_dir
#            unless an override sets it
# --conf     a config file: conf/<name>.yaml (an experiment that starts from conf/config.yaml) or any yaml whose
#            defaults list names `config`
# Everything after the options is a Hydra override (key=value). Expects: data dirs under data.data_dir, the teacher
# (teacher.name: a store name such as base, or a .pt path).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "$(date '+%F %T') [$(basename "$0"):${BASH_LINENO[0]}] $*"; }

nj=1
expdir=
conf=conf/config.yaml
master_port=
help_message="Usage: $0 --nj N --expdir DIR --conf FILE [key=value ...]"
. scripts/parse_options.sh

[ -n "$expdir" ] || { echo "$0: --expdir is required" >&2; exit 1; }
[ -f "$conf" ] || { echo "$0: config file '$conf' does not exist" >&2; exit 1; }
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3

overrides=("$@")
ckpt_dir=
for o in "${overrides[@]+"${overrides[@]}"}"; do
  case "$o" in checkpoint_dir=*) ckpt_dir=${o#checkpoint_dir=} ;; esac
done
[ -n "$ckpt_dir" ] || { ckpt_dir=$expdir; overrides+=("checkpoint_dir=$expdir"); }

conf_dir=$(cd "$(dirname "$conf")" && pwd)
conf_name=$(basename "$conf" .yaml)
mkdir -p "$expdir" "$ckpt_dir"
# One training per experiment dir: the lock (dqwhisper/train/expdir.py takes the same one) is held by this shell and
# what it starts, and released by the kernel when they end, killed or not.
exec 9>>"$ckpt_dir/.lock"
if ! flock -n 9; then
  echo "$0: error: $ckpt_dir is in use by another training ($(cat "$ckpt_dir/.lock" 2>/dev/null || true)): wait for" \
    "it to end, or train into another --expdir" >&2
  exit 1
fi
echo "pid $$ on host $(hostname) since $(date '+%F %T')" > "$ckpt_dir/.lock"
DQWHISPER_EXPDIR_LOCKED=$(cd "$ckpt_dir" && pwd -P)
export DQWHISPER_EXPDIR_LOCKED
# torchrun through dqwhisper.bin.launch: a training error stays the last line (no torchrun traceback after it)
if [ "$nj" -gt 1 ]; then
  port=${master_port:-$((29500 + RANDOM % 1000))}
  launcher=("$python" -m dqwhisper.bin.launch --nproc_per_node "$nj" --master_port "$port")
else
  launcher=("$python" -m dqwhisper.bin.launch --nproc_per_node 1 --standalone)
fi
log "training $conf ($nj process(es)) into $expdir; log: $expdir/train.log"
"${launcher[@]}" -m dqwhisper.bin.train \
  --config-path "$conf_dir" --config-name "$conf_name" \
  "hydra.searchpath=[file://$PWD/conf]" \
  "hydra.run.dir=$expdir/hydra" hydra.job.chdir=false hydra/job_logging=none hydra/hydra_logging=none \
  "${overrides[@]}" 2>&1 | tee -a "$expdir/train.log"
log "done: $expdir ($(ls "$expdir" | tr '\n' ' '))"
