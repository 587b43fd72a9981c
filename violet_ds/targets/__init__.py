"""Masked-visual-modeling targets (VIOLETv2's eight) behind one interface; see `base.py`.

Importing the package registers every target in `violet_ds.registry.TARGETS`. Heavy libraries
(transformers, timm, torchvision's RAFT, our Video Swin) are imported only when a target is built.
"""

from violet_ds.data.frames import IMAGENET_MEAN, IMAGENET_STD

from .base import (MixEntry, Target, TargetMix, TargetOutput, TargetSpec, create_target, create_targets, list_targets,
                   mvm_loss, target_from_batch)
from . import clip, depth, feat2d, feat3d, hog, optical_flow, pixel, vq  # noqa: F401  (registration)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MixEntry", "Target", "TargetMix", "TargetOutput", "TargetSpec",
           "create_target", "create_targets", "list_targets", "mvm_loss", "target_from_batch"]
