#!/usr/bin/env bash
# The README's quantization table for a trained run: bytes and round-trip val_bpb of four artifacts of
# RUN_DIR/model.safetensors, made by `loopgolf quantize --eval` with the settings and data of
# RUN_DIR/config.toml. Usage: scripts/quant_table.sh RUN_DIR [extra quantize args, e.g. --data DIR]
set -euo pipefail
run="${1:?usage: scripts/quant_table.sh RUN_DIR [--data DIR]}"
shift
loopgolf="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/loopgolf"

weights_bpb=""
row() {  # row LABEL ARTIFACT_NAME QUANTIZE_ARGS...
  local label="$1" name="$2"
  shift 2
  local line
  line="$("$loopgolf" quantize "$run/model.safetensors" --out "$run/$name" --eval "$@" | grep '^row: ')"
  local bytes="${line#*bytes=}" bpb="${line#*roundtrip_val_bpb=}"
  [[ "$line" == *weights_val_bpb=* ]] && weights_bpb="${line#*weights_val_bpb=}"
  bytes="$(echo "${bytes%% *}" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta')"
  printf '| %s | %s | %s |\n' "$label" "$bytes" "${bpb%% *}"
}

echo "| artifact | bytes | round-trip val_bpb |"
echo "|---|---:|---:|"
row "upstream int8 + zlib-9" table.int8-zlib.art --scheme int8 --codec zlib --eval-weights "$@"
row "int6 + zstd-22" table.int6-zstd.art --scheme int6 --rule 'tok_emb.weight=int8' --codec zstd "$@"
row "int7 attention, int5 MLP + zstd-22" table.int7-int5-zstd.art --scheme int8 --rule '*.attn.*=int7' \
  --rule '*.mlp.*=int5' --codec zstd "$@"
row "GPTQ int6 + zstd-22" table.gptq-int6-zstd.art --scheme int6 --rule 'tok_emb.weight=int8' --codec zstd \
  --gptq "$@"
# Where rounding hurts more, GPTQ's share shows more clearly:
row "int4 + zstd-22" table.int4-zstd.art --scheme int4 --rule 'tok_emb.weight=int8' --codec zstd "$@"
row "GPTQ int4 + zstd-22" table.gptq-int4-zstd.art --scheme int4 --rule 'tok_emb.weight=int8' --codec zstd \
  --gptq "$@"
echo "(the weights before quantization: val_bpb $weights_bpb)"
