#!/bin/bash
#SBATCH --job-name=gvpo-qwen3-30b-a3b
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# GVPO on Qwen3-30B-A3B (mixture of experts: 48 layers, 128 experts, 8 per token), 2 nodes of
# training and 1 of rollout (docs/scaling.md explains the layout and its memory plan).
#
#   nodes 1-2: training, TP1 x PP1 x DP16 with EP8 (16 experts per GPU per layer; expert data
#           parallel 2 shards the experts' optimizer state), distributed optimizer, full
#           recompute, bf16; torchrun, c10d rendezvous on node 1. tools/plan_memory.py puts this
#           at 71 GiB per GPU; one training node (--train-nodes 1, or --colocate) needs 92 GiB
#           per GPU (expert data parallel 1), which fits 141 GB GPUs, not 80 GB ones
#   node 3: four SGLang servers at TP2 (the bf16 model is about 61 GB), sglang-router on node 3;
#           weights from trainer rank 0 over NCCL (rollout.sglang.weight_sync=distributed),
#           experts gathered over the EP ranks and sent in per-expert HF names
#   --colocate on one node: trainer and the servers share the node's GPUs (CUDA IPC sync)
#
# Submit from the repository root (sbatch copies this file away from common.sh):
#
#   sbatch slurm/gvpo_qwen3_30b_a3b.sh [options] [-- hydra overrides for the trainer]
#   sbatch slurm/gvpo_qwen3_30b_a3b.sh -- model.moe.aux_loss_coeff=0.001 model.moe.routing_replay=old
#   SLURM_JOB_ID=1 SLURM_JOB_NODELIST='node[001-003]' SLURM_NNODES=3 GPUS_PER_NODE=8 \
#       bash slurm/gvpo_qwen3_30b_a3b.sh --dry-run   # print the commands, run nothing
#
# Options: --dry-run, --colocate, --train-nodes N, --tp N, --pp N, --ep N, --engine-tp N,
# --fp8-rollout, --no-convert, --help (see slurm/common.sh). Everything after "--" goes to the
# trainer, last.
#
# Environment: as slurm/gvpo_8b.sh, with these defaults:
#   HF_MODEL      [$GVPO_SHARED/models/Qwen3-30B-A3B]
#   RUN_DIR       [$GVPO_SHARED/runs/gvpo-qwen3-30b-a3b]
set -euo pipefail

if [[ -z ${GVPO_REPO:-} ]]; then
    _here=$(dirname "${BASH_SOURCE[0]}")
    if [[ -f $_here/common.sh ]]; then
        GVPO_REPO=$(cd "$_here/.." && pwd)
    else
        GVPO_REPO=${SLURM_SUBMIT_DIR:-$PWD}
    fi
fi
if [[ ! -f $GVPO_REPO/slurm/common.sh ]]; then
    echo "gvpo: cannot find slurm/common.sh under $GVPO_REPO: submit from the repository root or set GVPO_REPO" >&2
    exit 2
fi
# shellcheck source=common.sh
source "$GVPO_REPO/slurm/common.sh"

GVPO_SCRIPT_NAME=slurm/gvpo_qwen3_30b_a3b.sh
GVPO_DEFAULT_TRAIN_NODES=2
GVPO_DEFAULT_TP=1
GVPO_DEFAULT_PP=1
GVPO_DEFAULT_ENGINE_TP=2
GVPO_DEFAULT_EP=8
GVPO_SCRIPT_OVERRIDES=(model.recompute_granularity=full)  # before the user's overrides
: "${GVPO_SHARED:=${HOME:?HOME is unset: set GVPO_SHARED}/megatron_gvpo}"
: "${HF_MODEL:=$GVPO_SHARED/models/Qwen3-30B-A3B}"
: "${MCORE_CKPT:=$HF_MODEL-mcore}"
: "${DATA_PATH:=$GVPO_SHARED/data/math.jsonl}"
: "${RUN_DIR:=$GVPO_SHARED/runs/gvpo-qwen3-30b-a3b}"
: "${GVPO_SAVE_TIMEOUT:=240}"

gvpo_main "$@"
