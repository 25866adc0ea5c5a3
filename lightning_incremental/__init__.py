"""lightning-incremental: continual learning as drop-in callbacks for PyTorch Lightning."""

from lightning_incremental.core import ContinualCallback
from lightning_incremental.evaluation import ContinualEvaluation, ContinualResult
from lightning_incremental.models import MLPClassifier
from lightning_incremental.training import fit_tasks, load_task_checkpoint

__version__ = "0.1.0"

__all__ = [
    "ContinualCallback",
    "ContinualEvaluation",
    "ContinualResult",
    "MLPClassifier",
    "fit_tasks",
    "load_task_checkpoint",
]
