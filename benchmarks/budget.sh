# Sourced by gpu_perf.sh and speed_ab.sh: the selection and the time budget of their labelled runs.
# The caller sets ONLY, BUDGET_S, START and the arrays SKIPPED and FAILED.

selected_limit() {  # selected_limit LABEL TIMEOUT_S: sets LIMIT (the time limit, capped by the
    # budget left); fails when ONLY does not name the run or the budget is spent (then it is SKIPPED)
    local label=$1 left
    LIMIT=$2
    [[ -z $ONLY || " $ONLY " == *" $label "* ]] || return 1
    left=$((BUDGET_S - ($(date +%s) - START)))
    if ((left < 30)); then
        SKIPPED+=("$label")
        echo "=== $label: skipped, the time budget is spent"
        return 1
    fi
    ((LIMIT > left)) && LIMIT=$left
    return 0
}

finished() {  # finished LABEL EXIT_STATUS START_TIME LOG: the exit line; a failure is listed (FAILED)
    # and the log's last lines shown
    echo "    exit $2 after $(($(date +%s) - $3)) s"
    if (($2 != 0)); then
        FAILED+=("$1 (exit $2)")
        tail -n 4 "$4" | sed 's/^/    | /'
    fi
}
