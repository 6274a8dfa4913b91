#!/usr/bin/env bash
# The body of one_node.sbatch and multi_node.sbatch, sourced by them (so its traps are the batch
# shell's): run selfimprove under torchrun on every node of the allocation, requeue on preemption.
# Submit from the repository root: sbatch scripts/slurm/<script> [hydra overrides...], e.g.
#   sbatch scripts/slurm/multi_node.sbatch recipe=quickstart launcher=zero2
# Environment knobs (all optional):
#   RUN_DIR            run folder (default runs/$SLURM_JOB_NAME); a requeued job resumes from it
#   GPUS_PER_NODE      processes per node (default $SLURM_GPUS_ON_NODE)
#   SELFIMPROVE_PYTHON python of the environment that has selfimprove (default .venv/bin/python);
#                      torchrun is run as "$SELFIMPROVE_PYTHON -m torch.distributed.run" so PATH does not matter
#   LAUNCHER_ARGS      extra torchrun arguments, word-split (e.g. "--max-restarts=1 --log-dir=logs")
#   SRUN_ARGS          extra srun arguments for the training step, word-split
#   SELFIMPROVE_DRY_RUN=1  print the srun command instead of running it (for tests and checking)
set -uo pipefail # no -e: the exit status of the step is handled below

PYTHON=${SELFIMPROVE_PYTHON:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-selfimprove}}
NNODES=${SLURM_NNODES:?not inside a SLURM allocation (SLURM_NNODES unset)}
NPROC=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if ! [[ $NPROC =~ ^[1-9][0-9]*$ ]]; then
  echo "[slurm] no GPUs on this node (SLURM_GPUS_ON_NODE='$NPROC'): request them with --gpus-per-node, or set GPUS_PER_NODE (processes per node)" >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch; pass it on explicitly.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi
# On SIGTERM the torchrun agent passes SIGTERM to its workers and SIGKILLs them after this many seconds
# (torch's default is 30): leave them time to write their checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}

read -r -a launcher_args <<<"${LAUNCHER_ARGS:-}"
read -r -a srun_args <<<"${SRUN_ARGS:-}"
cmd=(
  srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 ${srun_args[@]+"${srun_args[@]}"}
  "$PYTHON" -m torch.distributed.run
  --nnodes="$NNODES" --nproc-per-node="$NPROC"
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"
  ${launcher_args[@]+"${launcher_args[@]}"}
  -m selfimprove train "$@" resume=auto run.dir="$RUN_DIR"
)

if [[ ${SELFIMPROVE_DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

# Preemption. SLURM sends SIGUSR1 to this batch shell 120 s before the end (--signal=B:USR1@120),
# or SIGTERM when it preempts/cancels. We forward SIGUSR1 to the selfimprove *worker* processes on
# every node: each worker finishes its current step, writes a checkpoint at the next safe point and
# exits 0 (selfimprove/loop.py: _request_stop, _preempted). The torchrun agent is deliberately left
# out: it does not handle SIGUSR1 (Python's default action kills it at once, orphaning the workers),
# and on SIGTERM it kills its workers itself after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (120 s unless set,
# above). Workers are started by the agent as "python -u -m selfimprove train ..." while the agent's
# own command line has no "-u" before "-m selfimprove", so the pattern below matches workers only;
# "[e]" keeps it from matching the command lines of this pkill/srun themselves. The pattern ends with
# this job's run.dir, so another job's workers on a shared node are left alone. When the step has
# exited we requeue; the requeued job runs this script again and resume=auto continues from the last
# checkpoint in $RUN_DIR.
run_dir_regex=$(printf '%s' "$RUN_DIR" | sed -E 's/[][\\.^$*+?(){}|]/\\&/g')
WORKER_PATTERN="-u -m selfimprov[e] train .* run\\.dir=$run_dir_regex( |\$)"
preempted=0
forward_stop() {
  [[ $preempted == 1 ]] && return
  preempted=1
  echo "[slurm] got SIG$1: asking the workers to checkpoint and stop" >&2
  srun --overlap --nodes="$NNODES" --ntasks-per-node=1 pkill -USR1 -f -- "$WORKER_PATTERN" || true
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

"${cmd[@]}" &
step=$!
# "wait" returns early (status > 128) when a trapped signal arrives: keep waiting until the step has
# exited; the last "wait" then gives the step's own exit status.
while kill -0 "$step" 2>/dev/null; do
  wait "$step"
done
wait "$step"
rc=$?

if [[ $preempted == 1 ]]; then
  echo "[slurm] training step exited ($rc); requeueing job $SLURM_JOB_ID" >&2
  # After `scontrol requeue` or a preemption SLURM has requeued the job already, and this one fails
  # with "Job is pending execution": harmless.
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
# No signal came: the step's own status, and no requeue (a bad override must not loop).
[[ $rc == 0 ]] || echo "[slurm] training step failed (exit $rc), not requeued: its error is above" >&2
exit "$rc"
