#!/usr/bin/env bash
# Finetune every demo task family from the demo pretraining checkpoint and test it on its held-out split,
# then print one table: metric, chance level, wall time. CPU, about 40 minutes for all on 2 cores.
#
#   bash tools/demo_downstream.sh                   # all: qa_mc capmc qa_oe fib retrieval caption action
#                                                   #      multitask_heads multitask
#   bash tools/demo_downstream.sh qa_mc retrieval   # some
#
# Builds what is missing first: data/demo and data/demo_large (`violet-ds make-demo-data`), the demo
# pretraining run runs/demo (launch/configs/pretrain_demo.yaml) and, for multitask, the LAVENDER-style
# pretraining run runs/demo_lavender. Each task: `violet-ds finetune --config launch/configs/demo_<task>.yaml`
# then `violet-ds evaluate ... --split test`, which writes runs/demo_<task>/eval_test.json.
# Set FORCE=1 to redo finetuning runs that already have an eval_test.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
TASKS=("$@")
if [ ${#TASKS[@]} -eq 0 ]; then
    TASKS=(qa_mc capmc qa_oe fib retrieval caption action multitask_heads multitask)
fi
for task in "${TASKS[@]}"; do
    if [ ! -f "launch/configs/demo_${task}.yaml" ]; then
        echo "unknown demo task '${task}': no launch/configs/demo_${task}.yaml" >&2
        exit 2
    fi
done

[ -f data/demo/demo.json ] || violet-ds make-demo-data --out data/demo
[ -f data/demo_large/demo.json ] || violet-ds make-demo-data --out data/demo_large --num_videos 1500 --num_images 10
[ -d runs/demo/checkpoints ] || violet-ds pretrain --config launch/configs/pretrain_demo.yaml

mkdir -p runs
for task in "${TASKS[@]}"; do
    run="runs/demo_${task}"
    if [ -f "${run}/eval_test.json" ] && [ -z "${FORCE:-}" ]; then
        echo "== ${task}: ${run}/eval_test.json exists (FORCE=1 redoes it)"
        continue
    fi
    if [ "${task}" = multitask ] && [ ! -d runs/demo_lavender/checkpoints ]; then
        violet-ds pretrain --config launch/configs/pretrain_demo.yaml --task.head_style mlm --run.name demo_lavender
    fi
    echo "== ${task}: finetune"
    rm -rf "${run}"
    start=$(date +%s)
    violet-ds finetune --config "launch/configs/demo_${task}.yaml" --run.progress false
    echo "== ${task}: evaluate on the test split"
    violet-ds evaluate --config "launch/configs/demo_${task}.yaml" --run.init_from "${run}/checkpoints" --split test \
        --run.progress false
    echo $(( $(date +%s) - start )) > "${run}/wall_seconds.txt"
done

python3 - "${TASKS[@]}" <<'EOF'
import json
import sys
from pathlib import Path

# (metric key, chance / text-only level, what the level is)
LEVELS = {
    "qa_mc": [("acc", 20.0, "1 of 5 motion options")],
    "capmc": [("acc", 20.0, "1 of 5 captions")],
    "qa_oe": [("acc", 29.4, "best text-only guess per question type (unanswerable counted wrong)")],
    "fib": [("acc", 22.2, "best text-only guess per blank type")],
    "retrieval": [("t2v_R@1", 0.44, "1 of 225 test videos (captions repeat: same attributes)"),
                  ("t2v_R@5", 2.2, ""), ("t2v_R@10", 4.4, ""), ("t2v_median_rank", 113.0, "")],
    "caption": [("BLEU-4", 11.3, "the most frequent training caption for every video"), ("CIDEr", 84.5, "")],
    "action": [("acc", 20.0, "1 of 5 motions")],
    "multitask_heads": [("qa_mc/acc", 20.0, "the four tasks above, one per step, task heads"),
                        ("qa_oe/acc", 29.4, ""), ("retrieval/t2v_R@1", 0.44, ""), ("retrieval/t2v_R@10", 4.4, ""),
                        ("action/acc", 20.0, ""), ("mean_main", None, "")],
    "multitask": [("qa_mc/acc", 20.0, "the same, LAVENDER style (every task through the MLM head)"),
                  ("qa_oe/acc", 29.4, ""), ("retrieval/t2v_R@1", 0.44, ""), ("retrieval/t2v_R@10", 4.4, ""),
                  ("action/acc", 20.0, ""), ("mean_main", None, "")],
}
print(f"\n{'task':<10} {'metric':<28} {'test':>8} {'chance':>8}  wall   note")
for task in sys.argv[1:]:
    path = Path(f"runs/demo_{task}/eval_test.json")
    if not path.is_file():
        print(f"{task:<10} (no {path})")
        continue
    metrics = json.loads(path.read_text())
    wall_file = Path(f"runs/demo_{task}/wall_seconds.txt")
    wall = f"{int(wall_file.read_text()) / 60:.1f}m" if wall_file.is_file() else "-"
    rows = LEVELS.get(task, [(None, None, "")])
    if rows[0][0] is None:
        rows = [(key, None, "") for key in sorted(metrics) if key.endswith(("acc", "R@1", "R@10", "CIDEr", "mean_main"))]
    for key, level, note in rows:
        value = metrics.get(key)
        shown = f"{value:8.2f}" if isinstance(value, (int, float)) else f"{'-':>8}"
        chance = f"{level:8.2f}" if level is not None else f"{'-':>8}"
        print(f"{task:<10} {key:<28} {shown} {chance}  {wall:<6} {note}")
        wall = ""
EOF
