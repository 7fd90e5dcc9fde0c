#!/usr/bin/env bash
# One GPU session's work, in order, on a GPU machine that has this checkout, the wheels in .whl and the packed
# data (stagewise pack) in .gpu/packs: the GPU pipeline (staged path + joint baseline, timed alone), the
# throughput benchmark of its two shapes (alone), then the recipe comparisons (several at once). Every step
# writes its results under $RESULTS (default runs/session, git-ignored, kept between calls on a warm machine);
# `touch $RESULTS/DONE` marks the end.
#   bash experiments/gpu_session.sh                  # in the foreground
#   setsid bash experiments/gpu_session.sh > runs/session.log 2>&1 &   # in the background, then poll $RESULTS
set -u
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-runs/session}
mkdir -p "$RESULTS"
export OUT=$PWD/$RESULTS PYTHONUNBUFFERED=1
date=$(date -u +%F)
step() { echo "== $(date -u +%T) $*" | tee -a "$RESULTS/steps.txt"; "$@"; echo "== $(date -u +%T) exit $?" | tee -a "$RESULTS/steps.txt"; }

nvidia-smi --query-gpu=name,memory.total,memory.used,utilization.gpu --format=csv | tee "$RESULTS/card.txt"
step timeout -k 20 760 python3 -m experiments.gpu_pipeline --pack .gpu/packs/full/full.pack.json --timeout 580 \
  --results "$RESULTS/gpu_pipeline_$date"
step timeout -k 20 300 python3 -m experiments.benchmark_throughput --sizes small_text small_tools --rows stagewise \
  --tag gpu_pipeline
# the comparisons that decide the recipe first (code replay, the tool stage's LR), then stage 4, then tool replay
step timeout -k 20 900 python3 -m experiments.recipe_comparisons --variants code_noreplay tools_lr1e4 preference \
  tools_noreplay joint_tools --workers 3 --out "$RESULTS/recipe_comparisons_$date"
touch "$RESULTS/DONE"
