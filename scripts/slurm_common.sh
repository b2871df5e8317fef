# What scripts/slurm_*.sbatch share: submitting themselves, one task per GPU, and requeueing a run that stopped
# early. Sourced, never run.
#
# The training processes are started by srun itself, one per GPU (RANK, LOCAL_RANK, WORLD_SIZE from SLURM),
# not by a launcher in between: SLURM's signals then reach every process directly, and each process's exit status
# reaches this script. A run that stops on a signal (preemption, scancel, `--signal` ahead of the time limit)
# writes a checkpoint and exits with status 75; this script then requeues the job, which continues with
# resume=auto. A run that finished, or failed, is not requeued.

EXIT_REQUEUE=75
MAX_REQUEUES=${DISTILL_MAX_REQUEUES:-100}  # a run that keeps stopping is left alone after this many requeues

# Outside a job: make the log folder (SLURM must find it before the job starts) and submit this script, with
# `--options` for sbatch and key=value arguments for the entry point.
submit_self() {
  local script=$1
  shift
  local sbatch_args=() train_args=()
  for arg in "$@"; do
    case "$arg" in
      --*) sbatch_args+=("$arg") ;;
      *) train_args+=("$arg") ;;
    esac
  done
  mkdir -p logs
  exec sbatch ${sbatch_args[@]+"${sbatch_args[@]}"} "$script" ${train_args[@]+"${train_args[@]}"}
}

# Inside a job: every process of the run, then what its exit status asks for.
run_ranks() {
  local entry=$1
  shift
  export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_PORT=${MASTER_PORT:-29500}
  export OMP_NUM_THREADS=1
  local status=0
  srun --kill-on-bad-exit=1 bash -c '
    export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
    exec python "$0" resume=auto "$@"
  ' "$entry" "$@" || status=$?
  requeue_if_stopped "$status"
}

# Exit status 75: requeue the job (it continues from its checkpoint); 0: done; anything else: the failure stands.
requeue_if_stopped() {
  local status=$1
  if [ "$status" -eq "$EXIT_REQUEUE" ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
      echo "the run stopped early again after ${SLURM_RESTART_COUNT} requeues: not requeued (DISTILL_MAX_REQUEUES)" >&2
      return "$status"
    fi
    echo "the run stopped early with a checkpoint: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  if [ "$status" -eq 0 ]; then
    echo "the run is complete"
  fi
  return "$status"
}
