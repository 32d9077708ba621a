#!/usr/bin/env bash
# The workflow on a real SLURM cluster, end to end (as root; CI runs it from .ci/run):
#
#   bash tests/cluster/run_slurm_test.sh
#
# 1. starts a single-node cluster (tests/cluster/slurm_single_node.sh; two fake GPUs),
# 2. checks that a request larger than the node fails at once, through sbatch and through Snakemake,
# 3. checks `snakemake --profile profiles/slurm -n` on the paper config: gpu=1 on exactly the
#    train, sample, sample_validation, fid_reference, fid, fid_validation, fid_calibration and metric jobs,
# 4. runs the whole DAG of config/demo.yaml + config/micro.yaml with --profile profiles/slurm and
#    checks that every job went through the scheduler (squeue, scontrol and the job completion
#    log say COMPLETED, GPU jobs held one GPU, one SLURM log per job),
# 5. runs the same config locally (--cores 2) and compares weights, HDF5 values and PNGs,
# 6. makes a train job fail on every attempt: it is retried as the profile says, then the
#    workflow stops with the job's logs named in the error,
# 7. cancels (scancel) a running training job mid-way, reruns the workflow, and checks that
#    the job resumed from its checkpoint and ended with the weights of an uninterrupted run,
# 8. trains one run on both GPUs (--set-resources train:gpu=2): the job holds 2 GPUs on one
#    node and trains as 2 data-parallel processes,
# 9. stops what it started (Snakemake runs, SLURM jobs, the daemons by PID), also on a failure
#    or a signal.
#
# Settings (environment): FLATNESS_SLURM_TEST_WORK=DIR (scratch folder; default a new one under
# /var/tmp, removed after a pass), FLATNESS_SLURM_TEST_KEEP=1 (keep it), and those of
# slurm_single_node.sh. The last line reads "slurm-test: N passed, 0 failed" (or "1 failed").
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"

if [[ $(id -u) -ne 0 ]]; then
    # The cluster's daemons need root; sudo -n never prompts (fails instead).
    command -v sudo >/dev/null && sudo -n true 2>/dev/null && exec sudo -n -E bash "$0" "$@"
    echo "run_slurm_test.sh: needs root (or password-less sudo) to run the SLURM daemons" >&2
    exit 1
fi

PY=$REPO/.venv/bin/python
SMK=(timeout 1800 "$REPO/.venv/bin/snakemake")
CLUSTER=(bash "$REPO/tests/cluster/slurm_single_node.sh")
CHECK=("$PY" "$REPO/tests/cluster/checks.py")
MICRO=(--configfile config/demo.yaml config/micro.yaml)
JOBCOMP=${FLATNESS_SLURM_DIR:-/var/tmp/flatness-slurm}/log/jobcomp.txt
WORK=${FLATNESS_SLURM_TEST_WORK:-$(mktemp -d /var/tmp/flatness-slurm-test.XXXXXX)}
mkdir -p "$WORK"
LOGDIR=$WORK/slurm-logs
# The profile as a user runs it; only the SLURM log folder moves into the scratch folder, and
# the first status check comes after 5 s instead of 20 (the test's jobs take seconds).
SLURM=(--profile profiles/slurm --slurm-logdir "$LOGDIR" --slurm-init-seconds-before-status-checks 5)

T0=$SECONDS
PASSED=0
BACKGROUND=()   # PIDs of the processes this script started
CLUSTER_STARTED=0

say() { printf '[slurm-test %s] %s\n' "$(date +%T)" "$*"; }
pass() { PASSED=$((PASSED + 1)); say "PASS: $*"; }
fail() { say "FAIL: $*"; exit 1; }

# Stop one of our processes: SIGINT first (Snakemake then cancels its SLURM jobs and exits;
# timeout passes the signal on), SIGKILL to its process group after 30 s.
stop_background() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    say "interrupting process $pid"
    kill -INT "$pid" 2>/dev/null || true
    for i in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        # timeout leads its own process group, which holds Snakemake and its jobs.
        if [[ $(ps -o pgid= -p "$pid" | tr -d ' ') == "$pid" ]]; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$? pid minutes
    trap - EXIT
    for pid in "${BACKGROUND[@]}"; do stop_background "$pid"; done
    if ((CLUSTER_STARTED)); then
        "${CLUSTER[@]}" stop || status=1
    fi
    minutes=$(awk -v s=$((SECONDS - T0)) 'BEGIN { printf "%.1f", s / 60 }')
    if ((status == 0)); then
        [[ ${FLATNESS_SLURM_TEST_KEEP:-0} == 1 ]] || rm -rf "$WORK"
        say "all checks passed in $minutes min"
        echo "slurm-test: $PASSED passed, 0 failed"
    else
        say "failed after $minutes min; logs and results kept in $WORK"
        echo "slurm-test: $PASSED passed, 1 failed"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM HUP
trap 'exit 130' INT

# A process that has ended leaves the list, so that cleanup never signals a recycled PID.
forget() {
    local kept=() pid
    for pid in "${BACKGROUND[@]}"; do [[ $pid == "$1" ]] || kept+=("$pid"); done
    BACKGROUND=("${kept[@]}")
}

# Run a command with its output in LOG. It runs in the background and this shell waits for
# it, because bash runs a trap only after a foreground command ends: a signal now stops the
# test at once, and cleanup stops the command.
run_logged() {
    local log=$1 status=0 pid
    shift
    "$@" >"$log" 2>&1 &
    pid=$!
    BACKGROUND+=("$pid")
    wait "$pid" || status=$?
    forget "$pid"
    return "$status"
}

# The same for a command that must succeed: print the log's tail if it fails.
logged() {
    local log=$1 status=0
    run_logged "$@" || status=$?
    if ((status != 0)); then
        say "command failed ($status), see $log:"
        tail -n 40 "$log"
    fi
    return "$status"
}

# Run one check of checks.py; its one-line summary lands in CHECK_OUT, a failure ends the test.
verify() {
    CHECK_OUT=$("${CHECK[@]}" "$@") || fail "the $1 check failed (reason above)"
}

# ------------------------------------------------------------------------------------------
say "scratch folder $WORK"
"$PY" -c "import snakemake, snakemake_executor_plugin_slurm" 2>/dev/null \
    || fail "the venv lacks the SLURM plugin: .venv/bin/pip install -e '.[cluster]'"

CLUSTER_STARTED=1   # before start: stop is harmless if start cleaned up after itself
"${CLUSTER[@]}" start
eval "$("${CLUSTER[@]}" env)"
NODE_CPUS=$(sinfo -h -o %c | head -n 1)
pass "single-node cluster up ($(sinfo -h -o '%D node, %c CPUs, %m MB, %G'))"

# ------------------------------------------------------------------------------------------
# A request the node can never satisfy is refused at submission, not left pending.
start=$SECONDS
if sbatch --parsable -c $((NODE_CPUS + 1)) --wrap true >"$WORK/oversize-sbatch.log" 2>&1; then
    fail "sbatch accepted $((NODE_CPUS + 1)) CPUs on a $NODE_CPUS-CPU node"
fi
status=0
run_logged "$WORK/oversize-snakemake.log" timeout 300 "$REPO/.venv/bin/snakemake" "${SLURM[@]}" "${MICRO[@]}" \
    --config results="$WORK/oversize" --set-resources prepare:mem_mb=99999999 \
    -- "$WORK/oversize/fashion_mnist/data.h5" || status=$?
((status != 0 && status != 124)) || fail "Snakemake did not fail on an oversized job (exit $status)"
grep -q "SLURM sbatch failed" "$WORK/oversize-snakemake.log" || fail "no 'SLURM sbatch failed' in $WORK/oversize-snakemake.log"
pass "oversized requests are refused at once (sbatch and Snakemake, $((SECONDS - start)) s)"

# ------------------------------------------------------------------------------------------
# The paper's DAG asks for GPUs on exactly the GPU rules.
logged "$WORK/paper-dryrun.log" "${SMK[@]}" --profile profiles/slurm -n
verify gpu-requests "$WORK/paper-dryrun.log"
pass "paper config, --profile profiles/slurm -n: $CHECK_OUT"

# ------------------------------------------------------------------------------------------
# The micro study, every job through SLURM, then locally.
logged "$WORK/micro-dryrun.log" "${SMK[@]}" "${SLURM[@]}" "${MICRO[@]}" --config results="$WORK/slurm" -n
start=$SECONDS
logged "$WORK/micro-slurm.log" "${SMK[@]}" "${SLURM[@]}" "${MICRO[@]}" --config results="$WORK/slurm"
say "micro study through SLURM: $((SECONDS - start)) s"
verify scheduler "$WORK/micro-slurm.log" "$WORK/micro-dryrun.log" "$LOGDIR" "$JOBCOMP"
pass "$CHECK_OUT"

start=$SECONDS
logged "$WORK/micro-local.log" "${SMK[@]}" --cores 2 "${MICRO[@]}" --config results="$WORK/local"
say "micro study locally: $((SECONDS - start)) s"
verify compare "$WORK/slurm" "$WORK/local"
pass "SLURM and local results $CHECK_OUT"

# ------------------------------------------------------------------------------------------
# A job that fails on every attempt: retried as configured, then the workflow stops and the
# error names the job's logs. The train job fails because its data.h5 is not HDF5.
RETRIES=$(sed -n 's/^retries: *\([0-9]*\).*/\1/p' profiles/slurm/config.yaml)
FAILING=$WORK/failing
mkdir -p "$FAILING/fashion_mnist"
echo "not an HDF5 file" >"$FAILING/fashion_mnist/data.h5"
FAIL_TARGET=$FAILING/fashion_mnist/adm/seed0/weights_raw.pt
logged "$WORK/failing-dryrun.log" "${SMK[@]}" "${SLURM[@]}" "${MICRO[@]}" --config results="$FAILING" -n -- "$FAIL_TARGET"
verify job-stats "$WORK/failing-dryrun.log"
[[ $CHECK_OUT == '{"train": 1}' ]] || fail "the failing run should hold the train job only: $CHECK_OUT"
status=0
run_logged "$WORK/failing.log" "${SMK[@]}" "${SLURM[@]}" "${MICRO[@]}" --config results="$FAILING" -- "$FAIL_TARGET" \
    || status=$?
((status != 0 && status != 124)) || fail "the failing workflow exited with $status"
attempts=$(grep -c "has been submitted with SLURM jobid" "$WORK/failing.log" || true)
((attempts == RETRIES + 1)) || fail "the failing train job ran $attempts times, expected 1 + retries ($RETRIES)"
last_job=$(sed -n 's/.*has been submitted with SLURM jobid \([0-9]*\) .*/\1/p' "$WORK/failing.log" | tail -n 1)
rule_log=$FAILING/logs/train/fashion_mnist_adm_seed0.log
slurm_log=$(find "$LOGDIR" -name "$last_job.log" | head -n 1)
[[ -n $slurm_log ]] || fail "no SLURM log of job $last_job under $LOGDIR"
error=$(sed -n '/^Error in rule train:/,/^$/p' "$WORK/failing.log")
grep -qF "$rule_log" <<<"$error" || fail "the error does not name the rule log $rule_log: $error"
grep -qF "$slurm_log" <<<"$error" || fail "the error does not name the SLURM log $slurm_log: $error"
pass "a failing job ran $attempts times (1 + retries: $RETRIES), then the workflow stopped naming $rule_log and $slurm_log"

# ------------------------------------------------------------------------------------------
# Cancel a running training job mid-way, rerun, and end with the uninterrupted run's weights.
TRAIN_STEPS=150
LONG=$WORK/long-training.yaml
printf 'training:\n  steps: %d\n  log_every: 10\n  checkpoint_every: 5\n' "$TRAIN_STEPS" >"$LONG"
RESUME=$WORK/resume
RUN_DIR=$RESUME/fashion_mnist/adm/seed0
RESUME_TARGET=$RUN_DIR/weights_raw.pt
LONG_ARGS=(--configfile config/demo.yaml config/micro.yaml "$LONG")
# --retries 0: the cancelled job stops the workflow, as when the whole session ends.
"${SMK[@]}" "${SLURM[@]}" "${LONG_ARGS[@]}" --config results="$RESUME" --retries 0 -- "$RESUME_TARGET" \
    >"$WORK/cancel.log" 2>&1 &
BACKGROUND+=($!)
smk_pid=$!
# Cancel after the job's fourth checkpoint save (step >= 20), counted from the file's modification
# times: the stage replaces the file at every save, and stat keeps this loop cheap.
train_job="" saves=0 last_save=""
deadline=$((SECONDS + 1200))
while ((SECONDS < deadline)) && kill -0 "$smk_pid" 2>/dev/null; do
    [[ -n $train_job ]] || train_job=$(sed -n \
        's/.*has been submitted with SLURM jobid \([0-9]*\) (log: .*rule_train.*/\1/p' "$WORK/cancel.log" | head -n 1)
    save=$(stat -c %y "$RUN_DIR"/checkpoint-*.pt 2>/dev/null | head -n 1 || true)
    if [[ -n $save && $save != "$last_save" ]]; then
        saves=$((saves + 1))
        last_save=$save
    fi
    ((saves >= 4)) && [[ -n $train_job ]] && break
    sleep 0.3
done
((saves >= 4)) || fail "the train job (SLURM ${train_job:-?}) never saved 4 checkpoints; see $WORK/cancel.log"
[[ $(squeue -h -j "$train_job" -o %T) == RUNNING ]] || fail "SLURM job $train_job is not running"
scancel "$train_job"
status=0
wait "$smk_pid" || status=$?
forget "$smk_pid"
[[ $(squeue -h --states=all -j "$train_job" -o %T) == CANCELLED ]] || fail "SLURM job $train_job is not CANCELLED"
((status != 0 && status != 124)) || fail "the workflow did not stop on the cancelled job (exit $status)"
grep -q "SLURM status is: 'CANCELLED'" "$WORK/cancel.log" || fail "the run does not report the cancel; see $WORK/cancel.log"
[[ ! -e $RESUME_TARGET ]] || fail "$RESUME_TARGET exists after the cancelled run"
verify checkpoint-step "$RUN_DIR"
cancelled_at=$CHECK_OUT
((cancelled_at >= 20 && cancelled_at < TRAIN_STEPS)) || fail "checkpoint step after the cancel is $cancelled_at"
pass "SLURM job $train_job cancelled at step $cancelled_at of $TRAIN_STEPS; the workflow stopped; its checkpoint was kept"

# The rerun: every checkpoint it writes continues from the kept one (a restart would write step 5).
"${CHECK[@]}" watch-checkpoint "$RUN_DIR" "$WORK/resume-steps.txt" "$RESUME_TARGET" 1800 &
BACKGROUND+=($!)
watcher=$!
logged "$WORK/resume.log" "${SMK[@]}" "${SLURM[@]}" "${LONG_ARGS[@]}" --config results="$RESUME" -- "$RESUME_TARGET"
wait "$watcher" || true
forget "$watcher"
grep "has been submitted with SLURM jobid" "$WORK/resume.log" | grep -q "rule_train" \
    || fail "the rerun did not submit the train job again"
read -r -a steps <<<"$(tr '\n' ' ' <"$WORK/resume-steps.txt")"
((${#steps[@]} >= 2 && steps[0] == cancelled_at)) || fail "checkpoint steps seen during the rerun: ${steps[*]:-none}"
for s in "${steps[@]}"; do ((s >= cancelled_at)) || fail "the rerun went back to step $s (< $cancelled_at): ${steps[*]}"; done
[[ -z $(find "$RUN_DIR" -name 'checkpoint-*.pt') ]] || fail "the finished run left its checkpoint behind"
pass "the rerun resumed at step $cancelled_at (checkpoints seen: ${steps[0]} ... ${steps[-1]}) and finished"

logged "$WORK/resume-reference.log" "${SMK[@]}" --cores 2 "${LONG_ARGS[@]}" \
    --config results="$WORK/uninterrupted" -- "$WORK/uninterrupted/fashion_mnist/adm/seed0/weights_raw.pt"
verify compare "$RESUME" "$WORK/uninterrupted"
pass "cancelled-and-resumed vs uninterrupted training $CHECK_OUT"

# ------------------------------------------------------------------------------------------
# One training run on both of the node's GPUs: --set-resources train:gpu=2 becomes
# sbatch --gpus=2 --nodes=1, and the job trains as 2 data-parallel processes under torchrun
# (gloo: the test's GPUs are fake, so the processes run on the CPU).
TWO=$WORK/two-gpus
start=$SECONDS
logged "$WORK/two-gpus.log" "${SMK[@]}" "${SLURM[@]}" "${MICRO[@]}" --config results="$TWO" \
    --set-resources train:gpu=2 --set-threads train=2 -- "$TWO/fashion_mnist/adm/seed0/weights_raw.pt"
verify multi-gpu-training "$WORK/two-gpus.log" "$TWO/fashion_mnist/adm/seed0/train.h5" 2
pass "$CHECK_OUT ($((SECONDS - start)) s)"
