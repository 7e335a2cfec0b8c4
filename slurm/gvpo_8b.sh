#!/bin/bash
#SBATCH --job-name=gvpo-8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# GVPO on a Llama-3-8B-class model, 2 nodes x 8 GPUs (docs/scaling.md explains the layout).
#
#   node 1: training, TP2 x PP1 x DP4 (8 GPUs), distributed optimizer, bf16; torchrun, c10d
#           rendezvous on node 1 (with more nodes, --train-nodes N gives DP 4N)
#   node 2 (and any further node): eight SGLang servers per node at TP1 (the 8B model fits one
#           GPU; --engine-tp 2 for four per node), sglang-router on node 2;
#           weights from trainer rank 0 over NCCL (rollout.sglang.weight_sync=distributed)
#   --colocate on one node: trainer and eight TP1 servers share the node's GPUs (CUDA IPC sync)
#
# Submit from the repository root (sbatch copies this file away from common.sh):
#
#   sbatch slurm/gvpo_8b.sh [options] [-- hydra overrides for the trainer]
#   sbatch --output=/shared/logs/%x-%j.out slurm/gvpo_8b.sh -- trainer.max_steps=500
#   sbatch slurm/gvpo_8b.sh -- model.fp8.enabled=true model.fp8.recipe=blockwise   # FP8 training
#   sbatch slurm/gvpo_8b.sh --fp8-rollout          # FP8 SGLang servers + blockwise FP8 sync
#   SLURM_JOB_ID=1 SLURM_JOB_NODELIST='node[001-002]' SLURM_NNODES=2 GPUS_PER_NODE=8 \
#       bash slurm/gvpo_8b.sh --dry-run             # print the commands, run nothing
#
# Options: --dry-run, --colocate, --train-nodes N, --tp N, --pp N, --engine-tp N, --fp8-rollout,
# --no-convert, --help (see slurm/common.sh). Everything after "--" goes to the trainer, last.
#
# Environment (defaults in brackets; everything must be on a filesystem all nodes share):
#   GVPO_SHARED   shared root                                [$HOME/megatron_gvpo]
#   HF_MODEL      HF checkpoint folder (servers load it too) [$GVPO_SHARED/models/Llama-3.1-8B-Instruct]
#   MCORE_CKPT    converted Megatron checkpoint; made once from HF_MODEL when
#                 MCORE_CKPT/megatron_gvpo.json is missing     [$HF_MODEL-mcore]
#   SGLANG_MODEL  what the SGLang servers load; with --fp8-rollout an FP8 checkpoint with
#                 blockwise scales (docs/scaling.md)         [$HF_MODEL]
#   DATA_PATH     prompts (.jsonl/.parquet or a folder)      [$GVPO_SHARED/data/math.jsonl]
#   RUN_DIR       run directory: checkpoints/, metrics, tensorboard; a requeued or resubmitted
#                 job resumes from RUN_DIR/checkpoints/      [$GVPO_SHARED/runs/gvpo-8b]
#   LOG_DIR       SGLang server and router logs              [$RUN_DIR/logs]
#   GVPO_REPO     repository root                            [the submit directory]
#   GVPO_PYTHON, GVPO_TORCHRUN   interpreters on the nodes   [python3, torchrun]
#   GPUS_PER_NODE                                            [SLURM_GPUS_ON_NODE, else 8]
#   RDZV_PORT, SGLANG_PORT (server k of a node: +k), ROUTER_PORT   [29500, 30000, 30080]
#   SGLANG_MEM_FRACTION  --mem-fraction-static               [0.85; 0.45 with --colocate]
#   SGLANG_EXTRA_ARGS, ROUTER_EXTRA_ARGS  more arguments (split on spaces)
#   ENGINE_STARTUP_TIMEOUT  seconds for servers to come up   [3600]
#   GVPO_SAVE_TIMEOUT  seconds the trainer gets after SIGUSR1 to save and exit; keep it below
#                 the --signal lead time above                [240]
#   GVPO_MAX_REQUEUES  stop requeueing after this many restarts [100]
#   GVPO_RESOLVE_ADDRS 1: use each node's IPv4 address, 0: its name [1; 0 in dry-run]
#   NCCL_SOCKET_IFNAME [^lo,docker], NCCL_IB_TIMEOUT [22], NCCL_IB_RETRY_CNT [7], NCCL_DEBUG [WARN],
#   TORCH_NCCL_ASYNC_ERROR_HANDLING [1], CUDA_DEVICE_MAX_CONNECTIONS [1, trainer only];
#   NCCL_IB_HCA, NCCL_IB_GID_INDEX, NCCL_NET_GDR_LEVEL, GLOO_SOCKET_IFNAME passed on when set.
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

GVPO_SCRIPT_NAME=slurm/gvpo_8b.sh
GVPO_DEFAULT_TRAIN_NODES=1
GVPO_DEFAULT_TP=2
GVPO_DEFAULT_PP=1
GVPO_DEFAULT_ENGINE_TP=1
: "${GVPO_SHARED:=${HOME:?HOME is unset: set GVPO_SHARED}/megatron_gvpo}"
: "${HF_MODEL:=$GVPO_SHARED/models/Llama-3.1-8B-Instruct}"
: "${MCORE_CKPT:=$HF_MODEL-mcore}"
: "${DATA_PATH:=$GVPO_SHARED/data/math.jsonl}"
: "${RUN_DIR:=$GVPO_SHARED/runs/gvpo-8b}"
: "${GVPO_SAVE_TIMEOUT:=240}"

gvpo_main "$@"
