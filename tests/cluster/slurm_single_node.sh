#!/usr/bin/env bash
# A throwaway single-node SLURM cluster for testing the workflow's SLURM profile on one Debian or
# Ubuntu machine without systemd (a CI runner, a container, a VM). This host is the controller
# and the only compute node; munged, slurmctld and slurmd run as plain background processes.
#
# Everything lives in one private folder, $FLATNESS_SLURM_DIR (default /var/tmp/flatness-slurm):
# a fresh munge key and socket, slurm.conf, controller state, logs, and the PIDs of the daemons
# this script started; a system munged is left alone. Client commands find the cluster through
# SLURM_CONF, and, while it runs, through a link /etc/slurm/slurm.conf -> the private slurm.conf:
# Snakemake's job step plugin drops every SLURM_* variable (SLURM_CONF too) before it calls srun
# inside a job, so srun only finds the default path. An /etc/slurm/slurm.conf of a real cluster
# makes `start` refuse.
#
#   sudo bash tests/cluster/slurm_single_node.sh start    # apt-get install if needed, start, smoke job
#   eval "$(bash tests/cluster/slurm_single_node.sh env)" # export SLURM_CONF for sinfo, sbatch, ...
#   sudo bash tests/cluster/slurm_single_node.sh status
#   sudo bash tests/cluster/slurm_single_node.sh stop     # cancel jobs, stop our daemons by PID
#
# Settings (environment):
#   FLATNESS_SLURM_DIR          private folder                        (/var/tmp/flatness-slurm)
#   FLATNESS_SLURM_GPUS         fake GPUs the node advertises, 0=none (2)
#   FLATNESS_SLURM_PARTITION    name of the single, default partition (debug)
#   FLATNESS_SLURM_MEM_RESERVE  MB of memory kept back from the node   (1024)
#   FLATNESS_SLURM_PORT         slurmctld port; slurmd listens on the next one (16817)
#
# Fake GPUs: the node advertises gres/gpu backed by dummy character devices (the major/minor of
# /dev/null) in the private folder, so `sbatch --gpus=1` is scheduled and counted like on a GPU
# node and the job gets CUDA_VISIBLE_DEVICES, while the work itself runs on the CPU.
set -euo pipefail

ROOT=${FLATNESS_SLURM_DIR:-/var/tmp/flatness-slurm}
GPUS=${FLATNESS_SLURM_GPUS:-2}
PARTITION=${FLATNESS_SLURM_PARTITION:-debug}
MEM_RESERVE=${FLATNESS_SLURM_MEM_RESERVE:-1024}
PORT=${FLATNESS_SLURM_PORT:-16817}

CONF=$ROOT/etc/slurm.conf
MUNGE_DIR=$ROOT/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
PID_FILE=$ROOT/run/daemons.pid     # "name pid" per line, in start order
HOSTS_MARK="# flatness-slurm test node"
DEFAULT_CONF=/etc/slurm/slurm.conf
export SLURM_CONF=$CONF

say() { printf '[slurm-single-node %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "'$1' needs root (the daemons run as root, munge and slurm)"; }

# ------------------------------------------------------------------------------------------
# Processes this script started: recorded on start, stopped by PID.

record_pid() { echo "$1 $2" >>"$PID_FILE"; }

# True if PID is alive and still runs the program NAME (a recycled PID is left alone).
is_ours() {
    local name=$1 pid=$2
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]
}

stop_pid() {
    local name=$1 pid=$2 i
    if ! is_ours "$name" "$pid"; then
        say "$name (pid $pid) is not running"
        return 0
    fi
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do
        is_ours "$name" "$pid" || return 0
        sleep 0.2
    done
    say "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# Stop every recorded daemon, the last started first.
stop_recorded() {
    [[ -s $PID_FILE ]] || return 0
    local name pid
    while read -r name pid; do
        stop_pid "$name" "$pid"
    done < <(tac "$PID_FILE")
    rm -f "$PID_FILE"
}

# Start a daemon in the foreground mode of its own, detached from this shell (own session, no
# terminal, no inherited pipes), and record its PID. setsid and setpriv exec in place, so $!
# is the daemon itself.
launch() {
    local name=$1 log=$2
    shift 2
    setsid "$@" </dev/null >>"$log" 2>&1 &
    local pid=$!
    record_pid "$name" "$pid"
    sleep 0.3
    is_ours "$name" "$pid" || die "$name exited right after start; see $log"
}

# ------------------------------------------------------------------------------------------
# Installation and configuration.

install_packages() {
    local missing=() pkg
    for pkg in slurmctld slurmd slurm-client munge; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    say "installing slurm-wlm and munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages try to start their services; without systemd that is refused, harmlessly.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

make_folders() {
    install -d -m 0755 "$ROOT" "$ROOT/etc" "$ROOT/run" "$ROOT/spool" "$ROOT/gpu"
    # slurmctld drops to the slurm user before it writes state, logs and job records.
    install -d -m 0755 -o slurm -g slurm "$ROOT/state" "$ROOT/log"
    # munged insists on a folder only munge can write to.
    install -d -m 0755 -o munge -g munge "$MUNGE_DIR"
}

start_munge() {
    local key=$MUNGE_DIR/munge.key
    if [[ ! -s $key ]]; then
        mungekey --create --keyfile="$key" 2>/dev/null || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$key"
    chmod 0400 "$key"
    # munged will not run as root; setpriv switches to munge without forking.
    launch munged "$ROOT/log/munged.out" setpriv --reuid=munge --regid=munge --init-groups \
        /usr/sbin/munged --foreground --key-file="$key" --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed"
    local i
    for i in $(seq 50); do
        munge -S "$MUNGE_SOCKET" -n </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "munge credentials do not round-trip; see $MUNGE_DIR/munged.log"
}

# srun (which runs every Snakemake job step) reaches the node by its name.
ensure_host_resolves() {
    local host=$1
    getent hosts "$host" >/dev/null && return 0
    say "adding '$host' to /etc/hosts (removed again by stop)"
    echo "127.0.0.1 $host $HOSTS_MARK" >>/etc/hosts
}

# srun inside jobs reads the default path only (see the top); point it at this cluster.
link_default_config() {
    if [[ -L $DEFAULT_CONF && $(readlink "$DEFAULT_CONF") == "$CONF" ]]; then
        return 0
    fi
    [[ -e $DEFAULT_CONF || -L $DEFAULT_CONF ]] \
        && die "$DEFAULT_CONF exists and is not this test cluster's; not touching a real cluster"
    install -d -m 0755 "$(dirname "$DEFAULT_CONF")"
    ln -s "$CONF" "$DEFAULT_CONF"
}

unlink_default_config() {
    if [[ -L $DEFAULT_CONF && $(readlink "$DEFAULT_CONF") == "$CONF" ]]; then
        rm -f "$DEFAULT_CONF"
    fi
}

write_config() {
    local host=$1 hardware memory gres_conf="" gres_node="" i
    # slurmd -C describes this machine as slurmd sees it: CPUs, sockets, cores, RealMemory.
    hardware=$(/usr/sbin/slurmd -C | head -n 1)
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hardware")
    # Memory claimed beyond what slurmd measures would put the node into DRAIN.
    hardware=$(sed -e "s/^NodeName=[^ ]*/NodeName=$host/" \
        -e "s/RealMemory=[0-9]*/RealMemory=$((memory - MEM_RESERVE))/" <<<"$hardware")

    rm -f "$ROOT"/gpu/fake*
    if ((GPUS > 0)); then
        # slurmd drops a GPU without a device file, so give each one a dummy device.
        for ((i = 0; i < GPUS; i++)); do
            mknod -m 0666 "$ROOT/gpu/fake$i" c 1 3
        done
        printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s/gpu/fake[0-%d]\n' \
            "$host" "$ROOT" $((GPUS - 1)) >"$ROOT/etc/gres.conf"
        gres_conf="GresTypes=gpu"
        gres_node=" Gres=gpu:$GPUS"
    else
        rm -f "$ROOT/etc/gres.conf"
    fi

    cat >"$CONF" <<EOF
# Written by tests/cluster/slurm_single_node.sh: one node that is also the controller.
ClusterName=flatness-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=slurm
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: runs the same in containers and VMs, with or without systemd. Memory is then
# scheduled but not enforced.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# A request this node can never satisfy is refused by sbatch, instead of pending forever.
EnforcePartLimits=ALL
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol for an hour: the test reads their records, and
# the Snakemake plugin's squeue status mode needs a MinJobAge of a few status intervals.
MinJobAge=3600
# scancel and time limits: SIGTERM, then SIGKILL 5 s later.
KillWait=5
InactiveLimit=0
# No accounting database: sacct does not work here (the profile polls with squeue); every
# finished job is still recorded, one line each, in the job completion log.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.txt
MailProg=/bin/true
MpiDefault=none
$gres_conf
$hardware$gres_node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    say "wrote $CONF: $(grep '^NodeName' "$CONF")"
}

wait_for_idle_node() {
    local host=$1 state="" i
    for i in $(seq 150); do
        state=$(sinfo -h -N -n "$host" -o %T 2>/dev/null || true)
        case $state in
            idle | mixed | allocated) say "node $host is $state"; return 0 ;;
            # A config change (memory, GPUs) can leave the saved node drained: resume it.
            drain* | down* | inval*) ((i % 10 == 0)) && scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    sinfo -R || true
    die "node $host is '$state', not idle; see $ROOT/log/slurmctld.log and $ROOT/log/slurmd.log"
}

wait_for_job() {  # wait_for_job JOBID -> prints the final state
    local job=$1 state="" i
    for i in $(seq 120); do
        state=$(squeue -h --states=all -j "$job" -o %T 2>/dev/null || true)
        case $state in COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY) break ;; esac
        sleep 0.5
    done
    echo "$state"
}

smoke_test() {
    local out=$ROOT/run/smoke.out job state gpu_flags=()
    ((GPUS > 0)) && gpu_flags=(--gpus=1)
    rm -f "$out"
    # shellcheck disable=SC2016  # expanded in the job
    job=$(sbatch --parsable -o "$out" -c 1 --mem=64 -t 1 "${gpu_flags[@]}" \
        --wrap 'echo "job $SLURM_JOB_ID on $(hostname) gpus=${CUDA_VISIBLE_DEVICES:-none}"; env -u SLURM_CONF srun -n1 true')
    state=$(wait_for_job "$job")
    [[ $state == COMPLETED ]] || die "smoke job $job ended as '$state': $(cat "$out" 2>/dev/null)"
    say "smoke job: $(cat "$out")"
}

# ------------------------------------------------------------------------------------------
# Commands.

do_start() {
    need_root start
    local host t0=$SECONDS
    host=$(hostname -s)
    [[ -s $PID_FILE ]] && die "a cluster from $PID_FILE may still run; '$0 stop' first"
    install_packages
    make_folders
    # A failed or interrupted start leaves nothing running.
    trap 'say "start failed; stopping what was started"; stop_recorded; unlink_default_config' EXIT
    trap 'exit 143' TERM HUP
    trap 'exit 130' INT
    start_munge
    ensure_host_resolves "$host"
    write_config "$host"
    link_default_config
    # -i: start from empty state if the saved one does not fit the new config.
    launch slurmctld "$ROOT/log/slurmctld.out" /usr/sbin/slurmctld -D -i -f "$CONF"
    launch slurmd "$ROOT/log/slurmd.out" /usr/sbin/slurmd -D -N "$host" -f "$CONF"
    wait_for_idle_node "$host"
    smoke_test
    trap - EXIT
    sinfo -o '%P %a %D %T %N %c %m %G'
    say "cluster up in $((SECONDS - t0)) s; clients need: export SLURM_CONF=$CONF"
}

do_stop() {
    need_root stop
    if [[ -s $PID_FILE ]] && squeue -h -o %i >/dev/null 2>&1; then
        # Jobs first: their processes belong to slurmd's job steps, not to this script.
        local jobs i
        jobs=$(squeue -h -o %i | tr '\n' ' ')
        if [[ -n ${jobs// /} ]]; then
            say "cancelling jobs $jobs"
            # shellcheck disable=SC2086  # one argument per job id
            scancel $jobs || true
            for i in $(seq 60); do
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_recorded
    unlink_default_config
    rm -f "$ROOT"/gpu/fake*
    if grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
        # /etc/hosts may be a bind mount: rewrite it in place rather than replace it.
        local kept
        kept=$(grep -v "$HOSTS_MARK" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
    say "stopped"
}

do_status() {
    local name pid
    if [[ -s $PID_FILE ]]; then
        while read -r name pid; do
            if is_ours "$name" "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: not running (pid $pid)"; fi
        done <"$PID_FILE"
        sinfo -o '%P %a %D %T %N %c %m %G' || true
        squeue --states=all -o '%i %T %j %k' || true
    else
        echo "no cluster started from $ROOT"
    fi
}

case ${1:-} in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) die "usage: $0 start|stop|status|env" ;;
esac
