"""Step time of the replay methods over naive fine-tuning, and the replay buffer's own cost.

    python benchmarks/timing/replay_overhead.py [--repeats 7] [--steps 40]

1. MLP 784-1000-1000-10: the median time of a training step on the second task (the buffer is full) for
   ExperienceReplay on batches of 128 new + 128 replayed rows, against naive fine-tuning on batches of 256
   rows — the same number of samples per step — measured interleaved in one run, printed as ratios. DER
   (128 + a replay forward of 128), DER++ (two replay forwards) and A-GEM (a reference gradient on 64 rows)
   are printed against naive fine-tuning on batches of 128, their inherent extra compute shown beside.
2. The library's machinery against a plain Lightning step on the same rows: ExperienceReplay (128 new + 128
   replayed) against ``plain step``, a LightningModule whose own ``training_step`` appends a fixed block of 128
   rows sampled once beforehand — the same 256 rows of compute per step, so the ratio isolates what the library
   adds (the step chain, the buffer sample and the batch rebuild). Measured on the MLP and on a tiny MLP
   (32-32-10, batch 32 + 32 replayed), where Lightning's own per-step cost dominates.
3. The buffer alone: the median time to insert a batch of 128 rows and to draw a replay sample of 128 rows
   from a full buffer of 1,000 rows, as a fraction of the naive step on 256 rows.

All three go to the section "Replay machinery overhead" of benchmarks/RESULTS.md.
"""

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

import torch
from harness import MLP, Workload, compare, ratio_table, time_steps, timing_args
from lightning.pytorch import LightningModule
from sections import publish
from torch import Tensor

from lightning_incremental import MLPClassifier
from lightning_incremental.buffers import ReplayBuffer
from lightning_incremental.methods.replay import AGEM, DER, ExperienceReplay

BUFFER = 1000
TINY = Workload("tiny MLP 32-32-10, batch 32", lambda: MLPClassifier(32, 10, hidden=(32,)), (32,), batch_size=32)


def plain_step_model(workload: Workload, rows: int) -> Callable[[], LightningModule]:
    """A builder of the workload's model whose own ``training_step`` appends ``rows`` fixed rows to every batch."""

    def build() -> LightningModule:
        model = workload.build_model()
        block = next(iter(workload.loader(task=7, n_batches=1, batch_size=rows)))
        original = model.training_step

        def training_step(batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            return original((torch.cat([x, block[0]]), torch.cat([y, block[1]])), batch_idx)

        model.training_step = training_step
        return model

    return build


def machinery(workload: Workload, replayed: int, repeats: int, steps: int) -> dict[str, float]:
    """Median step time of the plain step on the same rows and of ExperienceReplay, measured interleaved."""
    plain = Workload(workload.name, plain_step_model(workload, replayed), workload.input_shape, 10, workload.batch_size)
    samples: dict[str, list[float]] = {"plain step": [], "replay": []}
    for _ in range(repeats):
        samples["plain step"].append(time_steps(plain, lambda: [], steps=steps))
        samples["replay"].append(
            time_steps(
                workload, lambda: [ExperienceReplay(buffer_size=BUFFER, replay_batch_size=replayed)], steps=steps
            )
        )
    return {name: statistics.median(values) for name, values in samples.items()}


def buffer_costs(repeats: int = 200) -> tuple[float, float]:
    """Median seconds to insert 128 MLP rows into, and to sample 128 rows from, a full reservoir buffer."""
    buffer = ReplayBuffer(BUFFER, seed=0)
    inputs, labels = torch.randn(128, 784), torch.randint(0, 10, (128,))
    for _ in range(BUFFER // 128 + 1):
        buffer.add([inputs, labels], groups=None)
    inserts, samples = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.add([inputs, labels], groups=None)
        inserts.append(time.perf_counter() - started)
        started = time.perf_counter()
        buffer.sample(128)
        samples.append(time.perf_counter() - started)
    return statistics.median(inserts), statistics.median(samples)


def main() -> None:
    args = timing_args(__doc__)
    repeats = f"median of {args.repeats} interleaved repeats, buffer of {BUFFER} rows"
    same_samples = compare(
        MLP,
        {"naive": lambda: [], "replay": lambda: [ExperienceReplay(buffer_size=BUFFER, replay_batch_size=128)]},
        repeats=args.repeats,
        steps=args.steps,
        batch_sizes={"naive": 256},
    )
    lines = ratio_table(
        f"{MLP.name}: replay (128 new + 128 replayed) vs naive on 256 rows per step; {repeats}.", same_samples
    )

    extra_compute = compare(
        MLP,
        {
            "naive": lambda: [],
            "der": lambda: [DER(buffer_size=BUFFER)],
            "derpp": lambda: [DER(buffer_size=BUFFER, beta=0.5)],
            "agem": lambda: [AGEM(buffer_size=BUFFER, replay_batch_size=64)],
        },
        repeats=args.repeats,
        steps=args.steps,
    )
    lines += ratio_table(
        f"{MLP.name}: DER, DER++, A-GEM vs naive on the same 128 new rows per step; {repeats}.", extra_compute
    )

    for workload, replayed in ((MLP, 128), (TINY, 32)):
        medians = machinery(workload, replayed, args.repeats, args.steps)
        lines += ratio_table(
            f"{workload.name}: replay ({workload.batch_size} new + {replayed} replayed) vs a plain step on the same "
            f"rows; {repeats}.",
            medians,
            reference="plain step",
        )

    insert, sample = buffer_costs()
    step = same_samples["naive"]
    lines += [
        f"The buffer alone: insert 128 rows {insert * 1e3:.3f} ms, sample 128 rows {sample * 1e3:.3f} ms; "
        f"{(insert + sample) / step:.3f} of the naive 256-row step.",
    ]
    publish(args.results, "Replay machinery overhead", lines)


if __name__ == "__main__":
    main()
