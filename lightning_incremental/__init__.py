"""lightning-incremental: continual learning as drop-in callbacks for PyTorch Lightning.

Every method, head and tool is importable from here, as Lightning's own callbacks are from
``lightning.pytorch.callbacks``; the code lives in ``lightning_incremental.methods.<family>``.
"""

from lightning_incremental.buffers import ReplayBuffer
from lightning_incremental.core import ContinualCallback, ModelInterface, TaskCheckpoint
from lightning_incremental.evaluation import ContinualEvaluation, ContinualResult
from lightning_incremental.generative import (
    CandidateLikelihood,
    GreedyExactMatch,
    candidate_item,
    collate_candidates,
    collate_generation,
    collate_instructions,
    generation_item,
    instruction_item,
)
from lightning_incremental.heads import GrowHeads, IncrementalClassifier, MultiHeadClassifier
from lightning_incremental.methods.distillation import LwF
from lightning_incremental.methods.fusion import WeightMerging
from lightning_incremental.methods.partial import FreezeLayers, LoRA
from lightning_incremental.methods.pretrained import PrototypeHead, RanPACHead
from lightning_incremental.methods.regularization import EWC, MAS, SI, L2Anchor
from lightning_incremental.methods.replay import AGEM, DER, ExperienceReplay, ICaRL
from lightning_incremental.models import MLPClassifier
from lightning_incremental.optimizer_state import KeepOptimizerState
from lightning_incremental.training import fit_tasks, load_task_checkpoint

__version__ = "0.1.0"

__all__ = [
    "AGEM",
    "DER",
    "EWC",
    "MAS",
    "SI",
    "CandidateLikelihood",
    "ContinualCallback",
    "ContinualEvaluation",
    "ContinualResult",
    "ExperienceReplay",
    "FreezeLayers",
    "GreedyExactMatch",
    "GrowHeads",
    "ICaRL",
    "IncrementalClassifier",
    "KeepOptimizerState",
    "L2Anchor",
    "LoRA",
    "LwF",
    "MLPClassifier",
    "ModelInterface",
    "MultiHeadClassifier",
    "PrototypeHead",
    "RanPACHead",
    "ReplayBuffer",
    "TaskCheckpoint",
    "WeightMerging",
    "candidate_item",
    "collate_candidates",
    "collate_generation",
    "collate_instructions",
    "fit_tasks",
    "generation_item",
    "instruction_item",
    "load_task_checkpoint",
]
