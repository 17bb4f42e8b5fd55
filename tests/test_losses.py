"""Properties of losses.py, each checked against something independent of it: a closed form, an
identity, a brute-force sum in numpy or Python, or PyTorch's own F.cross_entropy."""
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import losses as L
import model as M

SEEDS = st.integers(0, 2 ** 31 - 1)


def finite(scale):
    return st.floats(-scale, scale, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def logit_rows(draw, max_rows=5, max_vocab=12, scale=20.0, same_shape_as=None):
    """A (rows, vocab) float64 tensor of logits."""
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(2, max_vocab))
    return torch.tensor(draw(arrays(np.float64, (rows, vocab), elements=finite(scale))))


@st.composite
def logit_pairs(draw, scale=20.0, max_vocab=12):
    a = draw(logit_rows(scale=scale, max_vocab=max_vocab))
    b = torch.tensor(draw(arrays(np.float64, tuple(a.shape), elements=finite(scale))))
    return a, b


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_logsumexp(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(-1)
    return m + np.log(np.exp(z - m[..., None]).sum(-1))


# ------------------------------------------------------------------------------------------------
# Information quantities
# ------------------------------------------------------------------------------------------------

@given(logit_pairs())
def test_cross_entropy_is_entropy_plus_kl_and_matches_brute_force(pair):
    p_logits, q_logits = pair
    p, q = np_softmax(p_logits.numpy()), np_softmax(q_logits.numpy())
    h_p = -(p * np.log(np.where(p > 0, p, 1))).sum(-1)
    h_pq = -(p * np.log(q)).sum(-1)
    kl = (p * (np.log(np.where(p > 0, p, 1)) - np.log(q))).sum(-1)
    got_h, got_hpq = L.entropy(p_logits), L.soft_cross_entropy(torch.softmax(p_logits, -1), q_logits)
    got_kl = L.kl_divergence(p_logits, q_logits)
    np.testing.assert_allclose(got_h.numpy(), h_p, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got_hpq.numpy(), h_pq, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got_kl.numpy(), kl, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(got_hpq, got_h + got_kl, rtol=1e-9, atol=1e-9)      # H(p,q) = H(p) + KL


@given(logit_pairs(), finite(1e3))
def test_kl_nonnegative_zero_iff_equal_and_above_pinsker(pair, shift):
    p_logits, q_logits = pair
    kl = L.kl_divergence(p_logits, q_logits)
    tv = 0.5 * (torch.softmax(p_logits, -1) - torch.softmax(q_logits, -1)).abs().sum(-1)
    assert (kl >= -1e-12).all()
    assert (kl >= 2 * tv ** 2 - 1e-9).all()               # Pinsker: p != q (tv > 0) forces KL > 0
    same = L.kl_divergence(p_logits, p_logits + shift)    # same distribution, shifted logits
    assert same.abs().max() < 1e-9


@given(logit_rows(scale=30.0))
def test_entropy_lies_between_zero_and_log_vocab(logits):
    vocab = logits.shape[-1]
    h = L.entropy(logits)
    assert (h >= -1e-12).all() and (h <= math.log(vocab) + 1e-9).all()
    torch.testing.assert_close(L.entropy(torch.zeros(3, vocab, dtype=torch.float64)),
                               torch.full((3,), math.log(vocab), dtype=torch.float64))
    spike = torch.zeros(vocab, dtype=torch.float64)
    spike[0] = 1e4                                          # a point mass: H = 0
    assert L.entropy(spike).abs() < 1e-12


@given(logit_pairs(), st.data())
def test_softmax_shift_invariance_of_every_quantity(pair, data):
    p_logits, q_logits = pair
    rows, vocab = p_logits.shape
    shift = torch.tensor(data.draw(arrays(np.float64, (rows, 1), elements=finite(1e3))))
    targets = torch.tensor(data.draw(arrays(np.int64, (rows,), elements=st.integers(0, vocab - 1))))
    close = dict(rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(L.entropy(p_logits + shift), L.entropy(p_logits), **close)
    torch.testing.assert_close(L.kl_divergence(p_logits + shift, q_logits - shift),
                               L.kl_divergence(p_logits, q_logits), **close)
    torch.testing.assert_close(L.log_likelihood(q_logits + shift, targets),
                               L.log_likelihood(q_logits, targets), **close)
    torch.testing.assert_close(L.cross_entropy(q_logits + shift, targets, label_smoothing=0.1),
                               L.cross_entropy(q_logits, targets, label_smoothing=0.1), **close)


@given(logit_rows(max_rows=16), st.data(), st.integers(1, 8))
def test_perplexity_and_bits_match_brute_force(logits, data, bytes_per_token):
    rows, vocab = logits.shape
    targets = data.draw(arrays(np.int64, (rows,), elements=st.integers(0, vocab - 1)))
    q_target = np_softmax(logits.numpy())[np.arange(rows), targets]         # q(x_t)
    mean_nll = L.nll(logits, torch.tensor(targets)).mean()
    geometric_mean = math.exp(np.log(q_target).mean())
    np.testing.assert_allclose(L.perplexity(mean_nll).item(), 1 / geometric_mean, rtol=1e-9)
    np.testing.assert_allclose(L.bits_per_token(mean_nll).item(), -np.log2(q_target).mean(), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(L.bits_per_byte(mean_nll, rows, rows * bytes_per_token).item(),
                               -np.log2(q_target).sum() / (rows * bytes_per_token), rtol=1e-9, atol=1e-12)


@given(logit_rows(), st.data())
def test_hard_targets_likelihood_nll_and_one_hot_soft_cross_entropy_agree(logits, data):
    rows, vocab = logits.shape
    targets = torch.tensor(data.draw(arrays(np.int64, (rows,), elements=st.integers(0, vocab - 1))))
    log_q = np.log(np_softmax(logits.numpy()))[np.arange(rows), targets.numpy()]
    np.testing.assert_allclose(L.log_likelihood(logits, targets).numpy(), log_q, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(L.nll(logits, targets), -L.log_likelihood(logits, targets))
    torch.testing.assert_close(L.soft_cross_entropy(F.one_hot(targets, vocab).double(), logits),
                               L.nll(logits, targets), rtol=1e-9, atol=1e-9)


def test_zero_probability_classes_count_zero_with_finite_gradient():
    logits = torch.tensor([[0.0, 1.0, -math.inf, 2.0], [3.0, -math.inf, -math.inf, 3.0]],
                          dtype=torch.float64, requires_grad=True)
    kept = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 3.0])]
    h = L.entropy(logits)
    for row, z in zip(h, kept):
        p = np_softmax(z.numpy())
        assert abs(row.item() + (p * np.log(p)).sum()) < 1e-12
    kl = L.kl_divergence(logits, torch.zeros(2, 4, dtype=torch.float64))  # p has zeros, q does not
    (h.sum() + kl.sum()).backward()
    assert torch.isfinite(h).all() and torch.isfinite(kl).all() and torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------------------------------------
# Cross-entropy, label smoothing, z-loss, chunked
# ------------------------------------------------------------------------------------------------

@st.composite
def ce_batch(draw, max_rows=24, max_vocab=40):
    seed = draw(SEEDS)
    rows, vocab = draw(st.integers(1, max_rows)), draw(st.integers(2, max_vocab))
    gen = torch.Generator().manual_seed(seed)
    logits = 5 * torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    ignored = torch.rand(rows, generator=gen) < draw(st.sampled_from([0.0, 0.3, 0.8]))
    targets[ignored] = -100
    return logits, targets


@given(ce_batch(), st.sampled_from([0.0, 0.05, 0.3]), st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_matches_torch_with_ignore_index_and_label_smoothing(batch, eps, reduction):
    logits, targets = batch
    assume(reduction != "mean" or (targets != -100).any())     # torch's mean of nothing is NaN
    ours = L.cross_entropy(logits, targets, label_smoothing=eps, reduction=reduction)
    ref = F.cross_entropy(logits, targets, ignore_index=-100, label_smoothing=eps, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@given(ce_batch(max_rows=8, max_vocab=8), st.floats(0.0, 1.0))
def test_label_smoothing_equals_its_closed_form(batch, eps):
    logits, targets = batch
    per_token = L.cross_entropy(logits, targets, label_smoothing=eps, reduction="none")
    for row, y in enumerate(targets.tolist()):
        if y == -100:
            assert per_token[row] == 0
            continue
        minus_log_q = [-math.log(v) for v in np_softmax(logits[row].numpy())]
        expected = (1 - eps) * minus_log_q[y] + eps * sum(minus_log_q) / len(minus_log_q)
        assert abs(per_token[row].item() - expected) < 1e-9 * max(1.0, abs(expected))


@given(ce_batch(), st.floats(1e-5, 1.0))
def test_z_loss_adds_coefficient_times_squared_log_partition(batch, coef):
    logits, targets = batch
    valid = (targets != -100).numpy()
    assume(valid.any())
    extra = L.cross_entropy(logits, targets, z_loss=coef) - L.cross_entropy(logits, targets)
    expected = coef * (np_logsumexp(logits.numpy())[valid] ** 2).mean()
    assert abs(extra.item() - expected) < 1e-9 * max(1.0, expected)


def _plain_reference(hidden, weight, targets, eps, z, reduction, mask=None):
    """F.cross_entropy on the full logits plus a hand-written z-loss: the un-chunked reference."""
    targets = targets.clone()
    if mask is not None:
        targets[~mask] = -100
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    flat = targets.reshape(-1)
    valid = flat != -100
    per_token = F.cross_entropy(logits, flat, label_smoothing=eps, reduction="none")
    per_token = per_token + z * torch.where(valid, torch.logsumexp(logits, -1) ** 2, 0.0)
    total = per_token.sum()
    return total / valid.sum().clamp_min(1) if reduction == "mean" else total


@given(SEEDS, st.integers(1, 3), st.integers(1, 9), st.integers(2, 50), st.integers(1, 12),
       st.integers(1, 20), st.sampled_from([0.0, 0.1]), st.sampled_from([0.0, 1e-2]),
       st.sampled_from(["mean", "sum"]), st.booleans())
def test_chunked_cross_entropy_equals_plain_in_value_and_gradients(seed, batch, seq, vocab, n_embd, chunk,
                                                                    eps, z, reduction, use_mask):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, n_embd, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, n_embd, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    targets[torch.rand(batch, seq, generator=gen) < 0.2] = -100
    mask = torch.rand(batch, seq, generator=gen) < 0.7 if use_mask else None
    ours = L.chunked_cross_entropy(hidden, weight, targets, mask=mask, label_smoothing=eps, z_loss=z,
                                   chunk_size=chunk, reduction=reduction)
    grads = torch.autograd.grad(3.0 * ours, (hidden, weight))      # a non-unit upstream gradient
    ref = _plain_reference(hidden, weight, targets, eps, z, reduction, mask)
    ref_grads = torch.autograd.grad(3.0 * ref, (hidden, weight))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_chunked_cross_entropy_float32_and_no_grad():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=gen, requires_grad=True)
    weight = torch.randn(1000, 32, generator=gen, requires_grad=True)
    targets = torch.randint(0, 1000, (64,), generator=gen)
    ours = L.chunked_cross_entropy(hidden, weight, targets, chunk_size=7)
    ours.backward()
    ref = F.cross_entropy(hidden @ weight.T, targets)
    ref_h, ref_w = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, ref_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad, ref_w, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        no_grad_loss = L.chunked_cross_entropy(hidden, weight, targets, chunk_size=5)
    torch.testing.assert_close(no_grad_loss, ref.detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunked_cross_entropy"):
        L.chunked_cross_entropy(hidden, weight, targets[:10])


@given(ce_batch(max_rows=20), st.integers(1, 19))
def test_whole_batch_denominator_makes_microbatches_match_full_batch(batch, split):
    logits, targets = batch
    assume(split < len(targets))
    full_logits = logits.clone().requires_grad_()
    L.cross_entropy(full_logits, targets).backward()
    micro_logits = logits.clone().requires_grad_()
    count = (targets != -100).sum().clamp_min(1)                 # the whole batch's token count
    for part in (slice(0, split), slice(split, None)):
        L.cross_entropy(micro_logits[part], targets[part], denom=count).backward()
    torch.testing.assert_close(micro_logits.grad, full_logits.grad, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# KL estimators
# ------------------------------------------------------------------------------------------------

@settings(max_examples=12)
@given(logit_pairs(scale=2.0, max_vocab=8), SEEDS)
def test_k1_and_k3_are_unbiased_estimators_of_kl_pi_to_ref(pair, seed):
    pi_logits, ref_logits = pair[0][0], pair[1][0]                 # one categorical each
    pi, ref = np_softmax(pi_logits.numpy()), np_softmax(ref_logits.numpy())
    exact = float((pi * np.log(pi / ref)).sum())                    # KL(pi || ref), brute force
    n = 20000
    gen = torch.Generator().manual_seed(seed)
    x = torch.multinomial(torch.tensor(pi), n, replacement=True, generator=gen)
    logp, ref_logp = torch.tensor(np.log(pi))[x], torch.tensor(np.log(ref))[x]   # x ~ pi
    for estimator in (L.kl_k1, L.kl_k3):
        k = estimator(logp, ref_logp)
        stderr = k.std().item() / math.sqrt(n)                       # from the sample variance
        assert abs(k.mean().item() - exact) <= 5 * stderr + 1e-12, estimator.__name__


@given(finite(1e4), finite(1e4))
def test_k3_and_k2_are_nonnegative_per_sample(logp, ref_logp):
    k3 = L.kl_k3(torch.tensor([logp]), torch.tensor([ref_logp]))
    k2 = L.kl_k2(torch.tensor([logp]), torch.tensor([ref_logp]))
    assert torch.isfinite(k3).all() and (k3 >= 0).all() and (k2 >= 0).all()


@given(finite(3.0))
def test_k2_matches_k3_to_second_order_per_sample(u):
    """k3 - k2 = e^u - 1 - u - u^2/2 = e^xi u^3 / 6 with |xi| <= |u| (Taylor's remainder)."""
    logp, ref_logp = torch.tensor([0.0], dtype=torch.float64), torch.tensor([u], dtype=torch.float64)
    gap = (L.kl_k3(logp, ref_logp) - L.kl_k2(logp, ref_logp)).item()
    assert abs(gap) <= abs(u) ** 3 * math.exp(abs(u)) / 6 + 1e-15


@given(logit_pairs(scale=1.0, max_vocab=10))
def test_k2_bias_is_third_order(pair):
    """With u = log r and E_pi[e^u] = 1: KL - E[k2] = E[u^3]/6 + R, |R| <= E[u^4 e^|u|]/24."""
    pi_logits, ref_logits = pair[0][0], pair[0][0] + 0.3 * pair[1][0]
    pi = np_softmax(pi_logits.numpy())
    u = np.log(np_softmax(ref_logits.numpy())) - np.log(pi)                    # log r for each token
    logp, ref_logp = torch.tensor(np.log(pi)), torch.tensor(np.log(pi) + u)
    expected_k2 = float((pi * L.kl_k2(logp, ref_logp).numpy()).sum())           # exact E_pi[k2]
    kl = float((pi * -u).sum())
    remainder = float((pi * u ** 4 * np.exp(np.abs(u))).sum()) / 24
    assert abs(kl - expected_k2 - float((pi * u ** 3).sum()) / 6) <= remainder + 1e-12


# ------------------------------------------------------------------------------------------------
# Preference losses
# ------------------------------------------------------------------------------------------------

pair_arrays = arrays(np.float64, st.integers(1, 8), elements=finite(50.0))


@given(pair_arrays, st.data(), st.floats(0.0, 5.0), finite(1e3))
def test_bradley_terry_is_neg_log_sigmoid_and_shift_invariant(chosen, data, margin, shift):
    rejected = data.draw(arrays(np.float64, chosen.shape, elements=finite(50.0)))
    loss, stats = L.bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected), margin=margin)
    expected = np.logaddexp(0.0, -(chosen - rejected - margin)).mean()           # -log sigmoid
    assert abs(loss.item() - expected) < 1e-9 * max(1.0, expected)
    shifted, _ = L.bradley_terry_loss(torch.tensor(chosen + shift), torch.tensor(rejected + shift),
                                      margin=margin)
    assert abs(shifted.item() - loss.item()) < 1e-9 * max(1.0, expected)
    assert abs(stats["accuracy"].item() - (chosen > rejected).mean()) < 1e-12


@given(arrays(np.float64, (4, 6), elements=st.floats(-200.0, 0.0)), st.floats(0.01, 2.0))
def test_dpo_and_ipo_equal_their_closed_forms_and_log2_at_reference(logps, beta):
    pc, pr, rc, rr = (torch.tensor(row) for row in logps)
    h = (logps[0] - logps[2]) - (logps[1] - logps[3])
    dpo, stats = L.dpo_loss(pc, pr, rc, rr, beta=beta)
    np.testing.assert_allclose(dpo.item(), np.logaddexp(0.0, -beta * h).mean(), rtol=1e-9)
    ipo, _ = L.ipo_loss(pc, pr, rc, rr, beta=beta)
    np.testing.assert_allclose(ipo.item(), ((h - 1 / (2 * beta)) ** 2).mean(), rtol=1e-9)
    np.testing.assert_allclose(stats["reward_margin"].item(), (beta * h).mean(), rtol=1e-9, atol=1e-9)
    at_ref, _ = L.dpo_loss(rc, rr, rc, rr, beta=beta)                           # policy == reference
    assert abs(at_ref.item() - math.log(2)) < 1e-12
    ipo_at_ref, _ = L.ipo_loss(rc, rr, rc, rr, beta=beta)
    assert abs(ipo_at_ref.item() - 1 / (4 * beta ** 2)) < 1e-9 / beta ** 2


@given(arrays(np.float64, (3, 7), elements=finite(5.0)), st.data())
def test_sequence_logprob_sums_the_unmasked_tokens(token_logprobs, data):
    mask = data.draw(arrays(np.bool_, token_logprobs.shape))
    got = L.sequence_logprob(torch.tensor(token_logprobs), torch.tensor(mask))
    want = [sum(v for v, m in zip(row, mrow) if m) for row, mrow in zip(token_logprobs, mask)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# RL losses
# ------------------------------------------------------------------------------------------------

@st.composite
def ppo_batch(draw):
    seed = draw(SEEDS)
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 12)))
    gen = torch.Generator().manual_seed(seed)
    old_logp = -3 * torch.rand(shape, generator=gen, dtype=torch.float64)
    logp = old_logp + 0.6 * torch.randn(shape, generator=gen, dtype=torch.float64)
    advantages = torch.randn(shape, generator=gen, dtype=torch.float64)
    advantages[torch.rand(shape, generator=gen) < 0.1] = 0.0
    mask = torch.rand(shape, generator=gen) < 0.8
    eps_low = draw(st.floats(0.05, 0.5))
    eps_high = draw(st.floats(0.05, 0.5))
    return logp, old_logp, advantages, mask, eps_low, eps_high


@given(ppo_batch())
def test_ppo_gradient_is_zero_where_clipped_and_closed_form_elsewhere(batch):
    logp, old_logp, advantages, mask, eps_low, eps_high = batch
    logp = logp.clone().requires_grad_()
    loss, stats = L.ppo_policy_loss(logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high)
    loss.backward()
    count = max(int(mask.sum()), 1)
    n_clipped = 0
    for i in range(logp.shape[0]):                                  # brute force, token by token
        for t in range(logp.shape[1]):
            ratio = math.exp(logp[i, t].item() - old_logp[i, t].item())
            a = advantages[i, t].item()
            clipped = (a > 0 and ratio > 1 + eps_high) or (a < 0 and ratio < 1 - eps_low)
            n_clipped += bool(mask[i, t]) and clipped
            want = 0.0 if clipped or not mask[i, t] else -a * ratio / count   # d(-ratio*A/count)/dlogp
            assert abs(logp.grad[i, t].item() - want) < 1e-9
    assert abs(stats["clipfrac"].item() - n_clipped / count) < 1e-12


@given(ppo_batch())
def test_ppo_at_ratio_one_is_the_policy_gradient(batch):
    _, old_logp, advantages, mask, eps_low, eps_high = batch
    logp = old_logp.clone().requires_grad_()                        # first step after the rollout
    loss, stats = L.ppo_policy_loss(logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high)
    loss.backward()
    count = max(int(mask.sum()), 1)
    torch.testing.assert_close(logp.grad, torch.where(mask, -advantages / count, 0.0))   # -A grad log pi
    assert abs(loss.item() + advantages[mask].sum().item() / count) < 1e-12
    assert stats["clipfrac"].item() == 0 and abs(stats["approx_kl"].item()) < 1e-15
    assert abs(stats["ratio_mean"].item() - (1.0 if mask.any() else 0.0)) < 1e-12


@given(SEEDS, st.floats(0.05, 1.0), st.booleans())
def test_value_loss_equals_brute_force(seed, clip_eps, use_mask):
    gen = torch.Generator().manual_seed(seed)
    values, old_values, returns = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(3, 5, generator=gen) < 0.7 if use_mask else torch.ones(3, 5, dtype=torch.bool)
    loss, stats = L.value_loss(values, old_values, returns, mask if use_mask else None, clip_eps=clip_eps)
    terms, clipped = [], 0
    for v, vo, r, m in zip(values.flatten().tolist(), old_values.flatten().tolist(),
                           returns.flatten().tolist(), mask.flatten().tolist()):
        if m:
            v_clip = vo + min(max(v - vo, -clip_eps), clip_eps)
            terms.append(0.5 * max((v - r) ** 2, (v_clip - r) ** 2))
            clipped += (v_clip - r) ** 2 > (v - r) ** 2
    assert abs(loss.item() - (sum(terms) / max(len(terms), 1))) < 1e-12
    assert abs(stats["vf_clipfrac"].item() - clipped / max(len(terms), 1)) < 1e-12


@given(arrays(np.float64, st.integers(2, 8), elements=finite(3.0)), st.data())
def test_reinforce_expected_gradient_is_unchanged_by_a_baseline(theta, data):
    """Exact expectation over a categorical policy: sum_x pi(x) * grad[loss on sample x] for every
    baseline b equals the closed form -grad E_pi[R] = -pi * (R - E_pi[R])."""
    vocab = len(theta)
    rewards = torch.tensor(data.draw(arrays(np.float64, vocab, elements=finite(5.0))))
    baseline = data.draw(finite(10.0))
    pi = torch.softmax(torch.tensor(theta), 0)
    expected_grad = torch.zeros(vocab, dtype=torch.float64)
    for x in range(vocab):
        logits = torch.tensor(theta, requires_grad=True)
        logp = torch.log_softmax(logits, 0)[x].reshape(1, 1)             # (B=1, T=1)
        loss, _ = L.reinforce_loss(logp, rewards[x].reshape(1, 1), baseline=baseline)
        (grad,) = torch.autograd.grad(loss, logits)
        expected_grad += pi[x] * grad
    closed_form = -pi * (rewards - (pi * rewards).sum())
    torch.testing.assert_close(expected_grad, closed_form, rtol=1e-9, atol=1e-9)


@given(arrays(np.float64, st.integers(2, 8), elements=finite(5.0)))
def test_reinforce_mean_and_leave_one_out_baselines(returns):
    r = torch.tensor(returns)[:, None]                                     # (B, 1) per sequence
    logp = torch.zeros(len(returns), 3, dtype=torch.float64, requires_grad=True)
    L.reinforce_loss(logp, r, baseline="loo")[0].backward()
    loo = [(returns.sum() - v) / (len(returns) - 1) for v in returns]
    want = -(returns - np.array(loo))[:, None].repeat(3, 1) / logp.numel()
    np.testing.assert_allclose(logp.grad.numpy(), want, rtol=1e-9, atol=1e-12)
    _, stats = L.reinforce_loss(logp, r, baseline="mean")
    assert abs(stats["advantage_mean"].item()) < 1e-9


@given(logit_rows(scale=10.0), st.data())
def test_entropy_bonus_is_the_masked_mean_entropy(logits, data):
    mask = torch.tensor(data.draw(arrays(np.bool_, (logits.shape[0],))))
    p = np_softmax(logits.numpy())
    h = -(p * np.log(p)).sum(-1)
    want = h[mask.numpy()].mean() if mask.any() else 0.0
    assert abs(L.entropy_bonus(logits, mask).item() - want) < 1e-9


# ------------------------------------------------------------------------------------------------
# Numerical safety
# ------------------------------------------------------------------------------------------------

@given(SEEDS, st.sampled_from([1e2, 1e3, 1e4]))
def test_large_logits_give_finite_values_and_gradients(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * (2 * torch.rand(4, 6, 50, generator=gen) - 1)).requires_grad_()   # fp32, |z| <= 1e4
    other = scale * (2 * torch.rand(4, 6, 50, generator=gen) - 1)
    targets = torch.randint(0, 50, (4, 6), generator=gen)
    hidden = (scale ** 0.5 * torch.randn(24, 8, generator=gen)).requires_grad_()
    weight = (scale ** 0.5 * torch.randn(50, 8, generator=gen) / 8).requires_grad_()
    logp = -scale * torch.rand(4, 6, generator=gen)
    ref_logp = -scale * torch.rand(4, 6, generator=gen)
    new_logp = logp.clone().requires_grad_()
    rewards = scale * torch.randn(4, generator=gen)
    terms = [
        L.cross_entropy(logits, targets, label_smoothing=0.1, z_loss=1e-4),
        L.entropy(logits).sum(), L.kl_divergence(logits, other).sum(),
        L.log_likelihood(logits, targets).sum(),
        L.soft_cross_entropy(torch.softmax(other, -1), logits).sum(), L.entropy_bonus(logits),
        L.chunked_cross_entropy(hidden, weight, targets.reshape(-1), chunk_size=5, z_loss=1e-4),
        L.kl_k3(new_logp, ref_logp).sum(),
        L.ppo_policy_loss(new_logp, ref_logp, torch.randn(4, 6, generator=gen))[0],
        L.bradley_terry_loss(rewards.requires_grad_(), -rewards, margin=1.0)[0],
        L.dpo_loss(new_logp.sum(1), logp.sum(1), ref_logp.sum(1), logp.sum(1), beta=0.5)[0],
    ]
    for i, term in enumerate(terms):
        assert torch.isfinite(term).all(), i
    sum(terms).backward()
    for tensor in (logits, hidden, weight, new_logp, rewards):
        assert torch.isfinite(tensor.grad).all()


def test_fully_masked_inputs_give_zero_and_zero_gradients():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    hidden = torch.randn(10, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    logp = torch.randn(2, 5, requires_grad=True)
    nowhere = torch.zeros(2, 5, dtype=torch.bool)
    ignored = torch.full((2, 5), -100)
    poisoned = torch.full((2, 5), math.inf, requires_grad=True)      # inf under a mask must not leak
    terms = {
        "cross_entropy": L.cross_entropy(logits, ignored, label_smoothing=0.1, z_loss=1e-3),
        "cross_entropy(mask)": L.cross_entropy(logits, torch.zeros(2, 5, dtype=torch.long), mask=nowhere),
        "chunked": L.chunked_cross_entropy(hidden, weight, ignored.reshape(-1), chunk_size=3),
        "entropy_bonus": L.entropy_bonus(logits, nowhere),
        "masked_mean": L.masked_mean(poisoned, nowhere),
        "ppo": L.ppo_policy_loss(logp, logp.detach() + 1, torch.ones(2, 5), nowhere)[0],
        "value": L.value_loss(logp, logp.detach(), torch.ones(2, 5), nowhere)[0],
        "reinforce": L.reinforce_loss(logp, torch.ones(2, 1), mask=nowhere)[0],
        "bradley_terry": L.bradley_terry_loss(logp[0], logp[1], mask=nowhere[0])[0],
        "dpo": L.dpo_loss(logp[0], logp[1], logp[1].detach(), logp[0].detach(), mask=nowhere[0])[0],
        "kl_k3": L.masked_mean(L.kl_k3(logp, logp.detach() + 3, mask=nowhere), nowhere),
    }
    for name, value in terms.items():
        assert value.item() == 0.0, name
    sum(terms.values()).backward()
    for tensor in (logits, hidden, weight, logp, poisoned):
        assert torch.equal(tensor.grad, torch.zeros_like(tensor)), tensor.shape


# ------------------------------------------------------------------------------------------------
# The script
# ------------------------------------------------------------------------------------------------

def test_main_walkthrough_and_benchmark_on_a_tiny_config(capsys):
    result = L.main(["--samples", "2000", "--vocab", "300", "--tokens", "40", "--n-embd", "8",
                     "--chunk-size", "16", "--repeats", "1", "--no-memory-subprocess", "--device", "cpu"])
    out = capsys.readouterr().out
    assert abs(result["entropy_p"] - 1.75 * math.log(2)) < 1e-12                     # 1.75 bits
    assert abs(result["cross_entropy_pq"] - result["entropy_p"] - result["kl_pq"]) < 1e-12
    assert abs(result["dpo_at_reference"] - math.log(2)) < 1e-12
    assert abs(result["ppo_clipfrac"] - 2 / 6) < 1e-6
    assert abs(result["mean_nll"] - result["cross_entropy_pq"]) < 5 * result["mean_nll_stderr"]
    assert result["loss_diff"] < 1e-5 and result["grad_weight_diff"] < 1e-5
    assert "chunked/plain" in out and "KL(p||q)" in out


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        L.main(["--help"])
    assert exit_info.value.code == 0
    assert "--chunk-size" in capsys.readouterr().out
    with pytest.raises(M.UserError, match="--tokens"):
        L.main(["--tokens", "0"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_chunked_cross_entropy_peak_memory_is_below_one_full_logits_tensor():
    class Args:
        vocab, tokens, n_embd, chunk_size, seed = 20000, 512, 16, 32, 0
    full_logits = Args.tokens * Args.vocab * 4                              # bytes of (N, V) fp32
    plain, chunked = L._measure_peak_rss("plain", Args), L._measure_peak_rss("chunked", Args)
    assert plain >= full_logits                                           # plain builds them
    assert chunked < full_logits / 2                                      # chunked never does
