#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (see docs/benchmarks.md, "GPU"):
# CUDA tests, every train.strategy through Lightning on CUDA (DeepSpeed and FSDP2 included),
# the paper's A/0..A/3 bank end to end on CUDA, the training-step benchmark in fp32 and bf16
# up to 131,072 features, the `sae train` loop against the bare step (bench/train_loop.py: with 0
# and 4 DataLoader workers, and TopK with train.cuda_graphs), and a profile of our steps
# (bench/step_profile.py). Writes its logs
# to $OUT (or bench/results/gpu): log.txt (device, test summaries, profile), pytest.txt (the
# tests' whole output), bench.md and bench/*.json with the scaling plot; few files, since a lent
# machine returns at most eight.
#
# PARTS picks the sections (default: "tests strategies paper bench loop profile"; "compile", the
# torch.compile contenders of bench/train_step.py, "graphs", a short check of train.cuda_graphs'
# step alone, "harvest", bench/activations.py with the LM on the GPU (harvest against the bare
# forward, the shard writer alone per thread count, the reader), and "paths", the paper SAE's
# dense path against its sparse one on sparse codes, only when named); each has its
# own timeout in seconds (TEST_S, STRATEGY_S, PAPER_S, BENCH_S, COMPILE_S, GRAPHS_S, HARVEST_S, PATHS_S,
# LOOP_S for each of its runs of LOOP_STEPS steps, PROFILE_S), so one call fits a
# device budget. On an H100 (2026-11-26): tests 40 s, strategies about 230 s (six one-GPU runs
# of ~28 s after a ~60 s set-up), bench 110 s, profile 40 s, plus ~30 s to start the machine:
#   PARTS="tests strategies bench profile" bash bench/gpu_check.sh     # one call, ~8 minutes
#
# The machine has CUDA PyTorch, Lightning and transformers; the rest travels as wheels in .whl/
# (omegaconf, webdataset, deepspeed, sparsify, SAELens and its imports), made by bench/gpu_wheels.sh.
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
LOG="$OUT/log.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$LOG"

PARTS=${PARTS:-tests strategies paper bench loop profile}
part() { [[ " $PARTS " == *" $1 "* ]]; }

if part tests; then
echo "== CUDA tests" | tee -a "$LOG" "$OUT/pytest.txt"
timeout "${TEST_S:-150}" python3 -m pytest -q -rfEs --durations=5 -m gpu -p no:cacheprovider tests/test_gpu_training.py \
  tests/test_lm_gpu.py 2>&1 | tee -a "$OUT/pytest.txt" | tail -n 25 | tee -a "$LOG"
fi

if part strategies; then
echo "== every train.strategy on one GPU against a single-device run (NCCL, Lightning's DeepSpeed and FSDP2)" \
  | tee -a "$LOG" "$OUT/pytest.txt"
timeout "${STRATEGY_S:-300}" python3 -m pytest -q -rfEs --durations=8 -m gpu -p no:cacheprovider tests/test_distributed.py \
  2>&1 | tee -a "$OUT/pytest.txt" | tail -n 25 | tee -a "$LOG"
fi

if part paper; then
echo "== paper bank (A/0..A/3) end to end on CUDA"
start=$(date +%s)
timeout "${PAPER_S:-200}" python3 -m framework.cli run recipes/paper/bank.yaml workdir=/tmp/paper \
  lm.path=/tmp/paper/lm harvest.output_dir=/tmp/paper/activations train.wandb.mode=disabled \
  'run.stages=[pretrain,harvest,train,eval,export]' > /tmp/paper.log 2>&1
echo "paper bank exit $? after $(( $(date +%s) - start ))s" | tee -a "$LOG"
{ tail -n 15 /tmp/paper.log; cat /tmp/paper/lm/metrics.json /tmp/paper/eval/metrics.json; } 2>/dev/null | tee -a "$LOG"
fi

if part bench; then
echo "== training-step benchmark" | tee -a "$LOG"
start=$(date +%s)
timeout "${BENCH_S:-240}" python3 bench/run_all.py --device cuda --only train_step scaling --out "$OUT/bench" \
  > "$OUT/bench.md" 2>&1
echo "bench exit $? after $(( $(date +%s) - start ))s" | tee -a "$LOG"
tail -n 40 "$OUT/bench.md"
fi

if part compile; then
echo "== torch.compile: our fast path and the plain SAE compiled, beside ours (bf16, n 16,384)" | tee -a "$LOG"
# Not in the default PARTS: compiling for the GPU takes a while per contender (Triton from .whl).
start=$(date +%s)
timeout "${COMPILE_S:-360}" python3 bench/train_step.py --device cuda --compile --precision bf16 --sizes 16384 \
  --out "$OUT/compile" > /tmp/compile.log 2>&1
echo "compile bench exit $? after $(( $(date +%s) - start ))s" | tee -a "$LOG"
grep -v "^USDT\|^STAGE\|^W[0-9]\|Warning\|warn" /tmp/compile.log | tail -n 120 | tee -a "$LOG"
fi

if part graphs; then
echo "== train.cuda_graphs: TopK n 16,384 against the peers, the loop with 4 workers, the profile" | tee -a "$LOG"
# A short check of the recorded step alone (not in the default PARTS; "bench loop profile" cover it too)
start=$(date +%s)
timeout "${GRAPHS_S:-150}" python3 bench/train_step.py --device cuda --families topk --sizes 16384 \
  --out "$OUT/graphs" > "$OUT/graphs.md" 2>&1
echo "topk bench exit $? after $(( $(date +%s) - start ))s" | tee -a "$LOG"
grep -A12 "^### topk SAE, n = 16,384" "$OUT/graphs.md" | tee -a "$LOG"
timeout "${LOOP_S:-240}" python3 bench/train_loop.py --device cuda --cuda-graphs --num-workers 4 --precision bf16 \
  --steps "${LOOP_STEPS:-200}" --out /tmp/loop-graphs 2>&1 | grep -v "^USDT\|^STAGE\|INFO\|Warning\|warn" \
  | tail -n 6 | tee -a "$LOG"
timeout "${PROFILE_S:-60}" python3 bench/step_profile.py --device cuda --case topk-graphs:16384:bf16 --rows 25 2>&1 \
  | grep -v "^USDT\|^STAGE" >> "$LOG"
fi

if part paths; then
echo "== the paper SAE's two paths on sparse codes (L0 ~ 32): sparse (what it takes) against dense" | tee -a "$LOG"
# Not in the default PARTS: the data for a CUDA sparse_density_threshold (framework/sae/paper.py).
start=$(date +%s)
timeout "${PATHS_S:-240}" python3 bench/train_step.py --device cuda --families paper --paths \
  --sizes 4096 16384 65536 --out "$OUT/paths" > "$OUT/paths.md" 2>&1
echo "paths bench exit $? after $(( $(date +%s) - start ))s" | tee -a "$LOG"
grep "^#### \|^| ours paper, sparse\|^| step" "$OUT/paths.md" | tee -a "$LOG"
fi

if part harvest; then
echo "== harvest with the LM on the GPU: against the bare forward, the shard writer alone, the reader" | tee -a "$LOG"
start=$(date +%s)
timeout "${HARVEST_S:-240}" python3 bench/activations.py --device cuda --out "$OUT/harvest" > "$OUT/harvest.md" 2>&1
echo "harvest bench exit $? after $(( $(date +%s) - start ))s" | tee -a "$LOG"
grep -v "INFO\|^USDT\|^STAGE" "$OUT/harvest.md" | head -n 40 | tee -a "$LOG"
fi

if part loop; then
echo "== the sae train loop against the bare step (Lightning, shard reader, callbacks)" | tee -a "$LOG"
# (its JSON stays on the machine: the tables in log.txt carry the figures, and a lent machine
# returns at most eight files)
timeout "${LOOP_S:-240}" python3 bench/train_loop.py --device cuda --steps "${LOOP_STEPS:-200}" --out /tmp/loop \
  2>&1 | grep -v "^USDT\|^STAGE\|INFO\|Warning\|warn" | tail -n 20 | tee -a "$LOG"
timeout "${LOOP_S:-240}" python3 bench/train_loop.py --device cuda --precision bf16 --num-workers 4 \
  --steps "${LOOP_STEPS:-200}" --out /tmp/loop-workers 2>&1 | grep -v "^USDT\|^STAGE\|INFO\|Warning\|warn" \
  | tail -n 8 | tee -a "$LOG"
timeout "${LOOP_S:-240}" python3 bench/train_loop.py --device cuda --cuda-graphs --num-workers 4 \
  --steps "${LOOP_STEPS:-200}" --out /tmp/loop-graphs 2>&1 | grep -v "^USDT\|^STAGE\|INFO\|Warning\|warn" \
  | tail -n 8 | tee -a "$LOG"
fi

if part profile; then
echo "== where our steps spend their time" | tee -a "$LOG"
timeout "${PROFILE_S:-60}" python3 bench/step_profile.py --device cuda --rows 25 2>&1 | grep -v "^USDT\|^STAGE" >> "$LOG"
tail -n 70 "$LOG"
fi
