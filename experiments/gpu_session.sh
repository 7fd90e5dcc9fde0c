#!/usr/bin/env bash
# One GPU session's work, in order, on a GPU machine that has this checkout, the wheels in .whl and the packed
# data (stagewise pack) in .gpu/packs: the decoding benchmark (which also decides whether decoding replays CUDA
# graphs here), the GPU pipeline (staged path + joint baseline + held-out tool scores, timed alone), the
# throughput benchmark of its two shapes (alone), then, together until $DEADLINE seconds after the start, the
# recipe comparisons (VARIANTS; by default preference_dpop and preference_lr2e6) and the staged-vs-joint study (its decisive runs
# first; it starts no run after its time budget, and skips the runs its results.json holds). Every step writes
# its results under $RESULTS (default runs/session, git-ignored, kept between calls on a warm machine);
# `touch $RESULTS/DONE` marks the end.
#   bash experiments/gpu_session.sh                  # in the foreground
#   setsid bash experiments/gpu_session.sh > runs/session.log 2>&1 &   # in the background, then poll $RESULTS
# Set STAGEWISE_COMMIT to the local checkout's commit in the call that starts it: the device's git names an older
# commit than the tree it was given (run 8), and every card takes its commit from there.
# Environment: DEADLINE (seconds after the start when the comparisons and the study stop; default 1450),
# DECODING=0 (no decoding benchmark: decoding keeps its default, CUDA graphs where CUDA is; runs 6-8 found them
# captured and equal to eager), BASELINES=0 (the pipeline's staged path only: its baselines' time goes to the comparisons),
# VARIANTS (the recipe comparisons to run, in order), WORKERS (of them at once; default 4), STUDY=0 (no study beside them), STUDY_DEVICES (the study's
# workers, one GPU index each; default "0 0"), BENCH_SIZES (the throughput benchmark's sizes, default
# "small_text small_tools"; set and empty: no benchmark), PIPELINE=0 (neither the pipeline nor the throughput benchmark:
# after the decoding check the time goes to the comparisons, which need the pipeline's checkpoints on this
# machine, and the study; `PIPELINE=0 VARIANTS= STUDY_DEVICES="0 0 0 0"` gives a fresh machine to the study).
# The study writes under $RESULTS/staged_vs_joint (which the device tool does not overwrite between calls, unlike
# the checkout's tracked experiments/results/), starting from the committed results.json, so a later call of the
# same session skips the runs an earlier one finished.
# How the device tool's calls poll it (each call at most 10 minutes; what is under $OUT comes back):
#   for i in $(seq 1 28); do sleep 20; tar czf $OUT/session.tgz runs/session runs/session.log runs/gpu/*.log \
#     runs/gpu/*/stderr.log runs/gpu/*/events.out.tfevents.* models/gpu/*/*.json 2>/dev/null
#     [ -f runs/session/DONE ] && break; done
# The machine goes back 30 s after a call returns with no next call: issue the next poll at once (run 6 lost its
# tool evaluation and every variant to a late poll; the pipeline's fits came back in the first call's tarball).
set -u
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-runs/session}
DEADLINE=${DEADLINE:-1450}
mkdir -p "$RESULTS"
case $RESULTS in /*) OUT=$RESULTS ;; *) OUT=$PWD/$RESULTS ;; esac  # an absolute RESULTS as it is
export OUT PYTHONUNBUFFERED=1
date=$(date -u +%F)
start=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
step() { echo "== $(date -u +%T) $*" | tee -a "$RESULTS/steps.txt"; "$@"; local rc=$?
  echo "== $(date -u +%T) exit $rc" | tee -a "$RESULTS/steps.txt"; }

nvidia-smi --query-gpu=name,memory.total,memory.used,utilization.gpu --format=csv | tee "$RESULTS/card.txt"
rm -f "$RESULTS/decoding_${date}_gpu_session.json"  # an earlier call's must not decide for this one
[ "${DECODING:-1}" != 0 ] && step timeout -k 10 150 python3 -m experiments.benchmark_decoding --repeats 1 --tag "${date}_gpu_session"
# the graph must be captured and give the eager static step's tokens in the float32 check; where not, eager
if [ "${DECODING:-1}" != 0 ] && ! python3 -c "import json,sys; c=json.load(open('$RESULTS/decoding_${date}_gpu_session.json')).get('check') or {}; sys.exit(not (c.get('graph_captured') and c.get('graph_rows_equal_static') == 1.0))"; then
  export STAGEWISE_CUDA_GRAPHS=0
  echo "== decoding without CUDA graphs" | tee -a "$RESULTS/steps.txt"
fi
if [ "${PIPELINE:-1}" != 0 ]; then
  pipeline_args=(); [ "${BASELINES:-1}" = 0 ] && pipeline_args=(--no-baselines)
  step timeout -k 20 760 python3 -m experiments.gpu_pipeline --pack .gpu/packs/full/full.pack.json --timeout 600 \
    --results "$RESULTS/gpu_pipeline_$date" "${pipeline_args[@]}"
  # shellcheck disable=SC2086
  [ -n "${BENCH_SIZES-x}" ] && step timeout -k 20 240 python3 -m experiments.benchmark_throughput \
    --sizes ${BENCH_SIZES:-small_text small_tools} --rows stagewise --tag gpu_pipeline
fi
# the study reads data/full, which only the pipeline's first step unpacks: without the pipeline, unpack it here
if [ "${STUDY:-1}" != 0 ] && [ ! -f data/full/tools/manifest.json ] && [ -f .gpu/packs/full/full.pack.json ]; then
  step timeout -k 10 120 python3 -m lightning_modules unpack --pack .gpu/packs/full/full.pack.json --into data
fi
# together: the recipe comparisons (WORKERS at once) and the study (STUDY_DEVICES workers), until the deadline
# by default the stage-4 settings not yet run from the 5,200-step tool stage (run 9 ran preference, preference_sampled,
# preference_ipo and joint_tools); the greedy-pair variants share one set of pairs, preference_sampled makes its
# own; their held-out windows match the tool stage's; each validates 16 a batch
VARIANTS=${VARIANTS-preference_dpop preference_lr2e6}
study="$RESULTS/staged_vs_joint"
mkdir -p "$study"
[ -f "$study/results.json" ] || cp experiments/results/staged_vs_joint/results.json "$study/" 2>/dev/null
rest=$(left)
if [ "$rest" -gt 120 ]; then
  if [ -n "$VARIANTS" ]; then
    # shellcheck disable=SC2086
    step timeout -k 20 $((rest - 20)) python3 -m experiments.recipe_comparisons --variants $VARIANTS --workers "${WORKERS:-4}" \
      --out "$RESULTS/recipe_comparisons_$date" &
  fi
  if [ "${STUDY:-1}" != 0 ]; then
    # shellcheck disable=SC2086
    # its results under $study only (that is under $OUT already: no second copy at $OUT's top)
    OUT=$OUT/staged_vs_joint step timeout -k 20 $((rest - 20)) python3 -m experiments.staged_vs_joint \
      --devices ${STUDY_DEVICES:-0 0} --time-budget $((rest - 240 > 0 ? rest - 240 : 1)) --work-dir runs/study \
      --out "$study" &
  fi
  wait
fi
touch "$RESULTS/DONE"
