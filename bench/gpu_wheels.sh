#!/usr/bin/env bash
# Wheels for a lent GPU machine (bench/gpu_check.sh): what the framework, its tests and the peers
# import that the machine's own image lacks. That image has CUDA torch, Lightning, transformers,
# numpy, pandas, matplotlib, pytest and Triton, and reaches no package registry, so the rest
# travels with the working tree in .whl/ (ignored by git; about 29 MB of the 64 MB a call carries).
# Versions are the ones the local .venv resolved; the machine runs Python 3.12 on x86-64.
#
#   bash bench/gpu_wheels.sh            # then: run(command="bash bench/gpu_check.sh", carry=[".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PY:-.venv/bin/python}
WHEELS=(
  # the framework and its tests
  omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 webdataset==1.0.2 braceexpand==0.1.7
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 gguf==0.19.0
  # sparsify
  eai-sparsify==1.3.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 natsort==8.4.0
  schedulefree==1.4.1 simple-parsing==0.1.9 docstring-parser==0.18.0
  # SAELens, and what importing it pulls in (transformer-lens imports wandb)
  sae-lens==6.54.12 transformer-lens==3.9.0 better-abc==0.0.3 wandb==0.31.0 platformdirs==4.14.8
  sniffio==1.3.1 truststore==0.10.5 httpcore2==2.16.2 httpx2==2.16.2 googleapis-common-protos==1.76.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
# DeepSpeed publishes only a source archive: build its pure-Python wheel (no CUDA ops compiled
# ahead; the strategies use torch's Adam) against the local torch.
[[ -n "$(ls .whl/deepspeed-0.19.8-*.whl 2>/dev/null)" ]] ||
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
du -sh .whl
