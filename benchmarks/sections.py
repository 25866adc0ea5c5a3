"""The sections of benchmarks/RESULTS.md: every script writes its own section, and only its own.

A section is a ``## `` heading and every line up to the next ``## `` heading (its ``### `` subsections included) or
the end of the file. :func:`write_section` replaces the one section with the given heading and leaves every other
byte of the file as it was; a heading not yet in the file is appended at the end. ``benchmarks/README.md`` lists which
script writes which section.
"""

import argparse
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import date
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def replace_section(document: str, heading: str, lines: Sequence[str]) -> str:
    """``document`` with the section ``## {heading}`` holding ``lines``, every other section unchanged.

    A replaced section keeps its place and the blank line before the next heading; a new one is appended after a
    blank line. The section ends with one newline, and ``lines`` lose their leading and trailing blank lines.
    """
    title = f"## {heading}"
    section = f"{title}\n\n" + "\n".join(lines).strip("\n") + "\n"
    rows = document.splitlines(keepends=True)
    starts = [i for i, row in enumerate(rows) if row.rstrip("\n") == title]
    if len(starts) > 1:
        raise ValueError(f"{title!r} heads {len(starts)} sections; a heading must be unique to be replaced.")
    if not starts:
        return (document.rstrip("\n") + "\n\n" if document.strip() else "") + section
    start = starts[0]
    end = next((i for i in range(start + 1, len(rows)) if rows[i].startswith("## ")), len(rows))
    following = "".join(rows[end:])
    return "".join(rows[:start]) + section + ("\n" + following if following else "")


def write_section(path: Path, heading: str, lines: Sequence[str]) -> None:
    """Replace (or append) the section ``## {heading}`` of the markdown file at ``path`` with ``lines``."""
    document = path.read_text() if path.exists() else ""
    path.write_text(replace_section(document, heading, lines))


def provenance() -> str:
    """The line under a section's heading: the command that produced it, the date and the machine."""
    script = Path(sys.argv[0]).resolve()
    where = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    command = shlex.join(["python", str(where), *sys.argv[1:]])
    return (
        f"Produced by `{command}` on {date.today().isoformat()}. Machine: {platform.platform()}, "
        f"{torch.get_num_threads()} torch thread(s); Python {platform.python_version()}, torch {version('torch')}, "
        f"lightning {version('lightning')}, torchmetrics {version('torchmetrics')}."
    )


def publish(path: Path, heading: str, lines: Sequence[str]) -> None:
    """Print ``lines`` and write them, under the provenance line, as the section ``## {heading}`` of ``path``."""
    print("\n".join(["", f"## {heading}", "", *lines]), flush=True)
    write_section(path, heading, [provenance(), "", *lines])
    print(f"wrote the section {heading!r} of {path}")


def add_results_argument(parser: argparse.ArgumentParser) -> None:
    """``--results PATH``: the markdown file whose section the script replaces (default: benchmarks/RESULTS.md)."""
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="the results file whose section this script replaces (default: benchmarks/RESULTS.md); "
        "point it at a scratch copy for a trial run",
    )
