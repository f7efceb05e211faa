#!/bin/bash
# train.small_maps x the CPU instruction set: the same params and seed (2,000 Fashion-MNIST
# images, 2 epochs, 2 threads) on one machine, each variant in its own small-map cache;
# prints each one's test accuracy, last training loss and how many layers took the matmul
# path. What moves the numbers: the path choice, the ISA, or both (docs/measurements.md).
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
run() { # name small_maps env...
  local name=$1 sm=$2; shift 2
  mkdir -p $OUT/$name
  .venv/bin/python - "$sm" $OUT/$name/params.yaml <<'PY'
import sys, yaml
p = yaml.safe_load(open("params.yaml"))
p["data"].update(train_limit=2000, test_limit=2000)
p["train"].update(epochs=2, threads=2, small_maps=yaml.safe_load(sys.argv[1]))
yaml.safe_dump(p, open(sys.argv[2], "w"))
PY
  env "$@" ABLATION_CACHE_DIR=$OUT/cache-$name .venv/bin/python -m ablation.stages.train --data data/prepared/fashion_mnist.npz --model resnet18 \
    --metrics $OUT/$name/m.json --out $OUT/$name/m.pt --live $OUT/$name/live --params $OUT/$name/params.yaml > $OUT/$name/log 2>&1
  .venv/bin/python -c "
import json; m=json.load(open('$OUT/$name/m.json')); r=json.load(open('$OUT/$name/m.run.json'))
print('$name', r['cpu_isa'], r['small_maps'], 'acc', m['test_accuracy'], 'loss', repr(m['final_train_loss']), 'matmul', len((r.get('small_map_paths') or {}).get('matmul') or []))"
}
run native-auto auto
run native-off false
run native-on true
run avx2-off false ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
run avx2-auto auto ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
run native-auto-again auto
