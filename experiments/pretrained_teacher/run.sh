#!/usr/bin/env bash
# The pretrained-teacher study (README.md beside this file): every variant and every ablation
# switch with the packaged ImageNet EfficientNet-Lite0 teacher, offline, at one equal budget
# (conf/experiment/pretrained_teacher.yaml). Sweeps go to logs/pretrained_teacher/ (ignored);
# tables, per-defect AUROCs, plots and RUN.md (commit, command, hardware, wall time) are
# written into results/ beside this script.
#   bash experiments/pretrained_teacher/run.sh            # everything
#   bash experiments/pretrained_teacher/run.sh variants   # one study
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-.venv/bin}
HERE=experiments/pretrained_teacher
COMMIT=$(git rev-parse --short HEAD)
SEEDS=${SEEDS:-0,1,2}
CATEGORIES=${CATEGORIES:-stripes,wood,dots}
export WANDB_MODE=offline HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

study() {  # study <name> <kdad-train overrides...>
  local name=$1; shift
  local sweep=logs/pretrained_teacher/$name dest=$HERE/results/$name
  rm -rf "$sweep"
  local start=$SECONDS
  "$BIN/kdad-train" experiment=pretrained_teacher "data.category=$CATEGORIES" "seed=$SEEDS" "$@" \
    "hydra.sweep.dir=$sweep" > "logs/pretrained_teacher_$name.log" 2>&1 || true
  local took=$((SECONDS - start))
  mkdir -p "$dest"
  "$BIN/kdad-aggregate" "$sweep" > /dev/null
  cp "$sweep"/aggregate.md "$sweep"/aggregate.csv "$sweep"/aggregate_bars.png "$dest"/
  cp "$sweep"/heatmaps_*.png "$dest"/ 2>/dev/null || true
  "$BIN/python" $HERE/subtle.py "$sweep" --by model ${BY:-} > "$dest/per_defect.md"
  cat > "$dest/RUN.md" <<INFO
commit: $COMMIT
command: kdad-train experiment=pretrained_teacher data.category=$CATEGORIES seed=$SEEDS $* hydra.sweep.dir=$sweep && kdad-aggregate $sweep && python $HERE/subtle.py $sweep --by model ${BY:-}
hardware: $(nproc) CPU cores ($(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU; torch $("$BIN/python" -c 'import torch; print(torch.__version__)'), OMP_NUM_THREADS=$OMP_NUM_THREADS
wall time of the sweep: ${took} s
INFO
}

mkdir -p logs
want=${1:-all}
run() { [[ $want == all || $want == "$1" ]]; }
# The five variants, each with its defaults (conf/model/*.yaml).
run variants && study variants model=stfpm,rd,hkt,hkt_plus,nferd
# One switch at a time against each method's default (each sweep changes one key).
run hkt_switches && BY="model.alignment" study hkt_alignment model=hkt model.alignment=same,both
run hkt_switches && BY="model.cbam" study hkt_cbam model=hkt model.cbam=false
run hkt_plus_switches && BY="model.extra_source" study hkt_plus_source model=hkt_plus model.extra_source=next_conv,next_block
# NFERD: the bank without HAFM (fusion add / cbam), HAFM without the bank, the paper's
# whole-map recall (with its plain softmax), and RD4AD's flattened loss.
run nferd_switches && BY="model.fusion" study nferd_fusion model=nferd model.fusion=add,cbam
run nferd_switches && BY="model.nfb.enabled" study nferd_no_bank model=nferd model.nfb.enabled=false
run nferd_switches && BY="model.nfb.recall" study nferd_paper_recall model=nferd model.nfb.recall=flattened \
  model.nfb.temperature=1.0 model.nfb.learn_temperature=false model.nfb.similarity_grad=true
run nferd_switches && BY="model.loss" study nferd_loss model=nferd model.loss=flattened
