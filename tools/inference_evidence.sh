#!/usr/bin/env bash
# The inference evidence of docs/decode.md, on this machine's GPU (CUDA or ROCm), saved under OUT step by step:
#
#   tests    the NF4 kernel's tests on the GPU (exactness, greedy tokens against bitsandbytes') and the decoder's
#            (its step's and prefill's graph replays give generate's tokens)
#   sweep    time the tile grid at 1, 8, 32 and 64 rows; writes OUT/nf4_tiles.json (this device's tile table)
#            and OUT/nf4-kernel-sweep.json (every layer shape and arm, every tile's time)
#   ncu      Nsight Compute on the gate/up_proj shape (NCU_LAYERS: others) at 1 and 8 rows (NCU_ROWS: others),
#            ours (the tiles in use, with and without LoRA) and bitsandbytes':
#            where each kernel's time goes (speed of light, warp stalls, occupancy); OUT/ncu.log. Skipped where
#            ncu is not on PATH (it is NVIDIA's)
#   profile  the kernel profile at the sweep's rows with the tiles in use, without sweeping (not in the default)
#   bench    the prefill and decode bench, one pytest session per 4-bit kernel arm (ours, then bitsandbytes'),
#            so a run cut short keeps the arms it finished; OUT/bench/<machine>/NNNN_<arm>.json
#
#   tools/inference_evidence.sh OUT [STEP...]      (default: tests sweep ncu bench, in that order)
#
# Environment: DATA (MedQA folder, default: the bundled subset), PRESET (default mistral-7b), BATCHES (default
# 1,8,32,64), ARMS (the bench's 4-bit kernel arms, default "triton bitsandbytes"), DECODE_ATTENTION (the decode steps'
# attentions, the bench's --decode-attention: auto, triton, model or a comma-separated list of them, arms of the same
# session; default auto; named in the bench files' names when set), SWEEP_ROWS (the row counts the sweep tunes,
# default 1,8,32,64), SWEEP_LAYERS and SWEEP_MODES (the sweep's --layers and --modes: only those shapes and those
# modes' tiles; default all), SWEEP_WORKERS (processes compiling the sweep's tiles ahead, default one a CPU),
# SWEEP_LORA (set: the sweep times its tiles with LoRA, and writes the table's entries for launches with LoRA),
# SWEEP_LAYOUT (tiled: the sweep times each tile on copies of the weights in that tile's order, as a decoder with
# MEDQA_NF4_LAYOUT=tiled reads them; its entries say "layout": "tiled"; default: MEDQA_NF4_LAYOUT's, else
# bitsandbytes'),
# TESTS_K (the tests step's -k expression; default all), NCU_SET (full: the ncu step collects every section, the
# per-instruction warp stalls too, and prints the report's details and its SASS source page, OUT/ncu-source.csv),
# PDL_AB (set: the bench runs our kernel's arm first with programmatic dependent launch off, MEDQA_PDL=0, then as
# MEDQA_PDL says, on by default, so the A/B is one card's), SCALES_AB (set: likewise first with the block scales
# decoded at load, MEDQA_NF4_SCALES=float32; the files' names end in -float32-scales), LAYOUT_AB (set: likewise with
# the weights copied at load into each launch's tile order, MEDQA_NF4_LAYOUT=tiled; names end in -tiled), PREFILL_AB
# (set: likewise with the decoder's prefill eager, MEDQA_PREFILL=eager, as before it was compiled on a GPU; names end
# in -eager-prefill),
# MEDQA_INDUCTOR_TUNING (1:
# inductor tunes its own kernels of the decode step as it compiles them; the bench files' names end in -tuned),
# NCU_LAYERS (the ncu step's --layers, default
# gate_proj/up_proj), MEDQA_PARITY_GIT_COMMIT (the commit this tree was copied from, which the result files then name:
# a copy's own .git may be stale; medqa_core/measure/fingerprint.py), STEP_TIMEOUT (seconds a step may take, default
# none; then SIGINT, so a bench keeps its finished cases). A step that fails is reported and the next one runs; the
# exit code is the number of failed steps. To publish: copy the bench files into results/bench/<machine>/ and the
# sweep/profile files into results/traces/ (docs/decode.md lists them), commit them, and run `python
# tools/gen_docs.py`.
set -uo pipefail
OUT=${1:?usage: tools/inference_evidence.sh OUT [tests|sweep|ncu|profile|bench ...]}
shift
STEPS=${*:-tests sweep ncu bench}
for s in $STEPS; do  # all checked before any runs
    case $s in tests | sweep | ncu | profile | bench) ;;
    *) echo "unknown step '$s' (tests, sweep, ncu, profile, bench)" >&2; exit 2 ;; esac
done
PRESET=${PRESET:-mistral-7b}
BATCHES=${BATCHES:-1,8,32,64}
SWEEP_ROWS=${SWEEP_ROWS:-1,8,32,64}
source "$(dirname "$0")/evidence_steps.sh"
# Tiles swept in this run take effect for the steps after it; the repository's table stays as it is.
cp medqa_core/engine/kernels/nf4_tiles.json "$OUT/nf4_tiles.json"
export MEDQA_NF4_TILES="$OUT/nf4_tiles.json"

for s in $STEPS; do
    case $s in
    tests) step tests python3 -m pytest tests/test_nf4_kernel.py tests/test_decoding.py -q -p no:cacheprovider \
        ${TESTS_K:+-k "$TESTS_K"} ;;
    sweep) MEDQA_NF4_TILES=none MEDQA_NF4_LAYOUT=${SWEEP_LAYOUT:-${MEDQA_NF4_LAYOUT:-bitsandbytes}} \
        step sweep python3 bench/profile_nf4_kernel.py --out "$OUT/nf4-kernel-sweep.json" \
        --rows "$SWEEP_ROWS" --sweep --tiles-out "$OUT/nf4_tiles.json" ${SWEEP_LAYERS:+--layers "$SWEEP_LAYERS"} \
        ${SWEEP_MODES:+--modes "$SWEEP_MODES"} ${SWEEP_WORKERS:+--compile-workers "$SWEEP_WORKERS"} \
        ${SWEEP_LORA:+--sweep-lora} ;;
    ncu)
        if ! command -v ncu >/dev/null; then echo "== ncu: skipped (no ncu on PATH: Nsight Compute is NVIDIA's)"; continue; fi
        sections=(--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy
                  --section LaunchStats --section MemoryWorkloadAnalysis)
        # NCU_SET=full: every section, the source counters too (each SASS instruction's warp stalls), saved as a
        # report and printed from it: its details (ncu-details.log; ncu.log keeps the profiled run's output) and its
        # per-instruction source page (ncu-source.csv)
        [[ ${NCU_SET:-} == full ]] && sections=(--set full --import-source no -f -o "$OUT/ncu")
        step ncu ncu --clock-control none "${sections[@]}" -k "regex:_nf4_matmul_kernel|gemm_4bit" \
        python3 bench/profile_nf4_kernel.py --once --rows "${NCU_ROWS:-1,8}" --layers "${NCU_LAYERS:-gate_proj/up_proj}"
        if [[ ${NCU_SET:-} == full && -f $OUT/ncu.ncu-rep ]]; then
            ncu -i "$OUT/ncu.ncu-rep" --page details >"$OUT/ncu-details.log" 2>&1
            ncu -i "$OUT/ncu.ncu-rep" --page source --print-source sass --csv >"$OUT/ncu-source.csv" 2>&1
        fi ;;
    profile) step profile python3 bench/profile_nf4_kernel.py --out "$OUT/nf4-kernel-profile.json" --rows "$SWEEP_ROWS" ;;
    bench)
        for arm in ${ARMS:-triton bitsandbytes}; do
            attns=${DECODE_ATTENTION:-}
            name="$arm${attns:+-attn-${attns//,/-}}"
            [[ ${MEDQA_INDUCTOR_TUNING:-0} == 1 ]] && name+=-tuned
            # PDL_AB: ours once more before, with programmatic dependent launch off (MEDQA_PDL=0), on the same card;
            # SCALES_AB: likewise with the block scales decoded at load (MEDQA_NF4_SCALES=float32); LAYOUT_AB: with the
            # weights copied at load into the order of each launch's tile (MEDQA_NF4_LAYOUT=tiled); PREFILL_AB: with
            # the decoder's prefill eager (MEDQA_PREFILL=eager)
            for pass in ${PDL_AB:+off} ${SCALES_AB:+float32} ${LAYOUT_AB:+tiled} ${PREFILL_AB:+eager} asked; do
                [[ $pass != asked && $arm != triton ]] && continue
                run="$name$([[ $pass == off ]] && echo -pdl-off)$([[ $pass == float32 ]] && echo -float32-scales)"
                run+=$([[ $pass == tiled ]] && echo -tiled)$([[ $pass == eager ]] && echo -eager-prefill)
                pdl=$([[ $pass == off ]] && echo 0 || echo "${MEDQA_PDL:-1}")
                scales=$([[ $pass == float32 ]] && echo float32 || echo "${MEDQA_NF4_SCALES:-nested}")
                layout=$([[ $pass == tiled ]] && echo tiled || echo "${MEDQA_NF4_LAYOUT:-bitsandbytes}")
                prefill=$([[ $pass == eager ]] && echo eager || echo "${MEDQA_PREFILL:-}")
                MEDQA_PDL=$pdl MEDQA_NF4_SCALES=$scales MEDQA_NF4_LAYOUT=$layout MEDQA_PREFILL=$prefill step "bench-$run" \
                    python3 -m pytest bench/bench_infer.py \
                    -p no:cacheprovider \
                    -k "decode_compiled or prefill" --preset "$PRESET" "${DATA_ARGS[@]}" --decode-batches "$BATCHES" \
                    --nf4-kernels "$arm" --decode-attention "${DECODE_ATTENTION:-auto}" \
                    --benchmark-save="nf4-decode-$run" --benchmark-storage="file://$OUT/bench" --durations=0
                grep -h "tokens/s" "$OUT/bench-$run.log"
            done
        done ;;
    esac
done
exit "$failed"
