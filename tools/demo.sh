#!/usr/bin/env bash
# Install violet_ds, build the synthetic demo data (once) and pretrain violet-tiny on it through DeepSpeed
# ZeRO-2 (fp32) on CPU: VTM + MLM + MVM, 30 epochs (1050 steps), about 3.5 minutes on 2 cores. Ends with a
# summary and the TensorBoard command. Extra arguments go to `violet-ds pretrain`, e.g.
# `bash tools/demo.sh --run.epochs 3` for a 20-second run (which learns MLM/MVM but not yet VTM).
# tools/demo_downstream.sh then finetunes and tests every task family from this checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --root-user-action=ignore -r requirements.txt -e .
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
if [ ! -f data/demo/demo.json ]; then
    violet-ds make-demo-data --out data/demo
fi
violet-ds pretrain --config pretrain_demo "$@"
