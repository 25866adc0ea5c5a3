"""Experience replay (Chaudhry et al., 2019; Rolnick et al., 2019)."""

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

from lightning_incremental.buffers import PadValue
from lightning_incremental.core import ModelInterface, Step, batch_size_of
from lightning_incremental.methods.replay._base import Fill, PolicyChoice, ReplayMethod


class ExperienceReplay(ReplayMethod):
    r"""Train on every batch together with rows replayed from a buffer of earlier data.

    The user's ``training_step`` receives its batch extended by ``replay_batch_size`` replayed rows — same
    structure (a tuple stays a tuple, a dict a dict), device and dtype — so its loss covers old and new data
    alike. Any model and batch style works: ``(x, y)`` tuples, dicts, Hugging Face-style dicts of
    ``input_ids``, ``attention_mask`` and ``labels`` whose length varies from batch to batch (the current and
    the replayed rows are padded to their common length, each entry with its own pad value), and any target.

    **Policy.** ``policy="auto"`` keeps the buffer class-balanced when the targets are one integer class label
    per row, and a reservoir otherwise (real-valued regression targets, multi-label targets, token labels);
    the choice is made at the first batch and kept in the checkpoint.

    **Fill.** By default each task's rows are offered once, at its end (``fill="task_end"``), and replayed in
    the tasks that follow: the setting the sweep in ``benchmarks/sweeps/sweep_replay.py`` favours on the reference
    protocol, ahead of filling from the stream as it trains (numbers in ``benchmarks/RESULTS.md``). A single
    task-free fit therefore replays nothing with the defaults, and the first fit says so when its data do not
    come from a :class:`~lightning_incremental.scenarios.TaskStream`: pass ``fill="stream"`` there.

    Args:
        buffer_size: rows the buffer holds (over all DDP ranks).
        replay_batch_size: rows replayed per step (the name every replay method uses for it); default ``ratio``
            times the current batch size.
        ratio: replayed rows per current row when ``replay_batch_size`` is not given. The default 4 is the
            cheapest ratio within 0.5 points of the best accuracy on the class-incremental and permuted digits
            streams (``benchmarks/studies/replay_tradeoff.py``, RESULTS.md "Replay ratio against wall time"); carry the
            optimizer's state beside it (:class:`~lightning_incremental.KeepOptimizerState`), which that sweep
            favours too.
        policy: ``"auto"``, ``"reservoir"``, ``"class_balanced"`` (refused at the first step when the targets
            are not one class label per row) or ``"task_balanced"`` (the task labels of ``(x, y, t)`` batches,
            else the task index).
        fill: when rows enter the buffer: ``"task_end"``, ``"stream"`` (task-free), ``"first_epoch"`` (every
            row once, as it is trained on) or ``"none"`` (only the rows of :meth:`prefill`: general data replayed
            beside every task).
        seed: seed of the buffer's sampling.
        model_interface: how the targets are read from a batch
            (:class:`~lightning_incremental.ModelInterface`); default the model's ``continual_interface``, else
            the standard reading.
        pad_values: the pad value of sequence entries by batch key, over the inferred ones (-100 for integer
            labels, for ``input_ids`` the id they hold where ``attention_mask`` is 0, else 0), e.g.
            ``{"input_ids": 1}``.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8,))
        >>> replay = ExperienceReplay(buffer_size=50)
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[replay], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> len(replay.buffer), replay.buffer.policy, sorted(set(replay.buffer.storage[1].tolist()))
        (50, 'class_balanced', [0, 1, 2, 3])
    """

    def __init__(
        self,
        buffer_size: int = 200,
        replay_batch_size: int | None = None,
        ratio: float = 4.0,
        policy: PolicyChoice = "auto",
        fill: Fill = "task_end",
        seed: int = 0,
        model_interface: ModelInterface | None = None,
        pad_values: Mapping[str, PadValue] | None = None,
    ) -> None:
        super().__init__(buffer_size, policy, fill, seed, model_interface, pad_values)
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"`replay_batch_size` must be a positive integer or None, got {replay_batch_size}.")
        if not ratio > 0:
            raise ValueError(f"`ratio` must be > 0, got {ratio}.")
        self.replay_batch_size, self.ratio = replay_batch_size, float(ratio)

    @override
    def wrap_training_step(self, trainer: Trainer, pl_module: LightningModule, batch: Any, step: Step) -> STEP_OUTPUT:
        extended = batch
        if len(self.buffer):
            k = self.replay_batch_size or max(1, round(self.ratio * batch_size_of(batch)))
            replayed, _ = self.replay(batch, k)
            extended = self.concat(batch, replayed)
        output = step(extended)
        if self.inserts_now(trainer):
            self.insert(batch)
        return output
