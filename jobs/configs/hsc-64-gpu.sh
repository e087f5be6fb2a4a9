#!/usr/bin/env bash
# How priors/hsc-64 was trained: one lent GPU machine (PyTorch there, but no Ray, GalSim or
# package registry), in one call of at most 10 minutes. Run from the repository root; the
# training mocks are committed (training/hsc-64/mocks.npy.xz, made by make_training_set.py), and
# the run continues the CPU training's committed state (training/hsc-64/state) at 64 px:
#   bash jobs/configs/hsc-64-gpu.sh SECONDS OUTDIR      # on the GPU machine
# It trains for SECONDS of training time (constant learning rate after warm-up, Min-SNR-5; the 64 px phase),
# exports the artifact (prior statistics drawn on the GPU), draws 512 samples for
# jobs/evaluate_prior.py --samples, and leaves in OUTDIR: the log, prior.tar, samples.npz
# and the last checkpoint (model, EMA, optimizer: resumable) as tar parts of 15 MB;
# jobs/unpack_gpu_prior.py rebuilds the artifact (weights = the checkpoint's EMA) here.
# PY overrides the interpreter (a local dry run: PY="python /tmp/blocked_run.py").
set -uo pipefail
secs=${1:-400}
out=${2:-/tmp/hsc64-out}
run=${RUN_DIR:-/tmp/hsc64}
py=${PY:-python3}
mkdir -p "$out" "$run"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1

package() {
    # the weights are the checkpoint's EMA (rebuilt from it and checked against config.json)
    if [ -d "$run/prior" ]; then tar -C "$run" --exclude=weights.safetensors -cf "$out/prior.tar" prior; fi
    last=$(ls -d "$run"/hsc-64/checkpoint_* 2>/dev/null | tail -1)
    if [ -n "$last" ]; then
        tar -C "$(dirname "$last")" -cf - "$(basename "$last")" | split -b 15M - "$out/ckpt.tar.part-"
    fi
    ls -la "$out" "$run" >> "$out/train.log" 2>&1
}
trap package EXIT

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; } > "$out/train.log" 2>&1
$py -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" >> "$out/train.log" 2>&1
resume=()
if [ -f training/hsc-64/state/state.pt ]; then resume=(--resume-state training/hsc-64/state); fi
$py jobs/train_prior.py --single-process --data training/hsc-64/mocks.npy.xz "${resume[@]}" \
    --prior-config jobs/configs/hsc-64.json --storage "$run" --name hsc-64 \
    --steps 100000000 --stop-after-seconds "$secs" --batch-size 256 --lr 4e-4 --warmup-steps 500 \
    --lr-schedule constant --loss-weighting min_snr --downsample 1 \
    --ema-decay 0.9995 --checkpoint-every 2500 --log-every 250 \
    --stats-samples 512 --stats-steps 100 --out "$run/prior" \
    --samples-out "$out/samples.npz" --n-samples-out 512 ${EXTRA_ARGS:-} 2>&1 | tee -a "$out/train.log"
