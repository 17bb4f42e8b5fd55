"""Shared test set-up: the project root on sys.path, Hypothesis profiles, and the real model's file read once.

The "ci" profile (the default) bounds the examples and turns deadlines off, so the suite is fast and
never flaky on a loaded 2-core machine; HYPOTHESIS_PROFILE=thorough runs many more examples."""
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def smollm2():
    """(path, our metadata, gguf-py's GGUFReader) of the real SmolLM2-135M-Instruct GGUF file, read once for
    the session (test_formats.py and test_tokenizer_files.py both compare against it)."""
    gguf = pytest.importorskip("gguf", reason="gguf-py's GGUFReader is the oracle")
    from helpers import smollm2_gguf_path
    from lib import formats
    path = smollm2_gguf_path()
    metadata, tensors = formats.read_gguf(path, tensor_names=[])
    assert tensors == {}
    return path, metadata, gguf.GGUFReader(path)
