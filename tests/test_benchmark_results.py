"""benchmarks/RESULTS.md is written one section at a time: a script replaces its own ``## `` section and no byte of
the others, and ``benchmarks/run_all.py --quick`` rewrites only the catalog's accuracy sections."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
sys.path.append(str(BENCHMARKS))  # last: `harness` stays the tests' own, benchmarks/ only adds `sections`

from sections import replace_section, write_section  # noqa: E402

DOCUMENT = """# Results

Every section is written by one script.

## Final accuracy: split

old split table

## Final accuracy: split-task

### a subsection

old split-task table

## Stacks

stacks table
"""


def test_replacing_a_section_keeps_its_place_and_every_byte_of_the_others():
    replaced = replace_section(DOCUMENT, "Final accuracy: split", ["new line 1", "", "new line 2"])
    assert replaced == DOCUMENT.replace("old split table", "new line 1\n\nnew line 2")


def test_a_section_runs_to_the_next_level_two_heading_with_its_subsections():
    replaced = replace_section(DOCUMENT, "Final accuracy: split-task", ["new table"])
    assert replaced == DOCUMENT.replace("### a subsection\n\nold split-task table", "new table")


def test_the_last_section_ends_the_file_with_one_newline():
    assert replace_section(DOCUMENT, "Stacks", ["", "new stacks", "", ""]).endswith("## Stacks\n\nnew stacks\n")


def test_a_new_heading_is_appended_after_a_blank_line():
    appended = replace_section(DOCUMENT, "Merge cost", ["merge table"])
    assert appended == DOCUMENT + "\n## Merge cost\n\nmerge table\n"


def test_a_heading_matches_whole_lines_only():
    assert replace_section(DOCUMENT, "Final accuracy", ["x"]) == DOCUMENT + "\n## Final accuracy\n\nx\n"


def test_a_heading_that_heads_two_sections_is_refused():
    with pytest.raises(ValueError, match="'## Stacks' heads 2 sections"):
        replace_section(DOCUMENT + "\n## Stacks\n\nagain\n", "Stacks", ["x"])


def test_write_section_creates_a_missing_file(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section(path, "Stacks", ["table"])
    assert path.read_text() == "## Stacks\n\ntable\n"


def _sections(document: str) -> dict[str, str]:
    """The text before the first ``## `` heading (key ``""``) and every section, by its heading line."""
    chunks = re.split(r"^(?=## )", document, flags=re.M)
    return {"": chunks[0], **{chunk.split("\n", 1)[0]: chunk for chunk in chunks[1:]}}


def test_run_all_quick_rewrites_only_its_accuracy_sections(tmp_path):
    results = tmp_path / "RESULTS.md"
    original = (BENCHMARKS / "RESULTS.md").read_text()
    results.write_text(original)
    command = [sys.executable, "benchmarks/run_all.py", "--quick", "--results", str(results)]
    # one thread: the check reads the file's structure, not the numbers, and a busy machine does not stall it
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, cwd=BENCHMARKS.parent, env=environment, check=True, capture_output=True, timeout=600)

    before, after = _sections(original), _sections(results.read_text())
    rewritten = [f"## Final accuracy: {scenario}" for scenario in ("split", "split-task", "permuted")]
    assert list(after) == list(before)  # no section added, removed or moved
    assert {key: text for key, text in after.items() if key not in rewritten} == {
        key: text for key, text in before.items() if key not in rewritten
    }
    for heading in rewritten:
        lines = after[heading].splitlines()
        assert lines[2].startswith(f"Produced by `python benchmarks/run_all.py --quick --results {results}` on ")
        assert lines[4].endswith("mean ± std over seeds 0 … 0, 2 tasks of 1 epoch(s); the wall seconds of a run, mean.")
        assert lines[6] == "| method | avg acc | forgetting | BWT | avg acc, seed 0 | wall s |"
        assert [line.split(" | ")[0] for line in lines[8:] if line] == ["| naive", "| replay"]
