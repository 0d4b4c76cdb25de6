#!/usr/bin/env bash
# Session scratch (never committed): one device call. Env: STEPS_RUN (steps of tools/inference_evidence.sh, each run
# in order with its own limit: tests, sweep, bench, ncu, profile), per-step limits TESTS_S SWEEP_S BENCH_S NCU_S.
set -uo pipefail
D=$OUT/${CALL:-call}
mkdir -p "$D"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$D/gpu.txt" 2>&1
start=$(date +%s)
cp medqa_core/engine/kernels/nf4_tiles.json "$D/nf4_tiles_repo.json"  # the table as committed (benchbase)
# a table from an earlier call (pre-placed as $D/base_tiles.json) stands for every step, a sweep's base too
[[ -f $D/base_tiles.json ]] && cp "$D/base_tiles.json" medqa_core/engine/kernels/nf4_tiles.json
for s in ${STEPS_RUN:-tests}; do
  case $s in
    tests) lim=${TESTS_S:-200} ;; sweep) lim=${SWEEP_S:-300} ;; bench) lim=${BENCH_S:-300} ;;
    ncu) lim=${NCU_S:-150} ;; profile) lim=${PROFILE_S:-200} ;; *) lim=200 ;;
  esac
  # a sweep's table stands for the steps after it (the device's copy of the tree only)
  [[ $s != sweep ]] && [[ -f $D/nf4_tiles.json ]] && cp "$D/nf4_tiles.json" medqa_core/engine/kernels/nf4_tiles.json
  if [[ $s == benchbase ]]; then  # the bench with the committed tile table, in its own folder (the A/B's base)
    echo "== $(date -u +%T) step benchbase (limit ${BENCH_S:-300} s)" | tee -a "$D/steps.txt"
    cp "$D/nf4_tiles_repo.json" medqa_core/engine/kernels/nf4_tiles.json
    STEP_TIMEOUT=${BENCH_S:-300} bash tools/inference_evidence.sh "$D/base" bench 2>&1 | tee -a "$D/steps.txt"
    continue
  fi
  if [[ $s == ncufull ]]; then  # Nsight Compute, full set, our launches with LoRA; the report printed here
    echo "== $(date -u +%T) step ncufull (limit ${NCUF_S:-150} s)" | tee -a "$D/steps.txt"
    cp medqa_core/engine/kernels/nf4_tiles.json "$D/nf4_tiles_ncu.json"
    timeout --signal=INT --kill-after=20 ${NCUF_S:-150} ncu --clock-control none --set full -c ${NCUF_COUNT:-4} \
      -k regex:_nf4_matmul_kernel -o "$D/nf4full" python3 bench/profile_nf4_kernel.py --once \
      --rows "${NCUF_ROWS:-1}" --layers "${NCUF_LAYERS:-gate+up_proj,q+k+v_proj}" --arms ours+lora > "$D/ncufull.log" 2>&1
    echo "ncufull exit $?" | tee -a "$D/steps.txt"
    ncu -i "$D/nf4full.ncu-rep" --page details > "$D/ncufull-details.txt" 2>&1
    ncu -i "$D/nf4full.ncu-rep" --page source --print-source sass --csv > "$D/ncufull-source.csv" 2>&1
    ls -la "$D" | tee -a "$D/steps.txt"
    continue
  fi
  echo "== $(date -u +%T) step $s (limit $lim s)" | tee -a "$D/steps.txt"
  STEP_TIMEOUT=$lim bash tools/inference_evidence.sh "$D" "$s" 2>&1 | tee -a "$D/steps.txt"
  # a second tests pass (another -k) where asked
  if [[ $s == tests && -n ${TESTS_K2:-} ]]; then
    echo "== $(date -u +%T) step tests2 -k $TESTS_K2" | tee -a "$D/steps.txt"
    STEP_TIMEOUT=${TESTS2_S:-150} TESTS_K=$TESTS_K2 bash tools/inference_evidence.sh "$D/t2" tests 2>&1 | tee -a "$D/steps.txt"
  fi
done
echo "== done in $(( $(date +%s) - start )) s" | tee -a "$D/steps.txt"
# the device tool leaves out folders past a depth: the bench files come back as one tarball
(cd "$D" && find . -name "*.json" -path "*bench*" | tar czf "$D/bench.tgz" -T - 2>/dev/null; tar tzf "$D/bench.tgz" 2>/dev/null)
tail -5 "$D"/tests.log "$D"/t2/tests.log 2>/dev/null | tee -a "$D/steps.txt"
