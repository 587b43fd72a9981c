"""The benchmarks behind `violet-ds bench ...` (top floor, beside the commands): `train` (one training step per
configuration), `gpu` (every CUDA path in one table, `tools/gpu_check.sh`), `data` (loader throughput per JPEG
decoder), `targets` (time per clip of each MVM teacher), and `meta` (what every results JSON carries, and its
writer). Each benchmark returns its results; the commands in `violet_ds.commands.bench` print the tables."""
