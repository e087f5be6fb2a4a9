#!/usr/bin/env bash
# Issue 29 item 1: short A/B runs of the training objective at equal compute (images seen),
# scored by jobs/evaluate_prior.py (Fréchet distance on held-out realistic mocks).
#   bash jobs/configs/hsc-64-ab.sh OUTDIR [STEPS32] [STEPS64]
# Every arm: one thread, batch 32, AdamW 3e-4 after 200 warm-up steps, EMA 0.999, seed 0,
# the committed training set. At 32 px (2x-binned, 1.5 kpc/px, log-SNR + 2 ln 2):
#   base      uniform loss weight, t uniform, constant lr
#   minsnr    Min-SNR-5 weight,    t uniform, constant lr
#   normal    uniform weight, log-SNR ~ N(0, 2)
#   laplace   uniform weight, log-SNR ~ Laplace(0, 1)
#   cosine    Min-SNR-5, lr cosine to 0.1x over the arm (not usable mid-run)
# Progressive against not, at 64 px and equal compute (the 32 px steps counted at the measured
# per-image cost ratio R of 64 px to 32 px, printed): prog = minsnr + STEPS64 steps at 64 px;
# full64 = STEPS32/R + STEPS64 steps at 64 px from scratch.
set -euo pipefail
out=${1:?usage: hsc-64-ab.sh OUTDIR [STEPS32] [STEPS64]}
s32=${2:-1000}
s64=${3:-200}
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
common=(--single-process --device cpu --cpus-per-worker 1 --data training/hsc-64/mocks.npy.xz
        --prior-config jobs/configs/hsc-64.json --storage "$out" --batch-size 32 --lr 3e-4
        --warmup-steps 200 --ema-decay 0.999 --log-every 100 --seed 0)
arm() {  # name steps flags...
    local name=$1 steps=$2
    shift 2
    # done when its last checkpoint exists (prog starts from a copy of minsnr's)
    if [ ! -d "$out/$name/$(printf 'checkpoint_%07d' "$steps")" ] || [ "${FORCE:-}" = 1 ]; then
        /usr/bin/time -f "[ab] $name cpu %U s user, %e s wall" \
            python jobs/train_prior.py "${common[@]}" --name "$name" --steps "$steps" \
            --checkpoint-every "$steps" "$@" 2>&1 | tail -3
    fi
}
arms32=${ARMS32:-base minsnr normal laplace cosine}  # a subset: ARMS32="base minsnr laplace"
for a in $arms32; do
    case $a in
        base) arm base "$s32" --downsample 2 --lr-schedule constant ;;
        minsnr) arm minsnr "$s32" --downsample 2 --lr-schedule constant --loss-weighting min_snr ;;
        normal) arm normal "$s32" --downsample 2 --lr-schedule constant \
            --timestep-sampling logsnr_normal --logsnr-scale 2 ;;
        laplace) arm laplace "$s32" --downsample 2 --lr-schedule constant \
            --timestep-sampling logsnr_laplace --logsnr-scale 1 ;;
        cosine) arm cosine "$s32" --downsample 2 --lr-schedule cosine --loss-weighting min_snr ;;
        *) echo "unknown arm $a" >&2; exit 2 ;;
    esac
done
[ -f "$out/eval32.json" ] || python jobs/evaluate_prior.py --n-samples 256 --steps 50 --n-heldout 512 --real-z 0.3 0.6 \
    --out-json "$out/eval32.json" --samples-png "$out/samples32.png" \
    $(for a in $arms32; do echo --prior "$a=$(ls -d "$out/$a"/checkpoint_* | tail -1)"; done)
# per-image training cost, 64 px over 32 px, measured here (one thread, batch 32, 5 steps each)
ratio=$(python - <<'PY'
import json, time, torch
from d4a_batch.config import PriorConfig, from_dict
from d4a_batch.prior.unet import build_unet
from d4a_batch.training.objective import phase_prior
torch.set_num_threads(1)
p = from_dict(PriorConfig, json.load(open("jobs/configs/hsc-64.json")))
cost = {}
for cfg in (phase_prior(p, 2), p):
    net, n = build_unet(cfg), cfg.image_size
    opt = torch.optim.AdamW(net.parameters())
    x, t = torch.randn(32, 3, n, n), torch.randint(0, 1000, (32,))
    best = 1e9
    for _ in range(5):
        t0 = time.process_time(); net(x, t).pow(2).mean().backward(); opt.step()
        best = min(best, time.process_time() - t0)
    cost[n] = best
print(f"{cost[64] / cost[32]:.2f}")
PY
)
echo "[ab] per-image cost ratio 64/32 px: $ratio"
base64=$(python -c "print(round($s32 / $ratio) + $s64)")
mkdir -p "$out/prog"
if [ -z "$(ls -d "$out/prog"/checkpoint_* 2>/dev/null)" ]; then
    cp -r "$(ls -d "$out/minsnr"/checkpoint_* | tail -1)" "$out/prog/"
fi
arm prog $((s32 + s64)) --lr-schedule constant --loss-weighting min_snr
arm full64 "$base64" --lr-schedule constant --loss-weighting min_snr
python jobs/evaluate_prior.py --n-samples 256 --steps 50 --n-heldout 512 --real-z 0.3 0.6 \
    --out-json "$out/eval64.json" --samples-png "$out/samples64.png" \
    --prior "prog=$(ls -d "$out/prog"/checkpoint_* | tail -1)" \
    --prior "full64=$(ls -d "$out/full64"/checkpoint_* | tail -1)"
echo "{\"ratio_64_over_32\": $ratio, \"steps32\": $s32, \"steps64\": $s64, \"full64_steps\": $base64}" > "$out/ab.json"
