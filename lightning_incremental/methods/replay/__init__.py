"""Replay methods: keep a small memory of earlier data and train on it alongside the new data.

They share :class:`~lightning_incremental.buffers.ReplayBuffer` and the DDP-global buffer of
``_base.ReplayMethod``: ExperienceReplay extends the user's batch, DER/DER++ add a logit-matching term,
A-GEM projects the gradient. ICaRL keeps herding-selected exemplars of its own and classifies by the nearest
mean of exemplars.
"""

from lightning_incremental.methods.registry import MethodSpec
from lightning_incremental.methods.replay.agem import AGEM
from lightning_incremental.methods.replay.der import DER
from lightning_incremental.methods.replay.experience_replay import ExperienceReplay
from lightning_incremental.methods.replay.icarl import ICaRL

METHODS = [
    MethodSpec(
        "replay", "replay", "Experience replay from a class-balanced 200-sample buffer.", lambda s: [ExperienceReplay()]
    ),
    MethodSpec("der", "replay", "Dark Experience Replay: match the stored logits of 200 samples.", lambda s: [DER()]),
    MethodSpec(
        "derpp", "replay", "DER++: stored logits and labels of 200 samples.", lambda s: [DER(alpha=0.3, beta=1.0)]
    ),
    MethodSpec("agem", "replay", "A-GEM: project updates that would raise the memory's loss.", lambda s: [AGEM()]),
    MethodSpec(
        "icarl",
        "replay",
        "iCaRL: 200 herding exemplars, distillation, nearest-mean-of-exemplars prediction.",
        lambda s: [ICaRL()],
    ),
]

__all__ = ["AGEM", "DER", "METHODS", "ExperienceReplay", "ICaRL"]
