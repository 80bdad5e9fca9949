"""Shared pytest configuration: hypothesis profiles and a registry fixture.

``CI`` set in the environment loads the derandomized ``ci`` profile (bounded examples, no
deadline, failing examples printed as reproducible blobs); otherwise ``dev``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

import fundiff

settings.register_profile("ci", derandomize=True, max_examples=50, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def registry() -> fundiff.Registry:
    """The registry of the installed plugins (built once per session)."""
    return fundiff.Registry.discover()
