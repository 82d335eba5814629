#!/usr/bin/env bash
# The one call a lent GPU gets (issues 19 and 21), speed first, then accuracy, every result under $OUT:
#   1. the dev split from the carried archive (the device has no ../shared: copy it into .carry/ first),
#   2. python -m bench.gpu_check: CUDA tests, sync audit, images/s and MFU (<= GPU_CHECK_S, default 360 s),
#   3. python -m bench.recipes methods,default: every fast-training method at full width on configs/fast.yaml
#      and the default recipe at full length, RUNS_AT_ONCE sharing the GPU, until ACCURACY_S (default 330 s).
#
# Here, once:   mkdir -p .carry && cp ../shared/data/cifar10-train-jpeg.tar.gz ../shared/data/cifar10_dev.py .carry/
#               echo /.carry/ >> .git/info/exclude
# Device call:  run(command="OUT=$OUT bash bench/device.sh", carry=[".carry"], timeout_s=600)
# CPU proof:    TINY=1 OUT=/tmp/out bash bench/device.sh     (synthetic data, width 8, three arms; what CI runs)
#
# The device image has torch and torchvision but no mlflow: PYTHONPATH=. and mlflow.enabled=false.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder results go to}"
export PYTHONPATH=. PYTHONUNBUFFERED=1
GPU_CHECK_S=${GPU_CHECK_S:-360}
ACCURACY_S=${ACCURACY_S:-330}
RUNS_AT_ONCE=${RUNS_AT_ONCE:-6}
mkdir -p "$OUT"
status=0

if [ -n "${TINY:-}" ]; then  # the same steps at a size a CPU runs in seconds; no data, no GPU
    python3 -m bench.recipes methods,default --only "fast-base,fast-lookahead,default-60ep" --seeds 0 \
        --data-root /nonexistent --out "$OUT/recipes" --parallel 2 --threads 1 --budget-s "$ACCURACY_S" \
        mlflow.enabled=false train.device=cpu data.source=synthetic model.width=8 data.val_size=256 \
        data.train_subset=512 data.test_subset=256 train.epochs=1 train.batch_size=64 train.eval_batch_size=256 \
        train.log_every_s=0 || status=1
    cp "$OUT/recipes/summary.json" "$OUT/recipes-summary.json" 2>/dev/null || status=1
    exit $status
fi

data=/tmp/cifar10-dev
if [ ! -d "$data/cifar-10-batches-py" ]; then
    python3 .carry/cifar10_dev.py --out "$data" > "$OUT/dev-split.log" 2>&1 || { tail -3 "$OUT/dev-split.log"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1

# speed first: a run that overruns here still leaves its JSON (gpu_check writes it after every part)
timeout -k 10 "$((GPU_CHECK_S + 30))" python3 -m bench.gpu_check --budget-s "$GPU_CHECK_S" \
    --out "$OUT/gpu-check.json" > "$OUT/gpu-check.log" 2>&1 || status=1
tail -5 "$OUT/gpu-check.log"

# then accuracy: seed 0 of every arm (and the default recipe) first, so a cut leaves whole comparisons
python3 -m bench.recipes methods,default --data-root "$data" --out /tmp/recipes --parallel "$RUNS_AT_ONCE" \
    --budget-s "$ACCURACY_S" mlflow.enabled=false train.device=cuda train.log_every_s=0 \
    > "$OUT/recipes.log" 2>&1 || status=1
cp /tmp/recipes/summary.json "$OUT/recipes-summary.json" 2>/dev/null || status=1
tail -20 "$OUT/recipes.log"
exit $status
