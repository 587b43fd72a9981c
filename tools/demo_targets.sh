#!/usr/bin/env bash
# Demo comparison of MVM targets (VIOLETv2's study, in miniature): pretrain violet-tiny on the demo data
# with one MVM target each (launch/configs/pretrain_demo.yaml, only task.mvm_targets changed), then finetune
# the motion multiple-choice QA (launch/configs/demo_qa_mc.yaml) from each and test it. Prints one table:
# MVM / VTM / MLM validation losses after pretraining and the QA test accuracy (chance 20%).
# CPU, about 9 minutes per target on 2 cores.
#
#   bash tools/demo_targets.sh                       # pixel hog 2d_feature
#   bash tools/demo_targets.sh pixel hog             # some
#
# 2d_feature needs a 2D Swin teacher from local files and no pretrained image weights can be downloaded
# here: the script saves a small randomly initialised transformers SwinModel (runs/demo_teachers/swin-tiny-random,
# save_pretrained layout) and uses that, so "2d_feature" below regresses random conv-net features, not
# ImageNet features. Pass TEACHER=/path/to/swin-folder to use real weights instead.
# The pixel run is runs/demo when it exists (same config); FORCE=1 redoes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(pixel hog 2d_feature)
fi

[ -f data/demo/demo.json ] || violet-ds make-demo-data --out data/demo
[ -f data/demo_large/demo.json ] || violet-ds make-demo-data --out data/demo_large --num_videos 1500 --num_images 10
TEACHER="${TEACHER:-runs/demo_teachers/swin-tiny-random}"
if [[ " ${TARGETS[*]} " == *" 2d_feature "* ]] && [ ! -f "${TEACHER}/config.json" ]; then
    python3 - "${TEACHER}" <<'EOF'
import sys

import torch
from transformers import SwinConfig, SwinModel

torch.manual_seed(0)
config = SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                    window_size=2)  # transformers fails when a window exceeds the 2x2 last stage
SwinModel(config).save_pretrained(sys.argv[1])
print(f"saved a randomly initialised SwinModel (stride 32, 256 features) to {sys.argv[1]}")
EOF
fi

for target in "${TARGETS[@]}"; do
    pre="demo_target_${target}"
    if [ "${target}" = pixel ] && [ -d runs/demo/checkpoints ] && [ -z "${FORCE:-}" ]; then
        pre=demo
    fi
    echo "${pre}" > "runs/.demo_target_${target}_pretrain"
    if [ ! -d "runs/${pre}/checkpoints" ] || [ -n "${FORCE:-}" ]; then
        echo "== ${target}: pretrain"
        rm -rf "runs/${pre}"
        options="{}"
        if [ "${target}" = 2d_feature ]; then
            options="{2d_feature: {model_dir: ${TEACHER}}}"
        fi
        violet-ds pretrain --config launch/configs/pretrain_demo.yaml --run.name "${pre}" --run.progress false \
            --task.mvm_targets "{${target}: 1.0}" --task.target_options "${options}"
    fi
    qa="demo_target_${target}_qa_mc"
    if [ ! -f "runs/${qa}/eval_test.json" ] || [ -n "${FORCE:-}" ]; then
        echo "== ${target}: finetune QA-MC"
        rm -rf "runs/${qa}"
        violet-ds finetune --config launch/configs/demo_qa_mc.yaml --run.name "${qa}" --run.progress false \
            --run.init_from "runs/${pre}/checkpoints"
        violet-ds evaluate --config launch/configs/demo_qa_mc.yaml --run.name "${qa}" --run.progress false \
            --run.init_from "runs/${qa}/checkpoints" --split test
    fi
done

python3 - "${TARGETS[@]}" <<'EOF'
import json
import sys
from pathlib import Path


def last_validation(run: str) -> dict:
    rows = [json.loads(line) for line in Path(f"runs/{run}/metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if row.get("split") == "val"]
    return rows[-1] if rows else {}


print(f"\n{'target':<12} {'pretrain run':<24} {'val MVM':>8} {'val VTM':>8} {'val MLM':>8} {'QA-MC test':>10}")
for target in sys.argv[1:]:
    pre = Path(f"runs/.demo_target_{target}_pretrain").read_text().strip()
    val = last_validation(pre)
    pick = lambda name: val.get(name, float("nan"))  # noqa: E731
    qa = json.loads(Path(f"runs/demo_target_{target}_qa_mc/eval_test.json").read_text())
    print(f"{target:<12} {pre:<24} {pick('loss_mvm'):8.3f} {pick('loss_vtm'):8.3f} {pick('loss_mlm'):8.3f} "
          f"{qa['acc']:10.1f}")
EOF
