#!/usr/bin/env bash
# A throwaway Slurm cluster on this machine for the launcher tests, without systemd.
#
#   bin=$(.ci/services/slurm.sh start DIR)            # one node (loopback); prints DIR/bin
#   bin=$(.ci/services/slurm.sh start DIR --nodes 2)  # two nodes, each in its own network namespace
#   export PATH="$bin:$PATH"                          # sbatch, squeue, scontrol, scancel, sinfo, sacct
#   .ci/services/slurm.sh stop DIR                    # stops every daemon it started, by PID
#
# Needs root and Debian's `slurm-wlm` + `munge` (installed with apt-get when missing and
# SLURM_INSTALL=1; otherwise it stops with the apt-get line to run). DIR must not exist yet or
# be empty; its parents must be traversable by the `munge` user (use a folder under /tmp, not
# pytest's private tmp_path).
#
# What runs: munged (as the munge user, private socket and key in DIR), slurmctld -i and one
# slurmd -N <node> per node, all as root, from a minimal slurm.conf in DIR/etc: no cgroups
# (proctrack/linuxproc, task/none), no accounting (sacct answers nothing; use squeue/scontrol).
# The two-node variant joins namespaces fl<id>a/fl<id>b with a veth pair; both ends are named
# `fl0` inside their namespace (so GLOO_SOCKET_IFNAME=fl0 fits every node) and carry the only
# addresses used (10.251.<id>.1 and .2); slurmctld runs in the first namespace, and the client
# wrappers in DIR/bin enter it with nsenter (`ip netns exec` breaks slurmd's cgroup detection).
# Logs: DIR/log. Environment for the clients: DIR/env (SLURM_CONF, PATH).
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
nodes=1
[[ "${3:-}" == "--nodes" ]] && nodes="${4:-1}"

die() { echo "slurm.sh: $*" >&2; exit 1; }
[[ "$cmd" == start || "$cmd" == stop ]] && [[ -n "$dir" ]] || die "usage: $0 start DIR [--nodes 1|2] | stop DIR"
[[ "$nodes" == 1 || "$nodes" == 2 ]] || die "--nodes must be 1 or 2 (got $nodes)"

stop_pids() {  # stop_pids FILE...: TERM the daemons whose PIDs are in the files, KILL them after 10 s
    local file pid pids=()
    for file in "$@"; do
        [[ -s "$file" ]] || continue
        pid="$(cat "$file")"
        kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$file"
    done
    for _ in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ "$alive" == 0 ]] && return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}

if [[ "$cmd" == stop ]]; then
    [[ -d "$dir/run" ]] || die "no cluster in $dir"  # also cleans up after a start that failed half-way
    # Jobs first (their processes are children of slurmstepd), then the daemons that run them.
    if [[ -x "$dir/bin/scancel" ]]; then timeout 10 "$dir/bin/scancel" --full --quiet --user="$(id -un)" 2>/dev/null || true; fi
    stop_pids "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid"
    stop_pids "$dir/run/munged.pid"  # last: the others authenticate through it while they stop
    if [[ -f "$dir/netns" ]]; then
        while read -r ns; do ip netns del "$ns" 2>/dev/null || true; done <"$dir/netns"
        rm -f "$dir/netns"
    fi
    exit 0
fi

[[ "$(id -u)" == 0 ]] || die "must run as root (slurmd runs jobs as their users)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    if [[ "${SLURM_INSTALL:-0}" == 1 ]]; then
        echo "slurm.sh: installing slurm-wlm and munge" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >&2 \
            || { DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >&2; } \
            || die "apt-get install slurm-wlm munge failed"
    else
        die "Slurm is not installed; run: apt-get install -y slurm-wlm munge (or set SLURM_INSTALL=1)"
    fi
fi
id munge >/dev/null 2>&1 || die "the munge user is missing (created by Debian's munge package)"

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
[[ -z "$(ls -A "$dir")" ]] || die "$dir is not empty"
chmod 755 "$dir"
mkdir -p "$dir"/{etc,bin,log,run,state,spool} "$dir/munge"
chown munge:munge "$dir/munge"
chmod 700 "$dir/munge"
runuser -u munge -- test -x "$dir/munge" || die "user munge cannot reach $dir (a parent folder is private); use a folder under /tmp"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
host="$(hostname -s)"
cpus="$(nproc)"
mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"

# munged: its own key, socket, pid and log in DIR, so a system munged (if any) is left alone.
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chown munge:munge "$dir/munge/munge.key"
chmod 400 "$dir/munge/munge.key"
socket="$dir/munge/munge.socket"
runuser -u munge -- munged --force --socket="$socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
    || { cat "$dir/munge/munged.log" >&2 || true; die "munged failed to start"; }
for _ in $(seq 50); do [[ -s "$dir/munge/munged.pid" && -S "$socket" ]] && break; sleep 0.1; done
cp "$dir/munge/munged.pid" "$dir/run/munged.pid"

prefix=()  # how to run a client or daemon in the controller's network namespace
if [[ "$nodes" == 2 ]]; then
    # An id no other run on this machine uses (its namespaces and veth names are free).
    for _ in $(seq 20); do
        id="$(( (RANDOM % 200) + 20 ))"
        [[ -e "/run/netns/fl${id}a" || -e "/run/netns/fl${id}b" ]] || ip link show "v${id}a" >/dev/null 2>&1 || break
    done
    ns_a="fl${id}a"; ns_b="fl${id}b"
    addr_a="10.251.$id.1"; addr_b="10.251.$id.2"
    ip netns add "$ns_a" || die "cannot create network namespaces here (ip netns add failed)"
    echo "$ns_a" >"$dir/netns"
    ip netns add "$ns_b" || die "cannot create a second network namespace"
    echo "$ns_b" >>"$dir/netns"
    join_namespaces() {
        ip link add "v${id}a" type veth peer name "v${id}b" || return 1
        ip link set "v${id}a" netns "$ns_a" && ip link set "v${id}b" netns "$ns_b" || return 1
        ip -n "$ns_a" link set "v${id}a" name fl0 && ip -n "$ns_b" link set "v${id}b" name fl0 || return 1
        ip -n "$ns_a" addr add "$addr_a/24" dev fl0 && ip -n "$ns_b" addr add "$addr_b/24" dev fl0 || return 1
        ip -n "$ns_a" link set lo up && ip -n "$ns_a" link set fl0 up || return 1
        ip -n "$ns_b" link set lo up && ip -n "$ns_b" link set fl0 up
    }
    join_namespaces || die "cannot join the network namespaces with a veth pair (ip link failed)"
    ctl_addr="$addr_a"
    node_lines="NodeName=fl1 NodeAddr=$addr_a CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=fl2 NodeAddr=$addr_b CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    prefix=(nsenter "--net=/run/netns/$ns_a" --)
    slurmd_port=6818
    ctl_port=6817
else
    ctl_addr=127.0.0.1
    node_lines="NodeName=fl1 NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    slurmd_port="$(free_port)"
    ctl_port="$(free_port)"
fi

conf="$dir/etc/slurm.conf"
cat >"$conf" <<EOF
# Minimal test cluster written by .ci/services/slurm.sh: no cgroups, no accounting.
ClusterName=forgeline
SlurmctldHost=$host($ctl_addr)
SlurmctldPort=$ctl_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket,cred_expire=${SLURM_CRED_EXPIRE:-10}
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
$node_lines
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# Client wrappers: the right slurm.conf, and the controller's namespace when there is one.
for tool in sbatch squeue scontrol scancel sinfo sacct srun; do
    real="$(command -v "$tool")" || continue
    printf '#!/bin/sh\nSLURM_CONF=%q exec %s %q "$@"\n' "$conf" "${prefix[*]:-}" "$real" >"$dir/bin/$tool"
    chmod 755 "$dir/bin/$tool"
done
printf 'export SLURM_CONF=%q\nexport PATH=%q:"$PATH"\n' "$conf" "$dir/bin" >"$dir/env"

export SLURM_CONF="$conf"
"${prefix[@]}" slurmctld -i -f "$conf" || { cat "$dir/log/slurmctld.log" >&2 || true; die "slurmctld failed to start"; }
if [[ "$nodes" == 2 ]]; then
    nsenter "--net=/run/netns/$ns_a" -- slurmd -N fl1 -f "$conf" || die "slurmd fl1 failed to start"
    nsenter "--net=/run/netns/$ns_b" -- slurmd -N fl2 -f "$conf" || die "slurmd fl2 failed to start"
else
    slurmd -N fl1 -f "$conf" || { cat "$dir/log/slurmd-fl1.log" >&2 || true; die "slurmd failed to start"; }
fi

# Ready when every node is idle (slurmd registered with the controller).
for _ in $(seq 150); do
    idle="$("$dir/bin/sinfo" -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l || true)"
    [[ "$idle" -ge "$nodes" ]] && break
    sleep 0.2
done
if [[ "${idle:-0}" -lt "$nodes" ]]; then
    "$dir/bin/sinfo" -N -l >&2 || true
    tail -n 20 "$dir"/log/*.log >&2 || true
    die "nodes did not become idle; logs in $dir/log"
fi
echo "slurm.sh: Slurm $(slurmctld -V | awk '{print $2}') with $nodes node(s) up (conf $conf)" >&2
echo "$dir/bin"
