#!/usr/bin/env bash
# Run a stage in the Docker image, with all local GPUs, never as root.
#   docker build -t sae-framework .
#   launch/docker-run.sh run recipes/quickstart.yaml
#   NPROC=8 launch/docker-run.sh train recipes/distributed/ddp.yaml     # torchrun inside
# runs/ on the host is mounted at /work/runs. The container runs as the host user (so runs/
# stays theirs), or, for root on the host, as the image's uid 1000, which is then given runs/.
# WANDB_API_KEY, HF_TOKEN and the autointerp key (AUTOINTERP_KEY_ENV names it, default
# OPENAI_API_KEY) are passed through from the environment, never written into the image or a
# recipe.
set -euo pipefail
IMAGE=${IMAGE:-sae-framework}
mkdir -p runs
gpu_flags=()
if command -v nvidia-smi >/dev/null 2>&1; then gpu_flags=(--gpus all --ipc=host); fi
env_flags=(-e WANDB_API_KEY -e WANDB_MODE -e HF_TOKEN -e "${AUTOINTERP_KEY_ENV:-OPENAI_API_KEY}")
if [[ $(id -u) -ne 0 ]]; then
  # Another uid than the image's has no home in it: caches go under runs/, which it owns.
  user_flags=(--user "$(id -u):$(id -g)" -e HOME=/work/runs/.home -e HF_HOME=/work/runs/.cache/huggingface)
else
  user_flags=()
  chown 1000:1000 runs
fi

if [[ -n "${NPROC:-}" ]]; then
  # --standalone: a rendezvous of this job's own (a fresh run id), so that a stage's done-marker
  # left in runs/ by an earlier container's job is never taken for this job's (framework/distributed.py)
  exec docker run --rm "${gpu_flags[@]}" "${user_flags[@]}" "${env_flags[@]}" -v "$PWD/runs:/work/runs" \
    --entrypoint python "$IMAGE" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m framework.cli "$@"
fi
exec docker run --rm "${gpu_flags[@]}" "${user_flags[@]}" "${env_flags[@]}" -v "$PWD/runs:/work/runs" "$IMAGE" "$@"
