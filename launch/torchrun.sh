#!/usr/bin/env bash
# Launch any `sae` stage on one node or many with torchrun.
#
#   launch/torchrun.sh train recipes/distributed/ddp.yaml            # all local GPUs (or 2 CPU procs)
#   NPROC=8 NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 launch/torchrun.sh train RECIPE key=value ...
#
# Environment (all optional):
#   NPROC        processes per node (default: GPUs on this node, or 2 on a CPU-only node)
#   NNODES       nodes in the job (default 1)
#   NODE_RANK    this node's rank (default 0)
#   MASTER_ADDR  rendezvous host (default 127.0.0.1)  MASTER_PORT (default 29500)
#   MAX_RESTARTS torchrun restarts after a failure; a restarted job resumes from its last
#                checkpoint (default 0)
#   PYTHON       the interpreter (default: the active environment's python, else this
#                checkout's .venv/bin/python where `make setup` made one, else python)
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,15p' "$0"; exit 2
fi

checkout=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python
  [[ -z "${VIRTUAL_ENV:-}" && -x "$checkout/.venv/bin/python" ]] && PYTHON="$checkout/.venv/bin/python"
fi

gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC=${NPROC:-$([[ "$gpus" -gt 0 ]] && echo "$gpus" || echo 2)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}

if [[ "$gpus" -eq 0 ]]; then
  # CPU: one thread per process so the processes do not fight over cores; DeepSpeed on CPU.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

# A restarted attempt must not share the rendezvous store with the dead one: torchrun's static
# rendezvous (and c10d's shared store) hand the new processes the old ranks' addresses, and the
# restart fails to connect or hangs (pytorch/pytorch#135712, #167288). c10d rendezvous with its
# own store per attempt restarts cleanly.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node="$NPROC" --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --max_restarts="$MAX_RESTARTS" \
  -m framework.cli "$@"
