# Sourced by tools/*_evidence.sh after they set OUT: `step NAME COMMAND...` runs COMMAND with its output in
# OUT/NAME.log (under STEP_TIMEOUT seconds where that is set: then interrupted, exit 124), says how it ended, and
# counts a failure in $failed, so the steps after a failed one still run and the script's exit code is the number
# that failed.
LIMIT=()
# SIGINT at the limit (SIGKILL 30 s later): pytest then ends its session as on Ctrl-C, and pytest-benchmark still
# saves the cases that finished (a bench step cut at SIGTERM saved none: session 42); the profile script saves
# after each shape anyway.
[[ -n ${STEP_TIMEOUT:-} ]] && LIMIT=(timeout --signal=INT --kill-after=30 "$STEP_TIMEOUT")
DATA_ARGS=()
[[ -n ${DATA:-} ]] && DATA_ARGS=(--data "$DATA")
failed=0
mkdir -p "$OUT"

step() {
    local name=$1
    shift
    echo "== $name: $*"
    "${LIMIT[@]}" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc (log: $OUT/$name.log)"
    [[ $rc -eq 0 ]] || failed=$((failed + 1))
}
