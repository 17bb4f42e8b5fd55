"""Shared test set-up: the project root on sys.path, and Hypothesis profiles.

The "ci" profile (the default) bounds the examples and turns deadlines off, so the suite is fast and
never flaky on a loaded 2-core machine; HYPOTHESIS_PROFILE=thorough runs many more examples."""
import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
