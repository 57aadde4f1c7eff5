"""Shared pytest set-up.

Hypothesis explores new random examples on every local run, which is how it finds bugs; CI
(``.ci/run`` sets ``CI=1``) runs a derandomized profile instead, so a clean clone of the same commit
always tests the same examples and a red CI can be reproduced. Cases found locally are pinned with
``@example`` in the test that found them.
"""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
