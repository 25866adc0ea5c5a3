"""Low-rank adapters (LoRA) as the updatable part: train rank-``r`` updates of chosen linear layers, freeze the rest."""

import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_incremental.core import ContinualCallback
from lightning_incremental.core.selection import Pattern, as_patterns, matching
from lightning_incremental.methods.fusion.weight_merging import WeightMerging
from lightning_incremental.methods.regularization._quadratic import QuadraticPenalty

Mode = Literal["merge", "per_task"]


class LowRankAdapters(nn.ModuleList):
    r"""The low-rank update of one linear layer: ``scaling * sum_k B_k A_k dropout(x)``, one ``(A, B)`` pair per set.

    :class:`LoRA` attaches it to the layer as ``layer.lora`` and a forward hook adds its output to the layer's, so
    the layer keeps its type and its parameter names (``query.weight``) and the adapters appear beside them
    (``query.lora.0.A.weight``, ``query.lora.0.B.weight``). ``A`` (``rank x in``) starts as ``nn.Linear``'s own
    Kaiming-uniform draw and ``B`` (``out x rank``) at zero, so a new set changes nothing until it trains.

    Args:
        in_features: the layer's input size.
        out_features: the layer's output size.
        rank: the rank ``r`` of every set.
        alpha: the scale numerator: ``scaling = alpha / rank``.
        dropout: the probability of the dropout on the adapters' input (the layer's own path sees no dropout).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scaling, self.dropout = alpha / rank, dropout

    def add(self, generator: torch.Generator, like: Tensor) -> None:
        """Append a fresh set (``A`` drawn with ``generator``, ``B = 0``) on the device and dtype of ``like``."""
        pair = nn.ModuleDict(
            {
                "A": nn.Linear(self.in_features, self.rank, bias=False, device=like.device, dtype=like.dtype),
                "B": nn.Linear(self.rank, self.out_features, bias=False, device=like.device, dtype=like.dtype),
            }
        )
        self.append(pair)
        self.reset(len(self) - 1, generator)

    @torch.no_grad()
    def reset(self, index: int, generator: torch.Generator) -> None:
        """Re-draw ``A`` of set ``index`` and zero its ``B``."""
        _kaiming_uniform_(self[index]["A"].weight, generator)
        self[index]["B"].weight.zero_()

    def delta_weight(self, index: int | None = None) -> Tensor:
        """``scaling * B A`` of set ``index`` (of every set summed when ``None``), in fp32, shaped like the weight."""
        pairs = list(self) if index is None else [self[index]]
        delta = sum(pair["B"].weight.float() @ pair["A"].weight.float() for pair in pairs)
        return self.scaling * delta

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(x.to(self[0]["A"].weight.dtype), self.dropout, self.training)
        if len(self) == 1:
            return self.scaling * self[0]["B"](self[0]["A"](x))
        a = torch.cat([pair["A"].weight for pair in self])  # one matmul for all sets: [k * r, in]
        b = torch.cat([pair["B"].weight for pair in self], dim=1)  # [out, k * r]
        return self.scaling * F.linear(F.linear(x, a), b)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint of a later task holds more sets than a freshly built model: grow to it before the sets load
        held = {key[len(prefix) :].split(".", 1)[0] for key in state_dict if key.startswith(prefix)}
        while str(len(self)) in held:
            like = self[0]["A"].weight
            self.add(torch.Generator().manual_seed(0), like)  # placeholder values: the checkpoint's replace them
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LoRA(ContinualCallback):
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
        self.module_types = _linear_types(module_types)
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
        self._trainer: Trainer | None = None  # the Trainer of the fit under way
        self._frozen: list[nn.Parameter] = []  # the parameters this callback set to requires_grad=False
        self._frozen_bns: list[nn.Module] = []
        self._bn_modes: dict[nn.Module, bool] = {}  # BatchNorm layers held in eval mode -> their previous mode

    # ------------------------------------------------------------------ the adapters
    @staticmethod
    def linear_layers(module: nn.Module) -> list[str]:
        """The names of the layers adapters can go on: ``nn.Linear`` modules, in ``named_modules()`` order."""
        return [name for name, _ in _candidates(module)]

    def inject(self, module: nn.Module) -> list[str]:
        """Put the adapters on the chosen layers of ``module`` (once; again is a no-op); return the layers' names.

        On a model with PEFT LoRA layers nothing is injected and their names are returned.
        """
        peft_layers = _peft_lora_layers(module)
        if peft_layers:
            self._check_peft(module, peft_layers)
            return list(peft_layers)
        model = type(module).__name__
        candidates = dict(_candidates(module))
        if not (self.target_modules or self.module_types):
            raise ValueError(
                f"LoRA needs the layers to adapt: `target_modules=[...]` (name patterns) or `module_types=nn.Linear`; "
                f"the linear layers of {model} are: {', '.join(candidates) or 'none'}."
            )
        chosen = matching("target_modules", self.target_modules, candidates, model, noun="linear layer")
        for kind in self.module_types:
            found = {name for name, layer in candidates.items() if isinstance(layer, kind)}
            if not found:
                raise ValueError(
                    f"`module_types`: {model} has no {kind.__name__} to adapt; its linear layers are: "
                    + ", ".join(f"{name} ({type(layer).__name__})" for name, layer in candidates.items())
                    + "."
                )
            chosen |= found
        generator = self._generator(0)
        names = [name for name in candidates if name in chosen]
        for name in names:
            layer = candidates[name]
            if isinstance(layer._modules.get("lora"), LowRankAdapters):
                continue
            if "lora" in layer._modules or hasattr(layer, "lora"):
                raise ValueError(f"{name} already has an attribute `lora`; LoRA cannot attach its adapters there.")
            adapters = LowRankAdapters(layer.in_features, layer.out_features, self.rank, self.alpha, self.dropout)
            adapters.add(generator, layer.weight)
            layer.lora = adapters
            layer.register_forward_hook(_add_adapter_output)
        return names

    def prepare_model(self, pl_module: nn.Module) -> None:
        """Inject the adapters into a freshly built model, so weights saved with them load
        (:func:`~lightning_incremental.load_task_checkpoint` calls it)."""
        self.inject(pl_module)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        had_adapters = bool(_own_adapters(pl_module))
        self.inject(pl_module)  # on every stage, so a checkpoint of the adapted model loads
        if self.adapter_sets and not had_adapters and _own_adapters(pl_module):
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
        self._trainer = trainer
        self._update(pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for bn in self._frozen_bns:  # Lightning leaves modes alone in fit; this also undoes a user's .train()
            self._bn_modes.setdefault(bn, bn.training)
            bn.eval()

    def on_task_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode != "merge":
            return  # per_task: the set is frozen from the next setup on
        generator = self._generator(self.tasks_completed + 1)
        with torch.no_grad():
            peft_layers = _peft_lora_layers(pl_module)
            for layer in peft_layers.values():
                for name in layer.active_adapters:
                    layer.merge(adapter_names=[name])  # PEFT's own merge: W += its delta weight
                    layer.merged_adapters.remove(name)  # the delta is the base weight's now, not an adapter's
                    _kaiming_uniform_(layer.lora_A[name].weight, generator)
                    for param in layer.lora_B[name].parameters():
                        param.zero_()
            for layer, adapters in _own_adapters(pl_module).values():
                layer.weight.copy_(layer.weight.float() + adapters.delta_weight())
                adapters.reset(0, generator)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._release()
        self._trainer = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._release()
        self._trainer = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "adapter_sets": self.adapter_sets}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.adapter_sets = int(state_dict["adapter_sets"])
        if self._trainer is not None:  # a fit restoring its checkpoint: the model is loaded, the optimizer not built
            self._update(self._trainer.lightning_module)

    # ------------------------------------------------------------------ helpers
    def _generator(self, draw: int) -> torch.Generator:
        """The generator of the ``draw``-th adapters: the same on every rank and in every run with this seed."""
        return torch.Generator().manual_seed(hash((self.seed, draw)) % 2**63)

    def _update(self, pl_module: LightningModule) -> None:
        """Grow the adapter sets the task about to train needs, and freeze everything but what trains."""
        self._release()
        own = _own_adapters(pl_module)
        if own:
            wanted = 1 if self.mode == "merge" else max(1, self.adapter_sets + (not self._task_in_progress))
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
        trainable |= {id(p) for p in _peft_trainable(pl_module)}
        named = dict(pl_module.named_parameters())
        trainable |= {id(named[name]) for name in matching("train", self.train, named, type(pl_module).__name__)}
        self._frozen = [p for p in named.values() if p.requires_grad and id(p) not in trainable]
        for p in self._frozen:
            p.requires_grad_(False)
            p.grad = None  # a stale gradient of the last fit must not reach an optimizer
        frozen = {id(p) for p in named.values() if not p.requires_grad}
        self._frozen_bns = [
            m for m in pl_module.modules() if isinstance(m, _BatchNorm) and all(id(p) in frozen for p in m.parameters())
        ]

    def _release(self) -> None:
        for p in self._frozen:
            p.requires_grad_(True)
        for bn, mode in self._bn_modes.items():
            bn.train(mode)
        self._frozen, self._frozen_bns, self._bn_modes = [], [], {}

    def _check_peft(self, module: nn.Module, layers: dict[str, nn.Module]) -> None:
        if self.target_modules or self.module_types:
            raise ValueError(
                f"{type(module).__name__} already has PEFT LoRA layers ({', '.join(list(layers)[:4])}, …); LoRA "
                "trains those and injects none: leave out `target_modules` and `module_types` (PEFT's LoraConfig "
                "chose the layers)."
            )
        if self.mode == "per_task":
            raise ValueError(
                "`mode='per_task'` injects one adapter set per task, which a PEFT model's LoRA layers do not hold: "
                "use mode='merge' with the PEFT model, or LoRA's own adapters on the model without PEFT."
            )
        for name, layer in layers.items():
            for adapter in layer.active_adapters:
                variant = getattr(layer, "lora_variant", {}).get(adapter) or getattr(layer, "use_dora", {}).get(adapter)
                if adapter not in layer.lora_A or variant:
                    raise ValueError(
                        f"PEFT adapter {adapter!r} of {name} is not a plain LoRA of a linear or convolutional layer "
                        f"({type(layer).__name__}{', a variant such as DoRA' if variant else ''}); LoRA merges and "
                        "re-draws plain LoRA only: configure PEFT without it, or let PEFT merge it yourself."
                    )


def _add_adapter_output(layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """The forward hook on an adapted layer: add its adapters' output (module-level, so a deepcopy uses its own)."""
    return output + layer.lora(args[0]).to(output.dtype)


def _kaiming_uniform_(weight: Tensor, generator: torch.Generator) -> None:
    """``nn.init.kaiming_uniform_(weight, a=sqrt(5))`` (nn.Linear's, PEFT's init of A), drawn on the CPU."""
    bound = 1.0 / math.sqrt(weight[0].numel())
    draw = torch.rand(weight.shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
    with torch.no_grad():
        weight.copy_(draw)


def _candidates(module: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The linear layers adapters can go on: not inside adapters, not an attention's unused ``out_proj``."""
    skipped: list[str] = []
    for name, child in module.named_modules():
        if any(name == prefix or name.startswith(prefix + ".") for prefix in skipped):
            continue
        if isinstance(child, LowRankAdapters):
            skipped.append(name)
        elif isinstance(child, nn.MultiheadAttention):
            skipped.append(f"{name}.out_proj" if name else "out_proj")
        elif isinstance(child, nn.Linear):
            yield name, child


def _own_adapters(module: nn.Module) -> dict[str, tuple[nn.Linear, LowRankAdapters]]:
    return {
        name: (layer, layer._modules["lora"])
        for name, layer in module.named_modules()
        if isinstance(layer._modules.get("lora"), LowRankAdapters)
    }


def _peft_lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers in ``module``, by name; PEFT is looked at only if something already imported it."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


def _peft_trainable(module: nn.Module) -> list[nn.Parameter]:
    """PEFT's active adapters, and what PEFT left trainable inside a ``PeftModel`` (its ``modules_to_save``)."""
    layers = _peft_lora_layers(module)
    if not layers:
        return []
    from peft import PeftModel

    params = [
        p
        for layer in layers.values()
        for adapter in layer.active_adapters
        for p in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters())
    ]
    params += [p for m in module.modules() if isinstance(m, PeftModel) for p in m.parameters() if p.requires_grad]
    return params


def _check_weight_readers_follow(lora: LoRA, trainer: Trainer) -> None:
    """In merge mode the merge must come before the callbacks that read the weights at the task end."""
    before = []
    for callback in trainer.callbacks:
        if callback is lora:
            break
        if isinstance(callback, QuadraticPenalty | WeightMerging):
            before.append(type(callback).__name__)
    if before:
        raise ValueError(
            f"{', '.join(before)} come(s) before LoRA in the Trainer's callbacks. With mode='merge', put LoRA first "
            f"(callbacks=[LoRA(...), {before[0]}(...)]): LoRA merges its adapters into the weights at the task end, "
            "and the callbacks that read the weights there must see the merged model. A regularizer would anchor "
            "the adapters at the update the merge already moved into the weights and pull the next task's fresh "
            "adapters back to it; WeightMerging would merge the factors A and B apart instead of their product."
        )


def _linear_types(types: type[nn.Module] | Sequence[type[nn.Module]]) -> tuple[type[nn.Linear], ...]:
    types = (types,) if isinstance(types, type) else tuple(types)
    for kind in types:
        if not (isinstance(kind, type) and issubclass(kind, nn.Linear)):
            raise TypeError(
                f"`module_types` takes linear layer types, nn.Linear or its subclasses; got "
                f"{getattr(kind, '__name__', repr(kind))}, which LoRA "
                "cannot adapt (it adds B A x to y = W x + b). Choose layers by name with `target_modules`, or use "
                "PEFT (LoraConfig) for other layer types and pass LoRA() the PEFT model."
            )
    return types
