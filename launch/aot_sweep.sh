#!/bin/bash
# The README's AOT table: models x TPU slices x steps, compiled on this CPU host (needs
# `pip install "jax[tpu]==0.10.2"`); one JSON report per run in $OUT, skipped when present.
# Summary: python -m covipal_jax.tools.aot --summarize launch/aot_reports
# ONLY=base: the README table; ONLY=long: the long-context packed prefills (docs/aot_long.md).
cd "$(dirname "$0")/.."
OUT=${OUT:-launch/aot_reports}
ONLY=${ONLY:-all}
if [ "$ONLY" != long ]; then
for model in llava15_7b llava15_13b llava_ov_7b; do
  for topo in v5e-8 v4-8 v5p-8; do
    case $topo in v5e-8) nd=8;; *) nd=4;; esac
    for mode in train_ppm prefill_full prefill_pruned; do
      case $mode in
        train_ppm) args="--mode train_ppm --batch 32 --text_len 128";;
        prefill_full) args="--mode prefill --batch 8 --text_len 64 --keep 1.0";;
        prefill_pruned) args="--mode prefill --batch 8 --text_len 64 --keep 0.25";;
      esac
      name=${model}_${topo}_${mode}
      [ -f $OUT/$name.json ] && continue
      echo "== $name $(date +%T)"
      python -m covipal_jax.tools.aot --config configs/$model.py --topology $topo $args \
        --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 --json $OUT/$name.json \
        > $OUT/$name.log 2>&1
      echo "rc=$? $(date +%T)"; grep -v "^WARNING\|^E0000\|^===\|learning/\|^$" $OUT/$name.log | tail -6
    done
  done
done
# Larger prefill batches on the smallest-HBM slice (v5e-8).
for model in llava15_7b llava15_13b llava_ov_7b; do
  for spec in "prefill64_full:--mode prefill --batch 64 --text_len 64 --keep 1.0" \
              "prefill64_pruned:--mode prefill --batch 64 --text_len 64 --keep 0.25"; do
    tag=${spec%%:*}; args=${spec#*:}
    name=${model}_v5e-8_${tag}
    [ -f $OUT/$name.json ] && continue
    echo "== $name $(date +%T)"
    python -m covipal_jax.tools.aot --config configs/$model.py --topology v5e-8 $args \
      --config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1 --json $OUT/$name.json \
      > $OUT/$name.log 2>&1
    echo "rc=$? $(date +%T)"; grep -v "^WARNING\|^E0000\|^===\|learning/\|^$" $OUT/$name.log | tail -6
  done
done
fi

# Long-context prefills on v5e-8 (docs/aot_long.md): packed AnyRes / video inputs
# (--visual), pruned (PPM r = 0.25) and unpruned, splash vs XLA attention, batch 8.
# OneVision-7B: 10-view AnyRes bucket (9 crops, 7,371 slots), 32-frame video (6,273 slots);
# LLaVA-NeXT-7B: 5-view bucket (base + 2x2 crops, 2,928 slots).
long_run() {  # name config visual batch keep attention [mesh flags]
  local name=$1 config=$2 visual=$3 batch=$4 keep=$5 attn=$6; shift 6
  local mesh=${*:-"--config.mesh.data=1 --config.mesh.fsdp=-1 --config.mesh.tensor=1"}
  [ -f $OUT/$name.json ] && return
  echo "== $name $(date +%T)"
  python -m covipal_jax.tools.aot --config "$config" --topology v5e-8 --mode prefill \
    --visual $visual --batch $batch --text_len 64 --keep $keep \
    --attention $attn $mesh --json $OUT/$name.json > $OUT/$name.log 2>&1
  echo "rc=$? $(date +%T)"; grep -v "^WARNING\|^E0000\|^===\|learning/\|^$" $OUT/$name.log | tail -7
}
if [ "$ONLY" != base ]; then
  # splash rows first (the path the README recommends on TPU), then the XLA comparison
  for attn in splash xla; do
    for input in "llava_ov_7b:anyres10:anyres:10" "llava_ov_7b:video32:video:32" \
                 "llava_next_7b:anyres5:anyres:5"; do
      model=${input%%:*}; rest=${input#*:}; tag=${rest%%:*}; visual=${rest#*:}
      for keep in full:1.0 pruned:0.25; do
        long_run ${model}_v5e-8_${tag}_b8_${keep%%:*}_${attn} configs/$model.py $visual 8 \
          ${keep#*:} $attn
      done
    done
  done
fi
