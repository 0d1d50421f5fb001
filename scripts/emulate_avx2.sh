#!/usr/bin/env bash
# Run a command as if on an AVX2-only x86 CPU (no AVX512, no VNNI), on an AVX512 machine:
#   bash scripts/emulate_avx2.sh .venv/bin/python -m pytest -q tests/quant/test_kernels.py
# ATen's vectorized kernels, fbgemm, oneDNN, MKL and CTranslate2 are capped at AVX2 by their own switches;
# DQW_EMULATE_CPU=avx2 makes dqwhisper.quant.kernels disable mkldnn, which sends torch._int_mm down the plain loop
# that a CPU without AVX512-VNNI gets (torch checks cpuinfo for VNNI, which no variable overrides). Float GEMMs keep
# MKL's AVX2 code; convolutions lose mkldnn (slower for float and quantized models alike).
set -euo pipefail
export DQW_EMULATE_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
  DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 CT2_FORCE_CPU_ISA=AVX2
exec "$@"
