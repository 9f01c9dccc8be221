# shellcheck shell=bash
# What every GPU session script (benchmarks/gpu/*_session.sh) does alike: log lines, the time budget and
# running one step under a time limit with its output tee'd. Sourced after the script has set OUT (the
# results folder), BUDGET_S (the session's budget in seconds) and T0 (its start, `date +%s`); each script
# keeps its own policy of which steps run (SKIP, STEPS, GPU counts) in its own `step`.
LOG="$OUT/session.log"

say() { echo "$*" | tee -a "$LOG"; }

# Seconds of the session's budget left.
budget_left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

# The session's first lines: "TITLE, <UTC time>, commit <hash>, budget <s>[EXTRA]".
session_header() {
    say "$1, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), budget ${BUDGET_S}s${2:-}"
}

# run_limited NAME LIMIT_S CMD...: run CMD under LIMIT_S seconds (SIGINT, then SIGKILL 10 s later), its
# output tee'd to $OUT/NAME.log, the command and its exit code and time in the session log.
run_limited() {
    local name=$1 limit=$2 start rc
    shift 2
    say "== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    rc=$?
    say "== $name: exit $rc after $(( $(date +%s) - start ))s$([[ $rc == 124 || $rc == 137 ]] && echo ' (time limit)')"
}

# step_in_budget NAME LIMIT_S CMD...: run_limited under min(LIMIT_S, budget left); skipped (and said) when
# under 20 s are left.
step_in_budget() {
    local name=$1 limit=$2 left
    shift 2
    left=$(budget_left)
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        say "== $name: skipped, ${left}s of the ${BUDGET_S}s budget left"
        return
    fi
    run_limited "$name" "$limit" "$@"
}
