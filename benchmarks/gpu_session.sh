#!/usr/bin/env bash
# The GPU measurements of the README, one phase per call of a lent GPU machine (each call is
# limited to 10 minutes). Usage: benchmarks/gpu_session.sh PHASE [OUT]
#
#   env       the machine: GPU, driver, torch
#   bench50   reslab bench train/infer of ResNet-50 at 224² (eager fp32 baseline vs bf16 fast path)
#   bench20   reslab bench train of ResNet-20 and ResNet-56 on CIFAR-size input
#   tta94     time to 94% on CIFAR-10: ResNet-9 (Page 2018's recipe), trained alone, timed
#   sweep     the short recipes side by side (several runs share the GPU: accuracy only)
#   epochs    ResNet-20/56 CIFAR-10 epoch times, each run alone
#
# CIFAR-10 (binary version) is read from $CIFAR (default /tmp/c10). Results go to OUT
# (default ./gpu-results): JSON from bench, run folders' metrics.jsonl, logs.
set -uo pipefail
phase=${1:?phase}
out=${2:-${OUT:-gpu-results}}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
CIFAR=${CIFAR:-/tmp/c10}
RUNS=${RUNS:-/tmp/gpu-runs}
SCALE=${SCALE:-1}  # SCALE=0: a dry run of 1 epoch each
read -r -a EXTRA <<< "${EXTRA:-}"  # more train flags, e.g. EXTRA="--train-limit 1024" for a dry run
reslab() { "$PY" -m reslab "$@"; }
ep() { if [ "$SCALE" = 0 ]; then echo 1; else echo "$1"; fi; }

# Page 2018 (DAWNBench ResNet-9): batch 512, peak lr 0.4 at ~20% of training then linear to 0,
# Nesterov 0.9, wd 5e-4, label smoothing 0.2, pad-4 crop + flip + 8×8 cutout, bf16, NHWC.
PAGE=(--model resnet9 --recipe fast --batch-size 512 --lr 0.4 --weight-decay 5e-4
      --label-smoothing 0.2 --cutout 8 --onecycle-peak 0.2)
train() {  # NAME EPOCHS ARGS... : one run, its log and metrics into $out
    local name=$1 epochs=$2; shift 2
    local t0; t0=$(date +%s.%N)
    reslab train --data cifar10 --data-dir "$CIFAR" \
        --device "$DEVICE" --epochs "$(ep "$epochs")" --progress plain --out "$RUNS/$name" "$@" "${EXTRA[@]}" \
        > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc wall $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s: $(tail -n 1 "$out/$name.log")"
    cp "$RUNS/$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null
    return $rc
}
bench() {  # NAME ARGS...
    local name=$1; shift
    timeout 300 "$PY" -m reslab bench "$@" --device "$DEVICE" --json > "$out/$name.json" 2> "$out/$name.err"
    echo "$name rc=$? $("$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{r['baseline']['images_per_sec']:.0f} -> {r['reslab']['images_per_sec']:.0f} img/s = {r['speedup']:.2f}x, {r['fraction_of_peak']:.0%} of bf16 peak {r['peak_flops']['bf16']/1e12:.0f} TFLOP/s\")" "$out/$name.json" 2>/dev/null)"
}

case $phase in
env)
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
    nproc
    ;;
bench50)
    bench r50_train_b256 train --model resnet50 --batch 256 --repeats 5 --iters 10
    bench r50_train_b256_compile train --model resnet50 --batch 256 --repeats 5 --iters 10 --compile
    bench r50_infer_b256_compile infer --model resnet50 --batch 256 --repeats 5 --iters 10 --compile
    ;;
bench20)
    for m in resnet20 resnet56; do
        bench ${m}_train_b512 train --model $m --batch 512 --repeats 5 --iters 20
        bench ${m}_train_b512_ro train --model $m --batch 512 --repeats 5 --iters 20 --compile \
            --compile-mode reduce-overhead
    done
    ;;
tta94)
    (cd "$CIFAR" && sha256sum -c SHA256SUMS --quiet) || { echo "CIFAR-10 files incomplete"; exit 1; }
    train r9_e24 24 "${PAGE[@]}" --eval-every 24
    ;;
sweep)
    # Two waves of four concurrent runs; wall times here are shared-GPU times, not reported.
    train r20_e30 30 --model resnet20 --recipe fast --eval-every 10 &
    train r20_e60 60 --model resnet20 --recipe fast --eval-every 10 &
    train r20_e60_wd1e4_ls0 60 --model resnet20 --recipe fast --weight-decay 1e-4 \
        --label-smoothing 0 --eval-every 10 &
    train r9_e8 8 "${PAGE[@]}" --eval-every 2 &
    wait
    train r9_e10 10 "${PAGE[@]}" --eval-every 2 &
    train r9_e12 12 "${PAGE[@]}" --eval-every 2 &
    train r9h_e12 12 "${PAGE[@]}" --model-kwargs "widths=(32,64,128,256)" --eval-every 2 &
    train r9h_e20 20 "${PAGE[@]}" --model-kwargs "widths=(32,64,128,256)" --eval-every 2 &
    wait
    for r in "$RUNS"/*; do
        echo "$(basename "$r") flip-TTA: $(reslab eval "$r" --data-dir "$CIFAR" --tta flip \
            --device "$DEVICE" 2>&1 | tail -n 1)"
    done
    ;;
epochs)
    train r20_epochs 5 --model resnet20 --recipe fast --batch-size 512 --lr 0.4 --eval-every 5
    train r56_epochs 5 --model resnet56 --recipe fast --batch-size 512 --lr 0.4 --eval-every 5
    train r9_e24_compile 24 "${PAGE[@]}" --eval-every 24 --compile
    ;;
*)
    echo "unknown phase $phase" >&2; exit 2
    ;;
esac
