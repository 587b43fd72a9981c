"""violet_ds: end-to-end video-language pretraining (VIOLET, VIOLETv2, LAVENDER, VIMPAC).

The library is importable without DeepSpeed; only ``violet_ds.engine`` needs it.
"""

__version__ = "0.1.0"

# `violet_ds.pretrained` (torch, the models) is imported inside these two: every import of a violet_ds module runs
# this file first, the CLI's light parse path included


def from_pretrained(directory, device="cpu"):
    """Load a model directory (`violet-ds export --format dir`, `save_pretrained`): the task module, eval mode."""
    from violet_ds.pretrained import from_pretrained as load

    return load(directory, device=device)


def save_pretrained(task, directory, **kwargs):
    """Write a task module as a model directory (config.json, model.safetensors, tokenizer, README)."""
    from violet_ds.pretrained import save_pretrained as save

    return save(task, directory, **kwargs)
