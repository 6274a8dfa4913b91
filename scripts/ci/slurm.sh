#!/usr/bin/env bash
# A SLURM cluster on this host, for the test suite (tests/test_slurm.py) and for trying the batch
# scripts by hand:
#   scripts/ci/slurm.sh install     apt-get install slurm-wlm + munge if missing (root; .ci/run does it)
#   scripts/ci/slurm.sh start DIR   install if needed, write DIR/slurm.conf, start munged, slurmctld and
#                                   the slurmd daemons, wait until every node takes jobs
#   scripts/ci/slurm.sh stop DIR    stop the daemons by the pids recorded in DIR/pids (never by name)
# Then point the clients at it: export SLURM_CONF=DIR/slurm.conf; sbatch ...
# The cluster: partition "debug" (the default) is one node named after this host with $SLURM_CI_CPUS
# (2) CPUs; partition "multi" is two more nodes of 1 CPU, <host>-a and <host>-b, on this same host (one
# slurmd each, as Slurm's multiple-slurmd mode allows), so multi_node.sbatch can run its two tasks.
# Everything (config, state, spool, logs, munge key and socket) lives under DIR, and the ports are free
# ones picked at start, so it runs beside a system SLURM or another copy of itself.
# Exit status 77 (with the reason on stderr) means "cannot run here" (not root, no apt-get): skip.
set -euo pipefail

usage() {
  echo "usage: $0 install | start DIR | stop DIR" >&2
  exit 2
}
cmd=${1:-}
if [[ $cmd == install ]]; then
  [[ $# == 1 ]] || usage
else
  [[ $# == 2 && -n $2 ]] || usage
  DIR=$(mkdir -p "$2" && cd "$2" && pwd)
fi
CPUS=${SLURM_CI_CPUS:-2}

stop() {
  # SIGTERM to all (the slurmd daemons, slurmctld, munged), then SIGKILL what is left after 5 s.
  local f pid pids=() alive=()
  for f in "$DIR"/pids/slurmd-*.pid "$DIR"/pids/slurmctld.pid "$DIR"/pids/munged.pid; do
    [[ -f $f ]] || continue
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$f"
  done
  for _ in $(seq 50); do
    alive=()
    for pid in ${pids[@]+"${pids[@]}"}; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [[ ${#alive[@]} == 0 ]] && return
    sleep 0.1
  done
  kill -KILL "${alive[@]}" 2>/dev/null || true
}

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null &&
    command -v sbatch >/dev/null && return
  if [[ $(id -u) != 0 ]]; then
    echo "SLURM is not installed and this is not root: cannot apt-get install slurm-wlm munge" >&2
    exit 77
  fi
  if ! command -v apt-get >/dev/null; then
    echo "SLURM is not installed and there is no apt-get to install slurm-wlm munge" >&2
    exit 77
  fi
  echo "[slurm.sh] installing slurm-wlm and munge with apt-get" >&2
  # The packaged services are not started in a container (policy-rc.d); we start our own copies anyway.
  local log
  log=$(mktemp)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurm-wlm slurm-client munge; } >"$log" 2>&1; then
    echo "apt-get install slurm-wlm munge failed: $(tail -n 1 "$log")" >&2
    exit 77
  fi
  rm -f "$log"
}

free_port() {
  # A port nothing listens on (connecting fails), away from the usual 6817-6819.
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 20000))
    if ! (: </dev/tcp/127.0.0.1/$p) 2>/dev/null; then
      echo "$p"
      return
    fi
  done
  echo "no free port found" >&2
  exit 1
}

fail() { # message, the daemon whose log to show; stops what was started
  echo "[slurm.sh] $1; the end of its log:" >&2
  tail -n 20 "$DIR/log/$2.log" "$DIR/log/$2.out" >&2 2>/dev/null || true
  stop
  exit 1
}

write_conf() { # host ctld_port
  local host=$1
  cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/ci/slurm.sh, for tests: see its header.
ClusterName=selfimprove-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$2
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a killed job's credential stays revoked, which is also how long a requeued job
# waits before it may start again (Slurm's default 120 s; starting it sooner fails with "Job credential
# revoked")
AuthInfo=socket=$DIR/munge.socket,cred_expire=${SLURM_CI_CRED_EXPIRE:-5}
StateSaveLocation=$DIR/state
# %n: one slurmd per node name on this host, each with its own spool, pid file and log
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/spool/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track a job's processes by their parent ids, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
# A requeued job becomes eligible by the clock, which no event announces: look every 2 s, not every 60.
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# Requeue allowed; SIGTERM, then SIGKILL after KillWait seconds (short: tests preempt without warning).
JobRequeue=1
KillWait=${SLURM_CI_KILL_WAIT:-10}
# Finished jobs stay visible to scontrol for 10 minutes (the tests read their state and exit code).
MinJobAge=600
InactiveLimit=0
NodeName=$host NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$CPUS Port=$(free_port) State=UNKNOWN
NodeName=$host-a NodeHostname=$host NodeAddr=127.0.0.1 CPUs=1 Port=$(free_port) State=UNKNOWN
NodeName=$host-b NodeHostname=$host NodeAddr=127.0.0.1 CPUs=1 Port=$(free_port) State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes=$host-a,$host-b MaxTime=INFINITE State=UP
EOF
}

start() {
  if [[ $(id -u) != 0 ]]; then
    # slurmd starts jobs as their users and the daemons own their files: root only, here.
    echo "the test cluster runs its daemons as root, and this is uid $(id -u)" >&2
    exit 77
  fi
  install
  stop # a leftover of an earlier start in the same DIR
  local host p states=""
  host=$(hostname -s)
  local nodes=("$host" "$host-a" "$host-b")
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/pids"
  # munge: its own key and socket (the system's munged, if any, is left alone)
  [[ -f $DIR/munge.key ]] || dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
  chmod 700 "$DIR"
  chmod 600 "$DIR/munge.key"
  write_conf "$host" "$(free_port)"
  # Daemons in the foreground (-F/-D), backgrounded here, so $! is the daemon's own pid to stop later.
  setsid munged -F -f --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" \
    --pid-file="$DIR/state/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/state/munge.seed" \
    </dev/null >>"$DIR/log/munged.out" 2>&1 &
  echo $! >"$DIR/pids/munged.pid"
  for _ in $(seq 50); do
    [[ -S $DIR/munge.socket ]] && break
    sleep 0.1
  done
  [[ -S $DIR/munge.socket ]] || fail "munged did not start" munged
  export SLURM_CONF=$DIR/slurm.conf
  setsid slurmctld -D -i -f "$SLURM_CONF" </dev/null >>"$DIR/log/slurmctld.out" 2>&1 &
  echo $! >"$DIR/pids/slurmctld.pid"
  for p in "${nodes[@]}"; do
    setsid slurmd -D -N "$p" -f "$SLURM_CONF" </dev/null >>"$DIR/log/slurmd-$p.out" 2>&1 &
    echo $! >"$DIR/pids/slurmd-$p.pid"
  done
  # Ready when every node is idle (its slurmd registered with slurmctld).
  for _ in $(seq 300); do
    states=$(sinfo -h -N -o %T 2>/dev/null | sort | uniq -c | xargs || true)
    [[ $states == "${#nodes[@]} idle" ]] && break
    for p in "$DIR"/pids/*.pid; do
      kill -0 "$(cat "$p")" 2>/dev/null || fail "$(basename "$p" .pid) exited" "$(basename "$p" .pid)"
    done
    sleep 0.1
  done
  [[ $states == "${#nodes[@]} idle" ]] || fail "nodes not idle after 30 s (${states:-no answer})" slurmctld
  echo "SLURM_CONF=$SLURM_CONF"
}

case $cmd in
install) install ;;
start) start ;;
stop) stop ;;
*) usage ;;
esac
