# shellcheck shell=bash
# slurm/common.sh: what the megatron_gvpo sbatch scripts share. Sourced, never run; defines
# functions and sets nothing until a script calls gvpo_main.
#
# A script (slurm/gvpo_70b.sh, slurm/gvpo_8b.sh) sets its defaults (GVPO_DEFAULT_* and the path
# variables) and calls `gvpo_main "$@"`. One job then runs, on the nodes of its allocation:
#
#   disaggregated (default): the first N_TRAIN nodes train (one torchrun per node, c10d rendezvous
#     on the head training node); every other node runs GPUS_PER_NODE / ENGINE_TP SGLang servers,
#     and the first rollout node also runs sglang-router in front of all of them. Weights go from
#     trainer rank 0 to the servers over NCCL (rollout.sglang.weight_sync=distributed).
#   --colocate: every node trains and also runs SGLang servers on the same GPUs (started with
#     --enable-memory-saver); weights go by CUDA IPC (rollout.sglang.weight_sync=tensor).
#
# Before training, the HF checkpoint is converted once to a Megatron checkpoint (skipped when
# $MCORE_CKPT/megatron_gvpo.json exists). On SIGUSR1 (sbatch --signal=B:USR1@...) the batch shell
# sends SIGUSR1 to the trainer's srun step, waits up to GVPO_SAVE_TIMEOUT seconds for it to save
# and exit, then runs `scontrol requeue $SLURM_JOB_ID`; the requeued job resumes from
# $RUN_DIR/checkpoints/.
#
# --dry-run prints every command, one per line prefixed with "+ ", and runs none of them. It needs
# no Slurm: give a fake allocation in the environment (SLURM_JOB_ID, SLURM_JOB_NODELIST, and
# SLURM_NNODES, SLURM_GPUS_ON_NODE or GPUS_PER_NODE as wanted).

# ------------------------------------------------------------------------------------------------
# Output

gvpo_log() {
    printf '[gvpo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

gvpo_die() {
    printf 'gvpo: error: %s\n' "$*" >&2
    exit 2
}

# GVPO_LINE="+ word word ...": each word bare when that is safe for a shell, else single-quoted.
_gvpo_format() {
    local w
    GVPO_LINE="+"
    for w in "$@"; do
        if [[ -n $w && $w =~ ^[A-Za-z0-9_@%+=:,./^-]+$ ]]; then
            GVPO_LINE+=" $w"
        else
            GVPO_LINE+=" '${w//\'/\'\\\'\'}'"
        fi
    done
}

# Print a command as "+ word word ..." (the dry-run format; real runs log the same lines).
gvpo_show() {
    _gvpo_format "$@"
    printf '%s\n' "$GVPO_LINE"
}

# Show a command, then run it (not in dry-run).
gvpo_run() {
    gvpo_show "$@"
    if ((GVPO_DRY_RUN)); then
        return 0
    fi
    "$@"
}

# Show a command with a trailing "&", run it in the background (not in dry-run) and append its
# pid to GVPO_SERVICE_PIDS (engines, router) or set GVPO_TRAIN_PID (role "train").
gvpo_spawn() {
    local role=$1
    shift
    _gvpo_format "$@"
    printf '%s &\n' "$GVPO_LINE"
    if ((GVPO_DRY_RUN)); then
        return 0
    fi
    "$@" &
    GVPO_LAST_PID=$!
    if [[ $role == train ]]; then
        GVPO_TRAIN_PID=$!
    else
        GVPO_SERVICE_PIDS+=("$!")
    fi
}

# ------------------------------------------------------------------------------------------------
# Slurm node lists, expanded without scontrol: "node[001-004,007],gpu12" -> one host per line.
# Handles comma lists, ranges (zero padding taken from the range's first number, as Slurm does),
# several bracket groups in one name ("r[1-2]n[01-02]") and plain names.

gvpo_expand_nodelist() {
    local list=$1 depth=0 cur="" c i
    for ((i = 0; i < ${#list}; i++)); do
        c=${list:i:1}
        case $c in
            '[') depth=$((depth + 1)) && cur+=$c ;;
            ']') depth=$((depth - 1)) && cur+=$c ;;
            ',')
                if ((depth == 0)); then
                    _gvpo_expand_host "$cur" || return 1
                    cur=""
                else
                    cur+=$c
                fi
                ;;
            ' ' | $'\t' | $'\n') ;;
            *) cur+=$c ;;
        esac
        if ((depth < 0 || depth > 1)); then
            printf 'gvpo: bad node list %s (brackets)\n' "$list" >&2
            return 1
        fi
    done
    if ((depth != 0)); then
        printf 'gvpo: bad node list %s (unclosed bracket)\n' "$list" >&2
        return 1
    fi
    if [[ -n $cur ]]; then
        _gvpo_expand_host "$cur" || return 1
    fi
}

# One host expression (no top-level commas): expand its first bracket group, recurse on the rest.
_gvpo_expand_host() {
    local item=$1
    if [[ $item != *'['* ]]; then
        if [[ -z $item || $item == *']'* ]]; then
            printf 'gvpo: bad host name %s in node list\n' "$item" >&2
            return 1
        fi
        printf '%s\n' "$item"
        return 0
    fi
    local prefix=${item%%\[*} rest=${item#*\[}
    local inside=${rest%%\]*} suffix=${rest#*\]}
    local parts part lo hi width n host
    IFS=, read -r -a parts <<<"$inside"
    if ((${#parts[@]} == 0)); then
        printf 'gvpo: empty brackets in %s\n' "$item" >&2
        return 1
    fi
    for part in "${parts[@]}"; do
        if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
            lo=${BASH_REMATCH[1]}
            hi=${BASH_REMATCH[2]}
            width=${#lo}
            if ((10#$lo > 10#$hi)); then
                printf 'gvpo: bad range %s in %s\n' "$part" "$item" >&2
                return 1
            fi
            for ((n = 10#$lo; n <= 10#$hi; n++)); do
                printf -v host '%s%0*d%s' "$prefix" "$width" "$n" "$suffix"
                _gvpo_expand_host "$host" || return 1
            done
        elif [[ $part =~ ^[0-9]+$ ]]; then
            _gvpo_expand_host "$prefix$part$suffix" || return 1
        else
            printf 'gvpo: bad range %s in %s\n' "$part" "$item" >&2
            return 1
        fi
    done
}

# ------------------------------------------------------------------------------------------------
# Arguments

gvpo_usage() {
    cat <<EOF
usage: sbatch ${GVPO_SCRIPT_NAME:-slurm/gvpo_<size>.sh} [options] [-- hydra overrides...]
       bash ${GVPO_SCRIPT_NAME:-slurm/gvpo_<size>.sh} --dry-run [options] [-- overrides...]

  --dry-run          print every command (one per line, "+ " first) and run none; needs only a
                     fake allocation in the environment (SLURM_JOB_ID, SLURM_JOB_NODELIST, ...)
  --colocate         SGLang servers share the training nodes' GPUs (CUDA-IPC weight sync)
  --train-nodes N    nodes that train (default ${GVPO_DEFAULT_TRAIN_NODES:-?}; the rest run SGLang)
  --tp N, --pp N     training tensor / pipeline parallel sizes (default ${GVPO_DEFAULT_TP:-?} x ${GVPO_DEFAULT_PP:-?})
  --ep N             expert-parallel size of a mixture-of-experts model (default ${GVPO_DEFAULT_EP:-1};
                     experts take their ranks from TP x DP)
  --engine-tp N      tensor parallel size of each SGLang server (default ${GVPO_DEFAULT_ENGINE_TP:-?})
  --fp8-rollout      SGLang servers start from a blockwise-FP8 checkpoint (SGLANG_MODEL if it
                     is one, else converted once into RUN_DIR/fp8_model by
                     tools/convert_hf_to_fp8.py); weights sync as blockwise FP8 (rollout.fp8=true)
  --no-convert       train from the HF folder directly (model.path=\$HF_MODEL)
  -h, --help         this text
  -- ARGS...         everything after "--" is passed to the trainer as Hydra overrides, last
                     (e.g. -- trainer.max_steps=200 model.fp8.enabled=true)
EOF
}

gvpo_parse_args() {
    GVPO_DRY_RUN=0
    GVPO_COLOCATE=0
    GVPO_FP8_ROLLOUT=0
    GVPO_CONVERT=1
    GVPO_TRAIN_NODES=""
    GVPO_TP=${GVPO_DEFAULT_TP:?}
    GVPO_PP=${GVPO_DEFAULT_PP:?}
    GVPO_EP=${GVPO_DEFAULT_EP:-1}
    GVPO_ENGINE_TP=${GVPO_DEFAULT_ENGINE_TP:?}
    GVPO_USER_OVERRIDES=()
    while (($#)); do
        case $1 in
            --dry-run) GVPO_DRY_RUN=1 ;;
            --colocate) GVPO_COLOCATE=1 ;;
            --fp8-rollout) GVPO_FP8_ROLLOUT=1 ;;
            --no-convert) GVPO_CONVERT=0 ;;
            --train-nodes | --tp | --pp | --ep | --engine-tp)
                (($# >= 2)) || gvpo_die "$1 needs a value"
                [[ $2 =~ ^[1-9][0-9]*$ ]] || gvpo_die "$1 needs a positive integer, got '$2'"
                case $1 in
                    --train-nodes) GVPO_TRAIN_NODES=$2 ;;
                    --tp) GVPO_TP=$2 ;;
                    --pp) GVPO_PP=$2 ;;
                    --ep) GVPO_EP=$2 ;;
                    --engine-tp) GVPO_ENGINE_TP=$2 ;;
                esac
                shift
                ;;
            -h | --help)
                gvpo_usage
                exit 0
                ;;
            --)
                shift
                GVPO_USER_OVERRIDES=("$@")
                break
                ;;
            *) gvpo_die "unknown option '$1' (trainer overrides go after '--'; see --help)" ;;
        esac
        shift
    done
}

# ------------------------------------------------------------------------------------------------
# The allocation

gvpo_read_allocation() {
    GVPO_JOB_ID=${SLURM_JOB_ID:-}
    [[ -n $GVPO_JOB_ID ]] ||
        gvpo_die "SLURM_JOB_ID is not set: submit with sbatch, or give a fake allocation with --dry-run"
    local nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}} expanded
    [[ -n $nodelist ]] || gvpo_die "SLURM_JOB_NODELIST is not set"
    if ((!GVPO_DRY_RUN)) && command -v scontrol >/dev/null 2>&1; then
        expanded=$(scontrol show hostnames "$nodelist") || gvpo_die "scontrol show hostnames failed"
    else
        expanded=$(gvpo_expand_nodelist "$nodelist") || gvpo_die "cannot expand '$nodelist'"
    fi
    [[ -n $expanded ]] || gvpo_die "SLURM_JOB_NODELIST=$nodelist names no node"
    mapfile -t GVPO_NODES <<<"$expanded"
    local n=${#GVPO_NODES[@]}
    if [[ -n ${SLURM_NNODES:-} && $SLURM_NNODES != "$n" ]]; then
        gvpo_die "SLURM_NNODES=$SLURM_NNODES but SLURM_JOB_NODELIST=$nodelist names $n nodes"
    fi
    # GPUs per node: GPUS_PER_NODE, else Slurm's count ("8" or "h100:8"), else 8.
    local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}
    gpus=${gpus##*:}
    if [[ -z $gpus ]]; then
        gpus=8
        gvpo_log "GPUs per node unknown (no GPUS_PER_NODE / SLURM_GPUS_ON_NODE): assuming 8"
    fi
    [[ $gpus =~ ^[1-9][0-9]*$ ]] || gvpo_die "GPUs per node must be a positive integer, got '$gpus'"
    GVPO_GPUS_PER_NODE=$gpus
    GVPO_CPUS_PER_NODE=${GVPO_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-}}
}

# The address peers use to reach NODE: its first non-loopback IPv4 address, or the name itself
# (always in dry-run unless GVPO_RESOLVE_ADDRS=1; never with GVPO_RESOLVE_ADDRS=0).
gvpo_addr() {
    local node=$1 addr=""
    if ((GVPO_RESOLVE_ADDRS)); then
        addr=$(getent ahostsv4 "$node" 2>/dev/null | awk '$1 !~ /^127\./ { print $1; exit }') || true
    fi
    printf '%s' "${addr:-$node}"
}

# ------------------------------------------------------------------------------------------------
# Who runs what

gvpo_plan_layout() {
    local n=${#GVPO_NODES[@]} gpn=$GVPO_GPUS_PER_NODE
    if ((GVPO_COLOCATE)); then
        if [[ -n $GVPO_TRAIN_NODES && $GVPO_TRAIN_NODES != "$n" ]]; then
            gvpo_die "--colocate trains on every node of the allocation ($n); drop --train-nodes"
        fi
        GVPO_TRAIN_NODES=$n
        GVPO_TRAIN_HOSTS=("${GVPO_NODES[@]}")
        GVPO_ROLLOUT_HOSTS=("${GVPO_NODES[@]}")
    else
        GVPO_TRAIN_NODES=${GVPO_TRAIN_NODES:-$GVPO_DEFAULT_TRAIN_NODES}
        if ((GVPO_TRAIN_NODES >= n)); then
            gvpo_die "$n nodes allocated: $GVPO_TRAIN_NODES train and none would be left for SGLang (allocate more nodes, lower --train-nodes, or use --colocate)"
        fi
        GVPO_TRAIN_HOSTS=("${GVPO_NODES[@]:0:GVPO_TRAIN_NODES}")
        GVPO_ROLLOUT_HOSTS=("${GVPO_NODES[@]:GVPO_TRAIN_NODES}")
    fi

    # Training: TP within a node; DP is what TP x PP leaves of the world.
    GVPO_WORLD=$((GVPO_TRAIN_NODES * gpn))
    ((GVPO_TP <= gpn && gpn % GVPO_TP == 0)) ||
        gvpo_die "--tp $GVPO_TP must divide the $gpn GPUs of a node (tensor parallelism stays inside a node)"
    ((GVPO_WORLD % (GVPO_TP * GVPO_PP) == 0)) ||
        gvpo_die "TP x PP = $GVPO_TP x $GVPO_PP does not divide the $GVPO_WORLD training GPUs ($GVPO_TRAIN_NODES nodes x $gpn)"
    GVPO_DP=$((GVPO_WORLD / (GVPO_TP * GVPO_PP)))
    ((GVPO_DP % GVPO_EP == 0)) ||
        gvpo_die "--ep $GVPO_EP must divide DP = $GVPO_DP (experts take their ranks from the data-parallel ranks)"

    # Rank 0 of a c10d rendezvous is the node whose host name sorts first (torchrun sorts the
    # participants), so the head -- rendezvous endpoint and weight-sync master -- is that node;
    # for the usual zero-padded node lists it is the first training node.
    GVPO_HEAD=$(printf '%s\n' "${GVPO_TRAIN_HOSTS[@]}" | LC_ALL=C sort | head -n 1)
    GVPO_HEAD_ADDR=$(gvpo_addr "$GVPO_HEAD")

    # Rollout: ENGINE_TP GPUs per server, servers never span nodes.
    ((GVPO_ENGINE_TP <= gpn && gpn % GVPO_ENGINE_TP == 0)) ||
        gvpo_die "--engine-tp $GVPO_ENGINE_TP must divide the $gpn GPUs of a node"
    GVPO_ENGINES_PER_NODE=$((gpn / GVPO_ENGINE_TP))
    GVPO_ENGINE_HOSTS=()
    GVPO_ENGINE_ADDRS=()
    GVPO_ENGINE_INDEX=()
    GVPO_ENGINE_URLS=()
    local host addr k
    for host in "${GVPO_ROLLOUT_HOSTS[@]}"; do
        addr=$(gvpo_addr "$host")
        for ((k = 0; k < GVPO_ENGINES_PER_NODE; k++)); do
            GVPO_ENGINE_HOSTS+=("$host")
            GVPO_ENGINE_ADDRS+=("$addr")
            GVPO_ENGINE_INDEX+=("$k")
            GVPO_ENGINE_URLS+=("http://$addr:$((SGLANG_PORT + k))")
        done
    done
    GVPO_ROUTER_HOST=${GVPO_ROLLOUT_HOSTS[0]}
    GVPO_ROUTER_URL="http://$(gvpo_addr "$GVPO_ROUTER_HOST"):$ROUTER_PORT"
    if ((GVPO_COLOCATE)); then
        GVPO_WEIGHT_SYNC=tensor
    else
        GVPO_WEIGHT_SYNC=distributed
    fi

    gvpo_log "allocation: job $GVPO_JOB_ID, $n nodes x $gpn GPUs (${GVPO_NODES[*]})"
    gvpo_log "training: ${GVPO_TRAIN_HOSTS[*]}: TP$GVPO_TP x PP$GVPO_PP x DP$GVPO_DP = $GVPO_WORLD GPUs, head $GVPO_HEAD ($GVPO_HEAD_ADDR)"
    if ((GVPO_EP > 1)); then
        gvpo_log "experts: EP$GVPO_EP (each expert-parallel group spans $GVPO_EP of the DP ranks)"
    fi
    gvpo_log "rollout: ${#GVPO_ENGINE_URLS[@]} SGLang servers at TP$GVPO_ENGINE_TP on ${GVPO_ROLLOUT_HOSTS[*]}, router on $GVPO_ROUTER_HOST, weight sync $GVPO_WEIGHT_SYNC"
    if ((GVPO_COLOCATE && GVPO_TRAIN_NODES > 1)); then
        gvpo_log "WARNING: colocated CUDA-IPC weight sync is sent by trainer rank 0, which reaches only the servers on its own node ($GVPO_HEAD); servers on the other nodes need a per-node sync in the trainer"
    fi
}

# ------------------------------------------------------------------------------------------------
# Environment: NCCL / InfiniBand and friends; a value already in the environment wins.

gvpo_export() {
    gvpo_show export "$1=$2"
    export "$1=$2"
}

gvpo_setup_env() {
    gvpo_export NCCL_SOCKET_IFNAME "${NCCL_SOCKET_IFNAME:-^lo,docker}"
    gvpo_export NCCL_IB_TIMEOUT "${NCCL_IB_TIMEOUT:-22}"
    gvpo_export NCCL_IB_RETRY_CNT "${NCCL_IB_RETRY_CNT:-7}"
    gvpo_export NCCL_DEBUG "${NCCL_DEBUG:-WARN}"
    gvpo_export TORCH_NCCL_ASYNC_ERROR_HANDLING "${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    gvpo_export PYTHONUNBUFFERED 1
    # Cluster-specific, passed on only when set: which HCAs (e.g. mlx5_0,mlx5_1 or =mlx5),
    # GID index for RoCE, interfaces for gloo.
    local v
    for v in NCCL_IB_HCA NCCL_IB_GID_INDEX NCCL_NET_GDR_LEVEL GLOO_SOCKET_IFNAME; do
        if [[ -n ${!v:-} ]]; then
            gvpo_export "$v" "${!v}"
        fi
    done
}

# ------------------------------------------------------------------------------------------------
# Signals: SIGUSR1 near the time limit -> trainer saves and exits -> requeue.

gvpo_on_usr1() {
    GVPO_REQUEUE=1
    gvpo_log "SIGUSR1: the time limit is near; asking the trainer to save and exit"
    if [[ -n $GVPO_TRAIN_PID ]]; then
        gvpo_run kill -USR1 "$GVPO_TRAIN_PID" || true
        GVPO_STOP_DEADLINE=$((SECONDS + GVPO_SAVE_TIMEOUT))
    fi
}

gvpo_on_term() {
    gvpo_log "SIGTERM/SIGINT: stopping"
    if [[ -n $GVPO_TRAIN_PID ]]; then
        kill -TERM "$GVPO_TRAIN_PID" 2>/dev/null || true
    fi
    gvpo_stop_services
    exit 143
}

gvpo_stop_services() {
    local pid
    for pid in ${GVPO_SERVICE_PIDS[@]+"${GVPO_SERVICE_PIDS[@]}"}; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in ${GVPO_SERVICE_PIDS[@]+"${GVPO_SERVICE_PIDS[@]}"}; do
        wait "$pid" 2>/dev/null || true
    done
    GVPO_SERVICE_PIDS=()
}

gvpo_install_traps() {
    gvpo_show trap gvpo_on_usr1 USR1
    gvpo_show trap gvpo_on_term TERM INT
    gvpo_log "on SIGUSR1: kill -USR1 <trainer srun>, wait <= ${GVPO_SAVE_TIMEOUT}s, scontrol requeue $GVPO_JOB_ID"
    if ((GVPO_DRY_RUN)); then
        return 0
    fi
    trap gvpo_on_usr1 USR1
    trap gvpo_on_term TERM INT
    trap gvpo_stop_services EXIT
}

# Sleep a little in a way a trapped signal interrupts at once.
_gvpo_nap() {
    sleep "$1" &
    wait $! 2>/dev/null || true
}

# Wait until URL answers (HTTP 2xx), its srun (pid $2) dies, a requeue is asked for, or timeout.
gvpo_wait_http() {
    local url=$1 pid=$2 timeout=$3
    gvpo_show gvpo_wait_http "$url" "$timeout"
    if ((GVPO_DRY_RUN)); then
        return 0
    fi
    local deadline=$((SECONDS + timeout))
    until curl -sf -o /dev/null --max-time 5 "$url"; do
        ((GVPO_REQUEUE)) && return 0
        kill -0 "$pid" 2>/dev/null || gvpo_die "the process serving $url exited (logs: $GVPO_LOG_DIR)"
        ((SECONDS < deadline)) || gvpo_die "$url did not answer within ${timeout}s (logs: $GVPO_LOG_DIR)"
        _gvpo_nap 5
    done
}

# Wait for the trainer's srun; after SIGUSR1, give it GVPO_SAVE_TIMEOUT seconds, then stop it.
gvpo_wait_trainer() {
    local pid=$GVPO_TRAIN_PID rc=0
    while kill -0 "$pid" 2>/dev/null; do
        if [[ -n $GVPO_STOP_DEADLINE ]] && ((SECONDS >= GVPO_STOP_DEADLINE)); then
            gvpo_log "the trainer did not exit within ${GVPO_SAVE_TIMEOUT}s of SIGUSR1; stopping it (resume from its last checkpoint)"
            kill -TERM "$pid" 2>/dev/null || true
            GVPO_STOP_DEADLINE=""
        fi
        _gvpo_nap 1
    done
    wait "$pid" || rc=$?
    GVPO_TRAIN_RC=$rc
}

# ------------------------------------------------------------------------------------------------
# The steps

# srun options every step shares: one task per node, all of the node's CPUs (Slurm >= 22.05 gives a
# step one CPU per task unless asked), --overlap so colocated steps may share nodes.
_gvpo_srun() {
    local nodes=$1 hosts=$2 name=$3
    GVPO_SRUN=(srun --overlap --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1
        --nodelist="$hosts" --job-name="$name")
    if [[ -n $GVPO_CPUS_PER_NODE ]]; then
        GVPO_SRUN+=(--cpus-per-task="$GVPO_CPUS_PER_NODE")
    fi
}

gvpo_convert_if_needed() {
    GVPO_MODEL_PATH=$MCORE_CKPT
    if ((!GVPO_CONVERT)); then
        GVPO_MODEL_PATH=$HF_MODEL
        gvpo_log "--no-convert: the trainer loads $HF_MODEL directly"
        return 0
    fi
    if [[ -f $MCORE_CKPT/megatron_gvpo.json ]]; then
        gvpo_log "converted checkpoint found: $MCORE_CKPT"
        return 0
    fi
    gvpo_log "no converted checkpoint at $MCORE_CKPT: converting $HF_MODEL (once)"
    _gvpo_srun 1 "$GVPO_HEAD" gvpo-convert
    gvpo_run mkdir -p "$(dirname "$MCORE_CKPT")"
    gvpo_run "${GVPO_SRUN[@]}" --kill-on-bad-exit=1 --chdir="$GVPO_REPO" \
        "$GVPO_PYTHON" tools/convert_hf_to_mcore.py --hf-dir "$HF_MODEL" --out-dir "$MCORE_CKPT" \
        --tp "$GVPO_TP" --pp "$GVPO_PP" --ep "$GVPO_EP"
}

gvpo_fp8_model_if_needed() {
    # Blockwise-FP8 sync needs servers started from a blockwise-FP8 checkpoint: SGLang's
    # --quantization fp8 on a BF16 checkpoint quantizes online and has no weight_scale_inv.
    ((GVPO_FP8_ROLLOUT)) || return 0
    if grep -qs weight_block_size "$SGLANG_MODEL/config.json"; then
        return 0
    fi
    local out=$RUN_DIR/fp8_model
    if [[ ! -f $out/config.json ]]; then
        gvpo_log "--fp8-rollout: converting $SGLANG_MODEL to blockwise FP8 in $out (once)"
        _gvpo_srun 1 "$GVPO_HEAD" gvpo-fp8
        gvpo_run "${GVPO_SRUN[@]}" --kill-on-bad-exit=1 --chdir="$GVPO_REPO" \
            "$GVPO_PYTHON" tools/convert_hf_to_fp8.py --src "$SGLANG_MODEL" --dst "$out"
    fi
    SGLANG_MODEL=$out
}

gvpo_start_engines() {
    local i host k port cmd extra=()
    if [[ -n ${SGLANG_EXTRA_ARGS:-} ]]; then
        read -r -a extra <<<"$SGLANG_EXTRA_ARGS"
    fi
    for i in "${!GVPO_ENGINE_URLS[@]}"; do
        host=${GVPO_ENGINE_HOSTS[i]}
        k=${GVPO_ENGINE_INDEX[i]}
        port=$((SGLANG_PORT + k))
        _gvpo_srun 1 "$host" gvpo-sglang
        cmd=("${GVPO_SRUN[@]}" --kill-on-bad-exit=1 --output="$GVPO_LOG_DIR/sglang-$host-$k.log"
            --open-mode=append
            "$GVPO_PYTHON" -m sglang.launch_server --model-path "$SGLANG_MODEL"
            --tp-size "$GVPO_ENGINE_TP" --base-gpu-id "$((k * GVPO_ENGINE_TP))"
            --host "${GVPO_ENGINE_ADDRS[i]}" --port "$port"
            --mem-fraction-static "$GVPO_MEM_FRACTION")
        if ((GVPO_COLOCATE)); then
            cmd+=(--enable-memory-saver)
        fi
        gvpo_spawn engine "${cmd[@]}" ${extra[@]+"${extra[@]}"}
    done
}

# Router health checks vs weight syncs (sglang-router 0.3.x, router_args.py): a worker paused
# for a sync fails /health (a generation in SGLang 0.5.23); the defaults (a check every 60 s,
# 3 failures mark it unhealthy, 2 successes restore it) turn a sync of a few minutes into up to
# 2 minutes of 503 "No available workers". Checked every 10 s, 200 failures (33 min, longer than
# rollout.sglang.sync_timeout_s) before a worker is dropped, 1 success to restore it; a dead
# worker is still cut off at once by the router's circuit breaker. ROUTER_EXTRA_ARGS come last.
gvpo_start_router() {
    local extra=()
    if [[ -n ${ROUTER_EXTRA_ARGS:-} ]]; then
        read -r -a extra <<<"$ROUTER_EXTRA_ARGS"
    fi
    _gvpo_srun 1 "$GVPO_ROUTER_HOST" gvpo-router
    GVPO_SRUN=("${GVPO_SRUN[@]/--cpus-per-task=*/--cpus-per-task=1}")
    gvpo_spawn router "${GVPO_SRUN[@]}" --output="$GVPO_LOG_DIR/router.log" --open-mode=append \
        "$GVPO_PYTHON" -m sglang_router.launch_router --worker-urls "${GVPO_ENGINE_URLS[@]}" \
        --host "$(gvpo_addr "$GVPO_ROUTER_HOST")" --port "$ROUTER_PORT" \
        --health-check-interval-secs 10 --health-success-threshold 1 \
        --health-failure-threshold 200 \
        ${extra[@]+"${extra[@]}"}
}

gvpo_trainer_overrides() {
    local urls
    urls=$(IFS=,; printf '%s' "${GVPO_ENGINE_URLS[*]}")
    GVPO_OVERRIDES=(
        model=hf "model.path=$GVPO_MODEL_PATH" model.precision=bf16
        "parallel.tp=$GVPO_TP" "parallel.pp=$GVPO_PP" "parallel.ep=$GVPO_EP"
        algorithm=gvpo
        rollout=sglang "rollout.sglang.urls=[$urls]" "rollout.sglang.router_url=$GVPO_ROUTER_URL"
        "rollout.sglang.tp_size=$GVPO_ENGINE_TP" "rollout.sglang.weight_sync=$GVPO_WEIGHT_SYNC"
        "++rollout.sglang.startup_timeout_s=$ENGINE_STARTUP_TIMEOUT"
    )
    if [[ $GVPO_WEIGHT_SYNC == distributed ]]; then
        GVPO_OVERRIDES+=("++rollout.sglang.dist_master_address=$GVPO_HEAD_ADDR")
    fi
    if ((GVPO_FP8_ROLLOUT)); then
        GVPO_OVERRIDES+=(rollout.fp8=true)
    fi
    GVPO_OVERRIDES+=(
        reward=math data=jsonl "data.path=$DATA_PATH"
        trainer=default "trainer.run_dir=$RUN_DIR" trainer.use_distributed_optimizer=true
        ${GVPO_SCRIPT_OVERRIDES[@]+"${GVPO_SCRIPT_OVERRIDES[@]}"}
        ${GVPO_USER_OVERRIDES[@]+"${GVPO_USER_OVERRIDES[@]}"}
    )
}

gvpo_start_trainer() {
    local hosts
    hosts=$(IFS=,; printf '%s' "${GVPO_TRAIN_HOSTS[*]}")
    gvpo_trainer_overrides
    _gvpo_srun "$GVPO_TRAIN_NODES" "$hosts" gvpo-train
    # torchrun (>= 2.9) forwards SIGUSR1 to its workers and gives them PET_SHUTDOWN_TIMEOUT
    # seconds to save before SIGKILL; an older torchrun would die on SIGUSR1 at once.
    gvpo_spawn train "${GVPO_SRUN[@]}" --kill-on-bad-exit=1 --chdir="$GVPO_REPO" \
        env "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}" \
        "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" \
        "PET_SHUTDOWN_TIMEOUT=$GVPO_SAVE_TIMEOUT" \
        "$GVPO_TORCHRUN" --nnodes "$GVPO_TRAIN_NODES" --nproc_per_node "$GVPO_GPUS_PER_NODE" \
        --rdzv_backend c10d --rdzv_endpoint "$GVPO_HEAD_ADDR:$RDZV_PORT" --rdzv_id "$GVPO_JOB_ID" \
        -m megatron_gvpo.train "${GVPO_OVERRIDES[@]}"
}

# ------------------------------------------------------------------------------------------------
# Main

gvpo_defaults() {
    : "${GVPO_PYTHON:=python3}"
    : "${GVPO_TORCHRUN:=torchrun}"
    : "${RDZV_PORT:=29500}"
    : "${SGLANG_PORT:=30000}"
    : "${ROUTER_PORT:=30080}"
    : "${ENGINE_STARTUP_TIMEOUT:=3600}"
    : "${GVPO_SAVE_TIMEOUT:=240}"
    : "${GVPO_MAX_REQUEUES:=100}"
    : "${LOG_DIR:=$RUN_DIR/logs}"
    : "${SGLANG_MODEL:=$HF_MODEL}"
    GVPO_LOG_DIR=$LOG_DIR
    if ((GVPO_COLOCATE)); then
        GVPO_MEM_FRACTION=${SGLANG_MEM_FRACTION:-${GVPO_DEFAULT_COLOCATE_MEM_FRACTION:-0.45}}
    else
        GVPO_MEM_FRACTION=${SGLANG_MEM_FRACTION:-0.85}
    fi
    if [[ -z ${GVPO_RESOLVE_ADDRS:-} ]]; then
        GVPO_RESOLVE_ADDRS=$((GVPO_DRY_RUN ? 0 : 1))
    fi
    GVPO_REQUEUE=0
    GVPO_TRAIN_PID=""
    GVPO_TRAIN_RC=0
    GVPO_STOP_DEADLINE=""
    GVPO_SERVICE_PIDS=()
    GVPO_LAST_PID=0
}

gvpo_main() {
    gvpo_parse_args "$@"
    gvpo_defaults
    gvpo_read_allocation
    gvpo_plan_layout
    [[ -d $HF_MODEL || $GVPO_DRY_RUN == 1 ]] || gvpo_die "HF_MODEL=$HF_MODEL is not a folder"
    [[ -e $DATA_PATH || $GVPO_DRY_RUN == 1 ]] || gvpo_die "DATA_PATH=$DATA_PATH does not exist"

    gvpo_setup_env
    gvpo_install_traps
    gvpo_run mkdir -p "$RUN_DIR" "$GVPO_LOG_DIR"

    gvpo_fp8_model_if_needed
    # Servers load their weights while the (CPU-only) conversion runs.
    gvpo_start_engines
    gvpo_convert_if_needed
    local i
    for i in "${!GVPO_ENGINE_URLS[@]}"; do
        gvpo_wait_http "${GVPO_ENGINE_URLS[i]}/health" "${GVPO_SERVICE_PIDS[i]:-0}" \
            "$ENGINE_STARTUP_TIMEOUT"
    done
    if ((!GVPO_REQUEUE)); then
        gvpo_start_router
        gvpo_wait_http "$GVPO_ROUTER_URL/health" "$GVPO_LAST_PID" 300
    fi
    if ((!GVPO_REQUEUE)); then
        gvpo_start_trainer
        if ((!GVPO_DRY_RUN)); then
            gvpo_wait_trainer
        fi
    fi
    gvpo_show gvpo_stop_services
    if ((!GVPO_DRY_RUN)); then
        gvpo_stop_services
    fi

    if ((GVPO_REQUEUE)); then
        if ((${SLURM_RESTART_COUNT:-0} >= GVPO_MAX_REQUEUES)); then
            gvpo_log "requeued ${SLURM_RESTART_COUNT} times already (GVPO_MAX_REQUEUES=$GVPO_MAX_REQUEUES): not again"
            exit 1
        fi
        gvpo_log "requeueing job $GVPO_JOB_ID; it resumes from $RUN_DIR/checkpoints/"
        gvpo_run scontrol requeue "$GVPO_JOB_ID"
        exit 0
    fi
    if ((GVPO_TRAIN_RC != 0)); then
        gvpo_log "the trainer exited with status $GVPO_TRAIN_RC (logs: $GVPO_LOG_DIR and the job's output)"
    fi
    exit "$GVPO_TRAIN_RC"
}
