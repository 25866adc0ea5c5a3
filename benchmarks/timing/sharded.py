"""Method state and step time on a sharded model: FSDP2 under ModelParallelStrategy on 2 CPU processes.

    python benchmarks/timing/sharded.py [--quick] [--seeds 3] [--repeats 5] [--steps 50]

1. State bytes per parameter: every cataloged method trains 2 tasks of the digits split on the reference MLP
   (64-256-256-10) once in a plain single process (1 rank) and once ``fully_shard``-ed under
   ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` on 2 processes; then the bytes of every
   tensor reachable from the method's callbacks (a ``DTensor`` counted as its local shard, each storage once, storage
   shared with the model's own parameters, buffers and gradients left out) over the model's full parameter count.
2. Low-precision state: the same bytes for EWC, SI, MAS and L2Anchor with ``state_dtype=torch.bfloat16``, and the final
   average accuracy of EWC, SI and MAS, fp32 and bf16 state, on the reference protocol's permuted digits.
3. Step time: the median step of the second task on an MLP 784-1024-1024-1024-10 (batch 128 a rank, random data),
   sharded on 2 processes, with EWC, SI, MAS and L2Anchor against a plain sharded step, interleaved repeats.
4. A 7B model on 8 ranks: the GiB a rank would hold for each method's state, projected from the bytes counted on
   1 and 2 ranks.

All of it goes to the section "Sharded models (FSDP2 on 2 CPU processes)" of benchmarks/RESULTS.md.
"""

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

import lightning as L
import torch
from harness import QUIET, StepTimer, quiet_benchmark
from lightning.pytorch import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from sections import add_results_argument, publish
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_incremental.catalog import MethodSpec, registry
from lightning_incremental.core.optimizer_state import CarriedOptimizerState
from lightning_incremental.experiment import make_stream, reference_model, run_method
from lightning_incremental.methods.regularization import EWC, MAS, SI, L2Anchor
from lightning_incremental.models import MLPClassifier
from lightning_incremental.scenarios import Task, TaskStream

HEADING = "Sharded models (FSDP2 on 2 CPU processes)"
RANKS = 2
GIB = 2**30
PARAMS_7B, RANKS_7B = 7e9, 8
MODEL_BYTES_PER_PARAM = 16  # fp32 weights 4 + gradients 4 + Adam's two moments 8
TARGET_STATE_RATIO, TARGET_STEP_RATIO = 0.55, 1.10
LOW_PRECISION = {  # name -> the method with its state in bfloat16 (the catalog's entry of the same name in fp32)
    "ewc": lambda: [EWC(state_dtype=torch.bfloat16)],
    "si": lambda: [SI(state_dtype=torch.bfloat16)],
    "mas": lambda: [MAS(state_dtype=torch.bfloat16)],
    "l2": lambda: [L2Anchor(state_dtype=torch.bfloat16)],
}
ACCURACY_METHODS = ["ewc", "si", "mas"]
TIMED = {
    "plain": lambda: [],
    "ewc": lambda: [EWC()],
    "si": lambda: [SI()],
    "mas": lambda: [MAS()],
    "l2": lambda: [L2Anchor()],
}
# the 7B projection: (row, catalog entry whose state it is)
PROJECTED = [
    ("EWC", "ewc"),
    ("SI", "si"),
    ("MAS", "mas"),
    ("L2Anchor", "l2"),
    ("LwF", "lwf"),
    ("WeightMerging (interpolate)", "merge"),
    ("WeightMerging (task_arithmetic)", "task_arithmetic"),
]


def low_precision_specs() -> list[MethodSpec]:
    return [MethodSpec(f"{name}_bf16", "regularization", "", build) for name, build in LOW_PRECISION.items()]


# ---------------------------------------------------------------------------------------------------- the state's bytes
# objects whose tensors are not the method's state: the data, the Trainer and what the model owns
_SKIPPED = (
    Dataset,
    DataLoader,
    Task,
    TaskStream,
    L.Trainer,
    torch.optim.Optimizer,
    DeviceMesh,
    torch.Generator,
    weakref.ref,
    type,
    types.ModuleType,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
)


def _storages_of(model: nn.Module) -> set[int]:
    """The storages of the model's own parameters, buffers and gradients (their local shards)."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    return {_local(t).untyped_storage().data_ptr() for t in tensors}


def _local(tensor: Tensor) -> Tensor:
    if isinstance(tensor, DTensor):
        with torch.no_grad():
            return tensor.to_local()
    return tensor


def state_bytes(callbacks: list[Callback], model: nn.Module) -> dict[tuple[str, str], int]:
    """The bytes of every tensor reachable from ``callbacks``, by where it was first found (``EWC.importance``,
    ``LwF.old._shards``; ``optimizer state`` for a ``CarriedOptimizerState``'s) and its dtype (``"float32"``).

    Walks attributes (objects' ``__dict__``, dicts, lists, tuples, sets) recursively; a ``DTensor`` counts as its local
    shard; each storage counts once, whole; storage shared with ``model``'s parameters, buffers and gradients does not
    count, nor does anything the model, its submodules, the Trainer, an optimizer or a dataset holds.
    """
    model_storages = _storages_of(model)
    skipped_ids = {id(m) for m in model.modules()}
    seen_objects: set[int] = set()
    seen_storages: set[int] = set()
    found: dict[tuple[str, str], int] = {}
    for callback in callbacks:
        stack: list[tuple[Any, str, bool]] = [(callback, type(callback).__name__, False)]
        while stack:
            obj, path, optimizer = stack.pop()
            if id(obj) in seen_objects or id(obj) in skipped_ids or isinstance(obj, _SKIPPED):
                continue
            seen_objects.add(id(obj))
            if isinstance(obj, Tensor):
                tensor = _local(obj)
                if tensor.device.type == "meta":
                    continue
                storage = tensor.untyped_storage()
                pointer = storage.data_ptr()
                if pointer in model_storages or pointer in seen_storages or storage.nbytes() == 0:
                    continue
                seen_storages.add(pointer)
                where = ("optimizer state" if optimizer else path, str(tensor.dtype).removeprefix("torch."))
                found[where] = found.get(where, 0) + storage.nbytes()
                continue
            optimizer = optimizer or isinstance(obj, CarriedOptimizerState)
            if isinstance(obj, dict):
                children = [(value, path) for value in obj.values()]
            elif isinstance(obj, list | tuple | set | frozenset):
                children = [(value, path) for value in obj]
            elif hasattr(obj, "__dict__") and not isinstance(obj, str | bytes | int | float | bool):
                # an object: the path names its attributes, two levels deep (``LwF.old._shards``)
                depth = path.count(".")
                children = [
                    (value, f"{path}.{name}" if depth < 2 else path)
                    for name, value in vars(obj).items()
                    if not isinstance(value, str | bytes | int | float | bool | type(None))
                ]
            else:
                continue
            stack += [(child, child_path, optimizer) for child, child_path in reversed(children)]
    return found


def parameter_count(model: nn.Module) -> int:
    """The model's parameters, whole (a sharded parameter's ``numel`` is its full size)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------- the runs
def sharding() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=RANKS, tensor_parallel_size=1)


def trainer(sharded: bool, epochs: int, callbacks: list[Callback]) -> L.Trainer:
    placement = {"strategy": sharding(), "devices": RANKS} if sharded else {"devices": 1}
    return L.Trainer(max_epochs=epochs, callbacks=callbacks, **placement, **QUIET)


class _Probe(Callback):
    """The bytes of ``methods``' state at the last training step of a fit (before the task end's work)."""

    def __init__(self, methods: list[Callback]) -> None:
        self.methods = methods
        self.found: dict[tuple[str, str], int] | None = None  # None: no step in the fit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1 and batch_idx == trainer.num_training_batches - 1:
            self.found = state_bytes(self.methods, pl_module)


def state_run(spec: MethodSpec, stream: TaskStream, epochs: int, sharded: bool) -> dict[str, Any]:
    """Every task of ``stream`` with fresh callbacks of ``spec`` on the reference MLP: the state they hold at the last
    step of the last task (``during``) and the state they end with (``bytes``), and the model's parameter count before
    any method changed it (LoRA's adapters are the model's parameters once injected)."""
    L.seed_everything(0, verbose=False)
    model, methods = reference_model(stream), spec.callbacks()
    params, probe = parameter_count(model), _Probe(methods)
    tasks = list(stream.cumulative() if spec.cumulative else stream)
    for index, task in enumerate(tasks):
        callbacks = [*methods, probe] if index == len(tasks) - 1 else methods
        trainer(sharded, epochs, callbacks).fit(model, DataLoader(task.train, batch_size=32, shuffle=False))
    return {"bytes": state_bytes(methods, model), "during": probe.found, "params": params}


def state_runs(stream: TaskStream, epochs: int, sharded: bool) -> dict[str, dict[str, Any]]:
    specs = [*registry().values(), *low_precision_specs()]
    found = {}
    for spec in specs:
        started = time.perf_counter()
        found[spec.name] = state_run(spec, stream, epochs, sharded)
        if not sharded or int(os.environ.get("RANK", 0)) == 0:
            total = sum(found[spec.name]["bytes"].values()) / found[spec.name]["params"]
            where = f"{RANKS} ranks" if sharded else "1 rank"
            print(f"state {where:<8} {spec.name:<18} {total:7.2f} B/param  ({time.perf_counter() - started:.1f} s)")
    return found


def random_loader(task: int, rows: int, features: int, batch_size: int) -> DataLoader:
    generator = torch.Generator().manual_seed(task)
    inputs = torch.randn(rows, features, generator=generator)
    return DataLoader(TensorDataset(inputs, torch.randint(0, 10, (rows,), generator=generator)), batch_size=batch_size)


def timed_run(build: Callable[[], list[Callback]], sizes: dict[str, Any]) -> float:
    """Median seconds of a sharded training step of the second task (the first trains ``first_steps``)."""
    L.seed_everything(0, verbose=False)
    model, methods = MLPClassifier(sizes["features"], 10, hidden=sizes["hidden"]), build()
    batch, rows = sizes["batch"], RANKS * sizes["batch"]  # the sampler gives each rank its half of the rows
    trainer(True, 1, methods).fit(model, random_loader(0, rows * sizes["first_steps"], sizes["features"], batch))
    timer = StepTimer(sizes["warmup"])
    steps = sizes["warmup"] + sizes["steps"]
    trainer(True, 1, [*methods, timer]).fit(model, random_loader(1, rows * steps, sizes["features"], batch))
    return statistics.median(timer.durations)


def step_times(sizes: dict[str, Any], repeats: int) -> tuple[dict[str, list[float]], list[float]]:
    """Every configuration of :data:`TIMED`, interleaved ``repeats`` times, the order rotated by one place at every
    repeat (a process's first runs are slower; 5 repeats put each configuration once in each place), after one
    untimed warm-up run: its median step of each repeat; and the 1-minute load average after each repeat."""
    found: dict[str, list[float]] = {name: [] for name in TIMED}
    timed_run(TIMED["plain"], sizes)  # warm-up: the process's first run is slower
    names, loads = list(TIMED), []
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            found[name].append(timed_run(TIMED[name], sizes))
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"step time, repeat {repeat}: {name:<6} {found[name][-1] * 1e3:8.2f} ms", flush=True)
        loads.append(os.getloadavg()[0])
    return found, loads


# ---------------------------------------------------------------------------------------------------- the processes
def launch(worker: Callable[[int, Path], None], out_dir: Path, distributed: bool) -> None:
    """``worker(rank, out_dir)`` in 2 forked processes of one thread each; with ``distributed``, set up as torchrun
    sets up its workers (``ModelParallelStrategy`` joins their process group instead of starting processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def entry(rank: int) -> None:
        if distributed:
            os.environ.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                WORLD_SIZE=str(RANKS),
                NODE_RANK="0",
                LOCAL_RANK=str(rank),
                RANK=str(rank),
            )
        torch.set_num_threads(1)
        worker(rank, out_dir)

    torch.multiprocessing.start_processes(entry, nprocs=RANKS, start_method="fork")


def accuracy_jobs(seeds: int) -> list[tuple[str, str, int]]:
    return [(name, dtype, seed) for name in ACCURACY_METHODS for dtype in ("fp32", "bf16") for seed in range(seeds)]


def accuracy_run(name: str, dtype: str, seed: int, tasks: int, epochs: int) -> float:
    spec = registry()[name] if dtype == "fp32" else MethodSpec(name, "regularization", "", LOW_PRECISION[name])
    run = run_method(spec, make_stream("permuted", tasks, seed), epochs=epochs, seed=seed)
    return run.result.summary()["acc"]


# ---------------------------------------------------------------------------------------------------- the tables
def per_param(found: dict[str, Any], optimizer: bool | None = None, key: str = "bytes") -> float:
    """Bytes per parameter at the end (``key="bytes"``) or at the last step of the last task (``"during"``): all of
    them, only the carried optimizer state's (``optimizer=True``) or all but it (``False``)."""
    total = sum(
        size
        for (where, _), size in found[key].items()
        if optimizer is None or (where == "optimizer state") == optimizer
    )
    return total / found["params"]


def holds(found: dict[str, Any], limit: int = 3, dtype: str | None = None) -> str:
    """The largest parts of a state (of ``dtype``, or all): ``importance 4.00, anchor 4.00``."""
    parts: dict[str, int] = {}
    for (where, kind), size in found["bytes"].items():
        if dtype is None or kind == dtype:
            parts[where] = parts.get(where, 0) + size
    shown = [
        f"{where.split('.', 1)[-1]} {size / found['params']:.2f}"
        for where, size in sorted(parts.items(), key=lambda item: -item[1])[:limit]
        if size / found["params"] >= 0.005
    ]
    return ", ".join(shown) if shown else "—"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def state_table(single: dict, ranks: list[dict], epochs: int) -> list[str]:
    params = next(iter(single.values()))["params"]
    lines = [
        f"Bytes of state per parameter after 2 tasks of the digits split ({epochs} epoch(s) a task, batch 32 a rank) "
        f"on the reference MLP 64-256-256-10 ({params:,} parameters): every tensor reachable from the method's "
        "callbacks, a DTensor as its local shard, each storage once, without the storage of the model's own "
        "parameters, buffers and gradients, nor the data the callbacks refer to; a rank's bytes over the model's "
        f"full parameter count. 1 rank: a plain single process, the model unsharded. {RANKS} ranks: the model "
        f"`fully_shard`-ed under `ModelParallelStrategy(data_parallel_size={RANKS}, tensor_parallel_size=1)`. The "
        "carried optimizer state (Adam's moments, kept between tasks by the method or by the entry's "
        '`KeepOptimizerState`) is in the totals and also shown alone. "While training": the same count at the last '
        'step of the second task, before its task end ("no step": the method takes none in that task). The last '
        "column names the largest parts at the end, 1 rank (B/param).",
        "",
        "| method | family | 1 rank | of it, carried optimizer state | 2 ranks: rank 0 | 2 ranks: rank 1 | "
        "rank 0 / 1 rank | while training: 1 rank | while training: rank 0 | largest parts (1 rank) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec in registry().values():
        one, zero, other = single[spec.name], ranks[0][spec.name], ranks[1][spec.name]
        total = per_param(one)
        ratio = f"{per_param(zero) / total:.3f}" if total > 0 else "—"
        if one["during"] is not None and zero["during"] is not None:
            during = f"{per_param(one, key='during'):.3f} | {per_param(zero, key='during'):.3f}"
        else:
            during = "no step | no step"
        lines.append(
            f"| {spec.name} | {spec.family} | {total:.3f} | {per_param(one, optimizer=True):.3f} | "
            f"{per_param(zero):.3f} | {per_param(other):.3f} | {ratio} | {during} | {holds(one)} |"
        )
    return [*lines, "", *state_reading(single, ranks)]


def state_reading(single: dict, ranks: list[dict]) -> list[str]:
    ratios = {
        name: per_param(ranks[0][name]) / per_param(single[name]) for name in ("ewc", "ewc_separate", "si", "mas")
    }
    met = all(ratio <= TARGET_STATE_RATIO for ratio in ratios.values())
    listed = ", ".join(f"{name} {ratio:.3f}" for name, ratio in ratios.items())
    spread = max(
        abs(per_param(ranks[0][name]) - per_param(ranks[1][name])) / per_param(ranks[0][name])
        for name in single
        if per_param(ranks[0][name]) > 0
    )
    replay = [spec.name for spec in registry().values() if spec.family == "replay"]

    def buffer_bytes(found: dict[str, Any]) -> int:
        return sum(size for (where, _), size in found["bytes"].items() if ".buffer" in where)

    rows = ", ".join(f"{name} {buffer_bytes(single[name]) / 1024:.0f} KiB" for name in replay)
    shares = [buffer_bytes(ranks[0][name]) / buffer_bytes(single[name]) for name in replay]
    above = sorted(
        name
        for name in single
        if per_param(single[name]) > 0 and per_param(ranks[0][name]) / per_param(single[name]) > TARGET_STATE_RATIO
    )
    lines = [
        f"Rank 0 holds, of the single process's bytes: {listed} (target ≤ {TARGET_STATE_RATIO} for EWC, SI and MAS: "
        f"{'met' if met else 'NOT met'}). Rank 1 holds within {spread * 100:.1f}% of rank 0's bytes for every method. "
        f"Above {TARGET_STATE_RATIO}: "
        + (", ".join(f"{name} (largest parts: {holds(single[name], limit=2)})" for name in above) or "none")
        + ".",
        "",
        "The replay methods' buffers hold rows with their labels (and DER's logits), not state per parameter; a "
        f"buffer's bytes at 1 rank: {rows}; rank 0 holds {min(shares):.2f}–{max(shares):.2f}x of them. "
        "They are counted per parameter only to sit in the same table.",
        "",
    ]
    return lines


def low_precision_table(single: dict, ranks: list[dict], accuracy: dict, seeds: int, protocol: str) -> list[str]:
    lines = [
        "Bytes of state per parameter (as above, at the end, without the carried optimizer state, which `state_dtype` "
        "does not touch) with `state_dtype=torch.bfloat16` against the fp32 default, and the final average accuracy "
        f"on permuted digits, {protocol} (mean ± std over seeds 0 … {seeds - 1}; each seed's stream and "
        "initialisation the same for both dtypes). L2Anchor: bytes only.",
        "",
        "| method | state | 1 rank | 2 ranks: rank 0 | rank 0 / 1 rank | permuted digits: avg acc | "
        "bf16 − fp32 (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    readings = []
    for name in LOW_PRECISION:
        found = {"fp32": name, "bf16": f"{name}_bf16"}
        acc = {
            dtype: [accuracy[(name, dtype, seed)] for seed in range(seeds)] if name in ACCURACY_METHODS else []
            for dtype in found
        }
        for dtype, key in found.items():
            one, zero = per_param(single[key], False), per_param(ranks[0][key], False)
            acc_cell, diff_cell = "—", ""
            if acc[dtype]:
                acc_cell = "{:.3f} ± {:.3f}".format(*mean_std(acc[dtype]))
                if dtype == "bf16":
                    diff_cell = f"{(statistics.mean(acc['bf16']) - statistics.mean(acc['fp32'])) * 100:+.1f}"
            lines.append(f"| {name} | {dtype} | {one:.3f} | {zero:.3f} | {zero / one:.3f} | {acc_cell} | {diff_cell} |")
        reading = f"{name} {per_param(single[found['bf16']], False) / per_param(single[name], False):.2f}x the bytes"
        if acc["fp32"]:
            diff = (statistics.mean(acc["bf16"]) - statistics.mean(acc["fp32"])) * 100
            std = max(mean_std(acc["fp32"])[1], mean_std(acc["bf16"])[1]) * 100
            reading += f", {diff:+.1f} points (std up to {std:.1f})"
        readings.append(reading)
    fp32 = {
        name: holds(
            {
                **single[f"{name}_bf16"],
                "bytes": {
                    key: size for key, size in single[f"{name}_bf16"]["bytes"].items() if key[0] != "optimizer state"
                },
            },
            limit=6,
            dtype="float32",
        )
        for name in LOW_PRECISION
    }
    lines += [
        "",
        "bf16 state against fp32: " + "; ".join(readings) + ". What stays fp32 under `state_dtype=torch.bfloat16` "
        "(besides the carried optimizer state; B/param, 1 rank): "
        + "; ".join(f"{name}: {parts}" for name, parts in fp32.items())
        + ".",
        "",
    ]
    return lines


def step_table(steps: dict[str, list[float]], loads: list[float], sizes: dict[str, Any], quick: bool) -> list[str]:
    hidden = "-".join(str(h) for h in sizes["hidden"])
    repeats = len(steps["plain"])
    medians = {name: statistics.median(values) for name, values in steps.items()}
    lines = [
        f"A training step of the second task (after a first task of {sizes['first_steps']} steps, so that the "
        f"penalty is active), MLP {sizes['features']}-{hidden}-10 sharded on {RANKS} processes of one thread, batch "
        f"{sizes['batch']} a rank of random data: from `on_train_batch_start` to `on_train_batch_end` on rank 0, the "
        f"median of {sizes['steps']} steps after {sizes['warmup']} warm-up steps, then the median over {repeats} "
        f"interleaved repeats, after one untimed run, the order rotated at each repeat ({', '.join(TIMED)}; then "
        f"{', '.join([*list(TIMED)[1:], next(iter(TIMED))])}; …). Plain: the same sharded model and Trainer without a "
        "method. Each repeat's median in the order of the repeats.",
        "",
        "| configuration | ms/step | ratio over plain | each repeat (ms) |",
        "|---|---|---|---|",
    ]
    for name, median in medians.items():
        each = ", ".join(f"{value * 1e3:.1f}" for value in steps[name])
        lines.append(f"| {name} | {median * 1e3:.2f} | {median / medians['plain']:.3f} | {each} |")
    ewc = medians["ewc"] / medians["plain"]
    others = ", ".join(
        f"{name} {medians[name] / medians['plain']:.3f}x" for name in TIMED if name not in ("plain", "ewc")
    )
    spread = max((max(values) - min(values)) / statistics.median(values) for values in steps.values())
    lines += [
        "",
        f"EWC's sharded step takes {ewc:.3f}x the plain sharded step (target ≤ {TARGET_STEP_RATIO}: "
        f"{'met' if ewc <= TARGET_STEP_RATIO else 'NOT met'}); {others}. The repeats of one configuration spread by "
        f"up to {spread * 100:.0f}% of its median. The machine's 1-minute load average after each repeat: "
        f"{', '.join(f'{load:.1f}' for load in loads)} (this run's own 2 processes and their gloo threads make about "
        "2 to 3)." + (" A --quick run: a small model and 1 repeat, not a measurement." if quick else ""),
        "",
    ]
    return lines


def projected_gib(name: str, single: dict, ranks: list[dict], optimizer: bool) -> tuple[float, str]:
    """GiB a rank of 8 would hold for 7e9 parameters, and when (``"end"`` or ``"training"``): the part that halved
    from 1 to 2 ranks divided by 8, the part that did not kept whole (fitted to the two measurements, per rank:
    ``bytes(n) = replicated + sharded / n``); the larger of the state at the end and at the last step of the last
    task."""
    found = []
    for key, when in (("bytes", "end"), ("during", "training")):
        if single[name][key] is None or ranks[0][name][key] is None:
            continue
        one, two = per_param(single[name], optimizer, key), per_param(ranks[0][name], optimizer, key)
        sharded = max(0.0, 2 * (one - two))
        replicated = max(0.0, one - sharded)
        found.append(((replicated + sharded / RANKS_7B) * PARAMS_7B / GIB, when))
    return max(found, key=lambda item: item[0]) if found else (0.0, "end")


def projection_table(single: dict, ranks: list[dict]) -> list[str]:
    model_gib = MODEL_BYTES_PER_PARAM * PARAMS_7B / RANKS_7B / GIB
    params = next(iter(single.values()))["params"]
    lines = [
        f"GiB a rank would hold for a model of 7e9 parameters sharded on {RANKS_7B} ranks, from the bytes per "
        "parameter measured above: the part of a state that halved from 1 rank to 2 counts as sharded (divided by "
        f"{RANKS_7B}), a part that did not as whole on every rank (per rank `bytes(n) = replicated + sharded / n`, "
        'fitted to the 1- and 2-rank counts); the larger of the state at the end and while training ("when"). A '
        "method's own state, without the carried optimizer state, which has its own row (a method that carries it by "
        "default adds it). Beside them, the model's own sharded training state: fp32 weights 4 + gradients 4 + Adam "
        f"8 = {MODEL_BYTES_PER_PARAM} B/param.",
        "",
        "| state | B/param, 1 rank, fp32 | GiB per rank, fp32 | when | B/param, 1 rank, bf16 | GiB per rank, bf16 | "
        "fp32 GiB over the model's own |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for label, name in PROJECTED:
        gib, when = projected_gib(name, single, ranks, optimizer=False)
        key = "during" if when == "training" else "bytes"
        if name in LOW_PRECISION:
            bf16_gib, bf16_when = projected_gib(f"{name}_bf16", single, ranks, optimizer=False)
            bf16_key = "during" if bf16_when == "training" else "bytes"
            bf16 = f"{per_param(single[f'{name}_bf16'], False, bf16_key):.2f} | {bf16_gib:.2f}"
        else:
            bf16 = "— (no `state_dtype`) | —"
        rows.append((label, gib))
        lines.append(
            f"| {label} | {per_param(single[name], False, key):.2f} | {gib:.2f} | {when} | {bf16} | "
            f"{gib / model_gib:.2f} |"
        )
    carried, when = projected_gib("naive", single, ranks, optimizer=True)
    lines += [
        f"| carried optimizer state (Adam) | {per_param(single['naive'], True):.2f} | {carried:.2f} | {when} | — | — | "
        f"{carried / model_gib:.2f} |",
        f"| the model's own: weights, gradients, Adam | {MODEL_BYTES_PER_PARAM} | {model_gib:.2f} | — | — | — | 1.00 |",
    ]
    largest = max(rows, key=lambda row: row[1])
    lines += [
        "",
        f"Per rank of {RANKS_7B}, the largest method state here is {largest[0]}'s, {largest[1]:.2f} GiB "
        f"({largest[1] / model_gib:.2f}x the model's own {model_gib:.1f} GiB); the carried optimizer state adds "
        f"{carried:.2f} GiB to a method that carries it. Projections from the {params:,}-parameter MLP on {RANKS} CPU "
        "ranks, not measurements at 7B.",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, 1 seed, 1 repeat")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the accuracy runs (0 … seeds-1)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every timed configuration")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per repeat, after 5 warm-up steps")
    add_results_argument(parser)
    args = parser.parse_args()
    quiet_benchmark()
    started = time.perf_counter()
    seeds, repeats = (1, 1) if args.quick else (args.seeds, args.repeats)
    state_epochs = 1 if args.quick else 2
    accuracy_tasks, accuracy_epochs = (2, 1) if args.quick else (5, 10)
    sizes = {
        "features": 784,
        "hidden": (128, 128, 128) if args.quick else (1024, 1024, 1024),
        "batch": 128,
        "first_steps": 3 if args.quick else 10,
        "warmup": 2 if args.quick else 5,
        "steps": 5 if args.quick else args.steps,
    }
    state_stream = make_stream("split", n_tasks=2)
    out_dir = Path(tempfile.mkdtemp(prefix="sharded-benchmark-"))

    def sharded_worker(rank: int, out: Path) -> None:
        quiet_benchmark()
        found: dict[str, Any] = {"state": state_runs(state_stream, state_epochs, sharded=True)}
        found["steps"], found["load"] = step_times(sizes, repeats)
        torch.save(found, out / f"rank{rank}.pt")

    def accuracy_worker(rank: int, out: Path) -> None:
        quiet_benchmark()
        found = {}
        for job in accuracy_jobs(seeds)[rank::RANKS]:
            found[job] = accuracy_run(*job, tasks=accuracy_tasks, epochs=accuracy_epochs)
            print(f"accuracy {job[0]:<4} {job[1]} seed {job[2]}: {found[job]:.4f}", flush=True)
        torch.save(found, out / f"accuracy{rank}.pt")

    # the forks first, while this process has computed nothing; then the single-process runs here
    launch(sharded_worker, out_dir, distributed=True)
    ranks = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(RANKS)]
    launch(accuracy_worker, out_dir, distributed=False)
    accuracy: dict[tuple[str, str, int], float] = {}
    for rank in range(RANKS):
        accuracy.update(torch.load(out_dir / f"accuracy{rank}.pt", weights_only=False))
    single = state_runs(state_stream, state_epochs, sharded=False)
    states = [found["state"] for found in ranks]

    protocol = f"{accuracy_tasks} tasks of {accuracy_epochs} epoch(s)" + (
        "" if args.quick else ", the reference protocol"
    )
    lines = [
        "### State per parameter, per rank",
        "",
        *state_table(single, states, state_epochs),
        "### State in bfloat16",
        "",
        *low_precision_table(single, states, accuracy, seeds, protocol),
        "### Step time",
        "",
        *step_table(ranks[0]["steps"], ranks[0]["load"], sizes, args.quick),
        f"### A 7B model on {RANKS_7B} ranks (projected)",
        "",
        *projection_table(single, states),
        f"The whole run took {(time.perf_counter() - started) / 60:.1f} min.",
    ]
    publish(args.results, HEADING, lines)


if __name__ == "__main__":
    main()
