"""ppo.py: GAE against brute-force sums, the KL-shaped rewards, the clipped losses and their gradients
in closed form, the adaptive KL controller, the first importance ratio being 1, the verifiable reward
equal to model.is_correct, the reward model equal to reward.py's, and tiny end-to-end runs (the
reward-model score rises; timing, memory and parameters-by-role fields are present and right)."""
import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import model as M
import ppo as P
import reward as R

ENC = M.get_tokenizer("bytes")
small = st.floats(-5, 5, allow_nan=False)


def rows_of(draw_lengths, n_max):
    """Strategy: B rows of N values plus each row's real length (>= 1)."""
    return st.integers(1, n_max).flatmap(lambda n: st.tuples(
        st.just(n), st.lists(st.integers(1, n), min_size=1, max_size=draw_lengths)).flatmap(lambda t: st.tuples(
            st.just(t[1]), st.lists(st.lists(small, min_size=t[0], max_size=t[0]), min_size=len(t[1]),
                                    max_size=len(t[1])),
            st.lists(st.lists(small, min_size=t[0], max_size=t[0]), min_size=len(t[1]), max_size=len(t[1])))))


def prefix_mask(lengths, n):
    return torch.tensor([[1.0 if t < L else 0.0 for t in range(n)] for L in lengths], dtype=torch.float64)


# ---- GAE ---------------------------------------------------------------------------------------

def brute_force_gae(r, v, L, gamma, lam):
    """A_t = sum_{l=0}^{L-1-t} (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} [t+1 < L] - V_t."""
    delta = [r[t] + (gamma * v[t + 1] if t + 1 < L else 0.0) - v[t] for t in range(L)]
    return [sum((gamma * lam) ** l * delta[t + l] for l in range(L - t)) for t in range(L)]


@given(data=rows_of(4, 10), gamma=st.floats(0, 1), lam=st.floats(0, 1))
def test_gae_equals_the_explicit_sum_of_discounted_td_errors(data, gamma, lam):
    lengths, rewards, values = data
    n = len(rewards[0])
    adv, ret = P.gae(torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64),
                     prefix_mask(lengths, n), gamma, lam)
    for b, L in enumerate(lengths):
        expected = brute_force_gae(rewards[b], values[b], L, gamma, lam)
        assert adv[b, :L].tolist() == pytest.approx(expected, abs=1e-9)
        assert ret[b, :L].tolist() == pytest.approx([a + v for a, v in zip(expected, values[b])], abs=1e-9)


@given(data=rows_of(3, 8), gamma=st.floats(0, 1))
def test_gae_lambda_zero_is_the_one_step_td_error(data, gamma):
    lengths, rewards, values = data
    n = len(rewards[0])
    adv, _ = P.gae(torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64),
                   prefix_mask(lengths, n), gamma, 0.0)
    for b, L in enumerate(lengths):
        td = [rewards[b][t] + (gamma * values[b][t + 1] if t + 1 < L else 0) - values[b][t] for t in range(L)]
        assert adv[b, :L].tolist() == pytest.approx(td, abs=1e-9)


@given(data=rows_of(3, 8), gamma=st.floats(0, 1))
def test_gae_lambda_one_is_the_discounted_return_minus_the_value(data, gamma):
    lengths, rewards, values = data
    n = len(rewards[0])
    adv, ret = P.gae(torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64),
                     prefix_mask(lengths, n), gamma, 1.0)
    for b, L in enumerate(lengths):
        G = [sum(gamma ** (k - t) * rewards[b][k] for k in range(t, L)) for t in range(L)]
        assert adv[b, :L].tolist() == pytest.approx([g - v for g, v in zip(G, values[b])], abs=1e-8)
        assert ret[b, :L].tolist() == pytest.approx(G, abs=1e-8)


@given(data=rows_of(3, 8), junk=st.lists(small, min_size=2, max_size=2), pad=st.integers(1, 5),
       gamma=st.floats(0, 1), lam=st.floats(0, 1))
def test_gae_padding_contributes_nothing(data, junk, pad, gamma, lam):
    lengths, rewards, values = data
    n = len(rewards[0])
    r, v = torch.tensor(rewards, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    mask = prefix_mask(lengths, n)
    adv, ret = P.gae(r, v, mask, gamma, lam)
    # garbage rewards and values in the padded positions, plus `pad` more padded columns
    r2 = torch.cat([torch.where(mask.bool(), r, junk[0]), torch.full((len(r), pad), junk[0], dtype=torch.float64)], 1)
    v2 = torch.cat([torch.where(mask.bool(), v, junk[1]), torch.full((len(r), pad), junk[1], dtype=torch.float64)], 1)
    mask2 = torch.cat([mask, torch.zeros(len(r), pad, dtype=torch.float64)], 1)
    adv2, ret2 = P.gae(r2, v2, mask2, gamma, lam)
    assert torch.allclose(adv2[:, :n] * mask, adv * mask, atol=1e-12)
    assert torch.all(adv2[mask2 == 0] == 0) and torch.all(ret2[mask2 == 0] == 0)


# ---- rewards, whitening, losses ------------------------------------------------------------------

@given(data=rows_of(4, 8), scores=st.lists(small, min_size=4, max_size=4), beta=st.floats(0, 1))
def test_kl_shaped_rewards_sum_to_score_minus_beta_times_the_log_ratio(data, scores, beta):
    lengths, logp, ref = data
    n, B = len(logp[0]), len(lengths)
    mask = prefix_mask(lengths, n)
    score = torch.tensor(scores[:B], dtype=torch.float64)
    rewards = P.kl_shaped_rewards(score, torch.tensor(logp, dtype=torch.float64),
                                  torch.tensor(ref, dtype=torch.float64), mask, beta)
    for b, L in enumerate(lengths):
        log_ratio = [logp[b][t] - ref[b][t] for t in range(L)]
        assert float(rewards[b].sum()) == pytest.approx(scores[b] - beta * sum(log_ratio), abs=1e-9)
        assert rewards[b, :L - 1].tolist() == pytest.approx([-beta * x for x in log_ratio[:-1]], abs=1e-12)
        assert torch.all(rewards[b, L:] == 0)


@given(data=rows_of(4, 8))
def test_whitened_advantages_have_mean_zero_and_std_one_over_real_tokens(data):
    lengths, values, _ = data
    x = torch.tensor(values, dtype=torch.float64)
    mask = prefix_mask(lengths, x.shape[1])
    real = x[mask.bool()]
    white = P.whiten(x, mask)
    if real.var(unbiased=False) > 1e-3:
        w = P.whiten(x, mask, eps=0.0)[mask.bool()]
        assert float(w.mean()) == pytest.approx(0, abs=1e-9)
        assert float(w.var(unbiased=False)) == pytest.approx(1, abs=1e-6)
    assert torch.all(white[mask == 0] == 0)


token = st.tuples(st.floats(-2, 2), st.floats(-2, 2), st.floats(-3, 3))   # (log-ratio, advantage, old logp)


@given(tokens=st.lists(token, min_size=1, max_size=12), eps=st.floats(0.05, 0.4), extra=st.floats(0, 0.2))
def test_surrogate_gradient_vanishes_outside_the_clip_region_in_the_advantage_direction(tokens, eps, extra):
    eps_high = eps + extra
    old = torch.tensor([t[2] for t in tokens], dtype=torch.float64)[None]
    logp = (old + torch.tensor([t[0] for t in tokens], dtype=torch.float64)[None]).requires_grad_(True)
    adv = torch.tensor([t[1] for t in tokens], dtype=torch.float64)[None]
    mask = torch.ones_like(adv)
    loss, stats = P.policy_loss(logp, old, adv, mask, eps, eps_high)
    loss.backward()
    n, clipped = len(tokens), 0
    for i, (log_ratio, a, _) in enumerate(tokens):
        ratio = math.exp(log_ratio)
        if (a > 0 and ratio > 1 + eps_high) or (a < 0 and ratio < 1 - eps):
            assert float(logp.grad[0, i]) == 0.0          # the constant clipped term was taken
            clipped += 1
        else:   # d/dlogp of -(ratio * A) / n = -(ratio * A) / n
            assert float(logp.grad[0, i]) == pytest.approx(-ratio * a / n, rel=1e-9, abs=1e-12)
    assert float(stats["clipfrac"]) == pytest.approx(clipped / n)
    assert float(stats["approx_kl"]) == pytest.approx(np.mean([math.exp(x) - 1 - x for x, _, _ in tokens]), abs=1e-12)


@given(vals=st.lists(st.tuples(small, small, small), min_size=1, max_size=12), clip=st.floats(0.01, 1))
def test_clipped_value_loss_equals_its_closed_form(vals, clip):
    v, old, ret = (torch.tensor([x[i] for x in vals], dtype=torch.float64)[None] for i in range(3))
    got, _ = P.value_loss(v, old, ret, torch.ones_like(v), clip)
    expected = np.mean([0.5 * max((a - r) ** 2, (o + min(max(a - o, -clip), clip) - r) ** 2) for a, o, r in vals])
    assert float(got) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(kl=st.floats(0, 20), target=st.floats(0.1, 10), beta=st.floats(0.001, 1), n=st.integers(1, 256))
def test_adaptive_controller_raises_beta_above_target_and_lowers_it_below(kl, target, beta, n):
    new = P.adaptive_beta(beta, kl, target, horizon=10000, n=n)
    if kl > target * (1 + 1e-9):
        assert new > beta
    elif kl < target * (1 - 1e-9):
        assert new < beta
    error = min(max(kl / target - 1, -0.2), 0.2)          # Ziegler et al.: proportional error, clipped
    assert new == pytest.approx(beta * (1 + error * n / 10000), rel=1e-12)


@given(logits=st.lists(st.floats(-5, 5), min_size=2, max_size=12), top_k=st.integers(0, 12),
       temperature=st.floats(0.3, 2))
def test_entropy_matches_torch_categorical(logits, top_k, temperature):
    logp = M.sampling_logprobs(torch.tensor(logits, dtype=torch.float64), temperature, top_k)
    expected = torch.distributions.Categorical(probs=logp.exp()).entropy()
    assert float(P.entropy(logp)) == pytest.approx(float(expected), abs=1e-6)


@given(data=rows_of(3, 8))
def test_explained_variance_matches_numpy(data):
    lengths, values, returns = data
    mask = prefix_mask(lengths, len(values[0]))
    v, r = torch.tensor(values, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)
    real_v, real_r = v[mask.bool()].numpy(), r[mask.bool()].numpy()
    got = P.explained_variance(v, r, mask)
    if np.var(real_r) > 1e-9:
        assert got == pytest.approx(1 - np.var(real_r - real_v) / np.var(real_r), rel=1e-6, abs=1e-9)
    if np.var(real_r) > 0:
        assert P.explained_variance(r, r, mask) == 1.0   # a perfect critic
    else:
        assert math.isnan(got)                             # undefined when the returns do not vary


# ---- models and rollouts -------------------------------------------------------------------------

def tiny_gpt(n_layer=1, seed=0):
    torch.manual_seed(seed)
    return M.GPT(M.Config(vocab_size=ENC.n_vocab, block_size=64, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=32))


def gpt_params_closed_form(cfg):
    """Tied swiglu/rmsnorm/no-bias GPT: V C + L (2 C + 2 C^2 + 2 C Hkv d + 3 C H) + C."""
    C, hidden = cfg.n_embd, cfg.ffn_width
    per_layer = 2 * C + 2 * C * C + 2 * C * cfg.n_kv_head * cfg.head_dim + 3 * C * hidden
    return cfg.vocab_size * C + cfg.n_layer * per_layer + C


#: constructed completions and answers: the shared set for "the verifier reward equals model.is_correct"
VERIFIER_CASES = [("3+4=7\n#### 7", "7", True), ("#### 8", "7", True), ("#### 7.0", "7", True),
                  ("#### 1,000", "1000", True), ("7", "7", True), ("#### 12 then #### 13", "13", True),
                  ("#### 1,000", "100", False), ("####", "0", False), ("#### -5", "-5", True)]


def test_verifier_reward_equals_model_is_correct_on_the_completion_only():
    # every prompt ends with a correct-looking "#### <answer>": it must not count, only the completion does
    prompts = [M.encode(ENC, f"q{i} #### {a}\n") for i, (_, a, _) in enumerate(VERIFIER_CASES)]
    completions, answers = [], []
    for text, answer, finished in VERIFIER_CASES:
        completions.append(M.encode(ENC, text) + ([ENC.eot_token] if finished else []))
        answers.append(answer)
    finished = [text != "7" for text, _, _ in VERIFIER_CASES]   # one truncated row
    batch = P.make_batch(prompts, completions, finished, ENC, "cpu")
    got = P.scores(batch, answers, reward_model=None, missing_eos_penalty=5.0)   # no penalty for the verifier
    expected = [float(M.is_correct(text, a)) for text, a, _ in VERIFIER_CASES]
    assert got.tolist() == expected
    assert batch.texts == [text for text, _, _ in VERIFIER_CASES]


def test_verifier_reward_equals_grpo_reward_on_the_same_completions():
    """Issue 13: the same task for both algorithms. grpo.py's correctness reward on the shared cases."""
    grpo = pytest.importorskip("grpo")
    if not hasattr(grpo, "correct_reward"):
        pytest.skip("grpo.py has no correct_reward")
    texts = [text for text, _, _ in VERIFIER_CASES]
    answers = [a for _, a, _ in VERIFIER_CASES]
    theirs = [grpo.correct_reward(t, {"prompt": "", "answer": a}, len(t), False, grpo.Args()) for t, a in zip(texts, answers)]
    assert P.verifier_scores(texts, answers).tolist() == theirs


def test_reward_model_scores_agree_with_reward_py_under_left_padding(tmp_path):
    rm = R.RewardModel(tiny_gpt(seed=4), ENC)
    with torch.no_grad():
        rm.head.weight.normal_()
    R.save_reward_model(str(tmp_path / "rm.pt"), rm)
    scalar, _ = P.load_reward_model(str(tmp_path / "rm.pt"), "cpu")
    prompts = ["1+2=?\n", "123+456=?\n", "9+9=?\n"]
    completions = ["#### 3", "3+6=9\n2+5=7\n1+4=5\n#### 579", "9+9=18\n#### 18"]
    batch = P.make_batch([M.encode(ENC, p) for p in prompts],
                         [M.encode(ENC, c) + [ENC.eot_token] for c in completions], [True] * 3, ENC, "cpu")
    got = P.scores(batch, None, scalar.eval())
    assert torch.allclose(got, rm.eval().score(prompts, completions), atol=1e-5)


def test_first_ratio_is_one_and_sampler_logprobs_match_a_full_forward():
    policy = tiny_gpt(n_layer=2, seed=1).eval()
    args = P.Args(temperature=0.7, top_k=20, max_new_tokens=12, n_minibatches=2, update_epochs=1)
    rows = [{"prompt": p, "answer": "0"} for p in ["1+1=?\n", "22+33=?\n", "7*8=?\n", "100-1=?\n", "5=?\n"]]
    batch, sample_logprobs = P.rollout(policy, ENC, rows, args, torch.Generator().manual_seed(0), "cpu")
    old = P.response_logprobs(policy, batch, args.temperature, args.top_k)
    assert torch.allclose(sample_logprobs, old, atol=1e-5)   # KV-cache sampler == full forward (fp32)
    value = P.ScalarHead(tiny_gpt(seed=2))
    models = {"policy": policy, "value": value}
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=1e-3)
    zeros = torch.zeros_like(old)
    stats = P.ppo_update(models, optimizer, batch, old, zeros, torch.randn_like(old) * batch.mask, zeros, args,
                         torch.Generator().manual_seed(0))
    assert stats["first_ratio"] == pytest.approx(1.0, abs=1e-6)


# ---- tiny end-to-end runs --------------------------------------------------------------------------

def write_inputs(folder):
    """A random tiny policy, a reward model whose score depends only on the last token (no blocks), and
    64 addition prompts."""
    M.save(str(folder / "policy.pt"), tiny_gpt(), ENC)
    rm = R.RewardModel(tiny_gpt(n_layer=0, seed=5), ENC)
    with torch.no_grad():
        rm.head.weight.normal_(0, 1 / 32 ** 0.5)
    R.save_reward_model(str(folder / "rm.pt"), rm)
    rng = random.Random(0)
    rows = [{"prompt": f"{a}+{b}=?\n", "answer": str(a + b)}
            for a, b in ((rng.randint(1, 99), rng.randint(1, 99)) for _ in range(64))]
    M.write_jsonl(str(folder / "rl_train.jsonl"), rows)
    M.write_jsonl(str(folder / "rl_test.jsonl"), rows[:8])
    return rows


def tiny_args(folder, **overrides):
    args = dict(init=str(folder / "policy.pt"), reward_model=str(folder / "rm.pt"),
                data=str(folder / "rl_train.jsonl"), eval_data=str(folder / "rl_test.jsonl"), out=str(folder / "run"),
                n_eval=8, completions_per_step=32, max_new_tokens=6, time_budget=0, max_steps=20,
                n_minibatches=2, lr=3e-2, value_lr=1e-3, missing_eos_penalty=0.0, beta=0.0, early_stop_kl=1.0,
                device="cpu")
    args.update(overrides)
    return P.Args(**args)


def mean_score(policy_path, rm_path, rows, args):
    policy, _, _ = M.load(policy_path)
    rm, _ = P.load_reward_model(rm_path, "cpu")
    batch, _ = P.rollout(policy, ENC, rows * 8, args, torch.Generator().manual_seed(123), "cpu")
    return float(P.scores(batch, None, rm.eval()).mean())


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ppo_rm")
    rows = write_inputs(folder)
    args = tiny_args(folder)
    before = mean_score(args.init, args.reward_model, rows, args)
    summary = P.train(args)
    after = mean_score(str(folder / "run" / "model.pt"), args.reward_model, rows, args)
    return folder, summary, before, after


def test_tiny_run_raises_the_reward_model_score_on_its_training_prompts(rm_run):
    _, _, before, after = rm_run
    assert after > before + 1.0   # score std ~1 per completion; 512 samples before and after


def read_metrics(folder):
    return [json.loads(line) for line in open(folder / "run" / "metrics.jsonl")]


SPEC_TRAIN = ["step", "time_s", "train_minutes", "gen_s", "score_s", "adv_s", "update_s", "step_s", "completions",
              "tokens_per_s", "peak_mem_mb", "reward_mean", "accuracy", "kl", "entropy", "clipfrac", "approx_kl",
              "response_length", "value_loss", "explained_variance", "beta"]
POSITIVE = ["gen_s", "score_s", "adv_s", "update_s", "step_s", "tokens_per_s", "peak_mem_mb", "train_minutes"]


def check_run(folder, summary, reward_role):
    rows = read_metrics(folder)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert train and len(evals) >= 2 and evals[0]["step"] == 0 and evals[-1]["step"] == train[-1]["step"]
    for r in train:
        assert set(SPEC_TRAIN) <= set(r)
        assert all(r[k] > 0 for k in POSITIVE), {k: r[k] for k in POSITIVE}
        assert r["completions"] == 32
    for r in evals:
        assert {"train_minutes", "eval_accuracy", "eval_stderr"} <= set(r)
    on_disk = json.load(open(folder / "run" / "summary.json"))
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["algo"] == "ppo" and on_disk["steps"] == len(train)
    assert on_disk["peak_mem_mb"] > 0 and on_disk["sec_per_step"] > 0
    assert all(v > 0 for v in on_disk["time_split"].values())
    policy_cfg = M.load(str(folder / "policy.pt"))[0].config
    rm_cfg = M.load(str(folder / "rm.pt"))[0].config
    n_policy = gpt_params_closed_form(policy_cfg)
    value_cfg = rm_cfg if reward_role else policy_cfg
    assert on_disk["params_by_role"] == {"policy": n_policy, "reference": n_policy,
                                         "value": gpt_params_closed_form(value_cfg) + value_cfg.n_embd + 1,
                                         "reward": gpt_params_closed_form(rm_cfg) + rm_cfg.n_embd + 1 if reward_role else 0}


def test_timing_memory_and_params_by_role_are_logged_after_a_tiny_run(rm_run):
    folder, summary, _, _ = rm_run
    check_run(folder, summary, reward_role=True)


def test_params_by_role_equal_sums_over_the_modules_held(tmp_path):
    write_inputs(tmp_path)
    models, _ = P.build_models(tiny_args(tmp_path), "cpu")
    for role, module in models.items():
        unique = {id(p): p.numel() for m in module.modules() for p in m.parameters(recurse=False)}
        assert P.params_by_role(models)[role] == sum(unique.values())
    assert all(not p.requires_grad for role in ("reference", "reward") for p in models[role].parameters())


def test_verifier_run_logs_the_same_fields_and_holds_no_reward_model(tmp_path):
    write_inputs(tmp_path)
    summary = P.train(tiny_args(tmp_path, reward="verifier", max_steps=2, kl_target=1.0, beta=0.1))
    check_run(tmp_path, summary, reward_role=False)
    betas = [r["beta"] for r in read_metrics(tmp_path) if r.get("kind") == "train"]
    assert betas[0] == 0.1 and betas[1] != 0.1   # the adaptive controller moved beta


def test_bad_arguments_are_one_line_errors(tmp_path):
    write_inputs(tmp_path)
    with pytest.raises(M.UserError, match="--reward"):
        P.train(tiny_args(tmp_path, reward="human"))
    with pytest.raises(M.UserError, match="missing.pt"):
        P.train(tiny_args(tmp_path, init=str(tmp_path / "missing.pt")))
    with pytest.raises(M.UserError, match="policy.pt"):   # a policy checkpoint is not a reward model
        P.train(tiny_args(tmp_path, reward_model=str(tmp_path / "policy.pt")))
