"""Closed-form heads on a frozen pretrained backbone: nothing trains, and the head after every task is exact.

:class:`PrototypeHead` (SimpleCIL) classifies by the nearest class mean of the backbone's features;
:class:`RanPACHead` (RanPAC) by a ridge classifier on a fixed random expansion of them. Both add each task's
sufficient statistics to the earlier ones (no sample stored, all-reduced under DDP) and write the classifier into
the model's head layer, so the model's own forward predicts with it.

As in torchmetrics, the math is pure functions (:mod:`~lightning_incremental.methods.pretrained.functional`) beside
thin stateful classes: the layer (:mod:`~lightning_incremental.methods.pretrained.classifier`) and the callbacks,
whose statistics are named states summed over tasks and ranks (the base in ``_base.py``).
"""

from lightning_incremental.methods.pretrained.functional import (
    RIDGE_GRID,
    class_sums,
    holdout_mask,
    ridge_solve,
    ridge_statistics,
    ridge_validation_errors,
    select_ridge,
)
from lightning_incremental.methods.pretrained.prototype_head import CosinePrototypeClassifier, PrototypeHead
from lightning_incremental.methods.pretrained.ranpac_head import RandomProjectionRidgeClassifier, RanPACHead

__all__ = [
    "RIDGE_GRID",
    "CosinePrototypeClassifier",
    "PrototypeHead",
    "RanPACHead",
    "RandomProjectionRidgeClassifier",
    "class_sums",
    "holdout_mask",
    "ridge_solve",
    "ridge_statistics",
    "ridge_validation_errors",
    "select_ridge",
]
