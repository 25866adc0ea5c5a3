"""Plain L2 regularization towards the previous task's weights."""

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from lightning_incremental.methods.regularization._quadratic import (
    QuadraticPenalty,
    named_trainable_parameters,
    snapshot,
)


class L2Anchor(QuadraticPenalty):
    r"""Penalise the squared distance to the weights at the end of the previous task (``Omega = 1``).

    The simplest regularizer and the baseline the importance-weighted ones (EWC, SI, MAS) improve on:
    every parameter is held back equally. The gradient ``lambda * (theta - theta*)`` is added before every
    optimizer step.

    Args:
        lambda_: penalty strength (>= 0). Default ``0.1``, the best mean final accuracy of the regularization
            sweep on the permuted digits stream (``benchmarks/RESULTS.md``, "The regularization methods' defaults").
        consolidate_every_n_steps: also move the anchor every N optimizer steps (task-free use).
        state_dtype: the dtype of the importance, the anchor and the cached penalty terms (e.g. ``torch.bfloat16``:
            half their bytes; ``benchmarks/RESULTS.md``, "Sharded models", measures the accuracy); ``None`` keeps
            the importance and the anchor in fp32 and the terms in the parameters' dtype.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model, l2 = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,)), L2Anchor(lambda_=1.0)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[l2], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, stream[0].train_dataloader(batch_size=16))
        >>> bool(torch.equal(l2.anchor["net.0.weight"], model.net[0].weight.detach()))
        True
    """

    def __init__(
        self,
        lambda_: float = 0.1,
        consolidate_every_n_steps: int | None = None,
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__(lambda_, consolidate_every_n_steps, state_dtype)

    @override
    def consolidate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.anchor = snapshot(named_trainable_parameters(pl_module))
        self.importance = {name: torch.ones_like(anchor) for name, anchor in self.anchor.items()}
