"""Elastic Weight Consolidation (Kirkpatrick et al., 2017), separate and online (Schwarz et al., 2018)."""

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.nn import functional as F
from typing_extensions import override

from lightning_incremental.core import ModelInterface
from lightning_incremental.methods.regularization._importance import SampledImportance
from lightning_incremental.methods.regularization._quadratic import named_trainable_parameters, snapshot


class EWC(SampledImportance):
    r"""Penalise moving the parameters that mattered for earlier tasks, weighted by their Fisher information.

    At the end of every task it estimates the diagonal Fisher information ``F`` of the model on the task's
    training data from **per-sample** gradients of the log-likelihood, in eval mode (BatchNorm statistics
    untouched) and fp32, all-reduced over DDP ranks. During later tasks the gradient
    ``lambda * Omega * (theta - theta*)`` of the penalty ``lambda/2 * sum Omega (theta - theta*)^2`` is added
    before every optimizer step.

    - ``mode="separate"`` keeps one penalty per past task, ``sum_t F_t (theta - theta_t)^2``. It is stored as
      the single quadratic with the same gradient, ``Omega = sum_t F_t`` and
      ``theta* = sum_t F_t theta_t / Omega``: memory does not grow with the number of tasks.
    - ``mode="online"`` (online EWC) decays the old importance, ``Omega = decay * Omega + F_t``, and anchors at
      the latest weights ``theta* = theta_t``.

    The log-likelihood is the one that fits the model (:class:`~lightning_incremental.ModelInterface`):
    categorical for class logits (token-level logits too; labels of -100 are ignored), Gaussian (half the
    squared error) for real-valued outputs, Bernoulli for multi-label logits, or the user's own per-sample loss.

    Which Fisher: the default ``fisher="empirical"`` squares the gradients of ``-log p(y_n | x_n)`` at the
    true targets — one backward per batch, so estimating it costs less than a training epoch. ``"true"``
    takes the exact expectation over the model's own predictive distribution: for class logits
    ``sum_c p(c | x_n) (d log p(c | x_n))^2`` at one backward per class per batch, for a Gaussian the
    squared gradients of every output, for a Bernoulli ``p (1 - p)`` times those of every logit.

    The defaults (``lambda_=300``, online with ``decay=0.9``, empirical Fisher over the whole task) were chosen by
    ``benchmarks/sweeps/sweep_regularization.py`` and ``benchmarks/studies/long_stream.py``, and the strength
    re-checked with the optimizer's state carried (as EWC carries it by default) on permuted digits and permuted
    Fashion-MNIST: ``benchmarks/RESULTS.md`` ("Defaults across datasets"). Online is the default because separate EWC's
    importance only grows: on a long stream (20 tasks) the summed Fisher ends up freezing the model and it falls
    below plain fine-tuning, while online EWC's decayed importance stays bounded (``decay / (1 - decay)`` times
    one task's).

    Args:
        lambda_: penalty strength (>= 0).
        mode: ``"separate"`` or ``"online"``.
        decay: online EWC's decay of the old importance, in [0, 1] (not used by ``mode="separate"``).
        fisher: ``"empirical"`` or ``"true"``.
        importance_samples: training samples (over all ranks) that estimate the Fisher; ``None``: the whole task.
        model_interface: how to read the model's outputs, targets and per-sample loss; default: the model's
            ``continual_interface``, else :class:`~lightning_incremental.ModelInterface`'s defaults.
        chunk_size: samples per chunk of the per-sample gradient computation (bounds memory).
        consolidate_every_n_steps: also consolidate every N optimizer steps, on the most recent batches
            (task-free use; pair with ``mode="online"``).
        state_dtype: the dtype of the importance, the anchor and the cached penalty terms (e.g. ``torch.bfloat16``:
            half their bytes; ``benchmarks/RESULTS.md``, "Sharded models", measures the accuracy); ``None`` keeps
            the importance and the anchor in fp32 and the terms in the parameters' dtype.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model, ewc = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,)), EWC(lambda_=100.0)
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[ewc], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> sorted(ewc.importance)[:2], ewc.tasks_completed
        (['net.0.bias', 'net.0.weight'], 2)
    """

    def __init__(
        self,
        lambda_: float = 300.0,
        mode: Literal["separate", "online"] = "online",
        decay: float = 0.9,
        fisher: Literal["empirical", "true"] = "empirical",
        importance_samples: int | None = None,
        model_interface: ModelInterface | None = None,
        chunk_size: int = 64,
        consolidate_every_n_steps: int | None = None,
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__(
            lambda_, importance_samples, model_interface, chunk_size, consolidate_every_n_steps, state_dtype
        )
        if mode not in ("separate", "online"):
            raise ValueError(f"`mode` must be 'separate' or 'online', got {mode!r}.")
        if fisher not in ("empirical", "true"):
            raise ValueError(f"`fisher` must be 'empirical' or 'true', got {fisher!r}.")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"`decay` must be in [0, 1], got {decay}.")
        self.mode, self.decay, self.fisher = mode, float(decay), fisher
        self._last_fisher: dict[str, Tensor] = {}  # the Fisher of the last consolidation alone
        self._last_fisher_task: int | None = None  # tasks_completed after the task it was estimated at
        self._keeps_task_fisher = False  # a consumer (WeightMerging(mode="fisher")) asked for each task's Fisher

    @override
    def per_sample_loss(
        self, interface: ModelInterface, pl_module: LightningModule, logits: Tensor, batch: Any
    ) -> Tensor:
        if self.fisher == "empirical":
            return interface.per_sample_loss(logits, batch)
        return _true_fisher_columns(logits.float(), interface.likelihood_of(logits, interface.targets(batch)))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._keeps_task_fisher = False  # until a consumer, set up after this callback, asks for it

    def check_task_fisher(self) -> None:
        """Refuse, with the fix, to give one Fisher per task while consolidating during tasks as well; otherwise
        keep each task's Fisher for the consumer that asks (without one, it is not kept: 4 bytes per parameter)."""
        self._keeps_task_fisher = True
        if self.consolidate_every_n_steps is not None:
            raise RuntimeError(
                "One Fisher per task (for WeightMerging(mode='fisher')) needs EWC to consolidate at task ends "
                f"only, but EWC(consolidate_every_n_steps={self.consolidate_every_n_steps}) also consolidates during "
                "the task. Use EWC(consolidate_every_n_steps=None) beside it."
            )

    def task_fisher(self) -> dict[str, Tensor]:
        """The diagonal Fisher of the task that is ending, alone (not folded into the importance), per trainable
        parameter name; estimated at this task's end (:class:`~lightning_incremental.core.FisherSource`)."""
        self.check_task_fisher()
        if self.resuming_task or self._last_fisher_task != self.tasks_completed:  # not this task's end yet
            raise RuntimeError(
                "EWC has not estimated this task's Fisher yet: it does so at the task end, in callback order. Put EWC "
                "before the callback that reads its Fisher: callbacks=[EWC(...), WeightMerging(mode='fisher')]."
            )
        return self._last_fisher

    @override
    def consolidate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fisher = self.estimate_importance(trainer, pl_module)
        if self._keeps_task_fisher:
            self._last_fisher, self._last_fisher_task = fisher, self.tasks_completed + 1  # once this task ends
        current = snapshot(named_trainable_parameters(pl_module))
        for name, information in fisher.items():
            old = self.importance.get(name)
            if old is None:
                self.importance[name], self.anchor[name] = information, current[name]
            elif self.mode == "online":
                self.importance[name] = self.decay * old + information
                self.anchor[name] = current[name]
            else:
                total = old + information
                weighted = old * self.anchor[name] + information * current[name]
                self.anchor[name] = torch.where(total > 0, weighted / total.clamp_min(1e-30), current[name])
                self.importance[name] = total


def _true_fisher_columns(logits: Tensor, likelihood: str) -> Tensor:
    """Columns whose squared per-sample gradients sum to the true Fisher's expectation over the model's own
    predictive distribution (the detached factors are the weights of the expectation).

    >>> _true_fisher_columns(torch.zeros(2, 3), "gaussian").shape
    torch.Size([2, 3])
    """
    if likelihood == "categorical" and logits.ndim == 2:  # sqrt(p_c) log p_c: squared gradients sum to E_c[g_c^2]
        log_probs = F.log_softmax(logits, dim=-1)
        return log_probs * log_probs.detach().exp().sqrt()
    if likelihood == "gaussian":  # unit variance: the Fisher is J^T J, the squared gradients of every output
        return logits.flatten(1)
    if likelihood == "bernoulli":  # p (1 - p) (d z)^2 per logit
        probs = logits.detach().sigmoid()
        return (logits * (probs * (1 - probs)).sqrt()).flatten(1)
    raise ValueError(
        f"`fisher='true'` is defined for class logits [batch, classes], real-valued and multi-label outputs, not "
        f"for {likelihood!r} outputs of shape {tuple(logits.shape)} (token-level or a custom loss). Use "
        "`fisher='empirical'`."
    )
