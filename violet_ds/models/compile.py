"""Optional `torch.compile` of a model's repeated blocks (`model.compile: true`).

Regional compilation: each transformer block (Video Swin block, cross-modal BERT layer, VIMPAC layer) is
compiled in place with `nn.Module.compile`, not the whole model. Blocks of one kind and shape share one
compiled graph, so compile time grows with the number of distinct block shapes (4 Video Swin stages + 1
BERT layer shape for violet-v2), not with depth, and activation checkpointing wraps the compiled block as
before. The rest of the forward (embeddings, masking, heads) stays eager: it has data-dependent shapes.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn


def _block_types() -> tuple:
    from transformers.models.bert.modeling_bert import BertLayer

    from .video_swin import SwinBlock3D
    from .vimpac import VimpacLayer

    return (SwinBlock3D, BertLayer, VimpacLayer)


def compile_blocks(model: nn.Module, **compile_kwargs) -> List[str]:
    """Compile every transformer block of `model` in place; returns the names of the compiled modules."""
    kinds = _block_types()
    compiled = []
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            module.compile(**compile_kwargs)
            compiled.append(name)
    if not compiled:
        raise ValueError(f"{type(model).__name__} has no transformer blocks that compile_blocks knows")
    return compiled


def graph_breaks(function, *args, **kwargs) -> dict:
    """Graphs and graph breaks dynamo sees when tracing `function(*args, **kwargs)` (no inductor run)."""
    explanation = torch._dynamo.explain(function)(*args, **kwargs)
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "reasons": [str(reason.reason) for reason in explanation.break_reasons]}
