"""sft.py: the prompt-masked loss, batching, accumulation, resume, DDP and the end-to-end run.

Each property is checked against an independent reference: a per-example brute-force sum of
-log p, autograd on the whole batch, closed-form LR values, an uninterrupted run, one process."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import model as M
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS, PAD = M.BYTE_EOT_ID, M.BYTE_PAD_ID
TINY = dict(vocab_size=258, block_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return M.GPT(M.Config(**{**TINY, **overrides}))


# (prompt tokens, completion tokens): a completion may be empty (the EOS alone is then learned)
example_lists = st.lists(
    st.tuples(st.lists(st.integers(0, 255), min_size=1, max_size=6),
              st.lists(st.integers(0, 255), min_size=0, max_size=6)),
    min_size=1, max_size=5)


def to_examples(pairs):
    return [(torch.tensor(p + c + [EOS]), len(p)) for p, c in pairs]


# ---- data and masking -----------------------------------------------------------------------

@given(pairs=example_lists)
def test_loss_mask_selects_exactly_completion_and_eos(pairs):
    """Brute force: target t of row b is token t+1; it is learned iff it is a completion token or the EOS."""
    inputs, targets, mask = sft.collate(to_examples(pairs), PAD)
    for b, (p, c) in enumerate(pairs):
        seq = p + c + [EOS]
        for t in range(mask.shape[1]):
            expected = len(p) <= t + 1 < len(seq)
            assert bool(mask[b, t]) == expected
            if t + 1 < len(seq):
                assert int(targets[b, t]) == seq[t + 1] and int(inputs[b, t]) == seq[t]
            else:
                assert int(targets[b, t]) == PAD
        assert int(mask[b].sum()) == len(c) + 1


def test_encode_example_appends_eos_and_counts_the_prompt():
    enc = M.get_tokenizer("bytes")
    tokens, n_prompt = sft.encode_example(enc, "12+3=?\n", "#### 15")
    assert tokens == list(b"12+3=?\n#### 15") + [enc.eot_token] and n_prompt == len("12+3=?\n")


@given(pairs=example_lists, seed=st.integers(0, 3))
def test_masked_loss_equals_brute_force_mean_of_completion_nll(pairs, seed):
    """Reference: each sequence ALONE (no padding), -log p summed over its completion+EOS in a Python
    loop, divided by the count over the whole batch. Also proves right padding changes nothing."""
    policy = tiny_model(seed)
    inputs, targets, mask = sft.collate(to_examples(pairs), PAD)
    loss = sft.masked_nll(policy(inputs), targets, mask)
    total, count = 0.0, 0
    for p, c in pairs:
        seq = torch.tensor(p + c + [EOS])
        with torch.no_grad():
            logp = torch.log_softmax(policy(seq[None, :-1])[0].double(), -1)  # (L-1, V)
        for t in range(len(p), len(seq)):  # predict seq[t] from seq[:t]
            total -= float(logp[t - 1, seq[t]])
            count += 1
    assert math.isclose(float(loss.detach()), total / count, rel_tol=1e-5, abs_tol=1e-6)


@given(pairs=example_lists, seed=st.integers(0, 3))
def test_gradient_at_prompt_and_pad_positions_is_exactly_zero(pairs, seed):
    """d loss / d logits is exactly 0 wherever the target is a prompt token or padding, and
    nonzero at every completion position (softmax - onehot never vanishes)."""
    policy = tiny_model(seed)
    inputs, targets, mask = sft.collate(to_examples(pairs), PAD)
    logits = policy(inputs).detach().requires_grad_(True)
    sft.masked_nll(logits, targets, mask).backward()
    grad_norm = logits.grad.abs().sum(-1)  # (B, T)
    assert torch.all(grad_norm[~mask] == 0)
    assert torch.all(grad_norm[mask] > 0)


@given(pairs=example_lists, noise_seed=st.integers(0, 100))
def test_loss_ignores_prompt_predictions_entirely(pairs, noise_seed):
    """Changing the logits at prompt/pad positions, arbitrarily, leaves the loss bit-identical."""
    inputs, targets, mask = sft.collate(to_examples(pairs), PAD)
    logits = torch.randn(*inputs.shape, 258, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(logits.shape, generator=torch.Generator().manual_seed(noise_seed)) * 10
    changed = torch.where(mask[..., None], logits, logits + noise)
    assert torch.equal(sft.masked_nll(logits, targets, mask), sft.masked_nll(changed, targets, mask))


def test_make_examples_skips_what_does_not_fit_the_context():
    enc = M.get_tokenizer("bytes")
    rows = [{"prompt": "1+1=?\n", "completion": "#### 2"},             # 6 + 6 + EOS = 13 tokens
            {"prompt": "1+1=?\n", "completion": "1+1=2\n" * 5 + "#### 2"}]
    examples, skipped = sft.make_examples(rows, enc, block_size=12)    # 13 tokens -> 12 pairs: fits
    assert skipped == 1 and len(examples) == 1 and len(examples[0][0]) == 13
    assert sft.make_examples(rows, enc, block_size=11)[1] == 2


@given(n=st.integers(1, 40), batch=st.integers(1, 16), seed=st.integers(0, 5))
def test_batch_order_visits_every_example_once_per_epoch(n, batch, seed):
    """Consecutive batches concatenated are a sequence of permutations of range(n)."""
    steps = math.ceil(3 * n / batch)
    stream = sum((sft.batch_indices(n, batch, s, seed) for s in range(steps)), [])
    for epoch in range(len(stream) // n):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert sft.batch_indices(n, batch, 2, seed) == sft.batch_indices(n, batch, 2, seed)


# ---- optimisation ---------------------------------------------------------------------------

@given(peak=st.floats(1e-5, 1e-1), warmup=st.integers(1, 50), ratio=st.floats(0, 1), step=st.integers(0, 200))
def test_lr_schedule_closed_form(peak, warmup, ratio, step):
    """Warmup: linear (step+1)/warmup; cosine: peak at progress 0, peak*ratio at 1, the mean of both at 1/2."""
    assert math.isclose(sft.lr_at(step, 0.0, peak, warmup, ratio), peak * min(1, (step + 1) / warmup))
    late = warmup + step
    assert math.isclose(sft.lr_at(late, 1.0, peak, warmup, ratio), peak * ratio, abs_tol=1e-15)
    assert math.isclose(sft.lr_at(late, 0.5, peak, warmup, ratio), peak * (1 + ratio) / 2)
    assert sft.lr_at(late, 0.3, peak, warmup, ratio) >= sft.lr_at(late, 0.7, peak, warmup, ratio)


@pytest.mark.parametrize("overrides", [{}, {"norm": "layernorm", "bias": True, "pos": "learned"}])
def test_weight_decay_groups_partition_parameters(overrides):
    """Every parameter in exactly one group; matrices/embeddings decayed, norm gains and biases not."""
    policy = tiny_model(**overrides)
    decay, no_decay = sft.adamw(policy, 1e-3, 0.1, (0.9, 0.99)).param_groups
    ids = [id(p) for p in decay["params"]] + [id(p) for p in no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in policy.parameters()) and len(set(ids)) == len(ids)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for name, p in policy.named_parameters():
        assert (id(p) in {id(q) for q in decay["params"]}) == (p.dim() >= 2), name


@settings(max_examples=10)
@given(pairs=st.lists(st.tuples(st.lists(st.integers(0, 255), min_size=1, max_size=8),
                                st.lists(st.integers(0, 255), min_size=0, max_size=8)), min_size=2, max_size=7),
       micro=st.integers(1, 6))
def test_gradient_accumulation_equals_the_whole_batch(pairs, micro):
    """Length-sorted micro-batches of unequal completion counts, each normalised by the WHOLE batch's
    count, give the gradient of the whole-batch mean (reference: plain autograd on the whole batch)."""
    examples = to_examples(pairs)
    reference = tiny_model()
    inputs, targets, mask = sft.collate(examples, PAD)
    sft.masked_nll(reference(inputs), targets, mask).backward()

    policy = tiny_model()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    micro_batches = sft.length_sorted_micro_batches(examples, micro, PAD)
    assert sum(len(m[0]) for m in micro_batches) == len(examples)
    loss, _, n_tokens = sft.train_step(policy, optimizer, micro_batches, torch.device("cpu"), grad_clip=0)
    assert n_tokens == int(mask.sum())
    assert math.isclose(loss, float(sft.masked_nll(reference(inputs), targets, mask).detach()), rel_tol=1e-5)
    for (name, p), q in zip(policy.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_grad_clip_bounds_the_global_norm():
    pairs = [([1, 2, 3], [4, 5, 6]), ([7], [8, 9])]
    policy = tiny_model()
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    _, norm, _ = sft.train_step(policy, optimizer, [sft.collate(to_examples(pairs), PAD)], "cpu", grad_clip=1e-3)
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in policy.parameters()))
    assert norm > 1e-3 and math.isclose(clipped, 1e-3, rel_tol=1e-4)


# ---- DDP: two gloo processes over halves == one process over the whole batch ----------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, pairs, state, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    policy = M.GPT(M.Config(**TINY))
    policy.load_state_dict(state)
    optimizer = sft.adamw(policy, 1e-2, 0.1, (0.9, 0.99))
    examples = to_examples(pairs)
    mine = torch.tensor_split(torch.arange(len(examples)), world)[rank].tolist()  # as sft.py splits
    loss, _, _ = sft.train_step(policy, optimizer, [sft.collate([examples[i] for i in mine], PAD)],
                                "cpu", grad_clip=1.0, world_size=world)
    torch.save({"loss": loss, "params": {n: p.detach() for n, p in policy.named_parameters()},
                "grads": {n: p.grad for n, p in policy.named_parameters()}}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_one_process_on_the_whole_batch(tmp_path):
    """Halves with different completion-token counts (the normalisation trap): the all-reduced
    gradient, the clipped update and the reported loss equal one process on the whole batch."""
    pairs = [([1, 2], [3, 4, 5, 6, 7, 8]), ([9, 10, 11], [12]), ([13], [14, 15, 16]),
             ([17, 18, 19, 20], []), ([21], [22, 23, 24, 25, 26, 27, 28, 29, 30])]
    state = {k: v.clone() for k, v in tiny_model(3).state_dict().items()}
    mp.start_processes(_ddp_worker, args=(2, free_port(), pairs, state, str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    policy = tiny_model(3)
    optimizer = sft.adamw(policy, 1e-2, 0.1, (0.9, 0.99))
    loss, _, _ = sft.train_step(policy, optimizer, [sft.collate(to_examples(pairs), PAD)], "cpu", grad_clip=1.0)
    for rank in range(2):
        got = torch.load(os.path.join(tmp_path, f"{rank}.pt"), weights_only=True)
        assert math.isclose(got["loss"], loss, rel_tol=1e-5)
        for name, p in policy.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
            torch.testing.assert_close(got["params"][name], p.detach(), atol=1e-6, rtol=1e-5, msg=name)


# ---- runs: resume, bad input, end to end ---------------------------------------------------

def write_rows(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_data(tmp_path, n=24):
    """Small prompt/completion files in tmp_path (left as they are once written)."""
    if (tmp_path / "train.jsonl").exists():
        return tuple(str(tmp_path / f"{name}.jsonl") for name in ("train", "test", "heldout"))
    rows = [{"prompt": f"{a}+{b}=?\n", "completion": f"{a % 10}+{b % 10}=?\n#### {a + b}", "answer": str(a + b)}
            for a, b in zip(range(10, 10 + n), range(30, 30 + n))]
    return (write_rows(tmp_path / "train.jsonl", rows), write_rows(tmp_path / "test.jsonl", rows[:8]),
            write_rows(tmp_path / "heldout.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in rows[:4]]))


def tiny_args(tmp_path, out="run", **overrides):
    train, test, heldout = tiny_data(tmp_path)
    base = dict(data=train, test_data=test, eval_data=heldout, out=str(tmp_path / out), n_layer=1, n_embd=32,
                n_head=2, n_kv_head=2, block_size=64, batch_size=6, max_steps=6, time_budget=0, eval_every=0, eval_minutes=0,
                n_eval=4, max_new_tokens=4, log_every=1, warmup_steps=2, device="cpu")
    return sft.Args(**{**base, **overrides})


def test_resume_k_then_n_minus_k_steps_equals_n_steps(tmp_path, monkeypatch):
    """Interrupt after k steps (Ctrl-C saves the state), --resume to N: bit-for-bit the N-step run,
    with dropout on so the restored RNG state matters."""
    n_steps, k = 6, 2
    sft.run(tiny_args(tmp_path, out="straight", max_steps=n_steps, dropout=0.1))
    real_step, calls = sft.train_step, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) > k:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(sft, "train_step", interrupted)
    with pytest.raises(SystemExit):
        sft.run(tiny_args(tmp_path, out="resumed", max_steps=n_steps, dropout=0.1))
    assert M.load(str(tmp_path / "resumed" / "model.pt"))[2]["meta"]["step"] == k
    monkeypatch.setattr(sft, "train_step", real_step)
    sft.run(tiny_args(tmp_path, out="resumed", max_steps=n_steps, dropout=0.1, resume=True))
    straight, _, ckpt_a = M.load(str(tmp_path / "straight" / "model.pt"))
    resumed, _, ckpt_b = M.load(str(tmp_path / "resumed" / "model.pt"))
    assert ckpt_a["meta"]["step"] == ckpt_b["meta"]["step"] == n_steps
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    lines = [json.loads(x) for x in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, n_steps + 1))  # appended, not restarted


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "1+1=?\\n", "completion": "#### 2"}\n{"prompt": oops}\n', "train.jsonl:2"),
    ('{"prompt": "1+1=?\\n", "completion": "#### 2"}\n\n{"prompt": "2+2=?\\n"}\n', "train.jsonl:3"),
    ('{"prompt": "1+1=?\\n", "completion": 2}\n', "train.jsonl:1"),
    ("\n", "empty"),
])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, content, message):
    args = tiny_args(tmp_path)
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(M.UserError, match=message):
        sft.run(args)
    assert not os.path.exists(args.out)


def test_too_long_completions_are_skipped_and_counted(tmp_path, capsys):
    args = tiny_args(tmp_path, max_steps=1)
    rows = [json.loads(x) for x in open(args.data)]
    rows[0]["completion"] = "9" * 100  # cannot fit a 64-token context
    write_rows(args.data, rows)
    sft.run(args)
    assert f"skipped 1 of {len(rows)} training" in capsys.readouterr().out
    write_rows(args.data, rows[:1])
    with pytest.raises(M.UserError, match="no example fits"):
        sft.run(tiny_args(tmp_path, out="other", data=args.data))


def test_explicit_missing_inputs_are_errors_naming_the_path(tmp_path):
    with pytest.raises(M.UserError, match="nowhere.jsonl"):
        sft.run(tiny_args(tmp_path, data=str(tmp_path / "nowhere.jsonl")))
    with pytest.raises(M.UserError, match="nothing.pt"):
        sft.run(tiny_args(tmp_path, init=str(tmp_path / "nothing.pt")))
    with pytest.raises(M.UserError, match="budget"):
        sft.run(tiny_args(tmp_path, max_steps=0, time_budget=0))


def test_run_records_heldout_accuracy_and_init_continues_from_the_checkpoint(tmp_path):
    """metrics.jsonl holds train loss, lr, grad_norm, tokens/s, eval loss and held-out accuracy;
    --init starts from the checkpoint's exact weights (step 0 of a new run, fresh optimizer)."""
    results = sft.run(tiny_args(tmp_path, max_steps=3))
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    keys = set().union(*lines)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "train_minutes", "eval_loss", "eval_accuracy"} <= keys
    assert lines[-1]["kind"] == "eval" and lines[-1]["eval_accuracy"] == results["eval_accuracy"]
    assert 0 <= results["eval_accuracy"] <= 1 and results["steps"] == 3
    assert json.load(open(tmp_path / "run" / "args.json"))["max_steps"] == 3
    start, _, _ = M.load(str(tmp_path / "run" / "model.pt"))
    continued = sft.run(tiny_args(tmp_path, out="cont", init=str(tmp_path / "run" / "model.pt"), max_steps=1,
                                  lr=1e-12, warmup_steps=1, eval_every=100))  # lr ~ 0: weights stay those of --init
    assert continued["steps"] == 1
    evals = [json.loads(x) for x in open(tmp_path / "cont" / "metrics.jsonl") if '"eval"' in x]
    assert [r["step"] for r in evals] == [0, 1] and evals[0]["train_minutes"] == 0  # the start is evaluated too
    assert math.isclose(evals[0]["eval_loss"], results["eval_loss"], rel_tol=1e-6)  # same model, same loss
    after, _, ckpt = M.load(str(tmp_path / "cont" / "model.pt"))
    for a, b in zip(start.state_dict().values(), after.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0)
    assert ckpt["meta"]["args"]["init"].endswith("model.pt")


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "synth.py")), reason="synth.py is not written yet")
def test_synth_then_sft_lowers_heldout_loss(tmp_path):
    """End to end: synth.py makes the data, a few seconds of sft lower the eval loss below the
    untrained model's (which is about ln(258) = 5.55 nats per token)."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, os.path.join(ROOT, "synth.py"), "--out-dir", str(data), "--n-sft", "200",
                    "--n-rl", "20", "--n-test", "20"], check=True, cwd=tmp_path, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    args = tiny_args(tmp_path, data=str(data / "sft_train.jsonl"), test_data=str(data / "sft_test.jsonl"),
                     eval_data=str(data / "rl_test.jsonl"), max_steps=40, batch_size=16, block_size=256,
                     n_embd=64, n_head=4, n_kv_head=4, lr=3e-3, eval_examples=32, max_new_tokens=32)
    enc = M.get_tokenizer("bytes")
    test_examples, _ = sft.make_examples(M.read_jsonl(args.test_data)[:32], enc, 256)
    torch.manual_seed(args.seed)
    before = sft.eval_loss(M.GPT(M.Config(**{**TINY, "n_embd": 64, "n_head": 4, "n_kv_head": 4,
                                             "block_size": 256})), test_examples, PAD, "cpu")
    after = sft.run(args)["eval_loss"]
    assert after < before - 1.0, (before, after)
