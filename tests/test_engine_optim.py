"""engine/optim.py (parameter groups, optimizer, LR schedule) and engine/deepspeed_engine.py (the frozen-teacher
check, the on-device skip of a non-finite step, the lighter ZeRO bookkeeping)."""

from __future__ import annotations

import pytest
import torch
from deepspeed.utils import groups as ds_groups
from torch import nn

from violet_ds.config import OptimConfig
from violet_ds.engine import deepspeed_engine as dse
from violet_ds.engine import optim
from violet_ds.engine.distributed import World


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.video_backbone = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.model.text = nn.Linear(4, 4)
        self.model.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.heads = nn.ModuleDict({"score": nn.Linear(4, 1)})


def test_parameter_groups_no_decay_and_video_multiplier():
    toy = _Toy()
    groups = optim.parameter_groups(toy, OptimConfig(lr=1e-4, weight_decay=0.01, video_lr_mult=0.1))
    by_name = {g["group_name"]: g for g in groups}
    assert set(by_name) == {"video_decay", "video_no_decay", "main_decay", "main_no_decay"}
    assert by_name["video_decay"]["lr"] == pytest.approx(1e-5) and by_name["main_decay"]["lr"] == 1e-4
    assert by_name["video_no_decay"]["weight_decay"] == 0.0 and by_name["main_decay"]["weight_decay"] == 0.01
    # video: Linear weight (decay); Linear bias + LayerNorm weight/bias (no decay)
    assert by_name["video_decay"]["num_params"] == 16 and by_name["video_no_decay"]["num_params"] == 4 + 8
    grouped = {id(p) for g in groups for p in g["params"]}
    assert id(toy.model.frozen) not in grouped
    assert len(grouped) == sum(1 for p in toy.parameters() if p.requires_grad)
    # a frozen teacher module is left out even if it slipped in with requires_grad=True
    teacher = toy.heads["score"]
    groups = optim.parameter_groups(toy, OptimConfig(), frozen=[teacher])
    assert id(teacher.weight) not in {id(p) for g in groups for p in g["params"]}


def test_teacher_registered_in_task_is_refused():
    toy = _Toy()
    with pytest.raises(ValueError, match="frozen teacher modules"):
        dse.initialize(toy, {}, OptimConfig(), 10, World(), frozen=[toy.model.text])


def test_cpu_optimizer_is_fused_adamw_and_schedule_shape():
    toy = _Toy()
    optimizer = optim.build_optimizer(optim.parameter_groups(toy, OptimConfig()), OptimConfig(), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused") is True
    schedule = optim.WarmupDecay(total=100, warmup=10, schedule="linear")
    assert schedule(0) == pytest.approx(1 / 11) and schedule(9) == pytest.approx(10 / 11)
    assert schedule(10) == 1.0 and schedule(55) == pytest.approx(0.5) and schedule(100) == 0.0
    cosine = optim.WarmupDecay(total=100, warmup=0, schedule="cosine", min_ratio=0.1)
    assert cosine(0) == pytest.approx(1.0) and cosine(50) == pytest.approx(0.55) and cosine(100) == pytest.approx(0.1)
    # warm-up of 10% of 20 steps = 2: the first step runs at 1/3 of each group's lr (default 5e-5)
    optim.build_scheduler(optimizer, OptimConfig(warmup_ratio=0.1), total_steps=20)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-5 / 3)


class _Regression(nn.Module):
    """A task as the engine sees one: batch in, {"loss"} out (`depth` more hidden layers: more parameter tensors)."""

    def __init__(self, depth: int = 0):
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.hidden = nn.ModuleList(nn.Linear(16, 16) for _ in range(depth))
        self.second = nn.Linear(16, 1)

    def forward(self, batch):
        x = torch.relu(self.first(batch["x"].to(self.first.weight.dtype)))
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return {"loss": (self.second(x).float().squeeze(-1) - batch["y"]).square().mean()}


def _bf16_engine(scan: bool = False, depth: int = 0, data_seed: int = 0, ds_config: str = "cpu_test.json"):
    from violet_ds.commands.run import setup_world
    from violet_ds.config import DataConfig, EngineConfig
    from violet_ds.engine.ds_config import resolve_ds_config

    engine_cfg = EngineConfig(ds_config=ds_config, precision="bf16",
                              ds_overrides={"bf16": {"check_grad_overflow": True}} if scan else {})
    world = setup_world(engine_cfg)
    # DeepSpeed caches a clone of the world group per process; an earlier test of this pytest process may have
    # destroyed the group it cloned
    ds_groups._WORLD_GROUP = None
    torch.manual_seed(0)
    task = _Regression(depth)
    optim_cfg = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=0.1, weight_decay=0.0)
    ds_config = resolve_ds_config(engine_cfg, optim_cfg, DataConfig(batch_size=4), world)
    engine, optimizer, _, _ = dse.initialize(task, ds_config, optim_cfg, total_steps=10, world=world)
    generator = torch.Generator().manual_seed(data_seed)
    batch = {"x": torch.randn(4, 8, generator=generator), "y": torch.randn(4, generator=generator)}
    return engine, optimizer, task, ds_config, batch


def _train_step(engine, batch, poison=None):
    handle = poison.register_hook(lambda grad: grad.clone().fill_(float("nan"))) if poison is not None else None
    engine.backward(engine(batch)["loss"])
    if handle is not None:
        handle.remove()
    engine.step()


def test_bf16_step_with_a_nan_gradient_is_skipped_on_the_device():
    """bf16 ZeRO-2 with torch's fused AdamW: DeepSpeed's per-gradient overflow scan is off, and a step whose
    global gradient norm is not finite changes nothing (weights, Adam moments, step count) and is counted; the
    next finite step trains on. Without the skip the NaN reaches the weights: the next loss is NaN, which only the
    divergence guard would then see."""
    from violet_ds.bench.train import OpCounter

    engine, optimizer, task, ds_config, batch = _bf16_engine()
    assert ds_config["bf16"]["check_grad_overflow"] is False and engine.nonfinite_skip is not None
    _train_step(engine, batch)
    client = optimizer.optimizer
    state = lambda: [t.clone() for p in client.param_groups[0]["params"]  # noqa: E731
                     for t in (p, client.state[p]["exp_avg"], client.state[p]["step"])]
    weights = lambda: [p.detach().clone() for p in task.parameters()]  # noqa: E731
    before_state, before_weights = state(), weights()
    counter = OpCounter()
    with counter:
        _train_step(engine, batch, poison=task.first.weight)
    assert counter.ops["amax"] == 0  # no per-gradient scan (DeepSpeed's has_inf_or_nan reduces with amax/amin)
    assert not torch.isfinite(engine.get_global_grad_norm())
    for after, expected in zip(state(), before_state):
        torch.testing.assert_close(after, expected, rtol=0, atol=0)
    for after, expected in zip(weights(), before_weights):
        torch.testing.assert_close(after, expected, rtol=0, atol=0)
    assert engine.nonfinite_skip.skipped_steps() == 1
    assert dse.skipped_steps(engine) == 1  # what the trainer logs as train/skipped_steps
    _train_step(engine, batch)
    assert all(torch.isfinite(p).all() for p in task.parameters())
    assert not torch.equal(weights()[0], before_weights[0]) and engine.nonfinite_skip.skipped_steps() == 1

    engine.nonfinite_skip.remove()
    _train_step(engine, batch, poison=task.first.weight)
    assert not torch.isfinite(task.first.weight).all()
    assert not torch.isfinite(engine(batch)["loss"])


def test_clipping_in_the_fused_kernel_equals_deepspeeds():
    """bf16 without the scan: DeepSpeed's `gradient_clipping` is 0 and the fused AdamW divides the gradients by
    DeepSpeed's clip factor (`grad_scale`, no host read); the weights after clipped steps equal those of DeepSpeed's
    own clipping (scan on)."""
    from violet_ds.bench.train import OpCounter

    engine, _, task, ds_config, batch = _bf16_engine()
    assert ds_config["gradient_clipping"] == 0.0 and engine.nonfinite_skip.max_norm == pytest.approx(0.1)
    counter = OpCounter()
    with counter:
        for _ in range(3):
            _train_step(engine, batch)
    assert counter.syncs == {}  # no host read in forward, backward or step
    assert float(engine.get_global_grad_norm()) > 0.1  # the steps were clipped
    ours = [p.detach().float().clone() for p in task.parameters()]
    engine, _, task, ds_config, batch = _bf16_engine(scan=True)
    assert ds_config["gradient_clipping"] == pytest.approx(0.1)
    for _ in range(3):
        _train_step(engine, batch)
    for mine, deepspeeds in zip(ours, task.parameters()):
        torch.testing.assert_close(mine, deepspeeds.detach().float(), rtol=0, atol=0)


def _deepspeeds_own_bookkeeping(zero_optimizer) -> None:
    """Undo `dse.lighten_zero_bookkeeping`: DeepSpeed's own methods, torch's flatten / unflatten."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for name in ("get_grad_norm_direct", "_update_model_bit16_weights", "update_offload_overflow_tracker",
                 "has_overflow", "complete_grad_norm_calculation_for_cpu_offload"):
        vars(zero_optimizer).pop(name, None)
    zero_optimizer.flatten, zero_optimizer.unflatten = _flatten_dense_tensors, _unflatten_dense_tensors


def _lightened_and_deepspeeds_runs(depth: int, data_seed: int = 0, poison_rank: int = 0, rank: int = 0,
                                   ds_config: str = "cpu_test.json") -> dict:
    """Both paths through 5 clipped bf16 ZeRO-2 steps, the third with a NaN gradient (on `poison_rank`), a
    parameter moved out of the flat bit16 buffer after the first: per path the weights, Adam moments, norms, skipped
    steps, whether the moved parameter aliases the buffer again, and the ops of each step."""
    from violet_ds.bench.train import OpCounter

    runs = {}
    for lightened in (True, False):
        engine, optimizer, task, _, batch = _bf16_engine(depth=depth, data_seed=data_seed, ds_config=ds_config)
        if not lightened:
            _deepspeeds_own_bookkeeping(optimizer)
        norms, counts = [], []
        for step in range(5):
            counter = OpCounter()
            with counter:
                _train_step(engine, batch, poison=task.first.weight if step == 2 and rank == poison_rank else None)
            counts.append(counter.ops)
            norms.append(float(engine.get_global_grad_norm()))
            if step == 0:
                # as a checkpoint load or offload_states / reload_states would leave it
                task.second.weight.data = task.second.weight.data.clone()
        flat = {t.untyped_storage().data_ptr() for t in optimizer.bit16_groups_flat}
        client = optimizer.optimizer
        runs[lightened] = {
            "weights": [p.detach().float().clone() for p in task.parameters()],
            "moments": [client.state[p]["exp_avg"].clone() for group in client.param_groups for p in group["params"]],
            "norms": norms, "skipped": dse.skipped_steps(engine), "counts": counts,
            "realiased": task.second.weight.untyped_storage().data_ptr() in flat,
            "optimizer": type(client).__name__,
            "tensors": sum(1 for _ in task.parameters())}
    return runs


def _assert_same_training(runs: dict) -> None:
    mine, deepspeeds = runs[True], runs[False]
    for key in ("weights", "moments"):
        for a, b in zip(mine[key], deepspeeds[key]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert mine["norms"][2] == deepspeeds["norms"][2] == float("inf")
    assert mine["norms"] == deepspeeds["norms"] and min(mine["norms"]) > 0.1  # clipped steps
    assert mine["skipped"] == deepspeeds["skipped"] == 1
    assert mine["realiased"] and deepspeeds["realiased"]


def test_lighter_zero_bookkeeping_trains_as_deepspeeds_own_methods():
    """lighten_zero_bookkeeping (on by default): the gradient norm of a group in one `_foreach_norm`, no re-pointing of
    the bit16 parameters that still alias the flat buffer, flatten / unflatten in one op each. Weights, Adam moments
    and norms equal those of DeepSpeed's own methods bitwise over clipped steps and a skipped NaN step; a parameter
    moved out of the buffer is re-pointed as DeepSpeed does; per parameter tensor about 11 fewer ops per step."""
    runs = _lightened_and_deepspeeds_runs(depth=6)
    _assert_same_training(runs)
    mine, deepspeeds = runs[True], runs[False]
    tensors = mine["tensors"]
    assert tensors == 16
    for ops in mine["counts"]:
        assert ops["linalg_vector_norm"] <= 1 and ops["_foreach_norm"] == 2  # one norm per group (2 groups)
    # the first step links the optimizer state per parameter (once, DeepSpeed's), the second re-points the moved
    # parameter's group; later ones narrow no gradient (unflatten) and re-point no parameter
    assert [ops["slice"] for ops in mine["counts"]] == [tensors, tensors // 2, 0, 0, 0]
    assert deepspeeds["counts"][3]["linalg_vector_norm"] >= tensors
    saved = sum(deepspeeds["counts"][3].values()) - sum(mine["counts"][3].values())
    assert saved >= 10 * tensors, saved


@pytest.mark.slow
def test_lighter_zero_bookkeeping_with_the_optimizer_offloaded():
    """The packaged `zero2_offload.json` (DeepSpeedCPUAdam on fp32 partitions in host memory, DeepSpeed's bf16
    overflow scan on, contiguous gradients): the same weights, Adam moments, norms and skipped NaN step as DeepSpeed's
    own methods, with one host read per step in place of two per parameter tensor. Slow: the first use builds
    DeepSpeed's cpu_adam op (about a minute)."""
    runs = _lightened_and_deepspeeds_runs(depth=6, ds_config="zero2_offload.json")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    _assert_same_training(runs)
    assert runs[True]["optimizer"] == runs[False]["optimizer"] == DeepSpeedCPUAdam.__name__
    # host reads per step: DeepSpeed's two per parameter tensor (its inf/NaN test, its norm) against a handful
    tensors = runs[True]["tensors"]
    reads = [[ops["_local_scalar_dense"] for ops in run["counts"]] for run in (runs[True], runs[False])]
    assert max(reads[0]) <= 4, reads
    # (the NaN step, the third, ends at DeepSpeed's overflow check, before its norm)
    assert all(theirs >= 2 * tensors for step, theirs in enumerate(reads[1]) if step != 2), reads


def _two_rank_worker(rank: int, port: int, queue, ds_config: str = "cpu_test.json") -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    try:
        # each rank its own samples; the NaN gradient on rank 1 only
        runs = _lightened_and_deepspeeds_runs(depth=3, data_seed=rank, poison_rank=1, rank=rank, ds_config=ds_config)
        for run in runs.values():
            run.pop("counts")
            # plain lists: a tensor would travel as shared memory this process takes along when it exits
            for key in ("weights", "moments"):
                run[key] = [t.tolist() for t in run[key]]
        queue.put((rank, runs))
    except BaseException as error:  # reported by the test
        import traceback

        queue.put((rank, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


@pytest.mark.parametrize("ds_config", ["cpu_test.json",
                                       pytest.param("zero2_offload.json", marks=pytest.mark.slow, id="offload")])
def test_lighter_zero_bookkeeping_with_gradients_partitioned_over_two_ranks(ds_config):
    """Two ranks (gloo, CPU): each owns half of every group's gradients and optimizer state (parameters split
    across the partition boundary, alignment padding); the lighter bookkeeping trains as DeepSpeed's own methods
    bitwise, a NaN gradient on one rank skips the step on both, and both ranks end with the same weights (also with
    the optimizer offloaded: slow, it builds DeepSpeed's cpu_adam op)."""
    import multiprocessing

    from violet_ds.engine.distributed import free_port

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_two_rank_worker, args=(rank, port, queue, ds_config)) for rank in (0, 1)]
    for process in processes:
        process.start()
    try:
        results = dict(queue.get(timeout=300) for _ in processes)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    for rank, runs in results.items():
        assert isinstance(runs, dict), runs
        for run in runs.values():
            for key in ("weights", "moments"):
                run[key] = [torch.tensor(values) for values in run[key]]
        _assert_same_training(runs)
    for a, b in zip(results[0][True]["weights"], results[1][True]["weights"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
