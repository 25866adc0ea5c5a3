"""The layer a closed-form head puts in place of the model's head: its weights are computed, not trained."""

import torch
from torch import Tensor, nn
from typing_extensions import override


class ClosedFormClassifier(nn.Module):
    """A classifier layer whose weights are computed, not trained; it takes the place of the model's head.

    Until a class is fitted it is the layer it replaced (``original``): the model predicts as before, and a
    first task can train the backbone through it (adapt once). From then on it scores with its closed-form
    weights, in float32 outside autocast; classes not seen yet score the lowest finite value. ``original``
    stays in the model (and its checkpoint), unused. Its weights are buffers, so they are in the model's
    ``state_dict``; subclasses say how to score.
    """

    def __init__(self, original: nn.Module, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.original = original
        self.in_features, self.num_classes = in_features, num_classes
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @property
    def fitted(self) -> bool:
        """Whether any class has been fitted (before that, the layer is ``original``)."""
        return bool(self.seen.any())

    def scores(self, features: Tensor) -> Tensor:
        """The closed-form scores ``[..., num_classes]`` of float32 ``features``."""
        raise NotImplementedError

    @override
    def forward(self, features: Tensor) -> Tensor:
        if not self.fitted:
            return self.original(features)
        with torch.autocast(features.device.type, enabled=False):
            scores = self.scores(features.float())
        return scores.masked_fill(~self.seen, torch.finfo(scores.dtype).min)

    @override
    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"
