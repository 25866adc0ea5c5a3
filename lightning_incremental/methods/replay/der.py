"""Dark Experience Replay, DER and DER++ (Buzzega et al., 2020)."""

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lightning_incremental.buffers import PadValue
from lightning_incremental.core import (
    ModelInterface,
    Step,
    add_to_loss,
    batch_size_of,
    interface_of,
)
from lightning_incremental.methods.replay._base import Fill, PolicyChoice, ReplayMethod


class DER(ReplayMethod):
    r"""Replay the logits the model gave to old samples: distillation from the model's own past.

    Every training row enters the buffer (reservoir) with the logits the model produced for it in that step,
    read from the step chain's record of the logits module. At every step a replayed sample is forwarded through
    the model and ``alpha * MSE(logits, stored logits)`` is added to the loss; with ``beta > 0`` (DER++) a
    second replayed sample adds ``beta`` times the user's own loss on it (their ``training_step`` run on the
    replayed rows, logging muted): cross-entropy for a classifier, MSE for a regression model, a Hugging Face
    model's ``.loss``. The user's batch is untouched; the replay forwards run inside the training step, under
    the same precision and DDP forward as the model's own. Real-valued outputs work as they are (the logits are
    the outputs).

    The defaults, the sweep that chose them (``benchmarks/sweeps/sweep_replay.py``) and the setting for
    domain-incremental streams (``policy="class_balanced", fill="task_end"``) are in ``benchmarks/RESULTS.md``.
    On a causal LM fine-tuned for a few steps per task, the logits of a row's own step are those of a model that
    has not yet learnt the task; ``fill="task_end"`` stores the task-end model's instead (RESULTS.md, "Causal
    language model", compares the two).

    Args:
        buffer_size: rows the buffer holds (over all DDP ranks).
        alpha: weight of the logit-matching term (>= 0).
        beta: weight of the replayed labels' cross-entropy (>= 0); > 0 makes DER++.
        replay_batch_size: rows per replayed sample; default the current batch size, the cheapest setting
            within 0.5 points of DER++'s best accuracy on the class-incremental digits stream
            (``benchmarks/studies/replay_tradeoff.py``, RESULTS.md "Replay ratio against wall time").
        logits_module: the submodule whose output is the logits (name or module); found by default.
        model_interface: how to read the model's outputs; default: the model's ``continual_interface``, else
            :class:`~lightning_incremental.ModelInterface`'s defaults.
        policy: the buffer's policy (reservoir in the paper).
        fill: when rows enter the buffer: ``"stream"`` (the paper), ``"first_epoch"`` or ``"task_end"``
            (with the logits of the model at the task's end).
        seed: seed of the buffer's sampling.
        pad_values: the padding of variable-length batch entries the buffer stores (see ``ReplayMethod``).
        stored_logits: for token-level logits with a larger vocabulary, the buffer keeps only each token's
            ``stored_logits`` largest logits (fp16) and their indices, and the replayed term matches the current
            logits at those entries (:func:`stored_logits`); ``None`` keeps every logit. Class logits are kept whole.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,))
        >>> der = DER(buffer_size=50, alpha=0.3, beta=1.0)
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[der], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> tuple(der.buffer.extras["logits"].shape)
        (50, 4)
    """

    reads_step_outputs = True
    adds_loss_terms = True

    def __init__(
        self,
        buffer_size: int = 200,
        alpha: float = 1.0,
        beta: float = 0.0,
        replay_batch_size: int | None = None,
        logits_module: str | nn.Module | None = None,
        policy: PolicyChoice = "reservoir",
        fill: Fill = "stream",
        seed: int = 0,
        model_interface: ModelInterface | None = None,
        pad_values: Mapping[str, PadValue] | None = None,
        stored_logits: int | None = 64,
    ) -> None:
        super().__init__(buffer_size, policy, fill, seed, model_interface, pad_values)
        if stored_logits is not None and (
            isinstance(stored_logits, bool) or not isinstance(stored_logits, int) or stored_logits < 1
        ):
            raise ValueError(
                f"`stored_logits` must be a positive integer (the largest logits kept per token) or None (all of "
                f"them), got {stored_logits!r}."
            )
        self.stored_logits = stored_logits
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not value >= 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"`replay_batch_size` must be a positive integer or None, got {replay_batch_size}.")
        if logits_module is not None and not isinstance(logits_module, (str, nn.Module)):
            raise TypeError(f"`logits_module` must be a submodule name, a submodule or None, got {logits_module!r}.")
        self.alpha, self.beta, self.replay_batch_size = float(alpha), float(beta), replay_batch_size
        self.logits_module = logits_module

    @override
    def wrap_training_step(self, trainer: Trainer, pl_module: LightningModule, batch: Any, step: Step) -> STEP_OUTPUT:
        output = step(batch)
        if output is None:  # the user skipped the batch
            return None
        interface = interface_of(pl_module, self.model_interface)
        k = self.replay_batch_size or batch_size_of(batch)
        terms = []
        if len(self.buffer) and self.alpha > 0:
            replayed, extras, masks = self.replay(batch, k, masks=True)
            logits = interface.predict(pl_module, replayed).float()
            if "logits" in extras:
                stored, mask = extras["logits"], masks.get("logits")
                logits = logits[..., : stored.shape[-1]]
            else:  # the largest logits of each token: the current logits at the same vocabulary entries
                stored, mask = extras["top_logits"].float(), masks.get("top_logits")
                indices = extras["top_indices"].long()
                logits = logits[:, : indices.shape[1]].gather(-1, indices)
            if logits.ndim == 3:  # token-level (a language model): the answer tokens only
                answers = interface.answer_positions(pl_module, logits, replayed)[:, : stored.shape[1]]
                mask = answers if mask is None else mask & answers
            terms.append(self.alpha * _masked_mse(logits, stored, mask))
        if len(self.buffer) and self.beta > 0:
            replayed, _ = self.replay(batch, k)
            label_loss = step.user_loss(replayed)
            if label_loss is not None:
                terms.append(self.beta * label_loss)
        if self.inserts_now(trainer):
            self.insert(batch, stored_logits(step.logits_for(batch).detach(), self.stored_logits))
        return add_to_loss(output, sum(terms)) if terms else output

    @override
    def extras_at_task_end(self, pl_module: LightningModule, batch: Any) -> dict[str, Tensor]:
        logits = interface_of(pl_module, self.model_interface).predict(pl_module, batch)
        return stored_logits(logits, self.stored_logits)


def stored_logits(logits: Tensor, top_k: int | None) -> dict[str, Tensor]:
    """What the buffer keeps of a batch's logits: all of them in fp32 (``"logits"``), or for token-level logits
    ``[B, T, V]`` with ``V > top_k`` (a language model's vocabulary) the ``top_k`` largest of every token, as fp16
    values (``"top_logits"``) and int32 vocabulary indices (``"top_indices"``): ``6 * top_k`` bytes a token,
    24 KiB for a row of 64 tokens at the default 64, where SmolLM2's 49,152 fp32 logits would take 12 MiB.

    >>> import torch
    >>> kept = stored_logits(torch.arange(10.0).view(1, 1, 10), top_k=2)
    >>> kept["top_logits"].tolist(), kept["top_indices"].tolist()
    ([[[9.0, 8.0]]], [[[9, 8]]])
    >>> sorted(stored_logits(torch.zeros(4, 3), top_k=2))  # class logits: kept whole
    ['logits']
    """
    if top_k is None or logits.ndim != 3 or logits.shape[-1] <= top_k:
        return {"logits": logits.float()}
    values, indices = logits.float().topk(top_k, dim=-1)
    return {"top_logits": values.half(), "top_indices": indices.int()}


def _masked_mse(logits: Tensor, stored: Tensor, mask: Tensor | None) -> Tensor:
    """The mean squared error of ``logits`` to the ``stored`` ones over the positions ``mask`` marks (token-level
    logits of rows of different lengths come back padded), without a host sync.

    >>> import torch
    >>> _masked_mse(torch.ones(1, 3, 2), torch.zeros(1, 3, 2), torch.tensor([[True, True, False]])).item()
    1.0
    """
    if mask is None:
        return F.mse_loss(logits, stored)
    logits = logits[:, : stored.shape[1]]
    weight = mask.unsqueeze(-1).to(logits.dtype)
    return ((logits - stored).square() * weight).sum() / (weight.sum() * stored.shape[-1]).clamp_min(1)
