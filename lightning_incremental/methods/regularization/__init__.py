"""Regularization methods: penalise moving the parameters that mattered for earlier tasks.

All of them share one quadratic penalty (``_quadratic.py``) whose gradient is added before the optimizer
step; they differ in the importance ``Omega``: the Fisher information (EWC, online EWC), the path integral
of the loss's decrease (SI), the output's sensitivity (MAS), or 1 (L2Anchor).
"""

from lightning_incremental.methods.registry import MethodSpec
from lightning_incremental.methods.regularization.ewc import EWC
from lightning_incremental.methods.regularization.l2_anchor import L2Anchor
from lightning_incremental.methods.regularization.mas import MAS
from lightning_incremental.methods.regularization.si import SI

METHODS = [
    MethodSpec("ewc", "regularization", "Elastic Weight Consolidation: Fisher-weighted penalty.", lambda s: [EWC()]),
    MethodSpec(
        "online_ewc",
        "regularization",
        "Online EWC: one decayed Fisher, anchored at the last task.",
        lambda s: [EWC(mode="online", decay=0.9)],
    ),
    MethodSpec("si", "regularization", "Synaptic Intelligence: path-integral importance.", lambda s: [SI()]),
    MethodSpec("mas", "regularization", "Memory Aware Synapses: output-sensitivity importance.", lambda s: [MAS()]),
    MethodSpec("l2", "regularization", "L2 penalty towards the previous task's weights.", lambda s: [L2Anchor()]),
]

__all__ = ["EWC", "MAS", "METHODS", "SI", "L2Anchor"]
