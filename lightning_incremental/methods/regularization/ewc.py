"""Elastic Weight Consolidation (Kirkpatrick et al., 2017), separate and online (Schwarz et al., 2018)."""

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.nn import functional as F

from lightning_incremental.core.batch import split_batch
from lightning_incremental.methods.regularization._importance import ForwardFn, SampledImportance
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

    Which Fisher: the default ``fisher="empirical"`` squares the gradients of ``-log p(y_n | x_n)`` at the
    true labels — one backward per batch, so estimating it costs less than a training epoch. ``"true"``
    takes the exact expectation over the model's own predictive distribution,
    ``sum_c p(c | x_n) (d log p(c | x_n))^2``, at one backward per class per batch. On the permuted digits
    stream the true Fisher is no better (``benchmarks/sweep_regularization.py``, 5 seeds, lambda 300:
    0.613 against 0.635), so the default is the cheaper one.

    Defaults (``lambda_=300``, empirical Fisher over the whole task) are the best mean final accuracy of
    that sweep on the reference protocol: 0.635 against naive fine-tuning's 0.485 (lambda 100: 0.614,
    1000: 0.629). Online EWC (``decay=0.9``) is better still there, 0.689 with half of naive's forgetting
    (0.290 against 0.597): it anchors at the latest weights, which fit every task seen so far.

    Args:
        lambda_: penalty strength (>= 0).
        mode: ``"separate"`` or ``"online"``.
        decay: online EWC's decay of the old importance, in [0, 1].
        fisher: ``"empirical"`` or ``"true"``.
        fisher_samples: training samples (over all ranks) that estimate the Fisher; ``None``: the whole task.
        forward: ``forward(pl_module, batch) -> logits``; default ``pl_module(x)``.
        chunk_size: samples per chunk of the per-sample gradient computation (bounds memory).
        consolidate_every_n_steps: also consolidate every N optimizer steps, on the most recent batches
            (task-free use; pair with ``mode="online"``).

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
        mode: Literal["separate", "online"] = "separate",
        decay: float = 1.0,
        fisher: Literal["empirical", "true"] = "empirical",
        fisher_samples: int | None = None,
        forward: ForwardFn | None = None,
        chunk_size: int = 64,
        consolidate_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(lambda_, fisher_samples, forward, chunk_size, consolidate_every_n_steps)
        if mode not in ("separate", "online"):
            raise ValueError(f"`mode` must be 'separate' or 'online', got {mode!r}.")
        if fisher not in ("empirical", "true"):
            raise ValueError(f"`fisher` must be 'empirical' or 'true', got {fisher!r}.")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"`decay` must be in [0, 1], got {decay}.")
        self.mode, self.decay, self.fisher = mode, float(decay), fisher

    def per_sample_loss(self, outputs: Tensor, batch: Any) -> Tensor:
        log_probs = F.log_softmax(outputs.float(), dim=-1)
        if self.fisher == "true":  # columns c: sqrt(p_c) * log p_c, whose squared gradients sum to E_c[g_c^2]
            return log_probs * log_probs.detach().exp().sqrt()
        _, targets = split_batch(batch)
        return -log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)

    def consolidate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fisher = self.estimate_importance(trainer, pl_module)
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
