"""`model.compile`: regional torch.compile of the transformer blocks, and the graph-break budget."""

from __future__ import annotations

import pytest
import torch

from violet_ds.config import ModelConfig
from violet_ds.models import create_model
from violet_ds.models.compile import BLOCK_GRAPH_LIMIT, compile_blocks, compile_counters, graph_breaks


def _inputs():
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(1, 2, 3, 64, 64, generator=generator)
    ids = torch.randint(1000, 2000, (1, 12), generator=generator)
    return video, ids, torch.ones_like(ids)


def test_violet_tiny_forward_is_one_graph_without_breaks():
    torch.manual_seed(0)
    model = create_model("violet-tiny").eval()
    report = graph_breaks(model, *_inputs())
    assert report == {"graphs": 1, "graph_breaks": 0, "reasons": []}


def test_compiled_blocks_give_the_same_outputs_and_gradients():
    """Every Swin block and BERT layer goes through dynamo (backend="eager": tracing without inductor, fast)."""
    torch.manual_seed(0)
    eager = create_model("violet-tiny")
    compiled = create_model("violet-tiny")
    compiled.load_state_dict(eager.state_dict())
    names = compile_blocks(compiled, backend="eager", dynamic=False)
    swin_blocks = sum(1 for n in names if ".blocks." in n)
    assert swin_blocks == 6 and len(names) == 6 + compiled.cfg.num_layers
    outputs = []
    for model in (eager, compiled):
        out = model(*_inputs()).hidden
        out.square().mean().backward()
        outputs.append((out.detach(), model.video_backbone.patch_embed.proj.weight.grad.clone()))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-6, atol=1e-7)


def test_build_model_applies_compile_and_attention_choice():
    from violet_ds.models import build_model

    model = build_model(ModelConfig(name="violet-tiny", compile=True, video_attention="flex"))
    assert model.video_backbone.cfg.attention == "flex"
    assert model.video_backbone.layers[0].blocks[0]._compiled_call_impl is not None
    with pytest.raises(ValueError, match="auto, sdpa, flex or explicit"):
        build_model(ModelConfig(name="violet-tiny", video_attention="flash"))


@pytest.mark.slow
def test_inductor_compiled_blocks_match_eager(tmp_path, monkeypatch):
    """The real inductor compile on the CPU (minutes on 2 cores); a second compile of the same blocks in a fresh
    dynamo state takes every graph from inductor's on-disk cache, and `compile_counters` says so."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = create_model("violet-tiny").eval()
    compiled = create_model("violet-tiny").eval()
    compiled.load_state_dict(eager.state_dict())
    start = compile_counters()
    compile_blocks(compiled)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*_inputs()).hidden, eager(*_inputs()).hidden, rtol=1e-4, atol=1e-5)
    cold = compile_counters()
    misses = cold["cache_misses"] - start["cache_misses"]
    assert misses > 0 and cold["cache_hits"] == start["cache_hits"]

    torch._dynamo.reset()
    again = create_model("violet-tiny").eval()
    again.load_state_dict(eager.state_dict())
    compile_blocks(again)
    with torch.no_grad():
        torch.testing.assert_close(again(*_inputs()).hidden, eager(*_inputs()).hidden, rtol=1e-4, atol=1e-5)
    warm = compile_counters()
    assert warm["cache_misses"] == cold["cache_misses"] and warm["cache_hits"] - cold["cache_hits"] == misses


def test_model_fields_reach_the_module_at_construction():
    """`model.video_attention` / `offload_activations` are construction fields of the same name; the Video Swin
    config a caller hands over is left as it was."""
    from violet_ds.models import build_model
    from violet_ds.models.video_swin import VideoSwinConfig, VideoSwinTransformer3D

    model = build_model(ModelConfig(name="violet-tiny", video_attention="explicit", grad_checkpointing=True,
                                    offload_activations=True))
    assert model.cfg.video_attention == "explicit" and model.cfg.offload_activations
    assert model.video_backbone.cfg.attention == "explicit" and model.registered_name == "violet-tiny"
    cfg = VideoSwinConfig(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=(2, 3, 3))
    VideoSwinTransformer3D(cfg, attention="sdpa", drop_path_rate=0.5)
    assert cfg.attention == "auto" and cfg.drop_path_rate == VideoSwinConfig().drop_path_rate
    with pytest.raises(TypeError, match="video_attention"):
        build_model(ModelConfig(name="vimpac-small", video_attention="sdpa"))


def _small_swin():
    from violet_ds.models.video_swin import VideoSwinTransformer3D

    # 4 + 2 blocks, each with its own drop-path rate; both stages with shifted windows (grids 4x6x6 and 4x3x3
    # against 2x2x2 windows): 4 distinct block geometries, and the first block, whose rate is 0 (no drop path)
    return VideoSwinTransformer3D(embed_dim=16, depths=(4, 2), num_heads=(1, 2), window_size=(2, 2, 2),
                                  drop_path_rate=0.3, attention="sdpa")


def test_regional_compile_traces_each_block_geometry_once_and_never_recompiles():
    """One graph per distinct block (stage x shifted or not), shared by the blocks of the stage whatever their
    drop-path rate; a second step compiles nothing; training outputs and gradients equal eager (backend "eager":
    dynamo's tracing without inductor, so the drop-path draws are the same)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, compiled = _small_swin().train(), _small_swin().train()
    compiled.load_state_dict(eager.state_dict())
    limits = []

    def backend(graph, example_inputs):  # dynamo's own "eager" backend, noting the limit it compiles under
        limits.append(torch._dynamo.config.recompile_limit)
        return graph.forward

    process_limit = torch._dynamo.config.recompile_limit
    assert len(compile_blocks(compiled, backend=backend)) == 6
    video = torch.randn(2, 3, 4, 24, 24, generator=torch.Generator().manual_seed(0))
    results, graphs = [], []
    for model in (eager, compiled):
        start = compile_counters()["graphs"]
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            out = model(video)
            out.square().mean().backward()
            graphs.append(compile_counters()["graphs"] - start)
        results.append((out.detach(), model.patch_embed.proj.weight.grad.clone()))
    assert graphs == [0, 0, 5, 5]
    # the raised recompile limit holds inside the compiled blocks' calls only
    assert set(limits) == {BLOCK_GRAPH_LIMIT} and torch._dynamo.config.recompile_limit == process_limit
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-7)
    assert compile_counters()["compile_s"] > 0


def _v2_inputs(size: int = 64):
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(1, 4, 3, size, size, generator=generator)
    ids = torch.randint(1000, 2000, (1, 32), generator=generator)
    return video, ids, torch.ones_like(ids)


@pytest.mark.slow
def test_violet_v2_inductor_compile_on_cpu():
    """violet-v2 blocks through inductor on the CPU (4 x 64 px): 6 Video Swin graphs (stages 1-2 shifted and
    unshifted, stages 3-4 unshifted at this size) + 1 cross-modal graph, no recompile on the second step, outputs
    equal to eager. Prints the compile time (docs/benchmarks.md)."""
    import time

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = create_model("violet-v2").eval()
    compiled = create_model("violet-v2").eval()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    inputs = _v2_inputs()
    start = compile_counters()["graphs"]
    started = time.perf_counter()
    out = compiled(*inputs).hidden
    out.square().mean().backward()
    first = time.perf_counter() - started
    graphs = compile_counters()["graphs"] - start
    started = time.perf_counter()
    compiled.zero_grad(set_to_none=True)
    again = compiled(*inputs).hidden
    again.square().mean().backward()
    second = time.perf_counter() - started
    print(f"violet-v2 CPU compile: first step {first:.1f} s, second {second:.1f} s, {graphs} graphs, "
          f"{compile_counters()['graphs'] - start - graphs} recompiles")
    assert graphs == 7 and compile_counters()["graphs"] - start == graphs
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs).hidden, eager(*inputs).hidden, rtol=1e-3, atol=1e-3)
