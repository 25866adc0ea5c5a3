import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("PYTHONWARNINGS", "ignore")
warnings.filterwarnings("ignore", ".*does not have many workers.*")

from lightning_incremental.scenarios import synthetic_stream  # noqa: E402


@pytest.fixture(scope="session")
def split_stream():
    """Three tasks of two classes each, 16 features: the conformance suite's class-incremental stream."""
    return synthetic_stream("split", n_tasks=3, classes_per_task=2)


@pytest.fixture(scope="session")
def permuted_stream():
    return synthetic_stream("permuted", n_tasks=3, classes_per_task=4)
