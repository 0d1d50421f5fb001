#!/usr/bin/env bash
# Kaldi-style option parsing, to be sourced after the caller defines its options as shell variables with defaults:
#   nj=1; expdir=; conf=
#   . scripts/parse_options.sh
# turns `--nj 4 --expdir exp/x` (or `--nj=4`) into nj=4 expdir=exp/x for variables that already exist; `--help`
# prints the caller's $help_message. Parsing stops at the first argument that is not an option (or after `--`);
# what is left stays in "$@".
while true; do
  [ $# -eq 0 ] && break
  case "$1" in
    --help|-h)
      echo -e "${help_message:-no help for $0}"
      exit 0 ;;
    --)
      shift; break ;;
    --*=*)
      name=$(echo "${1%%=*}" | sed 's/^--//; s/-/_/g')
      value="${1#*=}"
      shift ;;
    --*)
      name=$(echo "$1" | sed 's/^--//; s/-/_/g')
      [ $# -ge 2 ] || { echo "$0: option $1 needs a value" >&2; exit 1; }
      value="$2"
      shift 2 ;;
    *)
      break ;;
  esac
  if ! declare -p "$name" >/dev/null 2>&1; then
    echo "$0: unknown option --${name//_/-}" >&2
    exit 1
  fi
  printf -v "$name" '%s' "$value"
done
true
