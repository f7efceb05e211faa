#!/bin/bash
# Every GPU check in one device session (about 5 minutes on one H200):
#   1. the training benchmark on cuda: the study's loop vs ours (resident data, channels_last),
#      fp32 and bf16, ResNet-18/50 at batch 16 and 32, adam and sgd;
#   2. ours with torch.compile reduce-overhead (CUDA graphs) at batch 16, adam;
#   3. one real epoch of ResNet-18 and ResNet-50 on MNIST (bench/gpu_check.json): the train stage
#      run as a program, as dvc runs it, accuracy checked.
# Needs torch, torchvision and numpy only (the device machine has no dvc, dvclive, fvcore, yaml;
# FLOPs then come from torch's own counter, see models.gflops).
# From the device tool, in the repository root:
#   run(command="bash bench/gpu_check.sh", carry=["data/prepared/mnist.npz"], timeout_s=420)
# Results land in $OUT (the device tool's folder) or bench/out/gpu; copy them to bench/out/gpu.
set -euo pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-bench/out/gpu}
data=data/prepared/mnist.npz
mkdir -p "$out"
test -f "$data" || { echo "gpu_check: $data missing (carry it: dvc repro prepare@mnist first)"; exit 2; }
python -c "import torch; assert torch.cuda.is_available(), 'no cuda device'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
torchvision.__version__)" | tee -a "$out/gpu.txt"
bench="python -m ablation.bench --data $data --devices cuda --models resnet18 resnet50 --steps 100"
# 1. eager, fp32 then bf16 (reference: per-sample PIL loader, pin_memory, stock model)
failed=""  # one failing step must not cost the others their device time
$bench --batches 16 32 --optimizers adam sgd --repeats 3 --out "$out/fp32" || failed+=" fp32"
$bench --batches 16 --optimizers adam --repeats 3 --precision bf16 --out "$out/bf16" ||
  failed+=" bf16"
# 2. CUDA graphs through torch.compile; compilation happens in the warm-up steps
$bench --batches 16 --optimizers adam --repeats 2 --compile reduce-overhead \
  --out "$out/compiled" || failed+=" compiled"
# 3. a real epoch per model, test accuracy must reach 97 %
python -m ablation.bench.gpu_check --data "$data" --out "$out/train" 2>&1 | tee "$out/train.txt" ||
  failed+=" train"
if [ -n "$failed" ]; then echo "gpu_check: FAILED:$failed (results so far in $out)"; exit 1; fi
echo "gpu_check: all passed; results in $out"
