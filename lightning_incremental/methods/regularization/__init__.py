"""Regularization methods: penalise moving the parameters that mattered for earlier tasks.

All of them share one quadratic penalty (``_quadratic.py``) whose gradient is added before the optimizer
step; they differ in the importance ``Omega``: the Fisher information (EWC, online EWC), the path integral
of the loss's decrease (SI), the output's sensitivity (MAS), or 1 (L2Anchor).
"""

from lightning_incremental.methods.regularization.ewc import EWC
from lightning_incremental.methods.regularization.l2_anchor import L2Anchor
from lightning_incremental.methods.regularization.mas import MAS
from lightning_incremental.methods.regularization.si import SI

__all__ = ["EWC", "MAS", "SI", "L2Anchor"]
