"""sft.py: the prompt-masked loss, batching, accumulation, resume, DDP and the end-to-end run.

Each property is checked against an independent reference: a per-example brute-force sum of
-log p, autograd on the whole batch, closed-form LR values, optim.py's schedule, an uninterrupted
run, one process, and `python sft.py` itself for bad input (exit status 2, one line, nothing written)."""
import ast
import concurrent.futures
import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings, strategies as st

import model as M
from lib import checkpoints, cli, convert, stages, tasks, tokenizer
import optim
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
    enc = tokenizer.get_tokenizer("bytes")
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
    enc = tokenizer.get_tokenizer("bytes")
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


@given(peak=st.floats(1e-5, 1e-1), warmup=st.integers(0, 50), ratio=st.floats(0, 1),
       total=st.integers(1, 400), step=st.integers(0, 500))
def test_lr_schedule_is_optims_cosine_times_a_warmup_factor(peak, warmup, ratio, total, step):
    """sft.lr_at against optim.lr_cosine. The two differ by design in their warmup, so the test checks
    the identity that does hold: sft's schedule is optim's cosine WITHOUT warmup (min_lr = peak * ratio,
    progress = step / total) times the factor min(1, (step + 1) / warmup).

    Why they differ: sft.py's progress may be wall-clock time (progress = elapsed / budget), which knows
    nothing of a warmup measured in steps, so its cosine runs over the whole run and the warmup is a
    factor on top (the first update already uses peak / warmup); optim.lr_cosine counts in steps only,
    ramps additively from min_lr at step 0 and starts its cosine after the warmup. With no warmup
    (0 steps) the two schedules are the same function; with 1 they already differ at step 0 (optim
    starts at min_lr, sft at the peak)."""
    cosine = optim.lr_cosine(step, peak, total, warmup_steps=0, min_lr=peak * ratio)
    warmup_factor = min(1.0, (step + 1) / max(1, warmup))
    got = sft.lr_at(step, step / total, peak, warmup, ratio)
    assert math.isclose(got, warmup_factor * cosine, rel_tol=1e-12, abs_tol=1e-18)
    if warmup == 0:
        assert math.isclose(got, optim.lr_cosine(step, peak, total, warmup_steps=warmup, min_lr=peak * ratio),
                            rel_tol=1e-12, abs_tol=1e-18)


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


def completion_nll_by_hand(policy, pairs):
    """(sum over every completion+EOS token of -log p, token count): each sequence alone, in a Python loop."""
    total, count = 0.0, 0
    for p, c in pairs:
        seq = torch.tensor(p + c + [EOS])
        with torch.no_grad():
            logp = torch.log_softmax(policy(seq[None, :-1])[0].double(), -1)  # (L-1, V)
        for t in range(len(p), len(seq)):
            total -= float(logp[t - 1, seq[t]])
            count += 1
    return total, count


@settings(max_examples=10)
@given(pairs=example_lists, batch_size=st.integers(1, 3))
def test_eval_loss_is_the_mean_completion_nll_over_every_example(pairs, batch_size):
    policy = tiny_model(1)
    total, count = completion_nll_by_hand(policy, pairs)
    for got in (sft.eval_loss(policy, to_examples(pairs), PAD, "cpu", batch_size=batch_size),
                sft.eval_loss(policy, to_examples(pairs), PAD, "cpu")):
        assert math.isclose(got, total / count, rel_tol=1e-5)
    assert math.isnan(sft.eval_loss(policy, [], PAD, "cpu"))                 # nothing to score: NaN, not 0 / 0


def test_micro_batches_are_length_sorted_slices_each_padded_to_its_own_longest():
    pairs = [([1] * n, [2] * (n % 3)) for n in (5, 1, 4, 2, 6, 3, 1)]
    examples = to_examples(pairs)
    by_length = sorted(examples, key=lambda e: len(e[0]))
    for micro, sizes in ((2, [2, 2, 2, 1]), (3, [3, 3, 1]), (0, [7])):      # 0: the whole batch at once
        batches = sft.length_sorted_micro_batches(examples, micro, PAD)
        assert [len(b[0]) for b in batches] == sizes
        start = 0
        for inputs, targets, mask in batches:
            mine = by_length[start:start + len(inputs)]
            assert inputs.shape[1] == max(len(e[0]) for e in mine) - 1         # padded to its own longest
            assert [int(m.sum()) for m in mask] == [len(e[0]) - e[1] for e in mine]
            start += len(inputs)


def test_train_step_defaults_clip_at_1_name_the_update_and_count_a_lone_token():
    pairs = [([1, 2, 3], [4, 5, 6]), ([7], [8, 9])]
    policy = tiny_model()
    with torch.no_grad():
        for param in policy.parameters():
            param.mul_(8)                                                  # a gradient norm well above 2
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    _, norm, _ = sft.train_step(policy, optimizer, [sft.collate(to_examples(pairs), PAD)], "cpu")
    clipped = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in policy.parameters()))
    assert norm > 2 and math.isclose(clipped, 1.0, rel_tol=1e-4)           # grad_clip defaults to 1.0

    lone = tiny_model(2)                                                   # one completion token: N = 1
    batch = sft.collate([(torch.tensor([5, 6]), 1)], PAD)
    loss, _, n_tokens = sft.train_step(lone, torch.optim.SGD(lone.parameters(), lr=0.0), [batch], "cpu")
    with torch.no_grad():
        want = -float(torch.log_softmax(lone(torch.tensor([[5]]))[0, 0].double(), -1)[6])
    assert n_tokens == 1 and math.isclose(loss, want, rel_tol=1e-5)

    broken = tiny_model()
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(cli.NonFiniteError, match="^update: loss is nan; stopped before the update"):
        sft.train_step(broken, torch.optim.SGD(broken.parameters(), lr=0.1), [sft.collate(to_examples(pairs), PAD)],
                       "cpu")


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_update():
    pairs = [([1, 2, 3], [4, 5, 6])]
    policy = tiny_model()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    policy.lm_head.weight.register_hook(lambda grad: grad * float("inf"))  # the loss stays finite
    with pytest.raises(cli.NonFiniteError, match="^step 3: grad_norm is"):
        sft.train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), [sft.collate(to_examples(pairs), PAD)],
                       "cpu", where="step 3")
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_a_parameter_no_token_reached_gets_a_zero_gradient_not_none():
    """An MoE expert that no token was routed to has no gradient from autograd; train_step gives it zeros, so
    every parameter joins the gradient sum (and the norm) in every process."""
    policy = tiny_model(0, ffn="moe", n_expert=8, moe_top_k=1)
    batch = sft.collate(to_examples([([1], [2])]), PAD)                    # 2 positions: at most 2 experts used
    sft.train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), [batch], "cpu")
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in grads)
    assert any(not g.any() for g in grads)                                 # some expert was idle


def test_moe_auxiliary_loss_is_weighted_by_each_micro_batchs_share_of_rows_and_off_by_default():
    """loss = sum over micro-batches m of [ -sum log p / N + w * aux_m * rows_m / B ], aux_m the router
    losses of m's forward (read from a copy of the model, one micro-batch at a time); w = 0 by default."""
    pairs = [([1, 2], [3, 4, 5]), ([6], [7]), ([8, 9, 10], [11, 12]), ([13], [])]
    micro_batches = sft.length_sorted_micro_batches(to_examples(pairs), 3, PAD)
    reference = tiny_model(3, ffn="moe")
    n_tokens = sum(int(mask.sum()) for _, _, mask in micro_batches)
    nll, aux = 0.0, 0.0
    with torch.no_grad():
        for inputs, targets, mask in micro_batches:
            nll += float(sft.masked_nll(reference(inputs), targets, mask, n_tokens))
            aux += float(reference.aux_loss) * len(inputs) / len(pairs)
    assert aux > 0
    for weight in (0.0, 0.5):
        policy = tiny_model(3, ffn="moe")
        kwargs = {"aux_loss_weight": weight} if weight else {}
        loss, _, _ = sft.train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.0), micro_batches, "cpu",
                                    **kwargs)
        assert math.isclose(loss, nll + weight * aux, rel_tol=1e-5)


# ---- DDP: two gloo processes over halves == one process over the whole batch ----------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SGD_LR = 0.1  # the DDP test's update: p - lr * g moves each weight by exactly lr times its gradient


def _ddp_worker(rank, world, port, pairs, state, out_dir):
    """One of `world` spawned processes: its share of the batch, the gradients summed over gloo."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    policy = M.GPT(M.Config(**TINY))
    policy.load_state_dict(state)
    optimizer = torch.optim.SGD(policy.parameters(), lr=SGD_LR)
    examples = to_examples(pairs)
    mine = torch.tensor_split(torch.arange(len(examples)), world)[rank].tolist()  # as sft.py splits
    loss, _, _ = sft.train_step(policy, optimizer, [sft.collate([examples[i] for i in mine], PAD)],
                                "cpu", grad_clip=1.0, world_size=world)
    torch.save({"loss": loss, "params": {n: p.detach() for n, p in policy.named_parameters()},
                "grads": {n: p.grad for n, p in policy.named_parameters()}}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()
    cli.exit_without_shutdown(0)   # as cli.run ends a torchrun rank: spawn's exit would shut the interpreter down


def test_ddp_two_gloo_processes_match_one_process_on_the_whole_batch(tmp_path):
    """Halves with different completion-token counts (the normalisation trap): the all-reduced
    gradient, the clipped update and the reported loss equal one process on the whole batch.

    Tolerances follow from the math, not from this machine. A gradient element is a float32 sum
    whose terms are about as large as the tensor's largest element, summed in another order in
    each process (and with another thread count): its rounding error is a small multiple of
    eps32 * max|g|, so each tensor is compared with atol = 1e-5 * max|g| (eps32 = 1.2e-7), not
    relative to the element itself (a near-zero element from cancellation has no relative
    accuracy). The update is plain SGD, p - lr * g, so the weights differ by at most
    lr * (gradient tolerance) plus the last bits of p itself. (Adam's first step is about
    lr * sign(g): it would turn a 1e-9 difference in a near-zero gradient into a full step.)"""
    pairs = [([1, 2], [3, 4, 5, 6, 7, 8]), ([9, 10, 11], [12]), ([13], [14, 15, 16]),
             ([17, 18, 19, 20], []), ([21], [22, 23, 24, 25, 26, 27, 28, 29, 30])]
    state = {k: v.clone() for k, v in tiny_model(3).state_dict().items()}
    mp.start_processes(_ddp_worker, args=(2, free_port(), pairs, state, str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    policy = tiny_model(3)
    optimizer = torch.optim.SGD(policy.parameters(), lr=SGD_LR)
    loss, _, _ = sft.train_step(policy, optimizer, [sft.collate(to_examples(pairs), PAD)], "cpu", grad_clip=1.0)
    for rank in range(2):
        got = torch.load(os.path.join(tmp_path, f"{rank}.pt"), weights_only=True)
        assert math.isclose(got["loss"], loss, rel_tol=1e-5)
        for name, p in policy.named_parameters():
            grad_tol = 1e-5 * float(p.grad.abs().max()) + 1e-12
            torch.testing.assert_close(got["grads"][name], p.grad, atol=grad_tol, rtol=1e-5, msg=name)
            torch.testing.assert_close(got["params"][name], p.detach(), atol=SGD_LR * grad_tol, rtol=1e-6, msg=name)


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
    """Interrupt after k steps (Ctrl-C saves the state), `sft.py --out DIR --resume` to N: bit-for-bit
    the N-step run, with dropout on so the restored RNG state matters. The resume command names no
    data, size or budget: they come from the arguments saved in the checkpoint."""
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
    assert checkpoints.load(str(tmp_path / "resumed" / "model.pt"))[2]["meta"]["step"] == k
    monkeypatch.setattr(sft, "train_step", real_step)
    sft.main(["--out", str(tmp_path / "resumed"), "--resume"])  # everything else: the run's saved arguments
    straight, _, ckpt_a = checkpoints.load(str(tmp_path / "straight" / "model.pt"))
    resumed, _, ckpt_b = checkpoints.load(str(tmp_path / "resumed" / "model.pt"))
    assert ckpt_a["meta"]["step"] == ckpt_b["meta"]["step"] == n_steps
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    lines = [json.loads(x) for x in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, n_steps + 1))  # appended, not restarted
    assert not os.path.exists(tmp_path / "resumed" / "resume.pt")    # finished: model.pt alone is the result
    assert "optimizer" not in ckpt_b["meta"]


def test_a_finished_run_keeps_no_optimizer_state_and_resume_reads_its_own_file(tmp_path, monkeypatch):
    """model.pt holds the weights, step and arguments; the optimizer's moments and the RNG state for --resume
    live in resume.pt beside it while the run is unfinished, and a finished run removes that file (unless
    --keep-state). A resume.pt of another step than model.pt's (a torn pair) is refused in one line."""
    sft.run(tiny_args(tmp_path, out="kept", max_steps=2, keep_state=True))
    state = torch.load(tmp_path / "kept" / "resume.pt", weights_only=True)
    ckpt = checkpoints.load(str(tmp_path / "kept" / "model.pt"))[2]
    assert state["step"] == ckpt["meta"]["step"] == 2 and "optimizer" not in ckpt["meta"]
    n_adam_floats = sum(t.numel() for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step")
    assert n_adam_floats == 2 * sum(p.numel() for p in tiny_model_of(tmp_path / "kept").parameters())
    torch.save({**state, "step": 1}, tmp_path / "kept" / "resume.pt")
    with pytest.raises(cli.UserError, match=r"resume.pt: cannot resume from it .*not the state of .*step 2"):
        sft.main(["--out", str(tmp_path / "kept"), "--resume"])


def tiny_model_of(folder):
    return checkpoints.load(str(folder / "model.pt"))[0]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "1+1=?\\n", "completion": "#### 2"}\n{"prompt": oops}\n', "train.jsonl:2"),
    ('{"prompt": "1+1=?\\n", "completion": "#### 2"}\n\n{"prompt": "2+2=?\\n"}\n', "train.jsonl:3"),
    ('{"prompt": "1+1=?\\n", "completion": 2}\n', "train.jsonl:1"),
    ("\n", "empty"),
])
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, content, message):
    args = tiny_args(tmp_path)
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(cli.UserError, match=message):
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
    with pytest.raises(cli.UserError, match="no example fits"):
        sft.run(tiny_args(tmp_path, out="other", data=args.data))


def test_explicit_missing_inputs_are_errors_naming_the_path(tmp_path):
    with pytest.raises(cli.UserError, match="nowhere.jsonl"):
        sft.run(tiny_args(tmp_path, data=str(tmp_path / "nowhere.jsonl")))
    with pytest.raises(cli.UserError, match="nothing.pt"):
        sft.run(tiny_args(tmp_path, init=str(tmp_path / "nothing.pt")))
    with pytest.raises(cli.UserError, match="budget"):
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
    start, _, _ = checkpoints.load(str(tmp_path / "run" / "model.pt"))
    continued = sft.run(tiny_args(tmp_path, out="cont", init=str(tmp_path / "run" / "model.pt"), max_steps=1,
                                  lr=1e-12, warmup_steps=1, eval_every=100))  # lr ~ 0: weights stay those of --init
    assert continued["steps"] == 1
    evals = [json.loads(x) for x in open(tmp_path / "cont" / "metrics.jsonl") if '"eval"' in x]
    assert [r["step"] for r in evals] == [0, 1] and evals[0]["train_minutes"] == 0  # the start is evaluated too
    assert math.isclose(evals[0]["eval_loss"], results["eval_loss"], rel_tol=1e-6)  # same model, same loss
    after, _, ckpt = checkpoints.load(str(tmp_path / "cont" / "model.pt"))
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
    enc = tokenizer.get_tokenizer("bytes")
    test_examples, _ = sft.make_examples(tasks.read_jsonl(args.test_data)[:32], enc, 256)
    torch.manual_seed(args.seed)
    before = sft.eval_loss(M.GPT(M.Config(**{**TINY, "n_embd": 64, "n_head": 4, "n_kv_head": 4,
                                             "block_size": 256})), test_examples, PAD, "cpu")
    after = sft.run(args)["eval_loss"]
    # the drop over 8 seeds (synth.py --seed and the run's seed varied together): 2.86-2.98 nats, mean 2.93, std
    # 0.04; 1.0 is mean - 50 std, and an untrained model drops 0
    assert after < before - 1.0, (before, after)


# ---- the command line: saved arguments, non-finite guard, defaults, links, bad input ----------

def tiny_argv(args):
    """The command line of sft.Args `args` (every field given), as another stage would build it."""
    return stages.stage_command("sft.py", **{k: v for k, v in vars(args).items() if k not in ("init", "resume")})[1:]


def test_resume_uses_the_saved_arguments_and_an_option_given_again_overrides_them(tmp_path, capsys):
    """`--resume` reads the run's own arguments from its checkpoint (not the defaults): the lr, data and
    sizes of the first run; an option given again wins, announced with one line, and args.json says so."""
    sft.main(tiny_argv(tiny_args(tmp_path, max_steps=2, lr=5e-3, warmup_steps=1, min_lr_ratio=0.5, keep_state=True)))
    run_dir = tmp_path / "run"
    capsys.readouterr()
    sft.main(["--out", str(run_dir), "--resume", "--max-steps", "3"])
    printed = capsys.readouterr().out
    assert "--max-steps 3 given: overrides the saved 2" in printed
    assert "--lr" not in printed and "--data" not in printed  # not given again: not overridden
    saved = json.load(open(run_dir / "args.json"))
    assert saved["lr"] == 5e-3 and saved["max_steps"] == 3 and saved["data"] == str(tmp_path / "train.jsonl")
    train_lines = [json.loads(x) for x in open(run_dir / "metrics.jsonl") if '"train"' in x]
    assert [r["step"] for r in train_lines] == [1, 2, 3]
    # step 3 is update index 2 of 3: warmup over, cosine at progress 2/3, between lr*0.5 and lr = 5e-3
    expected = 5e-3 * (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
    assert math.isclose(train_lines[-1]["lr"], expected, rel_tol=1e-9)
    assert checkpoints.load(str(run_dir / "model.pt"))[2]["meta"]["step"] == 3


def test_a_diverging_run_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss turns NaN at step 4 (injected into the training loss only; the eval loss is computed
    under no_grad): the run stops with a NonFiniteError naming step 4, BEFORE optimizer.step(); the
    checkpoint written at step 2 stays, finite."""
    real_nll, training_calls = sft.masked_nll, []

    def poisoned_nll(logits, targets, loss_mask, n_tokens=None):
        loss = real_nll(logits, targets, loss_mask, n_tokens)
        if torch.is_grad_enabled():
            training_calls.append(1)
            if len(training_calls) >= 4:  # one micro-batch per step: the 4th call is step 4
                return loss * float("nan")
        return loss

    monkeypatch.setattr(sft, "masked_nll", poisoned_nll)
    args = tiny_args(tmp_path, max_steps=6, eval_every=2)
    with pytest.raises(cli.NonFiniteError, match="step 4: loss is nan"):
        sft.run(args)
    policy, _, ckpt = checkpoints.load(os.path.join(args.out, "model.pt"))
    assert ckpt["meta"]["step"] == 2
    assert all(torch.isfinite(p).all() for p in policy.state_dict().values())


def run_main_in_process(argv, capsys):
    """cli.run(sft.main) on argv in this process, as `python sft.py` runs it -> (exit status, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.run(lambda: sft.main(argv))
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("extra", [["--lr", "1e308", "--grad-clip", "0"], ["--lr", "1e30"], ["--lr", "1.5"]])
def test_an_absurd_lr_is_refused_by_name_before_anything_is_written(tmp_path, capsys, extra):
    """`--lr 1e308 --grad-clip 0` raised a RuntimeError inside Adam's addcdiv_ (lr / (1 - beta1) overflows
    float32): a traceback. An lr past cli.MAX_LR is now one line naming --lr, exit 2, no run folder."""
    args = tiny_args(tmp_path)
    status, err = run_main_in_process(tiny_argv(args) + extra, capsys)
    assert status == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0] == f"error: --lr must be <= {cli.MAX_LR:g}, got {float(extra[1])}"
    assert not os.path.exists(args.out)


def test_weights_that_pass_the_bound_stop_the_run_and_the_checkpoint_on_disk_is_the_last_good_one(tmp_path, capsys):
    """--weight-decay 1e7: AdamW multiplies every matrix by 1 - lr * wd per update (about -1e4 at the first
    warmup lr), so the weights pass cli.MAX_WEIGHT within two updates while every loss and gradient is still
    finite. The run stops at that update with one line naming the weight (cli.check_weights), exit 2; the
    checkpoint on disk is one saved before it (--eval-every 1), every weight within the bound."""
    args = tiny_args(tmp_path, weight_decay=1e7, max_steps=20, eval_every=1)
    status, err = run_main_in_process(tiny_argv(args), capsys)
    assert status == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("error: step ") and f"past cli.MAX_WEIGHT = {cli.MAX_WEIGHT:g}" in err[0], err
    failed_step = int(err[0].split()[2].rstrip(":"))
    policy, _, ckpt = checkpoints.load(os.path.join(args.out, "model.pt"))
    assert ckpt["meta"]["step"] < failed_step
    assert max(float(w.abs().max()) for w in policy.state_dict().values()) <= cli.MAX_WEIGHT


def test_check_weights_refuses_nan_inf_and_a_weight_past_the_bound_naming_the_tensor():
    """|w| = cli.MAX_WEIGHT passes; the next float32 up, NaN and -inf each stop it, naming the tensor."""
    model = tiny_model()
    weight = model.blocks[0].ffn.w2.weight
    with torch.no_grad():
        weight[0, 0] = cli.MAX_WEIGHT
        cli.check_weights("step 3", model)
        above = torch.nextafter(torch.tensor(cli.MAX_WEIGHT), torch.tensor(math.inf))   # the next float32 up
        for value, words in ((above, "reached |w| = "), (math.nan, "holds NaN"),
                             (-math.inf, "holds NaN or inf")):
            weight[0, 0] = value
            with pytest.raises(cli.NonFiniteError, match=r"^step 3: weight blocks\.0\.ffn\.w2\.weight "):
                cli.check_weights("step 3", model)
            with pytest.raises(cli.NonFiniteError) as error:
                cli.check_weights("step 3", torch.nn.Linear(1, 1), model)    # several modules: all checked
            assert words in str(error.value) and "\n" not in str(error.value)


def test_gsm8k_rows_train_and_evaluate_unchanged(tmp_path):
    """GSM8K's own {"question", "answer"} rows (the answer a worked solution ending in '#### n') are
    demonstrations for training and prompts for held-out accuracy, with no conversion."""
    rows = [{"question": f"What is {a} plus {b}?\n", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}
            for a, b in zip(range(10, 22), range(30, 42))]
    data = write_rows(tmp_path / "gsm8k.jsonl", rows)
    results = sft.run(tiny_args(tmp_path, data=data, test_data=data, eval_data=data, max_steps=1, n_eval=0))
    assert results["eval_n"] == len(rows) and results["steps"] == 1
    assert math.isfinite(results["eval_loss"])


def test_heldout_prompts_longer_than_the_context_are_skipped_and_counted(tmp_path, capsys):
    args = tiny_args(tmp_path, max_steps=1, n_eval=0)
    rows = [json.loads(x) for x in open(args.eval_data)]
    rows[0]["prompt"] = "1+" * 40 + "1=?\n"  # 84 bytes: no room in a 64-token context
    write_rows(args.eval_data, rows)
    results = sft.run(args)
    assert f"skipped 1 of {len(rows)} prompts longer than the context" in capsys.readouterr().out
    assert results["eval_n"] == len(rows) - 1


def test_defaults_are_a_step_budget_and_shared_values():
    """The default run is a step budget (the same seed gives the same checkpoint on a machine), its
    generation limit is every stage's, and grpo.py's equal-time control (a time budget, no step
    limit) is a valid command line."""
    defaults = sft.Args()
    assert defaults.max_steps > 0 and defaults.time_budget == 0
    assert defaults.max_new_tokens == tasks.MAX_NEW_TOKENS
    sft.check_args(defaults)
    control = cli.parse_args(sft.Args, ["--init", "runs/sft/model.pt", "--time-budget", "2.5", "--max-steps", "0"])
    sft.check_args(control)
    assert control.max_steps == 0 and control.time_budget == 2.5


def test_default_paths_are_written_only_in_args():
    """No default path ("data/...", "runs/...") is repeated as a string inside a function body."""
    tree = ast.parse(open(os.path.join(ROOT, "sft.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for const in ast.walk(node):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    assert not const.value.startswith(("data/", "runs/")), (node.name, const.value)


def test_a_time_budget_alone_ends_the_run(tmp_path):
    """--max-steps 0 --time-budget M (the control's command): the run ends at the step boundary nearest M
    minutes of training: after the first step whose end, counted as t + (its duration) / 2, reaches M, and not
    before (every earlier step's t + duration / 2 fell short). Read from the per-step train rows."""
    budget = 0.002
    results = sft.run(tiny_args(tmp_path, max_steps=0, time_budget=budget))
    t = [r["train_minutes"] for r in tasks.read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    durations = [b - a for a, b in zip([0.0] + t, t)]
    assert results["steps"] == len(t) >= 1 and results["train_minutes"] == t[-1]
    assert t[-1] + durations[-1] / 2 >= budget
    assert all(end + step / 2 < budget for end, step in zip(t[:-1], durations[:-1]))


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "synth.py")), reason="synth.py is not written yet")
def test_the_synth_command_makes_the_default_inputs():
    """The command sft.py runs for a missing default input is parsed by synth.py's own parser, and
    synth.py's default output folder holds exactly sft.py's default input files."""
    import synth
    command = sft.synth_command()
    assert command[0] == "synth.py"
    synth_args = cli.parse_args(synth.Args, command[1:])
    defaults = sft.Args()
    for path, name in ((defaults.data, "sft_train"), (defaults.test_data, "sft_test"),
                       (defaults.eval_data, "rl_test")):
        assert os.path.normpath(path) == os.path.normpath(os.path.join(synth_args.out_dir, f"{name}.jsonl"))


def run_sft(argv, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), *argv], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


def tree_listing(folder):
    """Every file under `folder` with its size and modification time: what a failed run must not change."""
    listing = {}
    for parent, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            listing[os.path.relpath(path, folder)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
    return listing


def write_checkpoint_without_optimizer(tmp_path):
    """A run folder whose model.pt was written by another stage (grpo.py: weights, step and args only)."""
    os.makedirs(tmp_path / "run")
    checkpoints.save(str(tmp_path / "run" / "model.pt"), tiny_model(), tokenizer.get_tokenizer("bytes"), step=3, args={"lr": 1e-5})
    return ["--resume"]


def write_truncated_checkpoint(tmp_path):
    path = tmp_path / "truncated.pt"
    checkpoints.save(str(path), tiny_model(), tokenizer.get_tokenizer("bytes"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["--init", str(path)]


def write_hostile_checkpoint(tmp_path):
    """1 KB that asks for 48 layers of width 8192 (~40 GB): refused before any weight is allocated."""
    path = tmp_path / "hostile.pt"
    config = {**TINY, "n_layer": 48, "n_embd": 8192, "n_head": 64, "n_kv_head": 64}
    torch.save({"config": config, "model": {"tok_emb.weight": torch.zeros(2, 2)},
                "tokenizer": {"name": "bytes", "n_vocab": 258}, "meta": {}}, path)
    return ["--init", str(path)]


def write_data(name, content):
    """A case that replaces tmp_path/<name> with `content` (str or bytes), given as its own option."""
    option = {"train.jsonl": "--data", "test.jsonl": "--test-data", "heldout.jsonl": "--eval-data"}[name]

    def setup(tmp_path):
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return [option, str(path)]
    return setup


GOOD = '{"prompt": "1+1=?\\n", "completion": "#### 2"}\n'
BAD_INPUT = {  # case -> (set-up returning extra argv, text the one error line must hold)
    "missing file": (lambda tmp: ["--data", str(tmp / "nowhere.jsonl")], "nowhere.jsonl"),
    "empty file": (write_data("train.jsonl", ""), "train.jsonl"),
    "not JSON": (write_data("train.jsonl", GOOD + '{"prompt": oops}\n'), "train.jsonl:2"),
    "missing key": (write_data("train.jsonl", GOOD + GOOD + '{"prompt": "1+1=?\\n"}\n'), "train.jsonl:3"),
    "wrong type": (write_data("train.jsonl", '{"prompt": "1+1=?\\n", "completion": 2}\n'), "train.jsonl:1"),
    "non-UTF-8 bytes": (write_data("train.jsonl", GOOD.encode() + b'{"prompt": "\xff\xfe"}\n'), "train.jsonl:2"),
    "deep nesting": (write_data("train.jsonl", "[" * 100000 + "\n"), "train.jsonl:1"),
    "huge integer": (write_data("train.jsonl", '{"prompt": "x", "completion": 1' + "0" * 5000 + "}\n"),
                     "train.jsonl:1"),
    "directory as data": (lambda tmp: (os.makedirs(tmp / "folder.jsonl"), ["--data", str(tmp / "folder.jsonl")])[1],
                          "folder.jsonl"),
    "eval prompts all too long": (write_data("heldout.jsonl", '{"prompt": "%s", "answer": "2"}\n' % ("1" * 80)),
                                  "heldout.jsonl"),
    "truncated checkpoint": (write_truncated_checkpoint, "truncated.pt"),
    "hostile checkpoint": (write_hostile_checkpoint, "hostile.pt"),
    "resume without optimizer state": (write_checkpoint_without_optimizer, "--init"),
    **{f"option {flag} {value}": (lambda tmp, flag=flag, value=value: [flag, value], flag) for flag, value in [
        ("--log-every", "0"), ("--n-head", "0"), ("--n-layer", "-1"), ("--batch-size", "0"),
        ("--micro-batch", "-1"), ("--lr", "-1"), ("--time-budget", "nan"), ("--seed", "-1")]},
}
MORE_BAD_INPUT = {  # the same kinds of case again, through cli.run(main) in this process (no interpreter start-up)
    "GSM8K answer not a string": (write_data("train.jsonl", '{"question": "q", "answer": 2}\n'), "train.jsonl:1"),
    "test data not JSON": (write_data("test.jsonl", "{\n"), "test.jsonl:1"),
    "eval answer wrong type": (write_data("heldout.jsonl", '{"prompt": "1+1=?\\n", "answer": [2]}\n'),
                               "heldout.jsonl:1"),
    "eval answer without a final answer": (write_data("heldout.jsonl", '{"question": "q", "answer": "#### "}\n'),
                                           "heldout.jsonl:1"),
    "resume with no checkpoint": (lambda tmp: ["--resume"], "model.pt"),
    "resume and init": (lambda tmp: ["--resume", "--init", str(tmp / "x.pt")], "--init"),
    "init is a directory": (lambda tmp: (os.makedirs(tmp / "ckpt"), ["--init", str(tmp / "ckpt")])[1], "ckpt"),
    "out is a file": (lambda tmp: ((tmp / "afile").write_text("x"), ["--out", str(tmp / "afile")])[1], "--out"),
    "no budget": (lambda tmp: ["--max-steps", "0", "--time-budget", "0"], "budget"),
}


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Every BAD_INPUT case prepared in its own folder, then `python sft.py` on all of them, 4 at a time
    (each run is mostly the interpreter importing torch): {case: (folder, listing before, result)}."""
    prepared = {}
    for case, (setup, _) in BAD_INPUT.items():
        folder = tmp_path_factory.mktemp("bad_input")
        args = tiny_args(folder, max_steps=2, eval_minutes=0, n_eval=4, max_new_tokens=4, threads=1)
        argv = tiny_argv(args) + setup(folder)
        prepared[case] = (folder, tree_listing(folder), argv)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(prepared, pool.map(lambda item: run_sft(item[2], item[0]), prepared.values())))
    return {case: (folder, before, results[case]) for case, (folder, before, _) in prepared.items()}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_no_traceback_and_nothing_written(bad_input_runs, case):
    """`python sft.py` on each kind of bad input (in a fresh folder): exit status 2, exactly one line on
    stderr that names the file:line or the option, no traceback, and no file created or changed."""
    folder, before, result = bad_input_runs[case]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and BAD_INPUT[case][1] in lines[0], lines[0]
    assert tree_listing(folder) == before


@pytest.mark.parametrize("case", list(MORE_BAD_INPUT))
def test_more_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch, case):
    """As the table above, through the cli.run(main) that `python sft.py` runs, in this process."""
    setup, where = MORE_BAD_INPUT[case]
    monkeypatch.chdir(tmp_path)
    argv = tiny_argv(tiny_args(tmp_path, max_steps=2, eval_minutes=0, n_eval=4, max_new_tokens=4)) + setup(tmp_path)
    before = tree_listing(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: sft.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and where in err, err
    assert tree_listing(tmp_path) == before


BAD_OPTIONS = [("--log-every", "0"), ("--n-head", "0"), ("--n-layer", "-1"), ("--batch-size", "0"),
               ("--micro-batch", "-1"), ("--lr", "-1"), ("--lr", "inf"), ("--time-budget", "nan"),
               ("--time-budget", "-1"), ("--max-steps", "-5"), ("--seed", "-1"), ("--seed", str(2 ** 32)),
               ("--beta1", "1"), ("--beta2", "-0.1"), ("--dropout", "1"), ("--min-lr-ratio", "2"),
               ("--warmup-steps", "-1"), ("--weight-decay", "-0.1"), ("--grad-clip", "-1"),
               ("--aux-loss-weight", "-1"), ("--eval-minutes", "-1"), ("--eval-every", "-1"),
               ("--eval-examples", "-1"), ("--n-eval", "-1"), ("--max-new-tokens", "0"), ("--eval-batch", "0"),
               ("--threads", "-1"), ("--n-kv-head", "3"), ("--n-embd", "30"), ("--block-size", "0"),
               ("--device", "tpu"), ("--ffn", "mlp"), ("--norm", "batchnorm"), ("--pos", "alibi"),
               ("--tokenizer", "no_such_encoding"), ("--out", ""), ("--data", "")]


@pytest.mark.parametrize("flag, value", BAD_OPTIONS)
def test_every_bad_option_value_is_one_line_exit_2_before_anything_is_read(tmp_path, capsys, monkeypatch, flag, value):
    """Each option's rule, through the same cli.run(main) that `python sft.py` runs (in this process, so the
    whole table costs well under a second): exit status 2, one line naming the flag, and nothing read or
    written (the data files are missing: an option check that came after reading would name them)."""
    monkeypatch.chdir(tmp_path)
    argv = tiny_argv(tiny_args(tmp_path)) + [flag, value]
    for path in tiny_data(tmp_path):
        os.remove(path)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: sft.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert flag in err, err
    assert os.listdir(tmp_path) == []


def test_a_second_run_on_a_folder_being_written_is_refused_and_writes_nothing(tmp_path):
    """Two processes, one run folder: while a first sft.py writes it, a second gets exit status 2 and
    one line naming the folder, and the first run's files are untouched (args.json is still the first's,
    metrics.jsonl holds only the first's whole lines)."""
    args = tiny_args(tmp_path, max_steps=10 ** 6, eval_minutes=0, log_every=1, threads=1)
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "sft.py"), *tiny_argv(args)], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        metrics = os.path.join(args.out, "metrics.jsonl")
        deadline = time.time() + 120
        while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
            assert first.poll() is None and time.time() < deadline, "the first run did not start writing"
            time.sleep(0.1)
        first_args = open(os.path.join(args.out, "args.json")).read()
        files_before = sorted(os.listdir(args.out))
        second = run_sft(tiny_argv(tiny_args(tmp_path, max_steps=3, lr=1e-4, threads=1)), tmp_path)
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert args.out in lines[0] and "another run" in lines[0]
        assert first.poll() is None  # the first run goes on
        assert open(os.path.join(args.out, "args.json")).read() == first_args
        assert sorted(os.listdir(args.out)) == files_before
    finally:
        first.kill()
        first.wait()
    steps = [json.loads(line)["step"] for line in open(metrics)]  # every line whole, one writer
    assert steps == list(range(1, len(steps) + 1))


def test_compile_train_takes_the_same_first_step_and_saves_the_eager_model_s_keys(tmp_path, monkeypatch):
    """--compile-train (torch.compile'd blocks; backend aot_eager here, as inductor takes minutes to compile on
    2 CPU cores) trains the same model: the first step's loss and gradient norm (same weights, same batch) equal
    the eager run's to rounding, and the checkpoint has the eager model's keys. Later steps are not compared:
    Adam's first update is about lr * sign(g), which turns rounding into visible differences."""
    original = M.GPT.compile_blocks
    compiled = []
    monkeypatch.setattr(M.GPT, "compile_blocks", lambda model: (compiled.append(1), original(model, backend="aot_eager"))[1])
    torch._dynamo.reset()
    runs = {}
    for name, flag in (("eager", False), ("compiled", True)):
        sft.run(tiny_args(tmp_path, out=name, max_steps=2, compile_train=flag))
        runs[name] = [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl") if '"train"' in x]
    assert compiled == [1]
    first = runs["eager"][0], runs["compiled"][0]
    assert first[1]["loss"] == pytest.approx(first[0]["loss"], rel=1e-5)
    assert first[1]["grad_norm"] == pytest.approx(first[0]["grad_norm"], rel=1e-4)
    assert checkpoints.load(str(tmp_path / "compiled" / "model.pt"))[0].state_dict().keys() == \
        checkpoints.load(str(tmp_path / "eager" / "model.pt"))[0].state_dict().keys()


def test_compile_train_with_fsdp_is_refused(tmp_path, monkeypatch):
    """Under torchrun (WORLD_SIZE >= 2) --compile-train --fsdp is one line naming both flags, before anything is read."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(cli.UserError, match="--compile-train with --fsdp"):
        sft.check_args(tiny_args(tmp_path, compile_train=True, fsdp=True))


# ---- pretrained starts: their defaults, LoRA, a system prompt ---------------------------------

def pretrained_folder(tmp_path):
    """A tiny model exported as a Hugging Face folder: to the stages, a pretrained model like any other."""
    folder = tmp_path / "hf"
    convert.save_hf(str(folder), tiny_model(), tokenizer.get_tokenizer("bytes"))
    return folder


def test_a_pretrained_start_takes_its_own_defaults_and_an_option_given_wins(tmp_path, capsys):
    """--init naming a Hugging Face folder (or a .gguf, or a checkpoint fine-tuned from one) trains at
    PRETRAINED_DEFAULTS, says so in one line, and an option on the command line still wins."""
    folder = pretrained_folder(tmp_path)
    argv = tiny_argv(tiny_args(tmp_path, max_steps=2))
    for name in ("lr", "batch_size", "eval_examples"):        # left to the defaults: not given
        index = argv.index("--" + name.replace("_", "-"))
        del argv[index:index + 2]
    sft.main(argv + ["--init", str(folder), "--max-steps", "2"])
    saved = json.load(open(tmp_path / "run" / "args.json"))
    assert (saved["lr"], saved["batch_size"], saved["eval_examples"]) == (5e-5, 8, 64)
    assert saved["max_steps"] == 2 and "is a pretrained model: its defaults are --lr 5e-05" in capsys.readouterr().out
    assert checkpoints.is_pretrained(str(folder)) and checkpoints.is_pretrained(str(tmp_path / "run" / "model.pt"))
    assert not checkpoints.is_pretrained(str(tmp_path / "nothing.pt"))
    checkpoints.save(str(tmp_path / "scratch.pt"), tiny_model(), tokenizer.get_tokenizer("bytes"))
    assert not checkpoints.is_pretrained(str(tmp_path / "scratch.pt"))


def test_lora_sft_moves_only_the_adapters_and_keeps_the_system_prompt(tmp_path):
    """--lora-rank trains adapters on a frozen base: every base tensor of the result equals the start's, the
    adapters moved, the saved model reloads with them; --system-prompt is kept in the checkpoint, so every
    later stage (and the export's chat template) wraps prompts as this run did."""
    start = tmp_path / "start.pt"
    checkpoints.save(str(start), tiny_model(), tokenizer.get_tokenizer("bytes"))
    sft.run(tiny_args(tmp_path, init=str(start), max_steps=3, lr=1e-2, lora_rank=2, system_prompt="Be brief."))
    trained, enc, _ = checkpoints.load(str(tmp_path / "run" / "model.pt"))
    base = checkpoints.load(str(start))[0].state_dict()
    state = trained.state_dict()
    assert trained.config.lora_rank == 2 and all(torch.equal(state[k], v) for k, v in base.items())
    assert any(state[k].abs().max() > 0 for k in state if k.endswith("lora_b"))
    assert tokenizer.encode_prompt(enc, "2+2=?") == tokenizer.encode(enc, "Be brief.\n\n2+2=?")
