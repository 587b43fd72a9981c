"""violet_ds: end-to-end video-language pretraining (VIOLET, VIOLETv2, LAVENDER, VIMPAC).

The library is importable without DeepSpeed; only ``violet_ds.engine`` needs it.
"""

__version__ = "0.1.0"
