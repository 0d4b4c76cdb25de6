# Sourced by tools/*_evidence.sh after they set OUT: `step NAME COMMAND...` runs COMMAND with its output in
# OUT/NAME.log (under STEP_TIMEOUT seconds where that is set), says how it ended, and counts a failure in
# $failed, so the steps after a failed one still run and the script's exit code is the number that failed.
LIMIT=()
[[ -n ${STEP_TIMEOUT:-} ]] && LIMIT=(timeout "$STEP_TIMEOUT")
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
