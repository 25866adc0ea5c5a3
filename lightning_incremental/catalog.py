"""The catalog of methods by name: what the command line, the benchmarks and the conformance suite run.

The methods themselves live in their families (``lightning_incremental.methods.<family>``) and know nothing of
this list. A new method joins by adding one :class:`MethodSpec` to :data:`METHODS` with its documented
defaults; ``docs/architecture.md`` walks through it.
"""

from collections.abc import Callable
from dataclasses import dataclass

from lightning.pytorch import Callback
from torch import nn

from lightning_incremental.methods.distillation.lwf import LwF
from lightning_incremental.methods.fusion.weight_merging import WeightMerging
from lightning_incremental.methods.partial.freeze import FreezeLayers
from lightning_incremental.methods.partial.lora import LoRA
from lightning_incremental.methods.pretrained.prototype_head import PrototypeHead
from lightning_incremental.methods.pretrained.ranpac_head import RanPACHead
from lightning_incremental.methods.regularization.ewc import EWC
from lightning_incremental.methods.regularization.l2_anchor import L2Anchor
from lightning_incremental.methods.regularization.mas import MAS
from lightning_incremental.methods.regularization.si import SI
from lightning_incremental.methods.replay.agem import AGEM
from lightning_incremental.methods.replay.der import DER
from lightning_incremental.methods.replay.experience_replay import ExperienceReplay
from lightning_incremental.methods.replay.icarl import ICaRL
from lightning_incremental.optimizer_state import KeepOptimizerState


@dataclass(frozen=True)
class MethodSpec:
    """How to run one method.

    Attributes:
        name: the name on the command line (``"ewc"``).
        family: ``"baseline"``, ``"regularization"``, ``"replay"``, ``"distillation"``, ``"partial"``,
            ``"pretrained"``, ``"fusion"``.
        summary: one line for ``--help`` and the README.
        build: returns fresh callbacks with the method's documented defaults, for one run over a stream.
        cumulative: train each task on the union of the tasks so far (the joint upper bound).
        keep_optimizer_state: ``None``: the methods decide whether the optimizer's state is carried from task to
            task, as they do in a user's Trainer (each method's ``keeps_optimizer_state``, the setting the
            measurements favour: ``benchmarks/studies/optimizer_state.py``, RESULTS.md); ``True`` / ``False``: a
            :class:`~lightning_incremental.KeepOptimizerState` decides (the baselines, which have no method).
    """

    name: str
    family: str
    summary: str
    build: Callable[[], list[Callback]]
    cumulative: bool = False
    keep_optimizer_state: bool | None = None

    def callbacks(self, keep_optimizer_state: bool | None = None) -> list[Callback]:
        """Fresh callbacks for one run: :attr:`build`'s, with a ``KeepOptimizerState`` when one decides.

        ``keep_optimizer_state`` overrides the entry's own setting (``None``: the entry's).

        >>> [type(c).__name__ for c in registry()["replay"].callbacks()]  # ExperienceReplay carries it itself
        ['ExperienceReplay']
        >>> reset = registry()["replay"].callbacks(keep_optimizer_state=False)[1]
        >>> type(reset).__name__, reset.carry
        ('KeepOptimizerState', False)
        """
        keep = self.keep_optimizer_state if keep_optimizer_state is None else keep_optimizer_state
        return [*self.build(), *([] if keep is None else [KeepOptimizerState(carry=keep)])]


# Each method carries the optimizer's state from task to task where the measurements favour it (its
# ``keeps_optimizer_state``: all but A-GEM, LoRA, interpolation and Fisher merging, which lose more than 3 points on the
# class-incremental split); the baselines carry it, and task arithmetic does not (see its entry):
# benchmarks/studies/optimizer_state.py, RESULTS.md "The optimizer's state across tasks".
METHODS: list[MethodSpec] = [
    MethodSpec(
        "naive",
        "baseline",
        "Plain fine-tuning on each task in turn (the lower bound).",
        lambda: [],
        keep_optimizer_state=True,
    ),
    MethodSpec(
        "joint",
        "baseline",
        "Each task trains on the union of the tasks so far (the upper bound).",
        lambda: [],
        cumulative=True,
        keep_optimizer_state=True,
    ),
    MethodSpec(
        "ewc",
        "regularization",
        "EWC (online, the default): a decayed Fisher, anchored at the last task.",
        lambda: [EWC()],
    ),
    MethodSpec(
        "ewc_separate",
        "regularization",
        "EWC with one Fisher-weighted penalty per past task (summed).",
        lambda: [EWC(mode="separate")],
    ),
    MethodSpec("si", "regularization", "Synaptic Intelligence: path-integral importance.", lambda: [SI()]),
    MethodSpec("mas", "regularization", "Memory Aware Synapses: output-sensitivity importance.", lambda: [MAS()]),
    MethodSpec("l2", "regularization", "L2 penalty towards the previous task's weights.", lambda: [L2Anchor()]),
    MethodSpec("replay", "replay", "Experience replay from a 200-sample buffer.", lambda: [ExperienceReplay()]),
    MethodSpec("der", "replay", "Dark Experience Replay: match the stored logits of 200 samples.", lambda: [DER()]),
    MethodSpec(
        "derpp", "replay", "DER++: stored logits and labels of 200 samples.", lambda: [DER(alpha=0.3, beta=1.0)]
    ),
    MethodSpec(
        "agem",
        "replay",
        "A-GEM: project updates that would raise the memory's loss.",
        lambda: [AGEM()],
    ),
    MethodSpec(
        "icarl",
        "replay",
        "iCaRL: 200 herding exemplars, distillation, nearest-mean-of-exemplars prediction.",
        lambda: [ICaRL()],
    ),
    MethodSpec(
        "replay_lwf_ewc",
        "stack",
        "Experience replay with LwF and EWC beside it, at the weights a stack needs (alpha 0.1, lambda 3).",
        lambda: [ExperienceReplay(), LwF(alpha=0.1, temperature=2.0), EWC(lambda_=3.0)],
    ),
    MethodSpec("lwf", "distillation", "Learning without Forgetting: distil the last model's outputs.", lambda: [LwF()]),
    MethodSpec(
        "freeze_backbone",
        "partial",
        "Train only the last layer (the head) from the second task on; the backbone stays fixed.",
        lambda: [FreezeLayers(train_last=1, from_task=1)],
    ),
    MethodSpec(
        "lora",
        "partial",
        "Low-rank adapters on every linear layer, merged into the weights at each task end (for pretrained models).",
        lambda: [LoRA(module_types=nn.Linear)],
    ),
    MethodSpec(
        "ranpac",
        "pretrained",
        "RanPAC: adapt on task 0, then a random-projection ridge head fitted in closed form (no samples stored).",
        lambda: [FreezeLayers(train_last=1, from_task=1), RanPACHead()],
    ),
    MethodSpec(
        "prototype",
        "pretrained",
        "SimpleCIL: adapt on task 0, then the nearest class mean (cosine) of the features.",
        lambda: [FreezeLayers(train_last=1, from_task=1), PrototypeHead()],
    ),
    MethodSpec(
        "merge",
        "fusion",
        "Weight merging: interpolate halfway between the weights before and after each task.",
        lambda: [WeightMerging()],
    ),
    MethodSpec(
        "task_arithmetic",
        "fusion",
        "Task arithmetic: the base weights plus 0.3 x the sum of the task vectors.",
        lambda: [WeightMerging(mode="task_arithmetic", scale=0.3)],
        # carrying the state gains on the digits split, but under gradient accumulation and DDP the conformance
        # suite's tiny stream then ends its last task under the learning bar (0.55 against 0.6)
        keep_optimizer_state=False,
    ),
    MethodSpec(
        "dare",
        "fusion",
        "DARE: drop 30% of each task vector (seeded), rescale, add 0.2 x the sum.",
        lambda: [WeightMerging(mode="dare", scale=0.2, drop_prob=0.3)],
    ),
    MethodSpec(
        "fisher_merge",
        "fusion",
        "Fisher merging: the Fisher-weighted mean of the task vectors, with EWC's Fisher (no penalty).",
        lambda: [EWC(lambda_=0.0), WeightMerging(mode="fisher")],
    ),
]


def registry() -> dict[str, MethodSpec]:
    """Every cataloged method by name, baselines first.

    >>> list(registry())[:3]
    ['naive', 'joint', 'ewc']
    """
    names = [spec.name for spec in METHODS]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise RuntimeError(f"Method names cataloged twice: {duplicated}.")
    return {spec.name: spec for spec in METHODS}
