#!/usr/bin/env bash
# Cluster recipe (SLURM): prepare as an array job, merge the parts, train on several nodes through torchrun.
# The same script runs without SLURM: the parts then run one after another and torchrun starts
# $GPUS_PER_NODE processes on this machine (1 by default; gloo on CPU, NCCL on GPUs, chosen by kdcli).
#
#   jid=$(sbatch --parsable --array=1-8 examples/cluster.sh prepare RAW SHARDS)
#   jid=$(sbatch --parsable --dependency=afterok:$jid examples/cluster.sh merge SHARDS)
#   sbatch --dependency=afterok:$jid --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 \
#       --export=ALL,GPUS_PER_NODE=8 examples/cluster.sh teach SHARDS oct.pt --modality oct
#
# Anything after the stage's arguments goes to kdcli unchanged (--model, --epochs, --set ema=0.999, ...).
set -euo pipefail

stage=${1:?usage: cluster.sh prepare RAW SHARDS | merge SHARDS | teach SHARDS OUT [kdcli options]}
shift

case "$stage" in
  prepare)
    raw=${1:?prepare RAW SHARDS}; shards=${2:?prepare RAW SHARDS}; shift 2
    source=${SOURCE:-multieye}
    if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then  # one part per array task, numbered from 1
      parts=${SLURM_ARRAY_TASK_COUNT:?run as an array job}
      kdcli prepare "$source" "$raw" --out "$shards" --part "$SLURM_ARRAY_TASK_ID/$parts" \
        --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"
    else
      parts=${PARTS:-2}
      for part in $(seq 1 "$parts"); do
        kdcli prepare "$source" "$raw" --out "$shards" --part "$part/$parts" "$@"
      done
    fi
    ;;
  merge)
    shards=${1:?merge SHARDS}
    kdcli prepare merge "$shards"
    kdcli inspect "$shards" --verify
    ;;
  teach | distill)
    shards=${1:?"$stage SHARDS OUT [options]"}; out=${2:?"$stage SHARDS OUT [options]"}; shift 2
    # One torchrun per node; they meet at the first node of the allocation (or here, alone).
    nodes=${SLURM_JOB_NUM_NODES:-1}
    head=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1 || true)
    launch=(torchrun --nnodes "$nodes" --nproc_per_node "${GPUS_PER_NODE:-1}")
    if [[ "$nodes" -gt 1 ]]; then
      launch+=(--rdzv-backend c10d --rdzv-endpoint "$head:${MASTER_PORT:-29500}" --rdzv-id "${SLURM_JOB_ID:-kdcli}")
    else
      launch+=(--standalone)
    fi
    run=("${launch[@]}" -m kdcli "$stage" --data "$shards" --out "$out" "$@")
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then srun --ntasks-per-node=1 "${run[@]}"; else "${run[@]}"; fi
    ;;
  *)
    echo "error: unknown stage '$stage'; use prepare, merge, teach or distill" >&2
    exit 2
    ;;
esac
