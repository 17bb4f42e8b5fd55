"""Tests for experiments/norm_position.py: the per-layer gradient norms add up to torch's total norm, the bigram
entropy equals the cross-entropy of the fitted bigram table (F.cross_entropy), the warmup and the paper's init
against their closed forms, pre-LN's identity path, and a tiny end-to-end run that prints both tables."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from lib import cli, tasks, tokenizer
import synth as S
from helpers import load_experiment

E = load_experiment("norm_position")


@pytest.fixture
def one_thread():
    """The tiny runs pass --threads 1 (tiny matmuls on a busy machine are faster on one thread); the
    session's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_data(folder):
    """Two small demonstration files (prompt/completion rows), enough for rows of 16 tokens."""
    for name, offset in (("train", 0), ("test", 50)):
        tasks.write_jsonl(str(folder / f"{name}.jsonl"), [{"prompt": f"{a}+{b}=?\n", "completion": f"#### {a + b}"}
                                                          for a in range(offset, offset + 30) for b in range(3)])
    return folder


def tiny_args(tmp_path, *extra):
    data = tiny_data(tmp_path)
    return ["--data", str(data / "train.jsonl"), "--test-data", str(data / "test.jsonl"), "--out", str(tmp_path / "np"),
            "--n-embd", "16", "--n-head", "2", "--seq-len", "16", "--batch-size", "4", "--depths", "2,3",
            "--grad-batches", "1", "--train-depth", "2", "--train-steps", "4", "--warmup-steps", "2", "--seeds", "0,1",
            "--eval-batches", "1", "--device", "cpu", *extra]


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("init", ["xiong", "gpt2"])
def test_block_gradient_norms_add_up_to_the_total_norm(placement, init):
    args = E.Args(n_embd=16, n_head=2, seq_len=8)
    model = E.make_model(args, 3, placement, 258, seed=0, device="cpu", init=init)
    batch = torch.randint(0, 258, (4, 9))
    E.lm_loss(model, batch).backward()
    per_block = E.block_grad_norms(model)
    ffn = {id(p) for block in model.blocks for p in block.ffn.parameters()}
    rest = [p.grad for p in model.parameters() if id(p) not in ffn and p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    rest_norm = torch.nn.utils.get_total_norm(rest)
    assert math.sqrt(sum(g ** 2 for g in per_block) + float(rest_norm) ** 2) == pytest.approx(float(total), rel=1e-5)


@given(seed=st.integers(0, 10 ** 6), vocab=st.integers(2, 12), n=st.integers(1, 6), length=st.integers(2, 10))
def test_bigram_entropy_is_the_cross_entropy_of_the_fitted_bigram_table(seed, vocab, n, length):
    rows = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    previous, target = rows[:, :-1].flatten(), rows[:, 1:].flatten()
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    counts.index_put_((previous, target), torch.ones(len(previous), dtype=torch.float64), accumulate=True)
    table = (counts / counts.sum(1, keepdim=True).clamp(min=1)).clamp(min=1e-300).log()   # log p(v | u)
    expected = F.cross_entropy(table[previous], target).item()
    assert E.bigram_entropy(rows, vocab) == pytest.approx(expected, abs=1e-9)
    unigram = torch.bincount(target, minlength=vocab).double() / len(target)
    unigram_entropy = -(unigram[unigram > 0] * unigram[unigram > 0].log()).sum().item()
    assert E.bigram_entropy(rows, vocab) <= unigram_entropy + 1e-9     # conditioning never adds entropy


@given(step=st.integers(0, 500), lr=st.floats(1e-5, 1.0), warmup=st.integers(0, 200))
def test_warmup_is_linear_then_constant(step, lr, warmup):
    expected = lr if warmup == 0 or step >= warmup - 1 else lr * (step + 1) / warmup
    assert E.warmup_lr(step, lr, warmup) == pytest.approx(expected, rel=1e-12)


def test_the_papers_init_has_unit_embeddings_and_one_over_fan_in_variance():
    torch.manual_seed(0)
    model = E.make_model(E.Args(n_embd=64, n_head=4), 2, "post", 258, seed=0, device="cpu", init="xiong")
    assert model.lm_head.weight is not model.wte.weight                    # untied
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            n = module.weight.numel()                                      # sample std within 5 standard errors
            assert abs(module.weight.std().item() - module.in_features ** -0.5) < 5 * module.in_features ** -0.5 / math.sqrt(2 * n)
    assert abs(model.wte.weight.std().item() - 1) < 5 / math.sqrt(2 * model.wte.weight.numel())
    gpt2 = E.make_model(E.Args(n_embd=64, n_head=4), 2, "post", 258, seed=0, device="cpu", init="gpt2")
    assert gpt2.lm_head.weight is gpt2.wte.weight and gpt2.wte.weight.std().item() < 0.03


@pytest.mark.parametrize("depth", [1, 4, 9])
def test_pre_ln_with_silent_branches_is_the_identity_path(depth):
    """Pre-LN: x_{l+1} = x_l + F(LN(x_l)). With every branch's output projection at 0, the hidden state is
    LN_f(x_0) at ANY depth, so the gradient reaching the embeddings does not depend on L."""
    args = E.Args(n_embd=16, n_head=2, seq_len=8)
    grads = []
    for L in (1, depth):
        model = E.make_model(args, L, "pre", 258, seed=0, device="cpu", init="xiong")
        with torch.no_grad():
            for block in model.blocks:
                block.attn.proj.weight.zero_()
                block.ffn.w2.weight.zero_()
        tokens = torch.randint(0, 258, (2, 8), generator=torch.Generator().manual_seed(1))
        hidden = model.hidden(tokens)
        assert torch.allclose(hidden, model.norm_f(model.wte(tokens)), atol=1e-6)
        model.lm_head.weight.data.copy_(torch.linspace(-1, 1, model.lm_head.weight.numel()).view_as(model.lm_head.weight))
        E.lm_loss(model, torch.randint(0, 258, (2, 9), generator=torch.Generator().manual_seed(2))).backward()
        grads.append(model.wte.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_run_fails_when_it_diverges_or_does_not_beat_the_bigram_table():
    assert E.failed({"finite": False, "test_loss": float("nan")}, 2.0)
    assert E.failed({"finite": True, "test_loss": 2.5}, 2.0)
    assert E.failed({"finite": True, "test_loss": float("nan")}, 2.0)
    assert not E.failed({"finite": True, "test_loss": 1.5}, 2.0)


def test_a_nan_loss_ends_the_arm_and_counts_as_failed(tmp_path, one_thread):
    torch.set_num_threads(1)
    data = tiny_data(tmp_path)
    enc = tokenizer.get_tokenizer("bytes")
    rows, test_rows = E.token_rows(str(data / "train.jsonl"), 16, enc), E.token_rows(str(data / "test.jsonl"), 16, enc)
    args = E.Args(n_embd=16, n_head=2, seq_len=16, batch_size=4, train_depth=2, train_steps=5, lr=1e30)
    run = E.train_arm(args, "post", 0, 0, rows, test_rows, enc.n_vocab, "cpu")
    # at lr 1e30 seeds 0-7, post- and pre-LN alike, all stop non-finite after exactly 1 step: no spread
    assert not run["finite"] and run["steps_done"] < 5 and E.failed(run, 10.0)


def test_tiny_run_prints_both_tables(tmp_path, capsys, one_thread):
    result = E.main(tiny_args(tmp_path, "--threads", "1"))
    assert set(result["profiles"]) == {f"{i}/{p}/{L}" for i in ("xiong", "gpt2") for p in ("pre", "post") for L in (2, 3)}
    assert all(len(norms) == int(key.split("/")[2]) for key, norms in result["profiles"].items())
    assert len(result["runs"]) == 2 * 2 * 2 and all(len(r["losses"]) == 4 for r in result["runs"])
    shown = capsys.readouterr().out
    for placement in ("post-LN", "pre-LN"):
        assert f"| {placement} | none |" in shown and f"| {placement} | 2 steps |" in shown
        assert f"| xiong | {placement} | 3 |" in shown
    saved = json.loads((tmp_path / "np" / "results.json").read_text())
    assert saved["profiles"] == result["profiles"] and (tmp_path / "np" / "results.md").exists()


@pytest.mark.parametrize("bad, names", [(["--depths", "0"], "--depths"), (["--depths", "x"], "--depths"),
                                        (["--seeds", "-1"], "--seeds"), (["--lr", "0"], "--lr"),
                                        (["--lr", "inf"], "--lr"), (["--norm", "batchnorm"], "--norm"),
                                        (["--ffn", "moe"], "--ffn"), (["--init", "he"], "--init"),
                                        (["--profile-inits", "xiong,he"], "--profile-inits"),
                                        (["--n-head", "3"], "--n-embd"), (["--train-steps", "0"], "--train-steps"),
                                        (["--data", "missing.jsonl"], "missing.jsonl")])
def test_a_bad_option_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, bad, names):
    argv = tiny_args(tmp_path, *bad)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: E.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and names in err and "Traceback" not in err, err
    assert not (tmp_path / "np").exists()


def test_the_data_command_parses_with_synths_parser_and_help_lists_every_option(capsys):
    command = E.data_command()
    assert command[0] == "synth.py" and cli.parse_args(S.Args, command[1:]) == S.Args()
    assert os.path.join(S.Args().out_dir, "sft_train.jsonl") == E.Args().data
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(E.Args, ["--help"])
    shown = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(f"--{n.replace('_', '-')}" in shown for n in vars(E.Args()))
