"""Time and peak memory of one VIOLET forward+backward step, with and without activation checkpointing.

    python tools/measure_violet_step.py --model violet-v2 --batch 1 --frames 4 --size 224 --mode all

Modes (each runs in its own process, so peak memory belongs to that mode alone):
- `plain`: no checkpointing;
- `checkpoint`: every Video Swin block and cross-modal layer recomputed in backward
  (`torch.utils.checkpoint`, `use_reentrant=False`);
- `checkpoint+offload`: as `checkpoint`, plus the video encoder's saved activations kept in (pinned) CPU
  memory (`set_grad_checkpointing(offload=True)`: saved-tensor hooks that leave parameters alone);
- `checkpoint+save_on_cpu`: the same with torch's stock `torch.autograd.graph.save_on_cpu` (copies
  the weights saved by each layer out and back too);
- `fairscale_offload`: the official recipe for comparison: fairscale `checkpoint_wrapper(offload_to_cpu=True)`
  around each Video Swin block, cross-modal layers checkpointed as in `checkpoint`.

Per mode: one warm-up step, one timed step, one step under torch's `MemTracker` (tensor-level
accounting by category: parameters, gradients, activations, temporaries). Peak memory is reported as
- `tensor_peak_mib` / `activation_peak_mib`: MemTracker's peak of live tensor bytes (exact, any device);
- `peak_step_mib`: on CUDA `torch.cuda.max_memory_allocated` of the timed step; on CPU the peak resident
  set size sampled every 2 ms during the timed step minus the size before it. With `--mode all` the
  per-mode processes run with a fixed glibc mmap threshold so freed tensors leave the resident set
  (otherwise the allocator keeps them and later steps look free).

Measured 2026-11-22 on the shared 2-core CPU box (load average 10-14 from other jobs, so times are
inflated several-fold; no GPU was available), violet-v2, batch 1, 4x224x224, 32 text tokens, 2 threads,
one step per mode (`--steps 1 --no-track-tensors` for time/RSS, `--steps 0` for the tensor peak):
    plain:       85 s, RSS peak +1634 MiB; tensor peak 2385 MiB (activations 1066 MiB)
    checkpoint: 128 s, RSS peak +1019 MiB; tensor peak 1757 MiB (activations  218 MiB)
(parameters 753 MiB and their gradients 753 MiB are inside both tensor peaks.)
Offload variants on CPU (violet-tiny, 2x8x160x160, eval, 1 thread, s/step): checkpoint 0.24,
+offload (ours) 0.25, +save_on_cpu 0.25, fairscale 0.22-0.26: equal within noise, same gradients;
the memory they save exists only on an accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

MODES = ("plain", "checkpoint", "checkpoint+offload", "checkpoint+save_on_cpu", "fairscale_offload")


class _RssSampler:
    """Peak resident set size of this process while the `with` block runs (bytes)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _apply_mode(model, mode: str) -> None:
    if mode == "plain":
        model.set_grad_checkpointing(False)
    elif mode == "checkpoint":
        model.set_grad_checkpointing(True)
    elif mode == "checkpoint+offload":
        model.set_grad_checkpointing(True, offload=True)
    elif mode == "checkpoint+save_on_cpu":
        import torch

        model.set_grad_checkpointing(True)
        contexts = []

        def enter(module, args):
            contexts.append(torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()))
            contexts[-1].__enter__()

        def leave(module, args, output):
            contexts.pop().__exit__(None, None, None)

        model.video_backbone.register_forward_pre_hook(enter)
        model.video_backbone.register_forward_hook(leave)
    elif mode == "fairscale_offload":
        try:
            from fairscale.nn.checkpoint import checkpoint_wrapper
        except ImportError:
            raise SystemExit("mode fairscale_offload needs fairscale: pip install 'violet-ds[fairscale]'") from None

        model.set_grad_checkpointing(True)
        model.video_backbone.set_grad_checkpointing(False)
        for stage in model.video_backbone.layers:
            for index, block in enumerate(stage.blocks):
                stage.blocks[index] = checkpoint_wrapper(block, offload_to_cpu=True)
    else:
        raise ValueError(f"unknown mode {mode!r}; known: {MODES}")


def measure(model_name: str, mode: str, batch: int, frames: int, size: int, text_len: int, steps: int,
            device: str, threads: int, track_tensors: bool = True) -> dict:
    import torch

    from violet_ds.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name).to(device).train()
    _apply_mode(model, mode)
    video = torch.randn(batch, frames, 3, size, size, device=device)
    vocab = model.vocab_size
    text_ids = torch.randint(1, vocab, (batch, text_len), device=device)
    text_mask = torch.ones(batch, text_len, dtype=torch.long, device=device)
    cuda = device.startswith("cuda")
    sampler = _RssSampler()
    results = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = sampler.rss()
        start = time.perf_counter()
        with sampler:
            out = model(video, text_ids, text_mask)
            loss = out.hidden.float().pow(2).mean()
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - before if cuda else sampler.peak - before
        results.append({"seconds": round(seconds, 3), "peak_step_mib": round(peak / 2 ** 20, 1),
                        "before_mib": round(before / 2 ** 20, 1)})
    tensor_peak = activation_peak = None
    if track_tensors:
        from torch.distributed._tools.mem_tracker import MemTracker

        model.zero_grad(set_to_none=True)
        # MemTracker hooks every parameter's gradient; the frozen order embedding of v2 has none to hook
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for param in frozen:
            param.requires_grad_(True)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            model(video, text_ids, text_mask).hidden.float().pow(2).mean().backward()
        for param in frozen:
            param.requires_grad_(False)
        peak = tracker.get_tracker_snapshot("peak")[torch.device(device)]
        tensor_peak = round(peak["Total"] / 2 ** 20, 1)
        activation_peak = round(next(v for k, v in peak.items() if str(k).endswith("ACT")) / 2 ** 20, 1)
    params = sum(p.numel() for p in model.parameters())
    return {"model": model_name, "mode": mode, "device": device, "threads": threads, "batch": batch,
            "frames": frames, "size": size, "text_len": text_len, "params_m": round(params / 1e6, 2),
            "steps": results, "seconds": results[-1]["seconds"] if results else None,
            "peak_step_mib": results[-1]["peak_step_mib"] if results else None,
            "tensor_peak_mib": tensor_peak, "activation_peak_mib": activation_peak}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="violet-v2")
    parser.add_argument("--mode", default="all", choices=MODES + ("all",))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode (the first warms up); "
                        "the last one is reported; 0 = only the MemTracker step")
    parser.add_argument("--no-track-tensors", action="store_true", help="skip the MemTracker step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="append one JSON line per mode to this file")
    args = parser.parse_args(argv)
    modes = MODES if args.mode == "all" else (args.mode,)
    rows = []
    for mode in modes:
        if len(modes) > 1:
            # one process per mode: the resident-size peak of one must not hide another's
            command = [sys.executable, __file__, "--mode", mode] + [
                token for key, value in vars(args).items() if key not in ("mode", "out", "no_track_tensors")
                for token in (f"--{key.replace('_', '-')}", str(value))]
            if args.no_track_tensors:
                command.append("--no-track-tensors")
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
            finished = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if finished.returncode != 0:
                raise SystemExit(f"mode {mode} failed ({finished.returncode}):\n{finished.stderr[-4000:]}")
            row = json.loads(finished.stdout.strip().splitlines()[-1])
        else:
            row = measure(args.model, mode, args.batch, args.frames, args.size, args.text_len, args.steps,
                          args.device, args.threads, track_tensors=not args.no_track_tensors)
            print(json.dumps(row))
        rows.append(row)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    if len(rows) > 1:
        print(f"{args.model} batch {args.batch}, {args.frames}x{args.size}x{args.size}, text {args.text_len}, "
              f"{args.device} ({args.threads} threads); last of {args.steps} steps")
        for row in rows:
            print(f"  {row['mode']:<22} {row['seconds']} s   peak step memory {row['peak_step_mib']} MiB"
                  f"   tensor peak {row['tensor_peak_mib']} MiB (activations {row['activation_peak_mib']} MiB)"
                  f"   steps: {row['steps']}")


if __name__ == "__main__":
    main()
