"""Low-rank adapters (LoRA) as the updatable part: train rank-``r`` updates of chosen linear layers, freeze the rest.

The adapter layer is in :mod:`~lightning_incremental.methods.partial.lora_layer`, putting it into a model (and the
bridge to PEFT) in :mod:`~lightning_incremental.methods.partial.lora_injection`; this module holds the callback.
"""

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from typing_extensions import override

from lightning_incremental.core import batchnorms_without_training
from lightning_incremental.core.selection import Pattern, as_patterns, matching
from lightning_incremental.core.sharding import is_model_parallel
from lightning_incremental.methods.partial._base import PartialTraining
from lightning_incremental.methods.partial.lora_injection import (
    check_peft,
    inject_adapters,
    linear_candidates,
    linear_types,
    merge_peft_adapters,
    own_adapters,
    peft_lora_layers,
    peft_trainable,
)
from lightning_incremental.methods.partial.lora_layer import LowRankAdapters

__all__ = ["LoRA", "LowRankAdapters"]

Mode = Literal["merge", "per_task"]


class LoRA(PartialTraining):
    r"""Train low-rank adapters on chosen linear layers and freeze everything else; merge them in at every task end.

    Each chosen ``nn.Linear`` computes ``y = W x + b + (alpha / rank) * B A dropout(x)`` (Hu et al., 2021): ``W``
    and ``b`` stay fixed, and only ``A`` (``rank x in``, a Kaiming-uniform draw) and ``B`` (``out x rank``,
    zero at the start, so training starts from the model as it is) learn, ``rank * (in + out)`` parameters
    instead of ``in * out``. Every other parameter of the LightningModule is frozen during the fit, except those
    the ``train`` patterns name (a classifier head, typically).

    **Which layers.** ``target_modules``: name patterns of ``pl_module.named_modules()``, matched as
    :class:`FreezeLayers`' patterns (a ``str`` is a glob on the whole name, ``"*.query"``; a compiled
    :func:`re.compile` pattern must match the whole name); ``module_types``: ``nn.Linear`` subclasses. Their union
    is adapted. Only linear layers are candidates (:meth:`LoRA.linear_layers` lists them); the ``out_proj`` of
    an ``nn.MultiheadAttention`` is not, as the attention reads its weight without calling it.

    **At each task end** (``on_task_end``):

    - ``mode="merge"`` (default): ``W += (alpha / rank) * B A`` in fp32, and the adapters restart fresh (a new
      ``A``, ``B = 0``) for the next task: the model's function does not change at the merge, the weights keep
      the size of the model, and every task gets the full rank of new adapters.
    - ``mode="per_task"``: every task trains a new set ``k`` and keeps it. From the next task on the set is frozen
      but stays active: during and after task ``t`` the layer computes
      ``W x + b + (alpha / rank) * sum_{k=0}^{t} B_k A_k dropout(x)`` (dropout only while training), with
      ``W``, ``b`` and the sets ``k < t`` fixed. Without dropout this is the same function as ``"merge"`` but
      each task's update stays apart, ``task_update(k) = (alpha / rank) B_k A_k``, to inspect, drop or re-weight
      later; memory and compute grow by one set per task.

    The fresh ``A`` of a set is drawn from a generator seeded by ``seed`` and the set's number, not from the
    global random state: every DDP rank draws the same adapters, and a run is reproducible.

    **Freezing** happens in ``setup``, as :class:`FreezeLayers` does it: before the checkpoint restore and before
    ``configure_optimizers``, so an optimizer over the parameters that require grad sees the adapters only, and a
    fresh process that resumes finds the adapter keys. BatchNorm layers none of whose parameters train are held
    in eval mode (their statistics do not move). ``teardown`` gives every frozen parameter ``requires_grad=True``
    back. The adapters stay in the model between fits (in ``"merge"`` mode they are zero there, so the model
    computes exactly its merged weights); :meth:`LoRA.inject` puts them in a freshly built model.

    **PEFT.** When the model already has PEFT LoRA layers (a ``peft.PeftModel`` anywhere in it), this callback
    injects nothing and ``target_modules``/``module_types`` must be left out: it trains PEFT's active adapters,
    what PEFT left trainable in a ``PeftModel`` (its ``modules_to_save``) and ``train``, and at each task end
    merges with PEFT's ``merge`` and re-draws the adapters (rank, alpha and dropout are the ``LoraConfig``'s). PEFT
    is never imported unless it is already loaded. ``mode="per_task"`` and PEFT variants (DoRA, …) are refused.

    **Regularizers beside it** (EWC, SI, MAS, L2Anchor) consolidate the parameters that require grad, so they act
    on the adapters and the ``train`` extras only. In ``"merge"`` mode put this callback *before* them (it raises
    otherwise): the merge then happens first, and they consolidate the merged model through the fresh adapters.
    The anchor of ``B`` is 0, which *is* the merged model, so the penalty restrains the next task's update and
    never pulls it back to the update already merged (with the opposite order it would count it twice).
    EWC's and MAS's importance of ``A`` is exactly 0 (their gradients vanish at ``B = 0``), that of ``B`` is
    measured at the merged model in the next adapter's coordinates; importances of earlier tasks carry over to
    the same entries of adapters whose ``A`` was re-drawn, so they protect output rows rather than exact
    directions. SI's path integral divides by the movement from the task's start to the fresh adapter, not to
    the trained one (the same when ``epsilon`` dominates, as with its default). In ``"per_task"`` mode a task's
    set is frozen once the task ends, so the penalty ends up on the ``train`` extras only.

    **WeightMerging beside it** also comes after this callback (it raises otherwise), so a base weight's task
    vector is the update merged into it. WeightMerging merges every floating-point tensor, the fresh adapters
    too: ``B`` stays 0 (all its task vectors are 0) and ``A`` becomes a merge of fresh draws, which changes only
    where the next task's adapters start, not the model; ``WeightMerging(exclude="*.lora.*")``
    leaves them out (and a class-incremental head, e.g. ``"head.*"``, which a merge would weaken).

    **State.** The number of adapter sets is in ``state_dict``; the adapters are the model's parameters, in its
    own ``state_dict``. A fit resumed with ``ckpt_path`` finds everything. A new process that starts the next
    task with :func:`~lightning_incremental.load_task_checkpoint` calls :meth:`LoRA.inject` on the freshly
    built model first, so the adapter keys exist when the weights load; so does a notebook under ``ddp_spawn`` /
    ``ddp_fork`` before the first fit, as only the weights come back from the worker processes (Lightning loads
    them non-strictly: without the call, the adapters would be dropped).

    Args:
        target_modules: name patterns of the linear layers to adapt.
        rank: the adapters' rank ``r`` (>= 1).
        alpha: the adapters' scale is ``alpha / rank`` (> 0).
        dropout: dropout on the adapters' input, in ``[0, 1)``.
        mode: ``"merge"`` or ``"per_task"``.
        module_types: ``nn.Linear`` subclasses to adapt, every layer of these types.
        train: name patterns of ``pl_module.named_parameters()`` that keep training beside the adapters.
        seed: seeds the draws of ``A``.

    Example::

        >>> import lightning as L
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> stream, model = synthetic_stream(n_tasks=2), MLPClassifier(16, 4, hidden=(8, 8))
        >>> LoRA.linear_layers(model)
        ['net.0', 'net.2', 'net.4']
        >>> lora = LoRA(target_modules="net.[02]", rank=2, train="net.4.*")
        >>> for task in stream:
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[lora], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        >>> [name for name, _ in model.named_parameters() if ".lora." in name]
        ['net.0.lora.0.A.weight', 'net.0.lora.0.B.weight', 'net.2.lora.0.A.weight', 'net.2.lora.0.B.weight']
        >>> model.net[0].lora[0]["B"].weight.abs().sum().item()  # merged into net.0.weight: the next B starts at 0
        0.0
    """

    keeps_optimizer_state = False  # measured: RESULTS.md "The optimizer's state across tasks"

    def __init__(
        self,
        target_modules: Pattern | Sequence[Pattern] | None = None,
        rank: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        mode: Mode = "merge",
        *,
        module_types: type[nn.Module] | Sequence[type[nn.Module]] = (),
        train: Pattern | Sequence[Pattern] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.target_modules = as_patterns("target_modules", target_modules)
        self.module_types = linear_types(module_types)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"`rank` must be an integer >= 1 (the adapters' rank, e.g. 8), got {rank!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"`alpha` must be a finite number > 0 (the scale is alpha / rank), got {alpha!r}.")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1) (0 turns it off), got {dropout!r}.")
        if mode not in ("merge", "per_task"):
            raise ValueError(f"`mode` must be 'merge' or 'per_task', got {mode!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.rank, self.alpha, self.dropout, self.mode = rank, float(alpha), float(dropout), mode
        self.train = as_patterns("train", train)
        self.seed = seed
        self.adapter_sets = 0  # sets of adapters in the model: 1 in "merge" mode, one per task so far in "per_task"

    # ------------------------------------------------------------------ the adapters
    @staticmethod
    def linear_layers(module: nn.Module) -> list[str]:
        """The names of the layers adapters can go on: ``nn.Linear`` modules, in ``named_modules()`` order."""
        return [name for name, _ in linear_candidates(module)]

    def inject(self, module: nn.Module) -> list[str]:
        """Put the adapters on the chosen layers of ``module`` (once; again is a no-op); return the layers' names.

        On a model with PEFT LoRA layers nothing is injected and their names are returned.
        """
        peft_layers = peft_lora_layers(module)
        if peft_layers:
            check_peft(
                module, peft_layers, chooses_layers=bool(self.target_modules or self.module_types), mode=self.mode
            )
            return list(peft_layers)
        return inject_adapters(
            module,
            self.target_modules,
            self.module_types,
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            generator=self._generator(0),
        )

    @override
    def prepare_model(self, pl_module: nn.Module) -> None:
        """Inject the adapters into a freshly built model, so weights saved with them load
        (:func:`~lightning_incremental.load_task_checkpoint` calls it)."""
        self.inject(pl_module)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.mode == "per_task" and is_model_parallel(trainer):
            raise RuntimeError(
                "LoRA(mode='per_task') adds a set of adapters at every task, and fully_shard fixes a module's "
                "parameters when it shards them. Under ModelParallelStrategy use LoRA(mode='merge'), whose one set of "
                "adapters is added before the first task and restarts fresh after each merge."
            )
        had_adapters = bool(own_adapters(pl_module))
        self.inject(pl_module)  # on every stage, so a checkpoint of the adapted model loads
        if self.adapter_sets and not had_adapters and own_adapters(pl_module):
            raise RuntimeError(
                f"LoRA trained adapters in {self.tasks_completed} task(s), but {type(pl_module).__name__} has none: "
                "it lost them. Under ddp_spawn / ddp_fork call `lora.inject(model)` in the main process before the "
                "first fit, so the adapters trained in the workers load back into it; in a new process, "
                "`load_task_checkpoint` injects them before loading the weights."
            )
        if stage != "fit":
            return
        if self.mode == "merge":
            _check_weight_readers_follow(self, trainer)
        self._start_fit(trainer, pl_module)

    @override
    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode != "merge":
            return  # per_task: the set is frozen from the next setup on
        generator = self._generator(self.tasks_completed + 1)
        merge_peft_adapters(peft_lora_layers(pl_module), generator)
        with torch.no_grad():
            for layer, adapters in own_adapters(pl_module).values():
                layer.weight.copy_(layer.weight.float() + adapters.delta_weight())
                adapters.reset(0, generator)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "adapter_sets": self.adapter_sets}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.adapter_sets = int(state_dict["adapter_sets"])
        super().load_state_dict(state_dict)  # in a fit restoring its checkpoint, decides again what trains

    # ------------------------------------------------------------------ helpers
    def _generator(self, draw: int) -> torch.Generator:
        """The generator of the ``draw``-th adapters: the same on every rank and in every run with this seed."""
        return torch.Generator().manual_seed(hash((self.seed, draw)) % 2**63)

    @override
    def _freeze_for_task(self, pl_module: LightningModule) -> None:
        """Grow the adapter sets the task about to train needs, and freeze everything but what trains."""
        self._frozen.release()
        own = own_adapters(pl_module)
        if own:
            wanted = 1 if self.mode == "merge" else max(1, self.adapter_sets + (not self.resuming_task))
            for name, (_, adapters) in own.items():
                if len(adapters) > wanted:
                    raise RuntimeError(
                        f"{name} holds {len(adapters)} adapter sets but this task needs {wanted}: the model comes from "
                        "a later task than this callback's state. Load the callback state saved with the model."
                    )
            for draw in range(len(next(iter(own.values()))[1]), wanted):
                generator = self._generator(draw)
                for layer, adapters in own.values():
                    adapters.add(generator, layer.weight)
            self.adapter_sets = wanted
        trainable = {id(p) for _, adapters in own.values() for p in adapters[-1].parameters()}
        trainable |= {id(p) for p in peft_trainable(pl_module)}
        named = dict(pl_module.named_parameters())
        trainable |= {id(named[name]) for name in matching("train", self.train, named, type(pl_module).__name__)}
        self._frozen.freeze(pl_module, (p for p in named.values() if id(p) not in trainable))
        # then the BatchNorm layers none of whose parameters trains now (the frozen ones, and those frozen before)
        self._frozen.freeze(pl_module, (), batchnorms=batchnorms_without_training(pl_module))


def _check_weight_readers_follow(lora: LoRA, trainer: Trainer) -> None:
    """In merge mode the merge must come before the callbacks that read the weights at the task end (those whose
    capability flag ``reads_trained_weights`` is set: the regularizers' anchors, WeightMerging)."""
    before = []
    for callback in trainer.callbacks:
        if callback is lora:
            break
        if getattr(callback, "reads_trained_weights", False):
            before.append(type(callback).__name__)
    if before:
        raise ValueError(
            f"{', '.join(before)} come(s) before LoRA in the Trainer's callbacks. With mode='merge', put LoRA first "
            f"(callbacks=[LoRA(...), {before[0]}(...)]): LoRA merges its adapters into the weights at the task end, "
            "and the callbacks that read the weights there must see the merged model. A regularizer would anchor "
            "the adapters at the update the merge already moved into the weights and pull the next task's fresh "
            "adapters back to it; WeightMerging would merge the factors A and B apart instead of their product."
        )
