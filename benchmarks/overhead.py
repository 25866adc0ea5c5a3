"""Step time of the regularization methods over naive fine-tuning, and the cost of EWC's Fisher.

    python benchmarks/overhead.py [--repeats 7] [--steps 40]

1. For the MLP 784-1000-1000-10 and the small CNN, batch 128: the median time of a training step on the
   second task (the penalty is active) for naive, EWC, online EWC, SI, MAS and L2Anchor, measured
   interleaved in one run, printed with the ratio over naive.
2. The time EWC takes to estimate the Fisher over 1,000 samples, over the time of one training epoch on
   the same 1,000 samples (batch 128), for both models.
"""

import statistics
import time

import lightning as L
from harness import CNN, MLP, QUIET, Workload, compare, print_ratios, timing_args

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
    for workload in (MLP, CNN):
        medians = compare(workload, METHODS, repeats=args.repeats, steps=args.steps)
        print_ratios(f"step time on the second task, {workload.name}", medians)
    print("\nFisher estimation over 1,000 samples vs one training epoch on them (batch 125)")
    for workload in (MLP, CNN):
        epoch, fisher = fisher_over_epoch(workload, repeats=3)
        print(f"{workload.name:<36} epoch {epoch:.3f} s  fisher {fisher:.3f} s  ratio {fisher / epoch:.2f}")


if __name__ == "__main__":
    main()
