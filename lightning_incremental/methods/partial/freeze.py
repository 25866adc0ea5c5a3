"""A fixed part and an updatable part: freeze some of the model's parameters from a given task on."""

from collections.abc import Sequence

from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_incremental.core import task_of
from lightning_incremental.core.selection import Pattern, as_patterns, matching
from lightning_incremental.methods.partial._base import PartialTraining


class FreezeLayers(PartialTraining):
    r"""Train only part of the model: the rest keeps its weights bit for bit, from task ``from_task`` on.

    Choose the **frozen part** with any of (their union is frozen):

    - ``freeze``: name patterns of ``pl_module.named_parameters()`` — a ``str`` is a glob (``"net.0.*"``,
      :func:`fnmatch.fnmatchcase`), a compiled :func:`re.compile` pattern must match the whole name;
    - ``freeze_modules``: module types, e.g. ``(nn.Conv2d,)``: every parameter inside such a module;
    - ``freeze_first``: the first N *layers*;

    or choose the **trained part** instead, everything else frozen:

    - ``train``: name patterns, as ``freeze``;
    - ``train_last``: the last N layers (``train_last=1`` is "the head" of a plain classifier).

    A *layer* is a module that owns parameters directly, in ``named_modules()`` order:
    :meth:`FreezeLayers.layers` lists them (``net.0``, ``net.2``, ``net.4`` for an MLP of three Linear layers).

    **When.** Tasks before ``from_task`` train every parameter. From ``from_task`` on, every fit freezes the
    frozen part in ``setup``: in Lightning 2.6 the ``setup`` hook runs before the checkpoint restore and
    before the strategy wraps the model (DDP registers only parameters that require grad) and calls
    ``configure_optimizers``, whereas ``on_fit_start`` runs after both. So a ``configure_optimizers``
    that filters on ``requires_grad`` never sees the frozen parameters, and one that passes all
    ``self.parameters()`` gets them without a gradient: torch's optimizers skip parameters whose ``grad`` is
    ``None``, so they get no update, no weight decay and no optimizer state. A fit that resumes from a
    checkpoint re-decides when this callback's state is loaded, which is still before the optimizer is built.

    **Between fits** the model is as you built it: ``teardown`` gives the frozen parameters
    ``requires_grad=True`` back and the BatchNorm layers their mode, and the next fit freezes them again.
    Methods that add gradient terms (EWC, SI, …) skip parameters without a gradient, so they compose.

    **BatchNorm.** A BatchNorm layer is in the frozen part when it is, or sits inside, a module all of whose
    parameters are frozen. By default (``train_bn=False``) the frozen part is fixed entirely: such layers'
    parameters are frozen and the layers held in eval mode during training, so they normalise with the
    running statistics they had and leave them unchanged. ``train_bn=True`` keeps them training instead.

    **State.** The decision depends only on the task index, so the base class's task counters are the
    whole state; a resumed fit freezes exactly what the interrupted one did.

    Args:
        freeze: name patterns of the parameters to freeze.
        train: name patterns of the parameters that keep training; all others are frozen.
        freeze_modules: module types whose parameters are frozen.
        freeze_first: freeze the first N layers.
        train_last: train only the last N layers.
        from_task: the first task index at which the freeze applies (>= 0).
        train_bn: whether BatchNorm layers in the frozen part keep training (default ``False``: the frozen part
            stays fixed bit for bit). ``True`` lets their affine parameters learn and their running statistics
            update, as Lightning's ``BaseFinetuning`` does.

    Example::

        >>> import lightning as L
        >>> import torch
        >>> from lightning_incremental import MLPClassifier
        >>> from lightning_incremental.scenarios import synthetic_stream
        >>> model = MLPClassifier(16, 4, hidden=(8, 8))
        >>> FreezeLayers.layers(model)
        ['net.0', 'net.2', 'net.4']
        >>> FreezeLayers(train_last=1).frozen_names(model)
        ['net.0.weight', 'net.0.bias', 'net.2.weight', 'net.2.bias']
        >>> stream, freeze = synthetic_stream(n_tasks=2), FreezeLayers(freeze=["net.0.*"], from_task=1)
        >>> for task in stream:
        ...     first_layer = model.net[0].weight.detach().clone()
        ...     trainer = L.Trainer(max_epochs=1, callbacks=[freeze], logger=False, enable_progress_bar=False,
        ...                         enable_checkpointing=False, enable_model_summary=False)
        ...     trainer.fit(model, task.train_dataloader(batch_size=16))
        ...     print(task.index, torch.equal(model.net[0].weight, first_layer))
        0 False
        1 True
    """

    keeps_optimizer_state = True  # measured: RESULTS.md "The optimizer's state across tasks"

    def __init__(
        self,
        train: Pattern | Sequence[Pattern] | None = None,
        freeze: Pattern | Sequence[Pattern] | None = None,
        from_task: int = 0,
        train_bn: bool = False,
        *,
        freeze_modules: type[nn.Module] | Sequence[type[nn.Module]] = (),
        freeze_first: int = 0,
        train_last: int = 0,
    ) -> None:
        super().__init__()
        self.train = as_patterns("train", train)
        self.freeze = as_patterns("freeze", freeze)
        self.freeze_modules = _module_types(freeze_modules)
        self.freeze_first = _count("freeze_first", freeze_first)
        self.train_last = _count("train_last", train_last)
        self.from_task = _count("from_task", from_task)
        self.train_bn = bool(train_bn)
        chooses_frozen = bool(self.freeze or self.freeze_modules or self.freeze_first)
        chooses_trained = bool(self.train or self.train_last)
        if chooses_frozen and chooses_trained:
            raise ValueError(
                "Give either the frozen part (`freeze`, `freeze_modules`, `freeze_first`) or the trained part "
                "(`train`, `train_last`; everything else is frozen), not both."
            )
        if not (chooses_frozen or chooses_trained):
            raise ValueError(
                "FreezeLayers needs a selection: e.g. `freeze=['backbone.*']`, `freeze_modules=(nn.Conv2d,)`, "
                "`freeze_first=2`, `train=['head.*']` or `train_last=1`."
            )
        self._plan: tuple[list[nn.Parameter], list[nn.Module]] = ([], [])

    # ------------------------------------------------------------------ what gets frozen
    @staticmethod
    def layers(module: nn.Module) -> list[str]:
        """The names of the modules that own parameters directly, in ``named_modules()`` order."""
        return [
            name for name, child in module.named_modules() if next(child.parameters(recurse=False), None) is not None
        ]

    def frozen_names(self, module: nn.Module) -> list[str]:
        """The names of the parameters of ``module`` this callback freezes (from ``from_task`` on)."""
        names = {id(p): name for name, p in module.named_parameters()}
        return [names[id(p)] for p in self._select(module)[0]]

    def _select(self, module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Module]]:
        """The parameters to freeze and the BatchNorm layers to hold in eval mode; raises on a bad selection."""
        named = dict(module.named_parameters())
        ids = {id(p): name for name, p in named.items()}
        model = type(module).__name__
        layers = self.layers(module)
        if self.freeze_first > len(layers) or self.train_last > len(layers):
            argument = "freeze_first" if self.freeze_first > len(layers) else "train_last"
            raise ValueError(
                f"`{argument}={getattr(self, argument)}` but {model} has {len(layers)} layers (modules that own "
                f"parameters): {', '.join(layers)}."
            )

        def layer_params(names: list[str]) -> set[str]:
            return {ids[id(p)] for name in names for p in module.get_submodule(name).parameters(recurse=False)}

        if self.train or self.train_last:
            trained = matching("train", self.train, named, model)
            trained |= layer_params(layers[len(layers) - self.train_last :])
            selected = set(named) - trained
        else:
            selected = matching("freeze", self.freeze, named, model) | layer_params(layers[: self.freeze_first])
            for kind in self.freeze_modules:
                found = [m for m in module.modules() if isinstance(m, kind) and next(m.parameters(), None) is not None]
                if not found:
                    raise ValueError(
                        f"`freeze_modules`: {model} has no {kind.__name__} with parameters; its layers are "
                        + ", ".join(f"{name} ({type(module.get_submodule(name)).__name__})" for name in layers)
                        + "."
                    )
                selected |= {ids[id(p)] for m in found for p in m.parameters()}

        frozen_modules = [
            name
            for name, m in module.named_modules()
            if next(m.parameters(), None) is not None and all(ids[id(p)] in selected for p in m.parameters())
        ]
        frozen_bns = [
            m
            for name, m in module.named_modules()
            if isinstance(m, _BatchNorm)
            and any(not prefix or name == prefix or name.startswith(prefix + ".") for prefix in frozen_modules)
        ]
        if self.train_bn:
            selected -= {ids[id(p)] for bn in frozen_bns for p in bn.parameters()}
        trainable = {name for name, p in named.items() if p.requires_grad}
        if not selected & trainable:
            raise ValueError(f"The selection freezes no trainable parameter of {model}: {self._describe()}.")
        if trainable <= selected:
            raise ValueError(
                f"The selection freezes every trainable parameter of {model}, so nothing would train: "
                f"{self._describe()}."
            )
        return [p for name, p in named.items() if name in selected], [] if self.train_bn else frozen_bns

    def _describe(self) -> str:
        arguments = {
            "train": self.train,
            "freeze": self.freeze,
            "freeze_modules": tuple(kind.__name__ for kind in self.freeze_modules),
            "freeze_first": self.freeze_first,
            "train_last": self.train_last,
            "train_bn": self.train_bn,
        }
        return ", ".join(f"{name}={value!r}" for name, value in arguments.items() if value or name == "train_bn")

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._plan = self._select(pl_module)  # on every fit, so a bad selection fails on the first task
        self._start_fit(trainer, pl_module)

    # ------------------------------------------------------------------ helpers
    @override
    def _freeze_for_task(self, pl_module: LightningModule) -> None:
        """Freeze or release to match the task about to train (again when a checkpoint's state loads)."""
        if self.resuming_task:
            index = self.current_task
        else:
            task = task_of(self._trainer)
            index = task.index if task is not None else self.tasks_completed
        if index < self.from_task:
            self._frozen.release()
        elif not self._frozen:
            self._frozen.freeze(pl_module, self._plan[0], batchnorms=self._plan[1])

    @override
    def _end_fit(self) -> None:
        super()._end_fit()
        self._plan = ([], [])


def _module_types(types: type[nn.Module] | Sequence[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    types = (types,) if isinstance(types, type) else tuple(types)
    for kind in types:
        if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
            raise TypeError(f"`freeze_modules` takes nn.Module subclasses such as (nn.Conv2d,); got {kind!r}.")
    return types


def _count(argument: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{argument}` must be an integer >= 0, got {value!r}.")
    return value
