#!/usr/bin/env bash
# Install violet_ds, build the synthetic demo data (once) and pretrain violet-tiny on it through DeepSpeed
# ZeRO-2 (bf16) on CPU: VTM + MLM + MVM, 3 epochs, a few minutes on 2 cores. Ends with a summary and the
# TensorBoard command. Extra arguments go to `violet-ds pretrain`, e.g. `bash tools/demo.sh --run.epochs 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt -e .
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
if [ ! -f data/demo/demo.json ]; then
    violet-ds make-demo-data --out data/demo
fi
violet-ds pretrain --config launch/configs/pretrain_demo.yaml "$@"
