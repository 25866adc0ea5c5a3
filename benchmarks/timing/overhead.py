"""Step time of the regularization methods over naive fine-tuning, and the cost of EWC's Fisher.

    python benchmarks/timing/overhead.py [--repeats 7] [--steps 40]

1. For the MLP 784-1000-1000-10 and the small CNN, batch 128: the median time of a training step on the
   second task (the penalty is active) for naive, EWC, online EWC, SI, MAS and L2Anchor, measured
   interleaved in one run, printed with the ratio over naive.
2. The time EWC takes to estimate the Fisher over 1,000 samples, over the time of one training epoch on
   the same 1,000 samples (batch 125), for both models.

Both go to the section "Regularization step time over naive fine-tuning" of benchmarks/RESULTS.md.
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

import lightning as L
from harness import CNN, MLP, QUIET, Workload, compare, ratio_table, timing_args
from sections import publish

from lightning_incremental.methods.regularization import EWC, MAS, SI, L2Anchor

METHODS = {
    "naive": lambda: [],
    "ewc": lambda: [EWC()],
    "online_ewc": lambda: [EWC(mode="online", decay=0.9)],
    "si": lambda: [SI()],
    "mas": lambda: [MAS()],
    "l2": lambda: [L2Anchor()],
}


class _FisherOnly(EWC):
    """EWC whose task end only times the Fisher estimate."""

    seconds: float = 0.0

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        started = time.perf_counter()
        self.estimate_importance(trainer, pl_module)
        self.seconds = time.perf_counter() - started


def fisher_over_epoch(workload: Workload, repeats: int) -> tuple[float, float]:
    """Median seconds of (one epoch over 1,000 samples, the Fisher over the same 1,000 samples)."""
    epochs, fishers = [], []
    for _ in range(repeats):
        L.seed_everything(0, verbose=False)
        model, ewc = workload.build_model(), _FisherOnly()
        loader = workload.loader(0, n_batches=8, batch_size=125)  # 1,000 samples
        started = time.perf_counter()
        trainer = L.Trainer(max_epochs=1, callbacks=[ewc], **QUIET)
        trainer.fit(model, loader)
        epochs.append(time.perf_counter() - started - ewc.seconds)
        fishers.append(ewc.seconds)
    return statistics.median(epochs), statistics.median(fishers)


def main() -> None:
    args = timing_args(__doc__)
    lines = []
    for workload in (MLP, CNN):
        medians = compare(workload, METHODS, repeats=args.repeats, steps=args.steps)
        title = f"Step time on the second task, {workload.name}, median of {args.repeats} interleaved repeats."
        lines += ratio_table(title, medians)
    lines += [
        "EWC's Fisher over 1,000 samples against one training epoch on them (batch 125), median of 3.",
        "",
        "| model | epoch (s) | Fisher (s) | ratio |",
        "|---|---|---|---|",
    ]
    for workload in (MLP, CNN):
        epoch, fisher = fisher_over_epoch(workload, repeats=3)
        lines.append(f"| {workload.name} | {epoch:.3f} | {fisher:.3f} | {fisher / epoch:.2f} |")
    publish(args.results, "Regularization step time over naive fine-tuning", lines)


if __name__ == "__main__":
    main()
