"""Step time of training only the head (FreezeLayers) against full fine-tuning.

    python benchmarks/timing/freeze_overhead.py [--repeats 7] [--steps 40]

MLP 784-1000-1000-10, batch 128: the median time of a training step on the second task, measured
interleaved in one run, for

- ``naive``: full fine-tuning, every layer trains;
- ``head only``: ``FreezeLayers(train_last=1, from_task=1)``: the first task trains every layer, the timed
  second task only the last Linear layer (no backward through the two hidden layers, an Adam step over
  the head alone);
- ``freeze inactive``: ``FreezeLayers(train_last=1, from_task=2)``: the callback is there but the timed task
  is before ``from_task``, so every layer trains: the callback's own cost.

The target: the head-only step is faster than full fine-tuning, and the inactive callback costs nothing. The table goes
to the section "Training only the head" of benchmarks/RESULTS.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

from harness import MLP, compare, ratio_table, timing_args
from sections import publish

from lightning_incremental.methods.partial import FreezeLayers


def main() -> None:
    args = timing_args(__doc__)
    medians = compare(
        MLP,
        {
            "naive": lambda: [],
            "head only": lambda: [FreezeLayers(train_last=1, from_task=1)],
            "freeze inactive": lambda: [FreezeLayers(train_last=1, from_task=2)],
        },
        repeats=args.repeats,
        steps=args.steps,
    )
    title = f"Step time on the second task, {MLP.name}, median of {args.repeats} interleaved repeats."
    publish(args.results, "Training only the head", ratio_table(title, medians))


if __name__ == "__main__":
    main()
