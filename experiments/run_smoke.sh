#!/usr/bin/env bash
# The CPU smoke versions of the studies: synthetic data, random-weight resnet18 teachers, tiny
# equal budgets. Sweeps go to logs/smoke/ (ignored); tables and plots are copied next to each
# study's README with the commit and command that produced them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
COMMIT=$(git rev-parse --short HEAD)
export WANDB_MODE=offline HF_HUB_OFFLINE=1

study() {  # study <name> <dest> <kdad-train args...>
  local name=$1 dest=$2; shift 2
  local sweep=logs/smoke/$name
  rm -rf "$sweep"
  local start=$SECONDS
  "$BIN/kdad-train" "$@" "hydra.sweep.dir=$sweep" > "logs/smoke_$name.log" 2>&1 || true
  local took=$((SECONDS - start))
  "$BIN/kdad-aggregate" "$sweep" > /dev/null
  mkdir -p "$dest"
  cp "$sweep"/aggregate.md "$sweep"/aggregate.csv "$sweep"/aggregate_bars.png "$dest"/
  cp "$sweep"/heatmaps_*.png "$dest"/ 2>/dev/null || true
  cat > "$dest/RUN.md" <<INFO
commit: $COMMIT
command: kdad-train $* hydra.sweep.dir=$sweep && kdad-aggregate $sweep
hardware: $(nproc) CPU cores ($(uname -m)), no GPU; torch $("$BIN/python" -c 'import torch; print(torch.__version__)')
wall time of the sweep: ${took} s
INFO
}

mkdir -p logs
COMMON=(model.backbone=resnet18 model.pretrained=false data.image_size=96 data.batch_size=16 data.num_workers=0 trainer.accelerator=cpu logger=csv)
study paper_tables experiments/paper_tables/smoke experiment=smoke_cpu
study seed_variance experiments/seed_variance/smoke experiment=smoke_cpu data.category=stripes seed=0,1
study hkt_ablation experiments/hkt_ablation/smoke experiment=hkt_ablation data=synthetic data.category=stripes "${COMMON[@]}" trainer.max_epochs=8
study nferd_ablation experiments/nferd_ablation/smoke experiment=nferd_ablation data=synthetic data.category=stripes "${COMMON[@]}" trainer.max_epochs=8 model.fusion=hafm,add 'model.nfb={enabled:false,size:0,top_k:0},{enabled:true,size:16,top_k:3},{enabled:true,size:8,top_k:1}'
