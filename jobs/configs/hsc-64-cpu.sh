#!/usr/bin/env bash
# One session's share of the hsc-64 prior's CPU training (issue 29): resume the committed state,
# train for SECONDS on one core (niced), checkpoint every 10 minutes, and on the way out (time
# up, SIGTERM or Ctrl-C) write the compact resumable state back to training/hsc-64/state.
#   bash jobs/configs/hsc-64-cpu.sh SECONDS [extra train_prior.py flags]
#   git add training/hsc-64/state && git commit    # before the session ends
# The recipe (objective, resolution phase) is this file's; training/hsc-64/README.md logs
# which recipe ran in which session. A changed --downsample or objective continues the same
# weights, optimiser and data order.
set -euo pipefail
secs=${1:?usage: hsc-64-cpu.sh SECONDS [flags]}
shift
cd "$(dirname "$0")/../.."
state=training/hsc-64/state
resume=()
if [ -f "$state/state.pt" ]; then resume=(--resume-state "$state"); fi
exec nice -n 10 python jobs/train_prior.py --single-process --device cpu --cpus-per-worker 1 \
    --data training/hsc-64/mocks.npy.xz --prior-config jobs/configs/hsc-64.json \
    --storage runs/hsc-64-cpu --name hsc-64 "${resume[@]}" \
    --steps 100000000 --stop-after-seconds "$secs" --checkpoint-every 1000000 \
    --checkpoint-every-seconds 600 --keep-checkpoints 3 --log-every 100 \
    --batch-size 32 --lr 3e-4 --warmup-steps 200 --lr-schedule constant --ema-decay 0.999 \
    --loss-weighting min_snr --min-snr-gamma 5 --timestep-sampling uniform \
    --downsample ${DOWNSAMPLE:-1} --save-state "$state" "$@"
