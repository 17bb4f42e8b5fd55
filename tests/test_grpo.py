"""GRPO: advantages, the clipped surrogate, its aggregations, KL, and end-to-end runs, each checked
against a closed form, brute force or an exact expectation."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import grpo
import model as M


# ---------------------------------------------------------------- advantages

rewards_strategy = arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 10)),
                          elements=st.floats(-10, 10, allow_nan=False).map(lambda x: round(x, 3)))


@given(rewards=rewards_strategy)
def test_group_advantages_are_centred_with_unit_std(rewards):
    r = torch.tensor(rewards)
    adv = grpo.group_advantages(r, scale="group", eps=1e-4)
    assert torch.isfinite(adv).all()
    assert adv.mean(dim=1).abs().max() < 1e-9
    std = r.std(dim=1, unbiased=False)
    for row, s in zip(adv, std):
        if s > 0:   # closed form: std(A) = s / (s + eps)
            assert abs(row.std(unbiased=False).item() - (s / (s + 1e-4)).item()) < 1e-9


@given(value=st.floats(-5, 5, allow_nan=False), G=st.integers(2, 16), scale=st.sampled_from(["group", "batch", "none"]))
def test_constant_groups_give_exactly_zero_advantage(value, G, scale):
    r = torch.full((3, G), value, dtype=torch.float64)
    r[1] = torch.arange(G, dtype=torch.float64)       # one informative group beside the constant ones
    adv = grpo.group_advantages(r, scale=scale)
    assert torch.equal(adv[0], torch.zeros(G, dtype=torch.float64))
    assert torch.equal(adv[2], torch.zeros(G, dtype=torch.float64))
    assert not torch.isnan(adv).any()


@given(rewards=rewards_strategy)
def test_none_scaling_is_reward_minus_group_mean(rewards):
    r = torch.tensor(rewards)
    expected = np.array([[x - np.mean(row) if np.ptp(row) > 0 else 0.0 for x in row] for row in rewards])
    assert np.allclose(grpo.group_advantages(r, scale="none").numpy(), expected, atol=1e-9)


# ---------------------------------------------------------------- the surrogate's gradient

def ragged_batch(seed, N=5, L=7, V=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (N, L), generator=g)
    lengths = torch.randint(1, L + 1, (N,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).double()
    advantages = torch.randn(N, generator=g, dtype=torch.float64)
    return logits, tokens, mask, advantages


@given(seed=st.integers(0, 10_000), aggregation=st.sampled_from(["grpo", "dr_grpo", "dapo"]))
def test_gradient_at_ratio_one_is_reinforce_with_group_baseline(seed, aggregation):
    """At the first update (pi == pi_old) the surrogate's gradient w.r.t. the logits is, in closed form,
    -A_i * w_{i,t} * (onehot(o_{i,t}) - softmax(z_{i,t})), with w the aggregation weight of the token."""
    logits, tokens, mask, adv = ragged_batch(seed)
    logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    loss, stats = grpo.grpo_loss(logp, logp.detach(), adv, mask, aggregation=aggregation, max_len=7)
    loss.backward()
    N, L = mask.shape
    if aggregation == "grpo":
        w = mask / mask.sum(1, keepdim=True) / N
    elif aggregation == "dr_grpo":
        w = mask / (N * 7)
    else:
        w = mask / mask.sum()
    onehot = F.one_hot(tokens, logits.shape[-1]).double()
    expected = -(adv[:, None, None] * w[..., None]) * (onehot - logits.detach().softmax(-1))
    assert torch.allclose(logits.grad, expected, atol=1e-12)
    assert stats["clipfrac"] == 0.0 and abs(stats["ratio_mean"] - 1) < 1e-12


def test_bandit_estimator_converges_to_exact_policy_gradient():
    """On a K-armed bandit, the mean GRPO gradient (scale none, G/(G-1) correction for the leave-in
    baseline) converges to grad E_pi[r] = p * (r - E_pi[r]), within a bound from the sample count."""
    torch.manual_seed(0)
    K, G, groups = 5, 8, 4000
    theta = torch.randn(K, dtype=torch.float64)
    reward = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0], dtype=torch.float64)
    p = theta.softmax(0)
    exact = p * (reward - (p * reward).sum())
    param = theta.clone().requires_grad_(True)
    actions = torch.multinomial(p.expand(groups, K), G, replacement=True)            # (groups, G)
    r = reward[actions]
    adv = grpo.group_advantages(r, scale="none").flatten()
    logp = param.log_softmax(0)[actions.flatten()][:, None]                            # (groups*G, 1)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), adv, torch.ones_like(logp), aggregation="grpo")
    loss.backward()
    estimate = -param.grad * G / (G - 1)
    # per-sample gradient std bounds the error of the mean over groups*G samples (5 sigma)
    per_sample = (adv[:, None] * (F.one_hot(actions.flatten(), K) - p)).std(0)
    assert torch.all((estimate - exact).abs() <= 5 * per_sample / math.sqrt(groups * G) + 1e-3)


@given(seed=st.integers(0, 10_000), eps_low=st.floats(0.05, 0.4), eps_high=st.floats(0.05, 0.6))
def test_clip_higher_zeroes_gradient_exactly_outside_the_range(seed, eps_low, eps_high):
    """d loss / d logp is 0 exactly when rho > 1 + eps_high with A > 0 or rho < 1 - eps_low with A < 0."""
    g = torch.Generator().manual_seed(seed)
    N = 64
    old = torch.randn(N, 1, generator=g, dtype=torch.float64)
    log_ratio = (torch.rand(N, 1, generator=g, dtype=torch.float64) - 0.5) * 2.0
    # keep ratios away from the clip boundaries, where the subgradient is ambiguous
    ratio = log_ratio.exp()
    away = ((ratio - (1 + eps_high)).abs() > 1e-6) & ((ratio - (1 - eps_low)).abs() > 1e-6)
    logp = (old + log_ratio).requires_grad_(True)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    loss, stats = grpo.grpo_loss(logp, old, adv, torch.ones(N, 1, dtype=torch.float64), eps_low=eps_low,
                                 eps_high=eps_high, aggregation="dapo")
    loss.backward()
    A = adv[:, None]
    outside = ((ratio > 1 + eps_high) & (A > 0)) | ((ratio < 1 - eps_low) & (A < 0))
    grad = logp.grad
    assert torch.all(grad[outside & away] == 0)
    assert torch.all(grad[~outside & away] != 0)
    # inside, the gradient is the unclipped one: -A * rho / n_tokens
    inside = ~outside & away
    assert torch.allclose(grad[inside], (-A * ratio / N)[inside], atol=1e-12)
    assert abs(stats["clipfrac"] - outside.double().mean().item()) < 1e-12


# ---------------------------------------------------------------- KL, aggregations, sequence ratio

@given(logp=arrays(np.float64, 16, elements=st.floats(-20, 0)), ref=arrays(np.float64, 16, elements=st.floats(-20, 0)))
def test_k3_is_nonnegative_per_token(logp, ref):
    assert (grpo.kl_k3(torch.tensor(logp), torch.tensor(ref)) >= 0).all()


@given(seed=st.integers(0, 1000))
@settings(max_examples=5)
def test_k3_mean_converges_to_exact_kl(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(6, generator=g, dtype=torch.float64).softmax(0)
    q = torch.randn(6, generator=g, dtype=torch.float64).softmax(0)
    exact = (p * (p / q).log()).sum()                               # KL(p || q)
    n = 200_000
    x = torch.multinomial(p, n, replacement=True, generator=g)
    k3 = grpo.kl_k3(p.log()[x], q.log()[x])
    assert abs(k3.mean() - exact) < 5 * k3.std() / math.sqrt(n)


@given(seed=st.integers(0, 1000))
def test_beta_zero_is_the_pure_surrogate(seed):
    logits, tokens, mask, adv = ragged_batch(seed)
    logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    old = logp.detach() + 0.1 * torch.randn_like(logp)
    ref = logp.detach() - 0.3
    a, _ = grpo.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.0)
    b, _ = grpo.grpo_loss(logp, old, adv, mask)
    assert torch.equal(a, b)
    c, stats = grpo.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.5, aggregation="dapo")
    d, _ = grpo.grpo_loss(logp, old, adv, mask, aggregation="dapo")
    k3 = (ref - logp).exp() - 1 - (ref - logp)
    assert torch.allclose(c - d, 0.5 * (k3 * mask).sum() / mask.sum())


def test_each_aggregation_equals_its_hand_computed_value():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [5.0, 6.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    # grpo: mean per sequence, then over sequences: (2 + 4 + 5.5) / 3
    assert math.isclose(grpo.aggregate(per_token, mask, "grpo").item(), (6 / 3 + 4 / 1 + 11 / 2) / 3)
    # dr_grpo: sum over tokens / (sequences * max_len) = 21 / (3 * 10)
    assert math.isclose(grpo.aggregate(per_token, mask, "dr_grpo", max_len=10).item(), 21 / 30)
    # dapo: mean over all tokens in the batch = 21 / 6
    assert math.isclose(grpo.aggregate(per_token, mask, "dapo").item(), 21 / 6)
    # micro-batches with whole-batch normalisers add up to the whole batch
    for agg in ("grpo", "dr_grpo", "dapo"):
        whole = grpo.aggregate(per_token, mask, agg, max_len=10)
        parts = sum(grpo.aggregate(per_token[i:i + 2], mask[i:i + 2], agg, n_seqs=3, n_tokens=6.0, max_len=10)
                    for i in (0, 2))
        assert math.isclose(whole.item(), parts.item(), rel_tol=1e-6)


@given(seed=st.integers(0, 1000))
def test_sequence_ratio_is_exp_of_mean_token_log_ratio(seed):
    logits, tokens, mask, _ = ragged_batch(seed)
    logp = logits.detach().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    old = logp + 0.05 * torch.randn_like(logp)
    ones = torch.ones(mask.shape[0], dtype=torch.float64)
    loss, stats = grpo.grpo_loss(logp, old, ones, mask, ratio_level="sequence", eps_low=10, eps_high=10,
                                 aggregation="grpo")
    seq_ratio = [math.exp(sum((logp[i, t] - old[i, t]).item() for t in range(mask.shape[1]) if mask[i, t])
                          / mask[i].sum().item()) for i in range(mask.shape[0])]
    assert math.isclose(-loss.item(), sum(seq_ratio) / len(seq_ratio), rel_tol=1e-9)


# ---------------------------------------------------------------- rewards

def test_rewards_read_the_completion_only():
    args = grpo.Args(max_new_tokens=32)
    row = {"prompt": "#### 7\n", "answer": "7"}
    assert grpo.correct_reward("3+4=7\n#### 7", row, 8, False, args) == 1.0
    assert grpo.correct_reward("3+4=8\n#### 8", row, 8, False, args) == 0.0
    assert grpo.correct_reward("no answer", row, 8, False, args) == 0.0     # the prompt's "#### 7" is not read
    assert grpo.format_reward("x=1\n#### 7", row, 8, False, args) == 1.0
    assert grpo.format_reward("#### 7 and more\ntext", row, 8, False, args) == 0.0
    assert grpo.overlong_reward("", row, 16, False, args) == 0.0
    assert grpo.overlong_reward("", row, 24, False, args) == -0.5
    assert grpo.overlong_reward("", row, 32, True, args) == -1.0
    w = grpo.parse_reward_weights("correct=1, format=0.5")
    assert grpo.total_reward("x=1\n#### 7", row, 8, False, args, w) == 1.5
    with pytest.raises(M.UserError):
        grpo.parse_reward_weights("nonsense=1")


@pytest.mark.parametrize("bad, flag", [({"prompts_per_step": 0}, "--prompts-per-step"), ({"pass_k": 0}, "--pass-k"),
                                       ({"top_k": -1}, "--top-k"), ({"group_size": 1}, "--group-size")])
def test_bad_sizes_are_one_clear_error_and_write_nothing(tmp_path, bad, flag):
    args = grpo.Args(out=str(tmp_path / "run"), data=str(tmp_path / "none.jsonl"), **bad)
    with pytest.raises(M.UserError, match=flag):
        grpo.train(args)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- end to end

def tiny_setup(tmp_path, seed=0):
    """A tiny byte-level policy checkpoint and RL prompts/answers, written to tmp_path."""
    torch.manual_seed(seed)
    enc = M.get_tokenizer()
    policy = M.GPT(M.Config(vocab_size=enc.n_vocab, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, block_size=64))
    M.save(str(tmp_path / "start.pt"), policy, enc)
    rows = [{"prompt": f"{a}+{b}=?\n", "answer": str(a + b), "difficulty": 1 + (a > 4)}
            for a in range(10) for b in range(10)]
    M.write_jsonl(str(tmp_path / "rl.jsonl"), rows)
    sft_rows = [{"prompt": r["prompt"], "completion": f"#### {r['answer']}"} for r in rows]
    M.write_jsonl(str(tmp_path / "sft.jsonl"), sft_rows)
    return tmp_path


def digit_reward(text, row, length, truncated, args):
    """A dense test reward a random policy can improve on: the share of ASCII digits in the completion."""
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def tiny_args(tmp, **kw):
    base = dict(init=str(tmp / "start.pt"), data=str(tmp / "rl.jsonl"), eval_data=str(tmp / "rl.jsonl"),
                sft_data=str(tmp / "sft.jsonl"), sft_test_data=str(tmp / "sft.jsonl"), out=str(tmp / "run"),
                prompts_per_step=8, group_size=8, max_new_tokens=8, lr=3e-3, update_epochs=1, time_budget=0, max_steps=12,
                n_eval=8, n_eval_during=8, pass_k=2, eval_minutes=100.0, mask_truncated=False, control=False,
                png=False, device="cpu", aggregation="dapo")
    base.update(kw)
    return grpo.Args(**base)


def test_tiny_run_raises_mean_training_reward(tmp_path, monkeypatch):
    tmp = tiny_setup(tmp_path)
    monkeypatch.setitem(grpo.REWARDS, "digits", digit_reward)
    args = tiny_args(tmp, rewards="digits=1", max_steps=25)
    grpo.train(args)
    rows = [json.loads(l) for l in open(tmp / "run" / "metrics.jsonl")]
    rewards = [r["reward_mean"] for r in rows if r.get("kind") == "train"]
    assert len(rewards) == 25
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.05, rewards
    for r in rows:
        if r.get("kind") == "train":   # the cost fields the GRPO-vs-PPO comparison reads
            assert r["gen_s"] > 0 and r["score_s"] > 0 and r["adv_s"] > 0 and r["update_s"] > 0
            assert r["step_s"] > 0 and r["peak_mem_mb"] > 0
            assert r["tokens_per_s"] > 0


def test_first_update_ratio_is_one_with_sampler_logprobs(tmp_path):
    """The sampler's log-probs (KV cache, temperature, top-k) and the training forward agree, so the
    importance ratio at the first update is 1 to fp32 precision."""
    tmp = tiny_setup(tmp_path)
    policy, enc, _ = M.load(str(tmp / "start.pt"))
    args = tiny_args(tmp, temperature=0.8, top_k=20, max_new_tokens=10)
    rows = M.read_jsonl(str(tmp / "rl.jsonl"))[:4]
    ro = grpo.rollout(policy, enc, rows, args, {"correct": 1.0}, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logprobs, entropy = grpo.policy_logprobs(policy, ro.tokens, args)
    filled = ro.lengths.sum().item()
    assert ro.mask.sum().item() == filled
    diff = (logprobs - ro.old_logprobs)[ro.mask.bool()].abs().max().item()
    assert diff < 1e-4, diff


def test_full_run_produces_the_three_row_table_with_a_fair_control(tmp_path, monkeypatch):
    """grpo.main with the control: the table has the SFT start, GRPO and the control; the control started
    from the byte-identical checkpoint, trained on the same SFT file, and was evaluated by the same function."""
    tmp = tiny_setup(tmp_path)
    args = tiny_args(tmp, max_steps=2, control=True)
    argv = []
    for k, v in vars(args).items():
        flag = "--" + k.replace("_", "-")
        argv += [flag if v else "--no-" + k.replace("_", "-")] if isinstance(v, bool) else [flag, str(v)]
    monkeypatch.chdir(tmp)
    results = grpo.main(argv)
    table = open(tmp / "run" / "results.md").read()
    for label in ("SFT start", "GRPO", "more SFT (control)"):
        assert label in table
    control_args = json.load(open(tmp / "run" / "control" / "args.json"))
    assert control_args["init"] == args.init and control_args["data"] == args.sft_data
    assert results["init_sha256"] == M.sha256(args.init)
    # the control row is what eval_row gives on the control checkpoint, on the same held-out prompts
    control_model, enc, _ = M.load(str(tmp / "run" / "control" / "model.pt"))
    again = grpo.eval_row(control_model, enc, M.read_jsonl(args.eval_data)[:args.n_eval], args,
                          samples=args.pass_k, seed=args.seed)
    assert again["greedy"] == results["control"]["greedy"] and again["sampled"] == results["control"]["sampled"]
    summary = json.load(open(tmp / "run" / "summary.json"))
    assert summary["params_by_role"]["policy"] == sum(p.numel() for p in control_model.parameters())


# ---------------------------------------------------------------- bad input and extreme values

@pytest.mark.parametrize("aggregation", ["grpo", "dr_grpo", "dapo"])
def test_empty_batch_gives_zero_loss_not_nan(aggregation):
    empty = torch.zeros(0, 5, requires_grad=True)
    loss, stats = grpo.grpo_loss(empty, empty.detach(), torch.zeros(0), torch.zeros(0, 5), aggregation=aggregation)
    loss.backward()
    assert loss.item() == 0.0 and stats["clipfrac"] == 0.0


@given(log_ratio=st.floats(-200, 200), advantage=st.sampled_from([-1.0, 0.0, 2.0]),
       aggregation=st.sampled_from(["grpo", "dr_grpo", "dapo"]), beta=st.sampled_from([0.0, 0.1]))
def test_far_off_policy_tokens_give_finite_loss_and_gradient(log_ratio, advantage, aggregation, beta):
    """exp(89) is inf in fp32, and inf * 0 (A = 0) is NaN: the clamp at +-MAX_LOG_RATIO keeps both finite,
    and masked positions holding -inf (top-k) never enter the arithmetic."""
    logp = torch.tensor([[log_ratio - 1.0, -float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, -float("inf")]])
    ref = torch.tensor([[-1.0 - log_ratio, 0.0]])
    mask = torch.tensor([[1.0, 0.0]])
    loss, stats = grpo.grpo_loss(logp, old, torch.tensor([advantage]), mask, ref_logprobs=ref, beta=beta,
                                 aggregation=aggregation, max_len=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 1] == 0
    assert all(math.isfinite(v) for v in stats.values())
    assert grpo.kl_k3(torch.tensor([0.0]), torch.tensor([float(log_ratio)])).isfinite().all()


def test_no_budget_is_refused_before_anything_is_written(tmp_path):
    tmp = tiny_setup(tmp_path)
    with pytest.raises(M.UserError, match="set a budget"):
        grpo.train(tiny_args(tmp, time_budget=0, max_steps=0))
    assert not (tmp / "run").exists()


def test_step_budget_runs_exactly_that_many_steps(tmp_path):
    tmp = tiny_setup(tmp_path)
    results = grpo.train(tiny_args(tmp, max_steps=3, time_budget=0))
    train_rows = [r for r in M.read_jsonl(str(tmp / "run" / "metrics.jsonl")) if r.get("kind") == "train"]
    assert results["steps"] == 3 and [r["step"] for r in train_rows] == [1, 2, 3]


def test_the_controls_bad_demonstrations_stop_the_run_before_grpo_trains(tmp_path):
    """--sft-data is the control's input: a malformed file is reported before GRPO spends its minutes."""
    tmp = tiny_setup(tmp_path)
    (tmp / "bad.jsonl").write_text('{"prompt": "1+1=?\\n", "completion": "#### 2"}\n{"prompt": 5, "completion": "x"}\n')
    with pytest.raises(M.UserError, match=r"bad.jsonl:2: 'prompt' must be a string"):
        grpo.train(tiny_args(tmp, control=True, sft_data=str(tmp / "bad.jsonl")))
    assert not (tmp / "run").exists()


def test_prompts_longer_than_the_context_are_skipped_and_counted(tmp_path, capsys):
    tmp = tiny_setup(tmp_path)                      # block_size 64, max_new_tokens 8: prompts of > 56 bytes skip
    rows = M.read_jsonl(str(tmp / "rl.jsonl"))
    rows[0] = {"prompt": "9" * 60 + "=?\n", "answer": "1"}
    M.write_jsonl(str(tmp / "rl.jsonl"), rows)
    grpo.train(tiny_args(tmp, max_steps=1))
    assert f"rl.jsonl: skipped 1 of {len(rows)} prompts longer than the context" in capsys.readouterr().out
