#!/usr/bin/env bash
# Every benchmark of this folder on one device, results into results/<device>_*.{md,json}.
#   experiments/benchmark/run_all.sh cpu    # resnet18 at 128 px (training) / 256 px (inference)
#   experiments/benchmark/run_all.sh cuda   # wide_resnet50_2 at 256 px, fp32 and bf16
# Needs the [bench] extra for the anomalib comparison: pip install -e '.[bench]'
set -euo pipefail
cd "$(dirname "$0")"
device=${1:-cpu}
out=results
mkdir -p "$out"
if [[ $device == cuda ]]; then
    backbone=wide_resnet50_2 train_size=256
else
    backbone=resnet18 train_size=128
fi
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "commit $commit device $device backbone $backbone"

for flags in "" "--channels-last" "--channels-last --bf16"; do
    tag=$(echo "train $flags" | tr -d '-' | xargs | tr ' ' '_')
    python train_throughput.py --device "$device" --backbone "$backbone" --size "$train_size" \
        --batch 16 $flags --out "$out/${device}_${tag}"
done
for flags in "" "--bf16"; do
    tag=$(echo "step $flags" | tr -d '-' | xargs | tr ' ' '_')
    python step_breakdown.py --device "$device" --backbone "$backbone" --size "$train_size" \
        --batch 16 $flags | tee "$out/${device}_${tag}.md"
done
python inference.py --device "$device" --backbone "$backbone" --size 256 --batch 32 \
    --out "$out/${device}_inference"
python eval_speed.py --device "$device" --images 1725 --size 256 --out "$out/${device}_eval.json"
python data_loading.py --size 256 --epochs 3 | tee "$out/${device}_data_loading.md"
