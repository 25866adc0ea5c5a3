"""Memory Aware Synapses (Aljundi et al., 2018)."""

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from lightning_incremental.core import ModelInterface
from lightning_incremental.core.per_sample import Reduction
from lightning_incremental.methods.regularization._importance import SampledImportance
from lightning_incremental.methods.regularization._quadratic import named_trainable_parameters, snapshot


class MAS(SampledImportance):
    r"""Penalise moving the parameters to which the model's output is most sensitive. Needs no labels.

    At the end of every task the importance of a parameter is the mean over the task's samples of the
    absolute gradient of the squared L2 norm of the model's output, ``|d ||f(x_n)||^2 / d theta|``,
    computed per sample in eval mode and fp32 and all-reduced over DDP ranks. It is merged into the old
    importance as ``Omega = alpha * Omega_old + (1 - alpha) * Omega_new`` (the first task sets it), anchored
    at the latest weights, and the gradient ``lambda * Omega * (theta - theta*)`` is added before every
    optimizer step.

    The defaults: ``alpha=0.5`` chosen by ``benchmarks/sweeps/sweep_regularization.py``, ``lambda_=0.03`` the best
    with the optimizer's state carried (as MAS carries it by default) on both permuted digits and permuted
    Fashion-MNIST; the numbers are in ``benchmarks/RESULTS.md`` ("Defaults across datasets"). The importance is
    in units of the squared outputs, much larger than a Fisher: MAS's lambda is correspondingly small.

    On a causal LM the output is the logits at the answer positions only (the prompt and the padding carry no
    label, see :meth:`~lightning_incremental.ModelInterface.answer_positions`), over the whole vocabulary: the
    importance is larger again by orders of magnitude, and ``lambda_`` must shrink with it. ``benchmarks/RESULTS.md``
    ("Causal language model") measures the default against ``lambda_=1e-6`` beside LoRA.

    Args:
        lambda_: penalty strength (>= 0).
        alpha: weight of the old importance when merging, in [0, 1].
        importance_samples: samples (over all ranks) that estimate the importance; ``None``: the whole task.
        model_interface: how to read the model's outputs; default: the model's ``continual_interface``, else
            :class:`~lightning_incremental.ModelInterface`'s defaults.
        chunk_size: samples per chunk of the per-sample gradient computation.
        consolidate_every_n_steps: also consolidate every N optimizer steps, on the most recent batches.
        state_dtype: the dtype of the importance, the anchor and the cached penalty terms (e.g. ``torch.bfloat16``:
            half their bytes; ``benchmarks/RESULTS.md``, "Sharded models", measures the accuracy); ``None`` keeps
            the importance and the anchor in fp32 and the terms in the parameters' dtype.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model = synthetic_stream(n_tasks=1), MLPClassifier(16, 2, hidden=(8,))
        >>> mas = MAS(lambda_=1.0, consolidate_every_n_steps=3)  # task-free: consolidates during one long fit
        >>> trainer = L.Trainer(max_epochs=2, callbacks=[mas], logger=False, enable_progress_bar=False,
        ...                     enable_checkpointing=False, enable_model_summary=False)
        >>> trainer.fit(model, stream[0].train_dataloader(batch_size=16))
        >>> bool(mas.importance["net.0.weight"].min() >= 0), trainer.global_step, mas.tasks_completed
        (True, 12, 1)
    """

    reduction: Reduction = "abs"

    def __init__(
        self,
        lambda_: float = 0.03,
        alpha: float = 0.5,
        importance_samples: int | None = None,
        model_interface: ModelInterface | None = None,
        chunk_size: int = 64,
        consolidate_every_n_steps: int | None = None,
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__(
            lambda_, importance_samples, model_interface, chunk_size, consolidate_every_n_steps, state_dtype
        )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
        self.alpha = float(alpha)

    @override
    def per_sample_loss(
        self, interface: ModelInterface, pl_module: LightningModule, logits: Tensor, batch: Any
    ) -> Tensor:
        outputs = logits.float()
        if outputs.ndim == 3:  # token-level outputs: only the positions that carry a label (a causal LM's answer)
            outputs = outputs * interface.answer_positions(pl_module, outputs, batch).unsqueeze(-1)
        return outputs.flatten(1).square().sum(-1)

    @override
    def consolidate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        importance = self.estimate_importance(trainer, pl_module)
        current = snapshot(named_trainable_parameters(pl_module))
        for name, new in importance.items():
            old = self.importance.get(name)
            self.importance[name] = new if old is None else self.alpha * old + (1 - self.alpha) * new
            self.anchor[name] = current[name]
