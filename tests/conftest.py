"""Shared pytest configuration: hypothesis profiles and a registry fixture.

``CI`` set in the environment loads the derandomized ``ci`` profile (bounded examples, no
deadline, failing examples printed as reproducible blobs); otherwise ``dev``.
"""

from __future__ import annotations

import os

# One intra-op thread: the suite's tensors are small, where a second thread costs more than it
# gives (and stalls badly on a loaded 2-core machine). Set before torch loads; subprocesses
# started by tests (the CLI) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from hypothesis import settings

import torch

# Without CUDA, Triton kernels run under its interpreter. The variable is read when triton
# modules import (and when @triton.jit decorates), and libraries imported by other tests
# (diffusers, through torch) may import triton first: so it is set here, for the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fundiff

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

settings.register_profile("ci", derandomize=True, max_examples=50, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def registry() -> fundiff.Registry:
    """The registry of the installed plugins (built once per session)."""
    return fundiff.Registry.discover()


#: counters filled by tests that want a line in the terminal summary (e.g. the recipe fuzzer)
REPORT: dict[str, object] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    for key, value in REPORT.items():
        terminalreporter.write_line(f"fundiff: {key}: {value}")
