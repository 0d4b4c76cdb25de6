#!/usr/bin/env bash
# The training evidence of docs/performance.md, docs/numerics.md and docs/peers.md on this machine's GPU (CUDA
# or ROCm), saved under OUT step by step:
#
#   cold   a 2-epoch `medqa-parity run` of PRESET with the profile it picks (max-speed on a large card), on an
#          empty compile cache: OUT/runs/*.json, its compile phase `cold`
#   warm   the same run again: its compile phase loads what `cold` saved (`warm`; the target is <= 10 s)
#   fp8    the same run with the fp8 lever (`--profile max-speed+fp8=true`), refused in one line where the GPU
#          has no fp8 tensor cores; report it against `warm` (below) for its cost in accuracy
#   bench  the train bench on the same batches: the reference arm, max-speed, max-speed with fp8
#   peers  the peers' arms (Liger-Kernel, then Unsloth in its own session, imported before transformers) where
#          installed; one that cannot run is a skip with its reason
#
#   tools/training_evidence.sh OUT [STEP...]      (default: all five, in that order)
#
# Environment: DATA (MedQA folder, default: the bundled subset), PRESET (default mistral-7b), PROFILE (the
# --profile of `cold` and `warm`, default: none, the run picks; e.g. max-speed+base_custom_op=true, whose graphs
# AOTAutograd's cache serves too), STEP_TIMEOUT (seconds a step may take, default none), MEDQA_PARITY_CACHE (the
# compile cache's folder: empty for `cold`).
# A step that fails is reported and the next one runs; the exit code is the number of failed steps. To publish:
# copy OUT/runs/*.json into results/runs/ and the bench files into results/bench/<machine>/, commit them, run
# `medqa-parity report results/runs/<warm> results/runs/<fp8> --out results/report-fp8` and
# `python tools/gen_docs.py`.
set -uo pipefail
OUT=${1:?usage: tools/training_evidence.sh OUT [cold|warm|fp8|bench|peers ...]}
shift
STEPS=${*:-cold warm fp8 bench peers}
for s in $STEPS; do  # all checked before any runs
    case $s in cold | warm | fp8 | bench | peers) ;;
    *) echo "unknown step '$s' (cold, warm, fp8, bench, peers)" >&2; exit 2 ;; esac
done
PRESET=${PRESET:-mistral-7b}
source "$(dirname "$0")/evidence_steps.sh"
RUN=(python3 -m medqa_core.cli run --preset "$PRESET" "${DATA_ARGS[@]}" --results "$OUT/runs")
BENCH=(python3 -m pytest -p no:cacheprovider --preset "$PRESET" "${DATA_ARGS[@]}"
       --benchmark-storage="file://$OUT/bench")

for s in $STEPS; do
    case $s in
    cold | warm) step "$s" "${RUN[@]}" ${PROFILE:+--profile "$PROFILE"} ;;
    fp8) step fp8 "${RUN[@]}" --profile max-speed+fp8=true ;;
    bench) step bench "${BENCH[@]}" bench/bench_train.py -k "reference or profile" \
        --train-profiles max-speed,max-speed+fp8=true --benchmark-save=train-fp8 ;;
    peers)  # Unsloth alone in a second session that imports it before transformers (bench/conftest.py)
        step peers "${BENCH[@]}" bench/bench_peers.py -k "not unsloth" --benchmark-save=peers
        MEDQA_UNSLOTH_FIRST=1 step peers-unsloth "${BENCH[@]}" bench/bench_peers.py -k unsloth \
            --benchmark-save=peers-unsloth
        grep -h "^run \|tokens/s\|SKIPPED\|error" "$OUT/peers-unsloth.log" | tail -n 8 ;;
    esac
    grep -h "^run \|tokens/s\|compile\|SKIPPED\|error" "$OUT/$s.log" | tail -n 8
done
exit "$failed"
