"""Shared pytest set-up.

Hypothesis explores new random examples on every local run, which is how it finds bugs; CI
(``.ci/run`` sets ``CI=1``) runs a derandomized profile instead, so a clean clone of the same commit
always tests the same examples and a red CI can be reproduced. Cases found locally are pinned with
``@example`` in the test that found them.
"""
import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def fast_root(tmp_path_factory):
    """One ``WORKBENCH_ROOT`` for every test that needs the tiny fast-mode run (:mod:`workbench.results`): the
    first to ask trains it there (~1 min on 2 cores), the others reuse it (the notebooks, the browser test,
    ``workbench.inference``)."""
    return tmp_path_factory.mktemp("workbench-root")
