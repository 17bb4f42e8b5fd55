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
import sft
import model as M
from lib import checkpoints, cli, rundir, tasks, tokenizer


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
    with pytest.raises(cli.UserError):
        grpo.parse_reward_weights("nonsense=1")


@pytest.mark.parametrize("bad, flag", [({"prompts_per_step": 0}, "--prompts-per-step"), ({"pass_k": 0}, "--pass-k"),
                                       ({"top_k": -1}, "--top-k"), ({"group_size": 1}, "--group-size")])
def test_bad_sizes_are_one_clear_error_and_write_nothing(tmp_path, bad, flag):
    args = grpo.Args(out=str(tmp_path / "run"), data=str(tmp_path / "none.jsonl"), **bad)
    with pytest.raises(cli.UserError, match=flag):
        grpo.train(args)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- end to end

def tiny_setup(tmp_path, seed=0):
    """A tiny byte-level policy checkpoint and RL prompts/answers, written to tmp_path."""
    torch.manual_seed(seed)
    enc = tokenizer.get_tokenizer()
    policy = M.GPT(M.Config(vocab_size=enc.n_vocab, n_layer=1, n_embd=32, n_head=2, n_kv_head=2, block_size=64))
    checkpoints.save(str(tmp_path / "start.pt"), policy, enc)
    rows = [{"prompt": f"{a}+{b}=?\n", "answer": str(a + b), "difficulty": 1 + (a > 4)}
            for a in range(10) for b in range(10)]
    tasks.write_jsonl(str(tmp_path / "rl.jsonl"), rows)
    sft_rows = [{"prompt": r["prompt"], "completion": f"#### {r['answer']}"} for r in rows]
    tasks.write_jsonl(str(tmp_path / "sft.jsonl"), sft_rows)
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
    args = tiny_args(tmp, rewards="digits=1", max_steps=25, lr=6e-3)
    grpo.train(args)
    rows = [json.loads(l) for l in open(tmp / "run" / "metrics.jsonl")]
    rewards = [r["reward_mean"] for r in rows if r.get("kind") == "train"]
    assert len(rewards) == 25
    # last-5 minus first-5 mean reward over 12 seeds (tiny_setup's and the run's seed varied together; 1 and 2
    # threads give the same numbers): 0.34-0.54, mean 0.46, std 0.07; 0.2 is mean - 3.9 std. With lr 0 the gain
    # is within +-0.012 (6 seeds). (At the former lr 3e-3 it was 0.066-0.124 over 8 seeds against a bar of 0.05.)
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.2, rewards
    for r in rows:
        if r.get("kind") == "train":   # the cost fields the GRPO-vs-PPO comparison reads
            assert r["gen_s"] > 0 and r["score_s"] > 0 and r["adv_s"] > 0 and r["update_s"] > 0
            assert r["step_s"] > 0 and r["peak_mem_mb"] > 0
            assert r["tokens_per_s"] > 0


def test_the_token_counts_are_every_sampled_completion_and_every_predicted_token_of_each_epoch(tmp_path):
    """sampled_tokens counts every completion token generated; trained_tokens the positions the update predicts:
    (prompt + completion - 1) per kept sequence, once per epoch. tiny_setup's prompts are 6 bytes ("a+b=?\\n")."""
    tmp = tiny_setup(tmp_path)
    args = tiny_args(tmp, max_steps=3, update_epochs=2, dynamic_sampling=False)
    results = grpo.train(args)
    rows = [r for r in tasks.read_jsonl(str(tmp / "run" / "metrics.jsonl")) if r.get("kind") == "train"]
    n = args.prompts_per_step * args.group_size
    assert len(tokenizer.encode_prompt(tokenizer.get_tokenizer(), "1+2=?\n")) == 6
    for r in rows:
        assert n <= r["sampled_tokens"] <= n * args.max_new_tokens           # 1 to max_new_tokens each
        assert r["trained_tokens"] == 2 * (n * (6 - 1) + r["sampled_tokens"])
    assert results["sampled_tokens"] == sum(r["sampled_tokens"] for r in rows)
    assert results["trained_tokens"] == sum(r["trained_tokens"] for r in rows)


def test_first_update_ratio_is_one_with_sampler_logprobs(tmp_path):
    """The sampler's log-probs (KV cache, temperature, top-k) and the training forward agree, so the
    importance ratio at the first update is 1 to fp32 precision."""
    tmp = tiny_setup(tmp_path)
    policy, enc, _ = checkpoints.load(str(tmp / "start.pt"))
    args = tiny_args(tmp, temperature=0.8, top_k=20, max_new_tokens=10)
    rows = tasks.read_jsonl(str(tmp / "rl.jsonl"))[:4]
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
    args = tiny_args(tmp, max_steps=2, control=True, controls="sft,rft,random")
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
    assert results["init_sha256"] == rundir.sha256(args.init)
    # the control row is what eval_row gives on the control checkpoint, on the same held-out prompts
    control_model, enc, _ = checkpoints.load(str(tmp / "run" / "control" / "model.pt"))
    again = grpo.eval_row(control_model, enc, tasks.read_jsonl(args.eval_data)[:args.n_eval], args,
                          samples=args.pass_k, seed=args.seed)
    assert again["greedy"] == results["control"]["greedy"] and again["sampled"] == results["control"]["sampled"]
    summary = json.load(open(tmp / "run" / "summary.json"))
    assert summary["params_by_role"]["policy"] == sum(p.numel() for p in control_model.parameters())
    # the two other arms: GRPO again on a random reward of the start's mean, and rejection sampling from the start
    for label in ("RFT (control)", "random reward (control)"):
        assert label in table
    random_args = json.load(open(tmp / "run" / "random" / "args.json"))
    assert random_args["rewards"] == "random=1" and random_args["init"] == args.init
    assert math.isclose(random_args["random_reward_mean"], results["start"]["sampled"], abs_tol=1e-6)
    assert {k: v for k, v in random_args.items() if k not in ("rewards", "random_reward_mean", "out", "control",
                                                              "png")} == \
        {k: v for k, v in vars(args).items() if k not in ("rewards", "random_reward_mean", "out", "control", "png")}
    assert results["random_minutes"] == json.load(open(tmp / "run" / "random" / "summary.json"))["train_minutes"]
    if os.path.exists(tmp / "run" / "rft" / "samples.jsonl"):
        sampled = json.load(open(tmp / "run" / "rft" / "samples.summary.json"))
        assert sampled["counts"]["sampled"] == min(2 * args.prompts_per_step, 100) * args.group_size
    else:                                         # an untrained start: nothing verified, so the arm is the start
        assert results["rft"]["greedy"] == results["start"]["greedy"] and results["rft_minutes"] > 0


def test_the_rft_arm_fine_tunes_on_verified_samples_only_within_grpo_s_minutes(tmp_path):
    """RFT from a start that solves some prompts: synth.py's filter keeps only completions the verifier accepts,
    sft.py trains on them from the same start, and the arm's minutes are its sampling's plus its training's,
    within GRPO's (one step of slack: sft.py stops at the step boundary nearest its budget)."""
    tmp = tiny_setup(tmp_path)
    sft.run(sft.Args(data=str(tmp / "sft.jsonl"), test_data=str(tmp / "sft.jsonl"), eval_data=str(tmp / "rl.jsonl"),
                     out=str(tmp / "start_run"), n_layer=1, n_embd=32, n_head=2, n_kv_head=2, block_size=64,
                     batch_size=32, max_steps=150, lr=1e-2, warmup_steps=5, eval_minutes=0, n_eval=8,
                     max_new_tokens=8, device="cpu"))
    args = tiny_args(tmp, init=str(tmp / "start_run" / "model.pt"), temperature=1.0)
    path, minutes = grpo.rft_arm(args, {"steps": 2, "train_minutes": 0.1, "start_args": {"batch_size": 4}})
    kept = tasks.read_jsonl(str(tmp / "run" / "rft" / "samples.jsonl"))
    assert kept and all(tasks.verify(row["completion"], row) for row in kept)
    trained = json.load(open(tmp / "run" / "rft" / "args.json"))
    assert (trained["init"], trained["data"], trained["batch_size"]) == (args.init, str(tmp / "run" / "rft" /
                                                                                        "samples.jsonl"), 4)
    assert path == str(tmp / "run" / "rft" / "model.pt") and 0 < minutes < 0.1 + 0.05


@given(mean=st.floats(0.0, 1.0), text=st.text(max_size=20))
@settings(max_examples=10)
def test_the_random_reward_has_the_given_mean_and_ignores_the_completion(mean, text):
    """2,000 independent draws: their mean is within 5 standard errors of `mean` (a binomial bound), and the
    completion's text (here any text) does not enter: a right and a wrong answer draw alike."""
    args = grpo.Args(random_reward_mean=mean)
    grpo.RANDOM_REWARD.seed(0)
    draws = [grpo.random_reward(text, {"answer": "1"}, 3, False, args) for _ in range(2000)]
    grpo.RANDOM_REWARD.seed(0)
    again = [grpo.random_reward("#### 1", {"answer": "1"}, 3, False, args) for _ in range(2000)]
    assert draws == again and set(draws) <= {0.0, 1.0}
    assert abs(sum(draws) / 2000 - mean) <= 5 * math.sqrt(mean * (1 - mean) / 2000) + 1e-12


def test_the_control_arms_commands_parse_with_their_stages_parsers(tmp_path):
    import synth
    args = tiny_args(tmp_path, controls="sft,rft,random", threads=1)
    sampling = cli.parse_args(synth.Args, grpo.rft_sampling_command(args, 3)[1:])
    assert sampling.threads == 1                             # sampling shares the CPU as the other arms do
    assert (sampling.from_model, sampling.prompts, sampling.n_prompts, sampling.k) == \
        (args.init, args.data, 3 * args.prompts_per_step, args.group_size)
    assert sampling.keep_bare and sampling.temperature == args.temperature
    again = cli.parse_args(grpo.Args, grpo.random_reward_command(args, 0.25)[1:])
    assert (again.rewards, again.random_reward_mean, again.control) == ("random=1", 0.25, False)
    with pytest.raises(cli.UserError, match="--controls: unknown arm 'ppo'"):
        grpo.check_args(tiny_args(tmp_path, controls="sft,ppo"))


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
    with pytest.raises(cli.UserError, match="set a budget"):
        grpo.train(tiny_args(tmp, time_budget=0, max_steps=0))
    assert not (tmp / "run").exists()


def test_step_budget_runs_exactly_that_many_steps(tmp_path):
    tmp = tiny_setup(tmp_path)
    results = grpo.train(tiny_args(tmp, max_steps=3, time_budget=0))
    train_rows = [r for r in tasks.read_jsonl(str(tmp / "run" / "metrics.jsonl")) if r.get("kind") == "train"]
    assert results["steps"] == 3 and [r["step"] for r in train_rows] == [1, 2, 3]


def test_the_controls_bad_demonstrations_stop_the_run_before_grpo_trains(tmp_path):
    """--sft-data is the control's input: a malformed file is reported before GRPO spends its minutes."""
    tmp = tiny_setup(tmp_path)
    (tmp / "bad.jsonl").write_text('{"prompt": "1+1=?\\n", "completion": "#### 2"}\n{"prompt": 5, "completion": "x"}\n')
    with pytest.raises(cli.UserError, match=r"bad.jsonl:2: 'prompt' must be a string"):
        grpo.train(tiny_args(tmp, control=True, sft_data=str(tmp / "bad.jsonl")))
    assert not (tmp / "run").exists()


def test_prompts_longer_than_the_context_are_skipped_and_counted(tmp_path, capsys):
    tmp = tiny_setup(tmp_path)                      # block_size 64, max_new_tokens 8: prompts of > 56 bytes skip
    rows = tasks.read_jsonl(str(tmp / "rl.jsonl"))
    rows[0] = {"prompt": "9" * 60 + "=?\n", "answer": "1"}
    tasks.write_jsonl(str(tmp / "rl.jsonl"), rows)
    grpo.train(tiny_args(tmp, max_steps=1))
    assert f"rl.jsonl: skipped 1 of {len(rows)} prompts longer than the context" in capsys.readouterr().out


# ---------------------------------------------------------------- every default, branch and logged statistic
# (issue 24: the mutants these tests kill passed every test above)

def numpy_advantages(rewards, scale, eps):
    """The docstring's three scalings in numpy: population std (ddof 0); a constant group gives exactly 0."""
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if scale == "group":
        advantages = centred / (rewards.std(axis=1, keepdims=True) + eps)
    elif scale == "batch":
        advantages = centred / (rewards.std() + eps)
    else:
        advantages = centred
    advantages[np.ptp(rewards, axis=1) == 0] = 0.0
    return advantages


# rewards whose spread runs from 1e-3 to 10, so that eps = 1e-4 moves the result well past the tolerance
spread_rewards = st.tuples(rewards_strategy, st.sampled_from([1e-3, 1.0])).map(lambda t: t[0] * t[1])


@given(rewards=spread_rewards, eps=st.sampled_from([1e-6, 0.5, 3.0]))
def test_each_scale_equals_numpy_and_the_defaults_are_group_scaling_with_eps_1e_4(rewards, eps):
    r = torch.tensor(rewards)
    for scale in ("group", "batch", "none"):
        got = grpo.group_advantages(r, scale=scale, eps=eps).numpy()
        assert np.allclose(got, numpy_advantages(rewards, scale, eps), rtol=1e-9, atol=1e-12), scale
    assert np.allclose(grpo.group_advantages(r).numpy(), numpy_advantages(rewards, "group", 1e-4), rtol=1e-9, atol=1e-12)
    assert np.allclose(grpo.group_advantages(r, scale="batch").numpy(), numpy_advantages(rewards, "batch", 1e-4),
                       rtol=1e-9, atol=1e-12)


def test_batch_scaling_shares_one_std_across_groups():
    """Two groups with the same centred rewards but different spreads: "group" gives both unit std, "batch"
    keeps their ratio (the batch std is sqrt of the mean of the two variances, a closed form)."""
    r = torch.tensor([[0.0, 2.0], [0.0, 6.0]], dtype=torch.float64)       # centred +-1 and +-3
    batch_std = float(r.std(unbiased=False))                               # population std of all 4 rewards
    assert math.isclose(batch_std, math.sqrt(((0 - 2) ** 2 + (2 - 2) ** 2 + (0 - 2) ** 2 + (6 - 2) ** 2) / 4))
    adv = grpo.group_advantages(r, scale="batch", eps=0.0)
    assert torch.allclose(adv, torch.tensor([[-1.0, 1.0], [-3.0, 3.0]], dtype=torch.float64) / batch_std)
    assert torch.allclose(grpo.group_advantages(r, scale="group", eps=0.0), torch.tensor([[-1.0, 1.0], [-1.0, 1.0]],
                                                                                         dtype=torch.float64))


def test_unknown_scale_is_an_error_and_no_rewards_give_no_advantages():
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(torch.ones(2, 3), scale="groups")
    for scale in ("group", "batch", "none"):
        empty = grpo.group_advantages(torch.zeros(0, 4, dtype=torch.float64), scale=scale)
        assert empty.shape == (0, 4) and empty.dtype == torch.float64


@given(gap=st.one_of(st.floats(-1, 1), st.floats(-60, 60)), logp=st.floats(-10, 0),
       max_log_ratio=st.sampled_from([None, 0.5, 3.0, 20.0]))
def test_k3_equals_its_closed_form_with_the_log_ratio_clamped_at_20_by_default(gap, logp, max_log_ratio):
    """k3 = r - 1 - log r with log r = clamp(log pi_ref - log pi, -m, m); m = 20 when not given."""
    m = 20.0 if max_log_ratio is None else max_log_ratio
    policy = torch.tensor([logp], dtype=torch.float64)
    ref = policy + gap
    log_r = min(max(float(ref - policy), -m), m)
    expected = math.expm1(log_r) - log_r
    got = grpo.kl_k3(policy, ref) if max_log_ratio is None else grpo.kl_k3(policy, ref, max_log_ratio)
    assert float(got) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def brute_force_aggregate(per_token, mask, aggregation, n_seqs=None, n_tokens=None, max_len=None):
    """The docstring's three reductions with Python loops; every normaliser is at least 1."""
    rows = [[x for x, m in zip(row, mrow) if m] for row, mrow in zip(per_token, mask)]
    n_seqs = len(per_token) if n_seqs is None else n_seqs
    if aggregation == "grpo":
        return sum(sum(row) / max(len(row), 1) for row in rows) / max(n_seqs, 1)
    total = sum(sum(row) for row in rows)
    if aggregation == "dr_grpo":
        return total / max(n_seqs * (max_len or len(per_token[0])), 1)
    return total / max(sum(len(row) for row in rows) if n_tokens is None else n_tokens, 1)


@st.composite
def token_grids(draw, max_rows=4, max_len=6):
    N, L = draw(st.integers(1, max_rows)), draw(st.integers(1, max_len))
    per_token = [[draw(st.floats(-5, 5)) for _ in range(L)] for _ in range(N)]
    mask = [[draw(st.sampled_from([0, 1])) for _ in range(L)] for _ in range(N)]
    return per_token, mask


@given(grid=token_grids(), aggregation=st.sampled_from(["grpo", "dr_grpo", "dapo"]),
       n_seqs=st.one_of(st.none(), st.integers(1, 8)), n_tokens=st.one_of(st.none(), st.floats(0.5, 30)),
       max_len=st.one_of(st.none(), st.integers(1, 9)))
def test_aggregate_equals_brute_force_with_and_without_each_normaliser(grid, aggregation, n_seqs, n_tokens, max_len):
    per_token, mask = grid
    got = grpo.aggregate(torch.tensor(per_token, dtype=torch.float64), torch.tensor(mask), aggregation,
                         n_seqs=n_seqs, n_tokens=n_tokens, max_len=max_len)
    expected = brute_force_aggregate(per_token, mask, aggregation, n_seqs, n_tokens, max_len)
    assert float(got) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_dr_grpo_divides_by_max_len_or_else_the_padded_width_and_unit_batches_are_not_halved():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    total = 1 + 2 + 3 + 5 + 6
    assert math.isclose(grpo.aggregate(per_token, mask, "dr_grpo").item(), total / (2 * 4))            # no max_len
    assert math.isclose(grpo.aggregate(per_token, mask, "dr_grpo", max_len=2).item(), total / (2 * 2))  # max_len < L
    assert math.isclose(grpo.aggregate(per_token, mask, "dr_grpo", n_seqs=5, max_len=3).item(), total / 15)
    one = torch.tensor([[7.5]], dtype=torch.float64)
    for aggregation in ("grpo", "dr_grpo", "dapo"):   # one sequence, one token: each reduction is the token
        assert grpo.aggregate(one, torch.ones(1, 1), aggregation).item() == 7.5
    masked_row = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])   # a fully masked sequence still counts in n_seqs
    assert math.isclose(grpo.aggregate(per_token, masked_row, "grpo").item(), (6 / 3 + 0) / 2)
    for aggregation in ("grpo", "dr_grpo", "dapo"):
        assert grpo.aggregate(per_token, torch.zeros(2, 4), aggregation).item() == 0.0
    with pytest.raises(ValueError, match="aggregation"):
        grpo.aggregate(per_token, mask, "mean")


@st.composite
def grpo_batches(draw, max_rows=4, max_len=6):
    """Old log-probs, log-ratios near 1 and past the +-20 clamp, reference gaps, any mask (fully masked too),
    advantages with exact zeros (a constant group gives exactly 0)."""
    N, L = draw(st.integers(1, max_rows)), draw(st.integers(1, max_len))

    def grid(elements):
        return [[draw(elements) for _ in range(L)] for _ in range(N)]
    old = grid(st.floats(-8, 0))
    log_ratio = grid(st.one_of(st.floats(-0.7, 0.7), st.floats(-40, 40)))
    ref_gap = grid(st.one_of(st.floats(-1, 1), st.floats(-40, 40)))
    mask = grid(st.sampled_from([0, 1]))
    advantages = [draw(st.one_of(st.just(0.0), st.floats(-3, 3))) for _ in range(N)]
    return old, log_ratio, ref_gap, mask, advantages


def brute_force_grpo(old, log_ratio, ref_gap, mask, advantages, beta, eps_low, eps_high, ratio_level, aggregation,
                     n_seqs, n_tokens, max_len, m):
    """The docstring's loss and statistics, one token at a time in float64."""
    clamp = lambda x: min(max(x, -m), m)
    per_token, ratios, kls = [], [], []
    for i, row in enumerate(log_ratio):
        real = [t for t in range(len(row)) if mask[i][t]]
        seq = sum(row[t] for t in real) / max(len(real), 1)
        loss_row = []
        for t, x in enumerate(row):
            lr = clamp(seq if ratio_level == "sequence" else x)
            ratio, A = math.exp(lr), advantages[i]
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            g = clamp(ref_gap[i][t] - x)                       # log pi_ref - log pi = (old + gap) - (old + x)
            k3 = math.expm1(g) - g
            loss_row.append(-min(ratio * A, clipped * A) + (beta * k3 if beta > 0 else 0.0))
            if mask[i][t]:
                binds = (ratio > 1 + eps_high and A > 0) or (ratio < 1 - eps_low and A < 0)
                ratios.append((ratio, lr, binds))
                kls.append(k3)
        per_token.append(loss_row)
    loss = brute_force_aggregate(per_token, mask, aggregation, n_seqs, n_tokens, max_len)
    n = len(ratios)
    stats = {"clipfrac": sum(b for _, _, b in ratios) / n if n else 0.0,
             "approx_kl": sum(r - 1 - lr for r, lr, _ in ratios) / n if n else 0.0,
             "ratio_mean": sum(r for r, _, _ in ratios) / n if n else 1.0,
             "kl": sum(kls) / n if n else 0.0}
    return loss, stats


@given(batch=grpo_batches(), beta=st.sampled_from([0.0, 0.3]), eps=st.tuples(st.floats(0.05, 0.5), st.floats(0.05, 0.5)),
       ratio_level=st.sampled_from(["token", "sequence"]), aggregation=st.sampled_from(["grpo", "dr_grpo", "dapo"]),
       n_seqs=st.one_of(st.none(), st.integers(1, 8)), n_tokens=st.one_of(st.none(), st.floats(1, 30)),
       max_len=st.one_of(st.none(), st.integers(1, 9)), max_log_ratio=st.sampled_from([3.0, 20.0]))
def test_grpo_loss_and_every_statistic_equal_brute_force(batch, beta, eps, ratio_level, aggregation, n_seqs, n_tokens,
                                                         max_len, max_log_ratio):
    old, log_ratio, ref_gap, mask, advantages = batch
    old_t = torch.tensor(old, dtype=torch.float64)
    logp = old_t + torch.tensor(log_ratio, dtype=torch.float64)
    ref = old_t + torch.tensor(ref_gap, dtype=torch.float64)
    loss, stats = grpo.grpo_loss(logp, old_t, torch.tensor(advantages, dtype=torch.float64), torch.tensor(mask),
                                 ref_logprobs=ref, beta=beta, eps_low=eps[0], eps_high=eps[1], ratio_level=ratio_level,
                                 aggregation=aggregation, n_seqs=n_seqs, n_tokens=n_tokens, max_len=max_len,
                                 max_log_ratio=max_log_ratio)
    want_loss, want_stats = brute_force_grpo(old, log_ratio, ref_gap, mask, advantages, beta, eps[0], eps[1],
                                             ratio_level, aggregation, n_seqs, n_tokens, max_len, max_log_ratio)
    assert float(loss) == pytest.approx(want_loss, rel=1e-9, abs=1e-9)
    assert set(stats) == {"clipfrac", "approx_kl", "ratio_mean", "kl"}
    for name, value in want_stats.items():   # clipfrac is a float32 mean of 0/1 flags: 1e-7
        assert stats[name] == pytest.approx(value, rel=1e-9, abs=1e-7 if name == "clipfrac" else 1e-12), name


@given(batch=grpo_batches())
def test_grpo_loss_defaults_are_token_ratios_clip_0_2_and_0_28_grpo_mean_no_kl_and_clamp_20(batch):
    old, log_ratio, ref_gap, mask, advantages = batch
    old_t = torch.tensor(old, dtype=torch.float64)
    logp = old_t + torch.tensor(log_ratio, dtype=torch.float64)
    loss, stats = grpo.grpo_loss(logp, old_t, torch.tensor(advantages, dtype=torch.float64), torch.tensor(mask))
    want_loss, want_stats = brute_force_grpo(old, log_ratio, ref_gap, mask, advantages, 0.0, 0.2, 0.28, "token",
                                             "grpo", None, None, None, 20.0)
    assert float(loss) == pytest.approx(want_loss, rel=1e-9, abs=1e-9)
    assert "kl" not in stats                                  # no reference, no kl statistic
    for name in ("clipfrac", "approx_kl", "ratio_mean"):
        assert stats[name] == pytest.approx(want_stats[name], rel=1e-9, abs=1e-7 if name == "clipfrac" else 1e-12), name
    # a reference without beta is logged but not in the loss (beta defaults to 0)
    ref = old_t + torch.tensor(ref_gap, dtype=torch.float64)
    with_ref, ref_stats = grpo.grpo_loss(logp, old_t, torch.tensor(advantages, dtype=torch.float64), torch.tensor(mask),
                                         ref_logprobs=ref)
    assert torch.equal(with_ref, loss) and ref_stats["kl"] == pytest.approx(want_stats["kl"], rel=1e-9, abs=1e-12)


def test_default_clip_range_binds_just_past_0_8_and_1_28():
    """Ratios 1.27 / 1.29 with A > 0 and 0.81 / 0.79 with A < 0: with eps_low = 0.2, eps_high = 0.28 (the
    defaults) exactly the second of each pair is clipped; a token with A = 0 never counts, whatever its ratio."""
    ratio = torch.tensor([[1.27], [1.29], [0.81], [0.79], [5.0], [0.1]], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    logp = ratio.log().requires_grad_(True)
    loss, stats = grpo.grpo_loss(logp, torch.zeros_like(ratio), adv, torch.ones_like(ratio), aggregation="dapo")
    loss.backward()
    assert stats["clipfrac"] == pytest.approx(2 / 6)
    expected = -(1.27 + 1.28 - 0.81 - 0.8 + 0 + 0) / 6
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    assert logp.grad[[1, 3, 4, 5], 0].tolist() == [0.0] * 4 and (logp.grad[[0, 2], 0] != 0).all()


def test_fully_masked_batch_logs_neutral_statistics():
    logp = torch.tensor([[-1.0, -30.0]], dtype=torch.float64)
    _, stats = grpo.grpo_loss(logp, logp - 5, torch.tensor([1.0], dtype=torch.float64), torch.zeros(1, 2),
                              ref_logprobs=logp + 5, beta=0.1)
    assert stats == {"clipfrac": 0.0, "approx_kl": 0.0, "ratio_mean": 1.0, "kl": 0.0}
    with pytest.raises(ValueError, match="ratio_level"):
        grpo.grpo_loss(logp, logp, torch.ones(1), torch.ones(1, 2), ratio_level="tokens")


def brute_force_sampling_distribution(z, temperature, top_k, top_p):
    """softmax(z / T) over the top-k, then the smallest most-likely set reaching top_p, renormalised;
    None where a token's cumulative mass sits within 1e-6 of top_p (the boundary is a rounding question)."""
    z = [x / temperature for x in z]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    allowed = order[:top_k] if 0 < top_k < len(z) else order
    top = max(z[i] for i in allowed)
    weights = {i: math.exp(z[i] - top) for i in allowed}
    total = sum(weights.values())
    probs = {i: w / total for i, w in weights.items()}
    if top_p < 1.0:
        nucleus, mass = [], 0.0
        for i in allowed:
            if abs(mass - top_p) < 1e-6:
                return None
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += probs[i]
        probs = {i: probs[i] / mass for i in nucleus}
    return probs


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 5, 0.9), (1.0, 3, 1.0),
                                                       (2.0, 0, 0.5)])
def test_policy_logprobs_and_entropy_equal_brute_force_under_the_sampling_transform(temperature, top_k, top_p):
    """policy_logprobs reads the rollout's transform from args (temperature, top_k, top_p): each next token's
    log-prob and the entropy H = -sum q log q >= 0 of the transformed distribution q, from the full logits."""
    torch.manual_seed(0)
    model = M.GPT(M.Config(vocab_size=24, block_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    tokens = torch.randint(0, 24, (2, 7), generator=torch.Generator().manual_seed(1))
    args = grpo.Args(temperature=temperature, top_k=top_k, top_p=top_p)
    with torch.no_grad():
        logp, entropy = grpo.policy_logprobs(model, tokens, args)
        logits = model(tokens).double()
    assert logp.shape == entropy.shape == (2, 6)
    checked = 0
    for b in range(2):
        for t in range(6):
            q = brute_force_sampling_distribution(logits[b, t].tolist(), temperature, top_k, top_p)
            if q is None:
                continue
            token = int(tokens[b, t + 1])
            want = math.log(q[token]) if token in q else -math.inf
            assert float(logp[b, t]) == pytest.approx(want, abs=1e-4)
            want_entropy = -sum(p * math.log(p) for p in q.values() if p > 0)
            assert float(entropy[b, t]) == pytest.approx(want_entropy, abs=1e-4) and float(entropy[b, t]) >= 0
            checked += 1
    assert checked >= 10


def test_grpo_loss_forwards_each_normaliser_and_keeps_the_logprobs_dtype():
    """At ratio 1 the loss is -sum_i A_i w_i over tokens: dr_grpo divides by n_seqs * max_len (max_len below the
    padded width here), dapo by n_tokens, grpo by n_seqs; float64 advantages do not promote a float32 loss."""
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    summed = -(2.0 * 3 - 1.0 * 1)
    cases = [(dict(aggregation="dr_grpo", max_len=3), summed / (2 * 3)),
             (dict(aggregation="dr_grpo", n_seqs=5, max_len=2), summed / (5 * 2)),
             (dict(aggregation="dapo", n_tokens=8.0), summed / 8),
             (dict(aggregation="grpo", n_seqs=4), -(2.0 - 1.0) / 4)]
    for kwargs, expected in cases:
        loss, _ = grpo.grpo_loss(logp, logp, adv, mask, **kwargs)
        assert loss.dtype == torch.float32 and math.isclose(loss.item(), expected, rel_tol=1e-6), kwargs


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_a_ratio_exactly_on_the_clip_boundary_is_not_clipped(advantage):
    """With eps_low = eps_high = 0 and rho = 1 exactly, rho sits on both boundaries: clip(rho) = rho, the
    gradient -A / n is not 0, so the clip does not bind and clipfrac is 0 (binding means gradient 0)."""
    logp = torch.full((1, 3), -0.7, dtype=torch.float64, requires_grad=True)
    loss, stats = grpo.grpo_loss(logp, logp.detach(), torch.tensor([advantage], dtype=torch.float64),
                                 torch.ones(1, 3), eps_low=0.0, eps_high=0.0, aggregation="dapo")
    loss.backward()
    assert torch.allclose(logp.grad, torch.full((1, 3), -advantage / 3, dtype=torch.float64))
    assert stats["clipfrac"] == 0.0


# ---------------------------------------------------------------- one estimator, two files

@given(logp=arrays(np.float64, st.integers(1, 12), elements=st.floats(-30, 0)),
       gap=arrays(np.float64, 12, elements=st.floats(-40, 40)))
def test_grpo_k3_is_the_k3_of_losses_py_including_its_clamp(logp, gap):
    """grpo.py keeps its own copy of k3 (a reader needs only model.py beside it); it must be losses.py's:
    the same closed form expm1(u) - u and the same clamp |u| <= 20, so the two agree to rounding."""
    import losses as L
    policy = torch.tensor(logp)
    ref = policy + torch.tensor(gap[:len(logp)])
    mine, theirs = grpo.kl_k3(policy, ref), L.kl_k3(policy, ref)
    assert grpo.MAX_LOG_RATIO == 20.0
    assert torch.allclose(mine, theirs, rtol=1e-12, atol=0.0)


def test_expression_reward_is_one_exactly_when_the_expression_hits_the_target_with_the_allowed_numbers():
    """The Countdown reward grpo.py registers, against hand-checked cases: 25*4-8 = 92 from [25, 4, 8]."""
    args = grpo.Args()
    row = {"prompt": "Use 25 4 8 to make 92", "numbers": [25, 4, 8], "answer": "92"}
    reward = lambda text: grpo.REWARDS["expression"](text, row, 10, False, args)
    assert reward("25*4=100, 100-8=92\n#### 25*4-8") == 1.0
    assert reward("#### 25*4-7") == 0.0          # 7 is not allowed (and misses the target)
    assert reward("#### 25*4-8+0") == 0.0        # 0 is not allowed
    assert reward("#### 8-4") == 0.0             # allowed numbers, wrong value
    assert reward("#### 25*4-8/") == 0.0         # does not parse: 0, never an exception
    assert reward("no answer line") == 0.0
    assert grpo.REWARDS["expression"]("#### 3+4", {"answer": "7"}, 3, False, args) == 0.0   # no numbers: none allowed


def test_compile_train_compiles_the_policy_after_the_reference_copy_and_passes_to_the_control(tmp_path, monkeypatch):
    """--compile-train compiles the policy's blocks (backend aot_eager here) once, after the KL reference is
    copied (the reference runs without gradients, eagerly), the run trains, and the control's sft.py command
    carries the flag, so both arms of the comparison train with the same kernels. With --fsdp under torchrun
    it is refused in one line."""
    tmp = tiny_setup(tmp_path)
    original = M.GPT.compile_blocks
    compiled = []
    monkeypatch.setattr(M.GPT, "compile_blocks", lambda model: (compiled.append(model), original(model, backend="aot_eager"))[1])
    monkeypatch.setitem(grpo.REWARDS, "digits", digit_reward)   # a reward that varies within a group: updates run
    torch._dynamo.reset()
    grpo.train(tiny_args(tmp, max_steps=2, beta=0.1, compile_train=True, rewards="digits=1"))
    assert len(compiled) == 1 and compiled[0].compiled_blocks is not None
    rows = [json.loads(l) for l in open(tmp / "run" / "metrics.jsonl") if '"train"' in l]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 and math.isfinite(r["kl"]) for r in rows)
    command = grpo.control_command(tiny_args(tmp, compile_train=True), 1.0, {})
    import sft
    assert "--compile-train" in command and cli.parse_args(sft.Args, command[1:]).compile_train
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(cli.UserError, match="--compile-train with --fsdp"):
        grpo.check_args(tiny_args(tmp, compile_train=True, fsdp=True))


# ---------------------------------------------------------------- learning rates and weights at the edge

def argv_of(args):
    """The command line of grpo.Args `args`: every field as its flag."""
    argv = []
    for k, v in vars(args).items():
        flag = "--" + k.replace("_", "-")
        argv += [flag if v else "--no-" + k.replace("_", "-")] if isinstance(v, bool) else [flag, str(v)]
    return argv


def run_main_in_process(argv, capsys):
    """cli.run(grpo.main) on argv, as `python grpo.py` runs it -> (exit status, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.run(lambda: grpo.main(argv))
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("extra, flag", [(["--lr", "1e30"], "--lr"), (["--lr", "1e308", "--grad-clip", "0"], "--lr"),
                                         (["--control", "--control-lr", "1e30"], "--control-lr")])
def test_an_absurd_lr_or_control_lr_is_one_line_before_anything_is_written(tmp_path, capsys, extra, flag):
    """`--control --control-lr 1e30` exited 0 with a control model whose weights reached 5e28 (sft.py took the
    lr and its weights stayed finite). Both learning rates are bounded by cli.MAX_LR in grpo.py's own
    check_args, before GRPO or the control writes anything."""
    tmp = tiny_setup(tmp_path)
    status, err = run_main_in_process(argv_of(tiny_args(tmp)) + extra, capsys)
    assert status == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"error: {flag} must be <= {cli.MAX_LR:g}"), err
    assert not (tmp / "run").exists()


def test_an_update_that_takes_a_weight_past_the_bound_stops_grpo_and_writes_no_model(tmp_path, capsys, monkeypatch):
    """--weight-decay 1e7 with lr 3e-3: AdamW multiplies every weight by 1 - 3e4 at the first update (the loss and
    gradient are still finite). The run stops at that update naming the weight (cli.check_weights), exit 2, one
    line; grpo.py saves model.pt only at the end, so no model is written (none was ever good)."""
    tmp = tiny_setup(tmp_path)
    monkeypatch.setitem(grpo.REWARDS, "digits", digit_reward)     # dense: every group has an advantage
    args = tiny_args(tmp, rewards="digits=1", weight_decay=1e7, max_steps=5)
    status, err = run_main_in_process(argv_of(args), capsys)
    assert status == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("error: step 1, epoch 1: weight ") and "past cli.MAX_WEIGHT" in err[0], err
    assert not (tmp / "run" / "model.pt").exists()


# ---------------------------------------------------------------- LoRA, system prompts, the control's settings

def test_a_lora_run_trains_only_the_adapters_and_its_checkpoint_reloads_them(tmp_path, monkeypatch):
    """--lora-rank: every base weight of the saved policy equals the start's exactly, the adapters moved, and
    checkpoints.load rebuilds the adapted model (its config says the rank)."""
    tmp = tiny_setup(tmp_path)
    monkeypatch.setitem(grpo.REWARDS, "digits", digit_reward)
    grpo.train(tiny_args(tmp, rewards="digits=1", max_steps=3, lr=1e-2, lora_rank=2, lora_alpha=4.0))
    start = checkpoints.load(str(tmp / "start.pt"))[0].state_dict()
    trained, _, _ = checkpoints.load(str(tmp / "run" / "model.pt"))
    assert (trained.config.lora_rank, trained.config.lora_alpha) == (2, 4.0)
    state = trained.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in start.items())
    assert any(state[name].abs().max() > 0 for name in state if name.endswith("lora_b"))


def test_the_control_runs_at_the_start_s_batch_size_and_learning_rate(tmp_path):
    """The control continues the start at the settings that made it (sft.py's saved arguments), so an equal-time
    comparison on a slow model is not one of batch 64 against the start's 8; --control-lr still wins."""
    args = tiny_args(tmp_path, system_prompt="Answer after ####.", lora_rank=4)
    control = cli.parse_args(sft.Args, grpo.control_command(args, 1.5, {"batch_size": 8, "micro_batch": 4,
                                                                           "lr": 5e-5, "n_layer": 9})[1:])
    assert (control.batch_size, control.micro_batch, control.lr) == (8, 4, 5e-5)
    assert (control.system_prompt, control.lora_rank, control.time_budget) == ("Answer after ####.", 4, 1.5)
    assert control.n_layer == sft.Args().n_layer                    # only the optimisation settings carry over
    args.control_lr = 1e-4
    assert cli.parse_args(sft.Args, grpo.control_command(args, 1.5, {"lr": 5e-5})[1:]).lr == 1e-4
    assert cli.parse_args(sft.Args, grpo.control_command(args, 1.5, {})[1:]).batch_size == sft.Args().batch_size


def test_the_table_prints_each_arm_s_own_minutes(tmp_path):
    row = {"greedy": 0.5, "stderr": 0.01, "per_difficulty": {3: 0.5}, "sampled": 0.4, "pass_at_k": 0.6,
           "skip_work": 0.1, "wrong_step": 0.1, "mean_length": 9.0}
    table = grpo.format_table({"start": row, "grpo": row, "control": row, "train_minutes": 0.33,
                               "control_minutes": 1.59}, tiny_args(tmp_path))
    minutes = [line.rstrip(" |").rsplit("| ", 1)[1] for line in table.splitlines()[2:]]
    assert minutes == ["0.0", "0.3", "1.6"]


def test_program_reward_is_the_share_of_hidden_tests_passed_and_needs_program_rows(tmp_path):
    """The program reward grpo.py registers: 2 of 4 hidden tests passed is 0.5 (x+1 agrees with x*x+1 at 0 and
    1 only); on data with no program rows it is refused before anything trains (every reward would be 0)."""
    args = grpo.Args()
    row = {"prompt": "f(2) = 5. f(x) = ?\n", "answer": "x*x+1", "tests": [[0, 1], [1, 2], [2, 5], [3, 10]]}
    reward = lambda text: grpo.REWARDS["program"](text, row, 10, False, args)
    assert reward("#### x*x+1") == 1.0 and reward("#### x+1") == 0.5 and reward("#### x") == 0.0
    assert reward("#### x.__class__") == 0.0 and reward("no program") == 0.0
    assert grpo.parse_reward_weights("program=1") == {"program": 1.0}
    tmp = tiny_setup(tmp_path)
    with pytest.raises(cli.UserError, match="--rewards program: .* no program rows"):
        grpo.train(tiny_args(tmp, rewards="program=1"))
    assert not (tmp / "run").exists()
