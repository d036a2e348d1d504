#!/usr/bin/env bash
# Run a stage in the Docker image, with all local GPUs, as the image's non-root user.
#   docker build -t sae-framework .
#   launch/docker-run.sh run recipes/quickstart.yaml
#   NPROC=8 launch/docker-run.sh train recipes/distributed/ddp.yaml     # torchrun inside
# runs/ on the host is mounted at /work/runs; WANDB_API_KEY is passed through from the
# environment (never written into the image or a recipe).
set -euo pipefail
IMAGE=${IMAGE:-sae-framework}
mkdir -p runs
gpu_flags=()
if command -v nvidia-smi >/dev/null 2>&1; then gpu_flags=(--gpus all --ipc=host); fi
env_flags=(-e WANDB_API_KEY -e WANDB_MODE -e WANDB_PROJECT -e HF_TOKEN)

if [[ -n "${NPROC:-}" ]]; then
  exec docker run --rm "${gpu_flags[@]}" "${env_flags[@]}" -v "$PWD/runs:/work/runs" \
    --entrypoint python "$IMAGE" -m torch.distributed.run --nproc_per_node="$NPROC" -m framework.cli "$@"
fi
exec docker run --rm "${gpu_flags[@]}" "${env_flags[@]}" -v "$PWD/runs:/work/runs" "$IMAGE" "$@"
