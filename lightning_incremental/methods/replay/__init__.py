"""Replay methods: keep a small memory of earlier data and train on it alongside the new data.

They share :class:`~lightning_incremental.buffers.ReplayBuffer` and the DDP-global buffer of
``_base.ReplayMethod``: ExperienceReplay extends the user's batch, DER/DER++ add a logit-matching term,
A-GEM projects the gradient. ICaRL keeps herding-selected exemplars of its own and classifies by the nearest
mean of exemplars.
"""

from lightning_incremental.methods.replay.agem import AGEM
from lightning_incremental.methods.replay.der import DER
from lightning_incremental.methods.replay.experience_replay import ExperienceReplay
from lightning_incremental.methods.replay.icarl import ICaRL

__all__ = ["AGEM", "DER", "ExperienceReplay", "ICaRL"]
