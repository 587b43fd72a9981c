"""`model.compile`: regional torch.compile of the transformer blocks, and the graph-break budget."""

from __future__ import annotations

import pytest
import torch

from violet_ds.config import ModelConfig
from violet_ds.models import create_model
from violet_ds.models.compile import compile_blocks, graph_breaks


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
def test_inductor_compiled_blocks_match_eager():
    """The real inductor compile on the CPU (minutes on 2 cores)."""
    torch.manual_seed(0)
    eager = create_model("violet-tiny").eval()
    compiled = create_model("violet-tiny").eval()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*_inputs()).hidden, eager(*_inputs()).hidden, rtol=1e-4, atol=1e-5)


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
