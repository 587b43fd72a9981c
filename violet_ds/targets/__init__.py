"""Masked-visual-modeling targets (VIOLETv2's eight) behind one interface; see `base.py`.

Importing the package imports every module in it, so a target file registers itself in
`violet_ds.registry.TARGETS` with `@TARGETS.register(...)`. Heavy libraries (transformers, timm,
torchvision's RAFT, our Video Swin) are imported only when a target is built.
"""

from violet_ds.data.frames import IMAGENET_MEAN, IMAGENET_STD
from violet_ds.registry import import_submodules

from .base import (MixEntry, Target, TargetMix, TargetOutput, TargetSpec, create_target, create_targets, list_targets,
                   mvm_loss, target_from_batch)

import_submodules(__name__)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MixEntry", "Target", "TargetMix", "TargetOutput", "TargetSpec",
           "create_target", "create_targets", "list_targets", "mvm_loss", "target_from_batch"]
