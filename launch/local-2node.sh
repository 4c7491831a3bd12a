#!/usr/bin/env bash
# Two "nodes" on one machine, for testing multi-node launches: two `accelerate launch`, machine
# ranks 0 and 1, rendezvous on 127.0.0.1 (on a machine without GPUs: CPU processes over gloo).
#
#   launch/local-2node.sh --config launch/configs/demo.yaml [key=value ...]
#
# PROCS_PER_NODE (default 1) and MASTER_PORT (default 29531) tune it. If either "node" fails, the
# other is stopped and the script exits non-zero.
set -euo pipefail
# no cd: relative paths in the arguments stay relative to where the script was started
per_node=${PROCS_PER_NODE:-1}
# never ACCELERATE_USE_CPU=1: it silently swaps DeepSpeed for DDP
unset ACCELERATE_USE_CPU
common=(--multi_gpu --num_machines 2 --num_processes $((2 * per_node)) --main_process_ip 127.0.0.1
        --main_process_port "${MASTER_PORT:-29531}" --rdzv_backend static --same_network)
# pipeline.launch: `accelerate launch` that hands SIGTERM to the ranks (they checkpoint and exit 0)
python=${PYTHON:-python}
"$python" -m pipeline.launch "${common[@]}" --machine_rank 1 -m pipeline.train "$@" &
node1=$!
"$python" -m pipeline.launch "${common[@]}" --machine_rank 0 -m pipeline.train "$@" &
node0=$!
trap 'kill $node0 $node1 2>/dev/null || true' EXIT INT TERM
status=0
wait -n -p finished "$node0" "$node1" || status=$?
if [ "$status" -ne 0 ]; then
    exit "$status"
fi
# the other one: `wait -n` again would name the finished one too ("wait: pid N is not a child")
if [ "$finished" = "$node0" ]; then remaining=$node1; else remaining=$node0; fi
wait "$remaining" || status=$?
exit "$status"
