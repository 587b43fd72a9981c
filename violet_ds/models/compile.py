"""Optional `torch.compile` of a model's repeated blocks (`model.compile: true`).

Regional compilation: each transformer block (Video Swin block, cross-modal BERT layer, VIMPAC layer) is
compiled in place with `nn.Module.compile` (`fullgraph=True`, `dynamic=False`), not the whole model. Blocks of one
kind and input shape share one compiled graph (dynamo inlines the module, its parameters are graph inputs, and
nothing the blocks of a stage differ in is a Python constant: the Video Swin drop-path rate is a buffer, the bias
indices come from the stage), so compile time grows with the number of distinct block shapes, not with depth:
violet-v2 at 4 x 224 compiles 7 Video Swin graphs (shifted and unshifted windows of stages 1-3, stage 4) and 1
cross-modal graph, and later steps reuse them without recompiling (tests/test_models_compile.py). Activation
checkpointing wraps the compiled block as before. The rest of the forward (embeddings, masking, heads) stays eager:
it has data-dependent shapes.
"""

from __future__ import annotations

import functools
from typing import List

import torch
from torch import nn

BLOCK_GRAPH_LIMIT = 64
"""Graphs one block kind may compile: each stage shape, shifted or not, in training and in evaluation, per input
geometry (torch's default limit of 8 per function is reached by violet-v2 training plus its evaluation)"""


def _block_types() -> tuple:
    from transformers.models.bert.modeling_bert import BertLayer

    from .video_swin import SwinBlock3D
    from .vimpac import VimpacLayer

    return (SwinBlock3D, BertLayer, VimpacLayer)


def _with_graph_limit(compiled):
    """`compiled` called with dynamo's recompile limit raised to BLOCK_GRAPH_LIMIT for this call only (the limit is
    per function and process-wide; no other compiled function of the process is affected)."""

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(recompile_limit=BLOCK_GRAPH_LIMIT):
            return compiled(*args, **kwargs)

    return call


def compile_blocks(model: nn.Module, **compile_kwargs) -> List[str]:
    """Compile every transformer block of `model` in place (`torch.compile` arguments: default `fullgraph=True`,
    `dynamic=False`); returns the names of the compiled modules."""
    compile_kwargs = {"fullgraph": True, "dynamic": False, **compile_kwargs}
    kinds = _block_types()
    compiled = []
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            module.compile(**compile_kwargs)
            module._compiled_call_impl = _with_graph_limit(module._compiled_call_impl)
            compiled.append(name)
    if not compiled:
        raise ValueError(f"{type(model).__name__} has no transformer blocks that compile_blocks knows")
    return compiled


def compile_counters() -> dict:
    """What dynamo compiled so far in this process: `graphs` (distinct graphs handed to the backend, recompiles
    included), `compile_s` (seconds spent compiling, dynamo's own timing of its frames, backend included) and
    `cache_hits` / `cache_misses` (inductor's on-disk FX graph cache, forward and backward graphs: a compile whose
    graphs all hit took its kernels from an earlier process, `TORCHINDUCTOR_CACHE_DIR`)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "compile_s": float(sum(compilation_time_metrics.get("_compile.compile_inner", []))),
            "cache_hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "cache_misses": int(counters["inductor"]["fxgraph_cache_miss"])}


def graph_breaks(function, *args, **kwargs) -> dict:
    """Graphs and graph breaks dynamo sees when tracing `function(*args, **kwargs)` (no inductor run)."""
    explanation = torch._dynamo.explain(function)(*args, **kwargs)
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "reasons": [str(reason.reason) for reason in explanation.break_reasons]}
