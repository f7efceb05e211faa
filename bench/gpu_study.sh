#!/bin/bash
# The study's GPU half in one command: Table 1's 32 runs and Table 3's five GPU rows, several at
# once on one GPU, through the train stage's own code; one archive of what finished, kept up
# to date after every run, so a command cut off by its time limit still returns it.
#
#   bash bench/gpu_study.sh --stage                    # here, before each lend: raw data and the
#                                                      # commit into data/gpu_stage (42 MB)
#   bash bench/gpu_study.sh [--budget-s S] [--only-missing] [--rows GRID:ROW ...]
#                                                      # on the GPU machine, from the device tool:
#     run(command="bash bench/gpu_study.sh --budget-s 240", carry=["data/gpu_stage"],
#         timeout_s=480)      # the runs, then up to 4 minutes of benchmarks
#   OUT=$(mktemp -d) bash bench/gpu_study.sh --rehearse  # any CPU: every step at toy size
#   python -m ablation.report --add $OUT/gpu_study.tar.gz   # here: the runs into the record
#
# Needs python3 with torch, torchvision, numpy and pyyaml only (the GPU machine has no dvc,
# dvclive, fvcore or ray). Writes to $OUT (default bench/out/gpu_study): gpu_study.tar.gz, the
# benchmark (bench.md, bench.json: the study's own loop beside ours on the same device;
# compiled/: ours with CUDA graphs) and summary.md (the targets, measured).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
if [ "${1:-}" = "--stage" ]; then
  shift
  exec $py -m ablation.gpu.study stage "$@"
fi
out=${OUT:-bench/out/gpu_study}
mkdir -p "$out"
dry=""
for a in "$@"; do [ "$a" = "--rehearse" ] && dry=1; done
if [ -z "$dry" ]; then
  $py -c "import torch; assert torch.cuda.is_available(), 'gpu_study: no CUDA device here \
(use --rehearse on a CPU)'"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
fi
$py -c "import numpy, yaml, torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'cuda', torch.version.cuda)" || {
  echo "gpu_study: needs python3 with numpy, pyyaml, torch and torchvision"; exit 2; }
# 1. the runs, longest first under the budget (the archive is rewritten after each)
$py -m ablation.gpu.study run --out "$out" "$@"
# 2. the study's loop beside ours, one run alone, on the same device (the targets' solo figures)
data=data/gpu_work/prepared/mnist.npz
if [ -n "$dry" ]; then
  $py -m ablation.bench --data "$data" --devices cpu --models resnet18 --batches 16 \
    --optimizers adam --steps 3 --repeats 1 --out "$out" || echo "gpu_study: bench failed"
else
  $py -m ablation.bench --data "$data" --devices cuda --models resnet18 resnet50 --batches 16 \
    --optimizers adam --steps 200 --repeats 2 --out "$out" || echo "gpu_study: bench failed"
  # the launch-bound step under CUDA graphs (torch.compile reduce-overhead; compiling is slow)
  timeout 120 $py -m ablation.bench --data "$data" --devices cuda --models resnet18 \
    --batches 16 --optimizers adam --steps 200 --repeats 1 --compile reduce-overhead \
    --out "$out/compiled" || echo "gpu_study: the compiled bench failed or ran out of time"
fi
# 3. the targets, from what steps 1 and 2 measured
$py -m ablation.gpu.study summary "$out"
