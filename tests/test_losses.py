"""Properties of losses.py, each checked against something independent of it: a closed form, an
identity, a brute-force sum in numpy or Python, or PyTorch's own F.cross_entropy."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import losses as L
from lib import cli

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
def test_value_loss_equals_brute_force(seed, value_clip, use_mask):
    gen = torch.Generator().manual_seed(seed)
    values, old_values, returns = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(3, 5, generator=gen) < 0.7 if use_mask else torch.ones(3, 5, dtype=torch.bool)
    loss, stats = L.value_loss(values, old_values, returns, mask if use_mask else None, value_clip=value_clip)
    terms, clipped = [], 0
    for v, vo, r, m in zip(values.flatten().tolist(), old_values.flatten().tolist(),
                           returns.flatten().tolist(), mask.flatten().tolist()):
        if m:
            v_clip = vo + min(max(v - vo, -value_clip), value_clip)
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
    with pytest.raises(cli.UserError, match="--tokens"):
        L.main(["--tokens", "0"])


def _peak_rss_of_one_tensor(rows, cols):
    """The peak-RSS increase of creating one touched (rows, cols) fp32 tensor, measured the way
    L._measure_peak_rss measures a step (fresh process, same malloc setting, peak counter reset):
    the unit the chunked and plain steps are compared with, so the margins do not depend on what
    else the process holds (a plain threshold once failed at 40.8 MB vs 40.96 MB)."""
    code = ("import gc, sys; sys.path.insert(0, sys.argv[1]); import torch; import losses as L; "
            "torch.set_num_threads(1); gc.collect(); open('/proc/self/clear_refs', 'w').write('5'); "
            "before, _ = L._rss_bytes(); x = torch.ones(int(sys.argv[2]), int(sys.argv[3])); "
            "_, peak = L._rss_bytes(); print(peak - before)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code, root, str(rows), str(cols)], capture_output=True,
                          text=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2 ** 20)), check=True)
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc")
def test_chunked_cross_entropy_peak_memory_is_below_one_full_logits_tensor():
    class Args:
        vocab, tokens, n_embd, chunk_size, seed = 20000, 512, 16, 32, 0
    full_logits = Args.tokens * Args.vocab * 4                              # bytes of (N, V) fp32
    one_tensor = _peak_rss_of_one_tensor(Args.tokens, Args.vocab)         # the same, as RSS measures it
    if not 0.9 * full_logits <= one_tensor <= 1.5 * full_logits:
        pytest.skip(f"peak RSS does not follow allocations here (one {full_logits} B tensor read as "
                    f"{one_tensor} B)")
    plain, chunked = L._measure_peak_rss("plain", Args), L._measure_peak_rss("chunked", Args)
    # plain holds the logits and their log-softmax at once (>= 2 such tensors; ~3 measured), chunked
    # one (chunk, V) block (32/512 of one) plus (V, C) gradients: each margin is >= 2x
    assert plain >= 0.9 * one_tensor                                      # plain builds them
    assert chunked < one_tensor / 2                                       # chunked never does
    assert plain >= 0.9 * full_logits and chunked < full_logits / 2       # the claim, in bytes


# ------------------------------------------------------------------------------------------------
# Whatever sits under a mask never matters (issue 18): +-inf, NaN and huge values under the mask
# give a finite value, a finite gradient that is exactly 0 there, and the value of the same loss
# computed on the kept positions alone (sliced, then computed by an independent reference)
# ------------------------------------------------------------------------------------------------

POISON = (math.inf, -math.inf, math.nan, 1e300, -1e300)


def poisoned(clean, keep, gen):
    """`clean` with every entry of the masked positions (~keep, over its leading dims) replaced by
    +-inf, NaN or +-1e300 (inf once cast to float32), drawn at random."""
    choice = torch.tensor(POISON, dtype=torch.float64)[torch.randint(0, len(POISON), clean.shape, generator=gen)]
    keep = keep.reshape(keep.shape + (1,) * (clean.dim() - keep.dim()))
    return torch.where(keep, clean, choice.to(clean.dtype))


@st.composite
def masked_batch(draw, max_b=3, max_t=5, max_vocab=9):
    """(gen, keep (B, T) bool with at least one row and sometimes nothing kept, B, T, V)."""
    gen = torch.Generator().manual_seed(draw(SEEDS))
    b, t, v = draw(st.integers(1, max_b)), draw(st.integers(1, max_t)), draw(st.integers(2, max_vocab))
    keep_share = draw(st.sampled_from([0.0, 0.4, 0.8, 1.0]))
    keep = torch.rand(b, t, generator=gen) < keep_share
    return gen, keep, b, t, v


def ref_entropy(z):
    return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)


def ref_kl(p_logits, q_logits):
    """PyTorch's F.kl_div(input=log q, target=log p) = p (log p - log q), summed over the vocabulary."""
    return F.kl_div(torch.log_softmax(q_logits, -1), torch.log_softmax(p_logits, -1), log_target=True,
                    reduction="none").sum(-1)


# name: (function(inputs, mask) -> per-position values, reference(kept clean inputs) -> values,
#        number of (B, T, V) inputs, whether the first input is a probability vector)
PER_TOKEN = {
    "entropy": (lambda x, mask: L.entropy(x[0], mask=mask), lambda x: ref_entropy(x[0]), 1, False),
    "soft_cross_entropy": (lambda x, mask: L.soft_cross_entropy(x[0], x[1], mask=mask),
                           lambda x: -(x[0] * torch.log_softmax(x[1], -1)).sum(-1), 2, True),
    "kl_divergence": (lambda x, mask: L.kl_divergence(x[0], x[1], mask=mask), lambda x: ref_kl(x[0], x[1]), 2,
                      False),
}


@pytest.mark.parametrize("name", sorted(PER_TOKEN))
@given(masked_batch())
def test_per_token_quantities_ignore_inf_and_nan_under_the_mask(name, batch):
    gen, keep, b, t, v = batch
    fn, ref, n_inputs, first_is_probs = PER_TOKEN[name]
    clean = [5 * torch.randn(b, t, v, generator=gen, dtype=torch.float64) for _ in range(n_inputs)]
    if first_is_probs:
        clean[0] = torch.softmax(clean[0], -1)
    inputs = [poisoned(x, keep, gen).requires_grad_() for x in clean]
    out = fn(inputs, keep)                                                     # (B, T)
    weights = torch.randn(b, t, generator=gen, dtype=torch.float64)           # a generic upstream gradient
    (out * weights).sum().backward()
    kept = [x[keep].requires_grad_() for x in clean]                           # (n, V) each: slice, then compute
    want = ref(kept)
    torch.testing.assert_close(out[keep], want.detach(), rtol=1e-9, atol=1e-9)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    if keep.any():
        want_grads = torch.autograd.grad((want * weights[keep]).sum(), kept)
    for x, got in zip(inputs, [x.grad for x in inputs]):
        assert torch.isfinite(got).all() and torch.equal(got[~keep], torch.zeros_like(got[~keep]))
    if keep.any():
        for x, want_grad in zip(inputs, want_grads):
            torch.testing.assert_close(x.grad[keep], want_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["log_likelihood", "nll"])
@given(masked_batch(), st.booleans())
def test_log_likelihood_and_nll_of_b_t_v_logits_ignore_the_mask_and_ignore_index(name, batch, use_ignore):
    """(B, T, V) logits; masked-out positions and ignored targets hold +-inf/NaN logits; the result is
    -F.cross_entropy (+F.cross_entropy for nll) on the kept rows, 0 elsewhere, gradient 0 there."""
    gen, keep, b, t, v = batch
    clean = 5 * torch.randn(b, t, v, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, v, (b, t), generator=gen)
    mask = keep
    if use_ignore:                                       # half of the dropped positions say so by -100
        by_index = ~keep & (torch.rand(b, t, generator=gen) < 0.5)
        targets[by_index] = -100
        mask = keep | by_index
    logits = poisoned(clean, keep, gen).requires_grad_()
    out = getattr(L, name)(logits, targets, mask=mask)                        # (B, T)
    weights = torch.randn(b, t, generator=gen, dtype=torch.float64)
    (out * weights).sum().backward()
    sign = -1.0 if name == "log_likelihood" else 1.0
    kept = clean[keep].requires_grad_()
    want = sign * F.cross_entropy(kept, targets[keep], reduction="none")
    torch.testing.assert_close(out[keep], want.detach(), rtol=1e-9, atol=1e-9)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[~keep], torch.zeros_like(logits.grad[~keep]))
    if keep.any():
        (want_grad,) = torch.autograd.grad((want * weights[keep]).sum(), kept)
        torch.testing.assert_close(logits.grad[keep], want_grad, rtol=1e-9, atol=1e-12)


@given(masked_batch(), st.sampled_from([0.0, 0.1]), st.sampled_from([0.0, 1e-3]),
       st.sampled_from(["mean", "sum", "none"]))
def test_cross_entropy_of_b_t_v_logits_ignores_inf_and_nan_under_the_mask(batch, eps, z, reduction):
    """Equal to F.cross_entropy on the kept rows (plus the hand-written z-loss); masked rows hold
    +-inf/NaN and get exactly zero gradient."""
    gen, keep, b, t, v = batch
    clean = 5 * torch.randn(b, t, v, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, v, (b, t), generator=gen)
    logits = poisoned(clean, keep, gen).requires_grad_()
    ours = L.cross_entropy(logits, targets, mask=keep, label_smoothing=eps, z_loss=z, reduction=reduction)
    kept = clean[keep].requires_grad_()                                        # (n, V)
    per_row = (F.cross_entropy(kept, targets[keep], label_smoothing=eps, reduction="none")
               + z * torch.logsumexp(kept, -1) ** 2)
    if reduction == "none":
        weights = torch.randn(b, t, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(ours[keep], per_row.detach(), rtol=1e-9, atol=1e-9)
        assert torch.equal(ours[~keep], torch.zeros_like(ours[~keep]))
        (ours * weights).sum().backward()
        want = (per_row * weights[keep]).sum()
    else:
        want = per_row.sum() / (max(int(keep.sum()), 1) if reduction == "mean" else 1)
        torch.testing.assert_close(ours, want.detach(), rtol=1e-9, atol=1e-9)
        (2.5 * ours).backward()
        want = 2.5 * want
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[~keep], torch.zeros_like(logits.grad[~keep]))
    if keep.any():
        (want_grad,) = torch.autograd.grad(want, kept)
        torch.testing.assert_close(logits.grad[keep], want_grad, rtol=1e-9, atol=1e-12)


@given(masked_batch(max_vocab=30), st.integers(1, 7), st.sampled_from([None, 2.0, 7.0]))
def test_chunked_cross_entropy_ignores_inf_hidden_states_under_the_mask_and_divides_by_denom(batch, chunk,
                                                                                            denom):
    gen, keep, b, t, v = batch
    n_embd = 4
    clean = torch.randn(b, t, n_embd, generator=gen, dtype=torch.float64)
    hidden = poisoned(clean, keep, gen).requires_grad_()
    weight = torch.randn(v, n_embd, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (b, t), generator=gen)
    ours = L.chunked_cross_entropy(hidden, weight, targets, mask=keep, chunk_size=chunk, denom=denom)
    ours.backward()
    kept = clean[keep].requires_grad_()
    ref_weight = weight.detach().clone().requires_grad_()
    count = denom if denom is not None else max(int(keep.sum()), 1)
    want = F.cross_entropy(kept @ ref_weight.T, targets[keep], reduction="sum") / count
    torch.testing.assert_close(ours, want.detach(), rtol=1e-10, atol=1e-10)
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert torch.equal(hidden.grad[~keep], torch.zeros_like(hidden.grad[~keep]))
    if keep.any():
        want_hidden, want_weight = torch.autograd.grad(want, (kept, ref_weight))
        torch.testing.assert_close(hidden.grad[keep], want_hidden, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(weight.grad, want_weight, rtol=1e-9, atol=1e-12)


# KL estimators per token, each with its closed form in u = log r = ref_logp - logp
KL_ESTIMATORS = {
    "kl_k1": lambda u: -u,
    "kl_k2": lambda u: u ** 2 / 2,
    "kl_k3": lambda u: torch.expm1(u) - u,
}


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
@given(masked_batch())
def test_kl_estimators_apply_their_own_mask_per_token(name, batch):
    """Called with mask= and NOT wrapped in masked_mean: 0 (value and gradient) at masked tokens,
    whatever they hold, and the closed form elsewhere."""
    gen, keep, b, t, _ = batch
    logp_clean = -3 * torch.rand(b, t, generator=gen, dtype=torch.float64)
    ref_clean = logp_clean + torch.randn(b, t, generator=gen, dtype=torch.float64)
    logp, ref_logp = (poisoned(x, keep, gen).requires_grad_() for x in (logp_clean, ref_clean))
    out = getattr(L, name)(logp, ref_logp, mask=keep)
    weights = torch.rand(b, t, generator=gen, dtype=torch.float64)
    (out * weights).sum().backward()
    u = (ref_clean - logp_clean)[keep]
    torch.testing.assert_close(out[keep], KL_ESTIMATORS[name](u), rtol=1e-9, atol=1e-12)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    for x in (logp, ref_logp):
        assert torch.isfinite(x.grad).all() and torch.equal(x.grad[~keep], torch.zeros_like(x.grad[~keep]))
    u_leaf = u.clone().requires_grad_()
    (du,) = torch.autograd.grad((KL_ESTIMATORS[name](u_leaf) * weights[keep]).sum(), u_leaf)
    torch.testing.assert_close(ref_logp.grad[keep], du, rtol=1e-9, atol=1e-12)     # d/d ref_logp = d/du
    torch.testing.assert_close(logp.grad[keep], -du, rtol=1e-9, atol=1e-12)        # d/d logp = -d/du


@given(masked_batch(), st.sampled_from([None, 3.0, 11.0]))
def test_rl_losses_ignore_inf_under_the_mask_and_divide_by_denom(batch, denom):
    """ppo_policy_loss, value_loss (clipped and not), reinforce_loss and entropy_bonus on tokens whose
    masked entries hold +-inf/NaN: the brute-force masked sum over the kept tokens / (denom or count),
    finite gradients, exactly 0 at masked tokens."""
    gen, keep, b, t, v = batch
    count = denom if denom is not None else max(int(keep.sum()), 1)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    old_logp = -2 * torch.rand(b, t, generator=gen, dtype=torch.float64)
    clean = {"logp": old_logp + 0.5 * rand(b, t), "old_logp": old_logp, "advantages": rand(b, t),
             "values": rand(b, t), "old_values": rand(b, t), "returns": rand(b, t), "logits": 3 * rand(b, t, v)}
    leaves = {k: poisoned(x, keep, gen).requires_grad_() for k, x in clean.items()}
    eps_low, eps_high, value_clip = 0.2, 0.3, 0.25
    ppo, stats = L.ppo_policy_loss(leaves["logp"], leaves["old_logp"], leaves["advantages"], keep,
                                   eps_low=eps_low, eps_high=eps_high, denom=denom)
    value, _ = L.value_loss(leaves["values"], leaves["old_values"], leaves["returns"], keep, value_clip=value_clip,
                            denom=denom)
    value_plain, value_stats = L.value_loss(leaves["values"], leaves["old_values"], leaves["returns"], keep,
                                            value_clip=None, denom=denom)
    reinforce, _ = L.reinforce_loss(leaves["logp"], leaves["returns"], mask=keep, denom=denom)
    bonus = L.entropy_bonus(leaves["logits"], keep, denom=denom)
    c = {k: x[keep] for k, x in clean.items()}                                  # the kept tokens, clean
    ratio = (c["logp"] - c["old_logp"]).exp()
    a = c["advantages"]
    want_ppo = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a).sum() / count
    v_clip = c["old_values"] + (c["values"] - c["old_values"]).clamp(-value_clip, value_clip)
    want_value = 0.5 * torch.maximum((c["values"] - c["returns"]) ** 2, (v_clip - c["returns"]) ** 2).sum() / count
    want_value_plain = 0.5 * ((c["values"] - c["returns"]) ** 2).sum() / count
    want_reinforce = -(c["returns"] * c["logp"]).sum() / count
    want_bonus = ref_entropy(c["logits"]).sum() / count
    for got, want in [(ppo, want_ppo), (value, want_value), (value_plain, want_value_plain),
                      (reinforce, want_reinforce), (bonus, want_bonus)]:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert value_stats["vf_clipfrac"].item() == 0.0                              # value_clip=None clips nothing
    n_kept = max(int(keep.sum()), 1)                                             # stats: over kept tokens
    bound = ((a > 0) & (ratio > 1 + eps_high)) | ((a < 0) & (ratio < 1 - eps_low))
    assert abs(stats["clipfrac"].item() - bound.sum().item() / n_kept) < 1e-12
    assert abs(stats["ratio_mean"].item() - ratio.sum().item() / n_kept) < 1e-12
    k3_old_to_new = ratio - 1 - (c["logp"] - c["old_logp"])                      # KL(pi_old || pi), x ~ pi_old
    assert abs(stats["approx_kl"].item() - k3_old_to_new.sum().item() / n_kept) < 1e-12
    (ppo + value + value_plain + reinforce + bonus).backward()
    for name, leaf in leaves.items():
        if leaf.grad is not None:
            assert torch.isfinite(leaf.grad).all(), name
            assert torch.equal(leaf.grad[~keep], torch.zeros_like(leaf.grad[~keep])), name


# Preference losses over pairs (B,): closed forms in numpy on the kept pairs
@st.composite
def masked_pairs(draw):
    gen = torch.Generator().manual_seed(draw(SEEDS))
    n = draw(st.integers(1, 8))
    keep = torch.rand(n, generator=gen) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    # integer-valued log-probs make exact ties (chosen reward == rejected reward) frequent
    logps = torch.randint(-6, 1, (4, n), generator=gen).double()
    return gen, keep, logps


@given(masked_pairs(), st.sampled_from([0.05, 0.1, 1.0]))
def test_dpo_and_ipo_with_a_mask_equal_their_closed_forms_on_the_kept_pairs(pairs, beta):
    """Loss and logged statistics, against numpy on the kept pairs; ties in the implicit reward are
    not counted as correct; masked pairs hold +-inf/NaN and get zero gradient."""
    gen, keep, logps = pairs
    inputs = [poisoned(x, keep, gen).requires_grad_() for x in logps]
    dpo, dpo_stats = L.dpo_loss(*inputs, beta=beta, mask=keep)
    ipo, ipo_stats = L.ipo_loss(*inputs, beta=beta, mask=keep)
    pc, pr, rc, rr = (x[keep.numpy()] for x in logps.numpy())
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    h = (pc - rc) - (pr - rr)
    n = max(len(h), 1)
    assert abs(dpo.item() - np.logaddexp(0.0, -beta * h).sum() / n) < 1e-9
    assert abs(ipo.item() - ((h - 1 / (2 * beta)) ** 2).sum() / n) < 1e-9 * max(1.0, ipo.item())
    for stats in (dpo_stats, ipo_stats):
        assert abs(stats["reward_chosen"].item() - chosen.sum() / n) < 1e-12
        assert abs(stats["reward_rejected"].item() - rejected.sum() / n) < 1e-12
        assert abs(stats["reward_margin"].item() - (chosen - rejected).sum() / n) < 1e-12
        assert stats["reward_accuracy"].item() == sum(c > r for c, r in zip(chosen, rejected)) / n
    (dpo + ipo).backward()
    for x in inputs:
        assert torch.isfinite(x.grad).all() and torch.equal(x.grad[~keep], torch.zeros_like(x.grad[~keep]))


def test_preference_accuracy_does_not_count_ties():
    """One pair won, one tied, one lost: accuracy 1/3 (a tie counted as correct would give 2/3)."""
    chosen = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    rejected = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)
    _, bt_stats = L.bradley_terry_loss(chosen, rejected)
    _, dpo_stats = L.dpo_loss(chosen, rejected, zero, zero, beta=1.0)
    _, ipo_stats = L.ipo_loss(chosen, rejected, zero, zero, beta=1.0)
    for accuracy in (bt_stats["accuracy"], dpo_stats["reward_accuracy"], ipo_stats["reward_accuracy"]):
        assert abs(accuracy.item() - 1 / 3) < 1e-12


@given(masked_pairs(), st.floats(0.0, 3.0))
def test_bradley_terry_with_a_mask_equals_its_closed_form_on_the_kept_pairs(pairs, margin):
    gen, keep, logps = pairs
    chosen, rejected = (poisoned(x, keep, gen).requires_grad_() for x in logps[:2])
    loss, stats = L.bradley_terry_loss(chosen, rejected, margin=margin, mask=keep)
    delta = (logps[0] - logps[1])[keep].numpy()
    n = max(len(delta), 1)
    assert abs(loss.item() - np.logaddexp(0.0, -(delta - margin)).sum() / n) < 1e-9
    assert stats["accuracy"].item() == (delta > 0).sum() / n                     # ties are not correct
    assert abs(stats["margin"].item() - delta.sum() / n) < 1e-12
    loss.backward()
    for x in (chosen, rejected):
        assert torch.isfinite(x.grad).all() and torch.equal(x.grad[~keep], torch.zeros_like(x.grad[~keep]))


# ------------------------------------------------------------------------------------------------
# Log-ratios of +-100 and logits of 1e4 (unmasked) stay finite
# ------------------------------------------------------------------------------------------------

@given(st.sampled_from([-100.0, -30.0, 30.0, 100.0]), st.sampled_from([torch.float32, torch.float64]))
def test_log_ratios_of_100_give_finite_values_and_gradients(log_ratio, dtype):
    """PPO, k1/k2/k3 and DPO/IPO at |log pi - log pi_old| up to 100 (e^100 overflows float32 and
    would make NaN through inf * 0 or inf - inf): finite values and gradients. Beyond the clamp
    (20) PPO's token and k3 have zero gradient, the closed form of the clamped value."""
    logp = torch.tensor([[-1.0, -2.0]], dtype=dtype, requires_grad=True)
    old_logp = (logp.detach() - log_ratio)                                      # logp - old_logp = log_ratio
    advantages = torch.tensor([[1.0, -1.0]], dtype=dtype)
    ppo, stats = L.ppo_policy_loss(logp, old_logp, advantages)
    ks = [L.kl_k1(logp, old_logp), L.kl_k2(logp, old_logp), L.kl_k3(logp, old_logp)]
    dpo, _ = L.dpo_loss(logp[:, 0], logp[:, 1].detach(), old_logp[:, 0], old_logp[:, 1] + log_ratio)
    ipo, _ = L.ipo_loss(logp[:, 0], logp[:, 1].detach(), old_logp[:, 0], old_logp[:, 1] + log_ratio)
    total = ppo + sum(k.sum() for k in ks) + dpo + ipo
    assert all(torch.isfinite(x).all() for x in [ppo, *ks, dpo, ipo, *stats.values()])
    total.backward()
    assert torch.isfinite(logp.grad).all()
    u = torch.tensor(-log_ratio, dtype=torch.float64)                          # k's u = old - new
    assert abs(ks[0][0, 0].item() - log_ratio) < 1e-4 and abs(ks[1][0, 0].item() - log_ratio ** 2 / 2) < 1e-2
    clamped = u.clamp(-20, 20)
    assert math.isclose(ks[2][0, 0].item(), (torch.expm1(clamped) - clamped).item(), rel_tol=1e-5)


def test_unmasked_logits_of_1e4_give_finite_masked_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    logits = (1e4 * (2 * torch.rand(2, 3, 11, generator=gen) - 1)).requires_grad_()     # fp32
    other = 1e4 * (2 * torch.rand(2, 3, 11, generator=gen) - 1)
    targets = torch.randint(0, 11, (2, 3), generator=gen)
    keep = torch.tensor([[True, False, True], [True, True, False]])
    terms = [L.cross_entropy(logits, targets, mask=keep, label_smoothing=0.1, z_loss=1e-4),
             L.entropy(logits, keep).sum(), L.kl_divergence(logits, other, keep).sum(),
             L.kl_divergence(other, logits, keep).sum(), L.log_likelihood(logits, targets, mask=keep).sum(),
             L.soft_cross_entropy(torch.softmax(other, -1), logits, keep).sum(), L.entropy_bonus(logits, keep)]
    assert all(torch.isfinite(x) for x in terms)
    sum(terms).backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[~keep] == 0).all()
    want = F.cross_entropy(logits.detach()[keep], targets[keep], label_smoothing=0.1)
    want = want + 1e-4 * (torch.logsumexp(logits.detach()[keep], -1) ** 2).mean()
    torch.testing.assert_close(terms[0].detach(), want, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------
# Defaults: a call WITHOUT the argument equals the documented value passed explicitly, on inputs
# where a different value would change the result (checked alongside)
# ------------------------------------------------------------------------------------------------

def test_cross_entropy_defaults_are_those_of_f_cross_entropy():
    """No label smoothing, no z-loss, ignore_index -100, mean over the valid tokens: torch's defaults."""
    gen = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(6, 9, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 9, (6,), generator=gen)
    targets[[1, 4]] = -100
    torch.testing.assert_close(L.cross_entropy(logits, targets), F.cross_entropy(logits, targets),
                               rtol=1e-12, atol=1e-12)
    assert L.cross_entropy(logits, targets, label_smoothing=0.1) != L.cross_entropy(logits, targets)
    ll = L.log_likelihood(logits, targets)
    assert ll[1] == 0 and ll[4] == 0                                                   # -100 ignored
    hidden = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(L.chunked_cross_entropy(hidden, weight, targets),
                               F.cross_entropy(hidden @ weight.T, targets), rtol=1e-12, atol=1e-12)


def test_preference_loss_defaults_margin_zero_and_beta_one_tenth():
    gen = torch.Generator().manual_seed(2)
    logps = [-20 * torch.rand(5, generator=gen, dtype=torch.float64) for _ in range(4)]
    bt, _ = L.bradley_terry_loss(logps[0], logps[1])
    delta = (logps[0] - logps[1]).numpy()
    assert abs(bt.item() - np.logaddexp(0.0, -delta).mean()) < 1e-12                  # margin 0
    h = ((logps[0] - logps[2]) - (logps[1] - logps[3])).numpy()
    dpo, dpo_stats = L.dpo_loss(*logps)
    ipo, _ = L.ipo_loss(*logps)
    assert abs(dpo.item() - np.logaddexp(0.0, -0.1 * h).mean()) < 1e-12              # beta 0.1
    assert abs(ipo.item() - ((h - 1 / 0.2) ** 2).mean()) < 1e-9
    assert abs(dpo_stats["reward_margin"].item() - 0.1 * h.mean()) < 1e-12
    for name, default in [("dpo_loss", dpo), ("ipo_loss", ipo)]:
        explicit, _ = getattr(L, name)(*logps, beta=0.1)
        assert explicit.item() == default.item()


def test_ppo_defaults_eps_low_0_2_eps_high_equal_to_it_and_log_ratio_clamp_20():
    log_ratio = torch.cat([torch.linspace(-0.7, 0.7, 57, dtype=torch.float64),
                           torch.tensor([-25.0, 25.0, -25.0, 25.0], dtype=torch.float64)])
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(31)[:61]        # both signs everywhere
    old_logp = torch.full_like(log_ratio, -30.0)
    logp = old_logp + log_ratio

    def run(**kw):
        loss, stats = L.ppo_policy_loss(logp, old_logp, advantages, **kw)
        return [loss.item()] + [v.item() for v in stats.values()]

    default = run()
    assert default == run(eps_low=0.2, eps_high=0.2, max_log_ratio=20.0)
    for other in (dict(eps_low=0.25), dict(eps_high=0.28), dict(max_log_ratio=21.0)):   # the inputs can tell
        assert run(**{**dict(eps_low=0.2, eps_high=0.2, max_log_ratio=20.0), **other}) != default, other


def test_value_loss_clip_and_kl_k3_clamp_defaults():
    values = torch.linspace(-0.5, 0.5, 41, dtype=torch.float64)
    old_values, returns = torch.zeros(41, dtype=torch.float64), torch.full((41,), 0.6, dtype=torch.float64)
    default, _ = L.value_loss(values, old_values, returns)
    explicit, _ = L.value_loss(values, old_values, returns, value_clip=0.2)
    assert default.item() == explicit.item()
    assert L.value_loss(values, old_values, returns, value_clip=0.25)[0].item() != default.item()
    u = torch.linspace(-30, 30, 61, dtype=torch.float64)
    logp = torch.zeros_like(u)
    assert torch.equal(L.kl_k3(logp, u), L.kl_k3(logp, u, max_log_ratio=20.0))
    assert not torch.equal(L.kl_k3(logp, u), L.kl_k3(logp, u, max_log_ratio=21.0))
    torch.testing.assert_close(L.kl_k3(logp, u), torch.expm1(u.clamp(-20, 20)) - u.clamp(-20, 20))


def test_reinforce_default_baseline_is_zero():
    logp = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[1.0], [2.0], [-4.0]], dtype=torch.float64)
    L.reinforce_loss(logp, returns)[0].backward()
    torch.testing.assert_close(logp.grad, -returns.expand(3, 2) / 6)                  # -(R - 0) / count


# ------------------------------------------------------------------------------------------------
# Paths: masked_mean(dim=...), half-precision logits, chunked CE with one input needing grad, bf16
# ------------------------------------------------------------------------------------------------

@given(st.integers(1, 4), st.integers(1, 5), st.sampled_from([0, 1, -1]), st.booleans(), SEEDS)
def test_masked_mean_over_one_dim_matches_brute_force(rows, cols, dim, use_mask, seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    mask = torch.rand(rows, cols, generator=gen) < 0.6
    got = L.masked_mean(values, mask if use_mask else None, dim=dim)
    keep = mask.numpy() if use_mask else np.ones((rows, cols), dtype=bool)
    lines = values.numpy() if dim == 0 else values.numpy().T               # reduce over the first axis
    keep = keep if dim == 0 else keep.T
    want = [np.mean(lines[keep[:, j], j]) if keep[:, j].any() else 0.0 for j in range(lines.shape[1])]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_upcast_to_float32(dtype):
    """Log-sum-exp in bf16 would be off by ~1e-2 nats; upcast, every quantity matches the float32
    reference on the same (rounded) logits to float32 precision."""
    gen = torch.Generator().manual_seed(3)
    logits = (8 * torch.randn(4, 6, 300, generator=gen)).to(dtype)              # (B, T, V)
    other = (8 * torch.randn(4, 6, 300, generator=gen)).to(dtype)
    targets = torch.randint(0, 300, (4, 6), generator=gen)
    z, o = logits.float(), other.float()
    close = dict(rtol=2e-6, atol=2e-5)
    results = {
        "cross_entropy": (L.cross_entropy(logits, targets), F.cross_entropy(z.flatten(0, 1), targets.flatten())),
        "log_likelihood": (L.log_likelihood(logits, targets),
                           -F.cross_entropy(z.flatten(0, 1), targets.flatten(), reduction="none").view(4, 6)),
        "entropy": (L.entropy(logits), ref_entropy(z)),
        "kl_divergence": (L.kl_divergence(logits, other), ref_kl(z, o)),
        "soft_cross_entropy": (L.soft_cross_entropy(torch.softmax(o, -1), logits),
                               -(torch.softmax(o, -1) * torch.log_softmax(z, -1)).sum(-1)),
    }
    for name, (got, want) in results.items():
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want, **close, msg=name)


@pytest.mark.parametrize("needs", ["hidden", "weight"])
def test_chunked_cross_entropy_with_only_one_input_requiring_grad(needs):
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64, requires_grad=needs == "hidden")
    weight = torch.randn(13, 5, generator=gen, dtype=torch.float64, requires_grad=needs == "weight")
    targets = torch.randint(0, 13, (2, 7), generator=gen)
    loss = L.chunked_cross_entropy(hidden, weight, targets, chunk_size=3, label_smoothing=0.1, z_loss=1e-2)
    (2.0 * loss).backward()
    leaf = hidden if needs == "hidden" else weight
    frozen = weight if needs == "hidden" else hidden
    ref_leaf = leaf.detach().clone().requires_grad_()
    ref_inputs = (ref_leaf, frozen) if needs == "hidden" else (frozen, ref_leaf)
    ref = _plain_reference(*ref_inputs, targets, 0.1, 1e-2, "mean")
    (2.0 * ref).backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol=1e-12)
    assert frozen.grad is None


def test_chunked_cross_entropy_in_bf16_and_under_autocast_matches_the_plain_loss():
    """bf16 hidden and weight (the bf16 path), and bf16 hidden with an fp32 weight under CPU autocast
    (the mixed-dtype path): the same loss and gradients as F.cross_entropy on the same matmul,
    within bf16 rounding of the gradients (2^-8 relative)."""
    gen = torch.Generator().manual_seed(5)
    hidden0 = torch.randn(40, 16, generator=gen)
    weight0 = torch.randn(300, 16, generator=gen) / 4
    targets = torch.randint(0, 300, (40,), generator=gen)
    for weight_dtype, autocast in [(torch.bfloat16, False), (torch.float32, True)]:
        runs = []
        for variant in ("chunked", "plain"):
            hidden = hidden0.to(torch.bfloat16).requires_grad_()
            weight = weight0.to(weight_dtype).clone().requires_grad_()           # a fresh leaf each time
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if variant == "chunked":
                    loss = L.chunked_cross_entropy(hidden, weight, targets, chunk_size=7)
                else:
                    loss = F.cross_entropy((hidden @ weight.T).float(), targets)
            loss.backward()
            runs.append((loss.detach(), hidden.grad, weight.grad))
        (loss_c, gh_c, gw_c), (loss_p, gh_p, gw_p) = runs
        assert loss_c.dtype == torch.float32 and gh_c.dtype == torch.bfloat16 and gw_c.dtype == weight_dtype
        torch.testing.assert_close(loss_c, loss_p, rtol=1e-5, atol=1e-5)
        for got, want in ((gh_c, gh_p), (gw_c, gw_p)):
            scale = want.float().abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * scale)


def test_clipfrac_is_zero_when_advantages_are_zero_and_on_a_fully_masked_batch():
    """A = 0 (a constant GRPO group) never binds the clip, however far the ratio moved; a fully
    masked batch logs 0, not NaN (0/0)."""
    old_logp = torch.zeros(2, 4, dtype=torch.float64)
    logp = torch.tensor([[-3.0, -0.5, 0.5, 3.0], [-1.0, 1.0, -2.0, 2.0]], dtype=torch.float64)   # far outside
    _, stats = L.ppo_policy_loss(logp, old_logp, torch.zeros(2, 4, dtype=torch.float64))
    assert stats["clipfrac"].item() == 0.0
    _, stats = L.ppo_policy_loss(logp, old_logp, torch.ones(2, 4, dtype=torch.float64))
    assert stats["clipfrac"].item() == 4 / 8                          # ratio > 1.2 with A > 0: half
    nowhere = torch.zeros(2, 4, dtype=torch.bool)
    _, stats = L.ppo_policy_loss(logp, old_logp, torch.ones(2, 4, dtype=torch.float64), nowhere)
    assert all(value.item() == 0.0 for value in stats.values()), stats
    _, stats = L.value_loss(logp, old_logp, old_logp + 5, nowhere)
    assert stats["vf_clipfrac"].item() == 0.0


BAD_LOSSES_OPTIONS = [("--samples", "1"), ("--vocab", "1"), ("--tokens", "0"), ("--n-embd", "0"),
                      ("--chunk-size", "0"), ("--repeats", "0"), ("--seed", "-1"), ("--device", "tpu")]


@pytest.mark.parametrize("flag,value", BAD_LOSSES_OPTIONS)
def test_every_bad_option_is_a_one_line_user_error(flag, value, capsys):
    with pytest.raises(cli.UserError, match=flag):
        L.main([flag, value])
    assert capsys.readouterr().out == ""                              # refused before the walkthrough


def test_bad_option_exits_2_with_one_line_and_no_traceback():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "losses.py", "--chunk-size", "0"], cwd=root, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: --chunk-size must be >= 1, got 0\n"


# ---------------------------------------------------------------- statistics: MLE, MAP, conjugate priors, temperature

@given(counts=st.lists(st.integers(0, 50), min_size=2, max_size=8).filter(lambda c: sum(c) > 0),
       seed=st.integers(0, 1000))
def test_mle_is_the_minimum_of_the_nll_and_its_value_is_the_entropy(counts, seed):
    """p = n / N minimises -1/N sum_k n_k log p_k over the simplex: no random point of the simplex does
    better, and the minimum equals the empirical entropy (closed form)."""
    n = torch.tensor(counts, dtype=torch.float64)
    p = L.categorical_mle(n)
    nll = lambda q: -(n * q.clamp_min(1e-300).log()).sum() / n.sum()
    empirical = n / n.sum()
    entropy = -(empirical[empirical > 0] * empirical[empirical > 0].log()).sum()
    assert abs(nll(p) - entropy) < 1e-12
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        q = torch.distributions.Dirichlet(torch.ones(len(counts), dtype=torch.float64)).sample()
        assert nll(q) >= nll(p) - 1e-12
    # and gradient descent on logits with the library's cross-entropy converges to it
    logits = torch.zeros(len(counts), dtype=torch.float64, requires_grad=True)
    targets = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    optimizer = torch.optim.LBFGS([logits], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits.expand(len(targets), -1), targets)
        loss.backward()
        return loss
    optimizer.step(closure)
    assert torch.allclose(logits.softmax(0)[n > 0], p[n > 0], atol=1e-4)


@given(counts=st.lists(st.integers(0, 30), min_size=2, max_size=6), alpha=st.floats(0.1, 5.0))
def test_dirichlet_posterior_mean_is_add_alpha_smoothing_and_a_label_smoothing_mixture(counts, alpha):
    """(n_k + alpha) / (N + K alpha) = (1 - w) n_k / N + w / K with w = K alpha / (N + K alpha); checked
    against the Dirichlet posterior's own mean (torch.distributions) and the mixture form."""
    n = torch.tensor(counts, dtype=torch.float64)
    K, N = len(counts), float(sum(counts))
    mean = L.dirichlet_posterior_mean(n, alpha)
    posterior = torch.distributions.Dirichlet(n + alpha)
    assert torch.allclose(mean, posterior.mean, atol=1e-12)
    if N > 0:
        w = K * alpha / (N + K * alpha)
        assert torch.allclose(mean, (1 - w) * n / N + w / K, atol=1e-12)
        # label smoothing w: the target distribution of cross_entropy is that same mixture, so the smoothed
        # loss is minimised exactly at the posterior mean (its gradient w.r.t. the logits vanishes there)
        logits = mean.log().clone().requires_grad_(True)
        targets = torch.repeat_interleave(torch.arange(K), torch.tensor(counts))
        loss = L.cross_entropy(logits.expand(len(targets), -1), targets, label_smoothing=w)
        loss.backward()
        assert logits.grad.abs().max() < 1e-9


@given(seed=st.integers(0, 1000), prior_std=st.floats(0.3, 3.0), n_examples=st.integers(1, 50))
def test_map_with_a_gaussian_prior_is_l2_regularisation(seed, prior_std, n_examples):
    """-1/N log p(theta | D) = mean NLL + ||theta||^2 / (2 N sigma^2) + const: the gradient of map_l2_loss
    equals the NLL's gradient plus lambda * theta with lambda = 1 / (N sigma^2), and minus the log density of
    N(0, sigma^2) computed by torch.distributions has the same theta-dependence."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(n_examples, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n_examples,), generator=g).double()
    nll = F.binary_cross_entropy_with_logits(x @ theta, y)
    (grad_map,) = torch.autograd.grad(L.map_l2_loss(nll, [theta], prior_std, n_examples), theta, retain_graph=True)
    (grad_nll,) = torch.autograd.grad(nll, theta, retain_graph=True)
    assert torch.allclose(grad_map, grad_nll + theta.detach() / (n_examples * prior_std ** 2), atol=1e-12)
    log_prior = torch.distributions.Normal(0.0, prior_std).log_prob(theta).sum()
    (grad_prior,) = torch.autograd.grad(-log_prior / n_examples, theta)
    assert torch.allclose(grad_map - grad_nll, grad_prior, atol=1e-12)


def test_adam_with_l2_is_not_adamw():
    """On a weight whose data gradient is 0, AdamW's decoupled decay shrinks it geometrically,
    w (1 - lr wd)^T (closed form), while Adam with the L2 term in its gradient normalises that term away and
    moves it by about lr per step (sign descent): the two differ. With a live gradient on another weight the
    same L2 coefficient decays it far less than AdamW does (its penalty is divided by sqrt(v) of a big gradient).
    AdamW matches torch.optim.AdamW."""
    lr, wd, T = 0.01, 0.1, 50
    weight = torch.tensor([1.0, 1.0], dtype=torch.float64)
    grads = torch.zeros(T, 2, dtype=torch.float64)
    grads[:, 1] = torch.linspace(-3, 3, T).sin() * 5                  # weight 1 sees a large, varying gradient
    adam_l2, adamw = L.adam_l2_vs_adamw(grads, weight, lr, wd, T)
    assert abs(adamw[0] - (1 - lr * wd) ** T) < 1e-12                  # decoupled: geometric decay, 0.951
    # coupled: Adam's step is at most about lr (|m_hat / sqrt(v_hat)| <= 1 for a gradient of one sign), and
    # here it is close to that bound every step: the weight falls to about 1 - lr T = 0.5, ten times further
    assert 1 - lr * T - 1e-6 <= adam_l2[0] <= 1 - 0.8 * lr * T
    assert adamw[1] < adam_l2[1]                                       # the big-gradient weight: decoupled decays more
    reference = weight.clone().requires_grad_(True)
    torch_adamw = torch.optim.AdamW([reference], lr=lr, weight_decay=wd)
    for t in range(T):
        reference.grad = grads[t].clone()
        torch_adamw.step()
    assert torch.allclose(adamw, reference.detach(), atol=1e-10)


@given(seed=st.integers(0, 1000), temperature=st.floats(0.1, 10.0))
def test_temperature_samples_from_the_tempered_distribution(seed, temperature):
    """softmax(z / tau) = p^(1/tau) / sum p^(1/tau) (closed form), and the entropy rises with tau."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(7, generator=g, dtype=torch.float64) * 3
    p = z.softmax(0)
    want = p.pow(1 / temperature) / p.pow(1 / temperature).sum()
    assert torch.allclose(L.tempered(z, temperature).exp(), want, atol=1e-12)
    hotter = L.tempered(z, temperature * 1.5).exp()
    entropy = lambda q: -(q * q.log()).sum()
    assert entropy(hotter) >= entropy(want) - 1e-12


# ---------------------------------------------------------------- gaps found by the mutation run of losses.py

@given(seed=st.integers(0, 10 ** 6), batch=st.integers(2, 6), length=st.integers(2, 5))
def test_reinforce_baselines_over_per_token_returns_equal_brute_force(seed, batch, length):
    """returns (B, T), one per token: 'mean' subtracts each column's mean over the batch (dim 0), 'loo' each
    column's mean over the OTHER samples; the gradient of the plain mean loss is -(R - b) / (B T), and the
    statistics are the mean and the population std (correction 0) of R - b."""
    gen = torch.Generator().manual_seed(seed)
    returns = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    rows = returns.tolist()
    for kind in ("mean", "loo"):
        baseline = [[(sum(r[t] for r in rows) - (rows[i][t] if kind == "loo" else 0.0))
                     / (batch - 1 if kind == "loo" else batch) for t in range(length)] for i in range(batch)]
        advantages = [[rows[i][t] - baseline[i][t] for t in range(length)] for i in range(batch)]
        logp = torch.zeros(batch, length, dtype=torch.float64, requires_grad=True)
        loss, stats = L.reinforce_loss(logp, returns, baseline=kind)
        loss.backward()
        want = torch.tensor(advantages, dtype=torch.float64)
        torch.testing.assert_close(logp.grad, -want / (batch * length), rtol=1e-9, atol=1e-12)
        flat = [a for row in advantages for a in row]
        mean = sum(flat) / len(flat)
        assert math.isclose(float(stats["advantage_mean"]), mean, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(float(stats["advantage_std"]), math.sqrt(sum((a - mean) ** 2 for a in flat) / len(flat)),
                            rel_tol=1e-9, abs_tol=1e-12)


def test_reinforce_masked_tokens_with_non_finite_returns_or_logprobs_change_nothing():
    """Masked tokens are replaced by 0 in BOTH factors before the product: inf * 0 never makes NaN there."""
    logp = torch.tensor([[-1.0, -float("inf")], [-2.0, -0.5]], requires_grad=True)
    returns = torch.tensor([[1.0, float("inf")], [3.0, 2.0]])
    mask = torch.tensor([[True, False], [True, True]])
    loss, _ = L.reinforce_loss(logp, returns, mask=mask)
    loss.backward()
    assert math.isclose(loss.item(), -(1.0 * -1.0 + 3.0 * -2.0 + 2.0 * -0.5) / 3, rel_tol=1e-6)
    assert logp.grad.isfinite().all() and logp.grad[0, 1] == 0


def test_reinforce_refuses_a_bad_baseline_with_its_own_words():
    logp = torch.zeros(1, 2)
    with pytest.raises(ValueError) as error:
        L.reinforce_loss(logp, torch.ones(1, 1), baseline="loo")
    assert str(error.value) == "losses.reinforce_loss: baseline='loo' needs at least 2 samples"
    with pytest.raises(ValueError) as error:
        L.reinforce_loss(logp, torch.ones(1, 1), baseline="median")
    assert str(error.value) == "losses.reinforce_loss: baseline='median'; use a number, a tensor, 'mean' or 'loo'"


@pytest.mark.parametrize("chunk_size", [1, 7])
def test_chunked_cross_entropy_under_autocast_accumulates_the_weight_gradient_in_the_weight_s_dtype(chunk_size):
    """Autocast's case: bf16 hidden states, an fp32 output matrix, many chunks. Each chunk's (V, C) block is a bf16
    product (rounding 2^-9), but the sum over 512 rows must be kept in fp32: compared with fp32 autograd on the
    same bf16-valued inputs the weight gradient is within 5e-3 (measured 1.8e-3), where a bf16 running sum
    drifts to 1e-2 - 2e-2."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(512, 8, generator=gen).to(torch.bfloat16).requires_grad_(True)
    weight = torch.randn(16, 8, generator=gen, requires_grad=True)
    targets = torch.randint(0, 16, (512,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):          # the matmul of a bf16 and an fp32 operand
        loss = L.chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    loss.backward()
    ref_hidden = hidden.detach().float().requires_grad_(True)
    ref_weight = weight.detach().clone().requires_grad_(True)
    F.cross_entropy(ref_hidden @ ref_weight.T, targets).backward()
    assert weight.grad.dtype == torch.float32
    relative = (weight.grad - ref_weight.grad).norm() / ref_weight.grad.norm()
    assert relative < 5e-3, relative
    assert ((hidden.grad.float() - ref_hidden.grad).norm() / ref_hidden.grad.norm()) < 2e-2


def test_chunked_cross_entropy_in_float64_accumulates_its_loss_in_float64():
    """float64 inputs give a float64 loss equal to F.cross_entropy's to 1e-12 (a float32 accumulator cannot)."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(50, 6, generator=gen, dtype=torch.float64) * 3
    weight = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 40, (50,), generator=gen)
    loss = L.chunked_cross_entropy(hidden, weight, targets, chunk_size=7)
    assert loss.dtype == torch.float64
    assert math.isclose(float(loss), float(F.cross_entropy(hidden @ weight.T, targets)), rel_tol=1e-12)


def test_k3_without_its_clamp_is_the_raw_closed_form():
    """max_log_ratio=None removes the clamp: k3 at log r = 30 is expm1(30) - 30, not the clamped value at 20."""
    logp, ref = torch.tensor([0.0], dtype=torch.float64), torch.tensor([30.0], dtype=torch.float64)
    assert math.isclose(float(L.kl_k3(logp, ref, max_log_ratio=None)), math.expm1(30.0) - 30.0, rel_tol=1e-12)
    assert math.isclose(float(L.kl_k3(logp, ref)), math.expm1(20.0) - 20.0, rel_tol=1e-12)


@pytest.mark.parametrize("which", ["logp", "old_logp", "advantages"])
def test_ppo_policy_loss_masked_tokens_holding_inf_or_nan_in_any_input_change_nothing(which):
    """Each input is replaced by 0 under the mask before any arithmetic: the loss and gradient equal those of
    the same batch with finite values there."""
    inputs = {"logp": torch.tensor([[-1.0, -2.0], [-0.5, -1.5]]),
              "old_logp": torch.tensor([[-1.1, -2.0], [-0.4, -1.0]]),
              "advantages": torch.tensor([[1.0, -1.0], [0.5, 2.0]])}
    mask = torch.tensor([[True, False], [True, True]])
    results = []
    for poison in (0.0, float("inf"), float("nan")):
        values = {k: v.clone() for k, v in inputs.items()}
        values[which][0, 1] = poison if poison else values[which][0, 1]
        logp = values["logp"].requires_grad_(True)
        loss, stats = L.ppo_policy_loss(logp, values["old_logp"], values["advantages"], mask=mask)
        loss.backward()
        results.append((loss.item(), logp.grad.clone(), {k: float(v) for k, v in stats.items()}))
    for loss, grad, stats in results[1:]:
        assert loss == results[0][0] and torch.equal(grad, results[0][1]) and stats == results[0][2]


def test_ppo_policy_loss_clamps_the_log_ratio_at_its_max_log_ratio_in_the_loss_and_every_statistic():
    """log ratio -30 with max_log_ratio 5: ratio e^-5 (not e^-30), and approx_kl = k3 at the same clamp."""
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, stats = L.ppo_policy_loss(old - 30.0, old, torch.ones(1, 1, dtype=torch.float64), max_log_ratio=5.0)
    assert math.isclose(float(stats["ratio_mean"]), math.exp(-5.0), rel_tol=1e-12)
    assert math.isclose(float(loss), -math.exp(-5.0), rel_tol=1e-12)                # A > 0: min(rho A, clip A)
    assert math.isclose(float(stats["approx_kl"]), math.expm1(-5.0) + 5.0, rel_tol=1e-12)  # k3, log r = new - old


def test_ppo_policy_loss_a_ratio_exactly_on_the_clip_boundary_is_not_counted_as_clipped():
    """eps = 0 and ratio exactly 1: the condition is strict (ratio > 1 + eps_high, ratio < 1 - eps_low)."""
    logp = torch.zeros(2, 1)
    _, stats = L.ppo_policy_loss(logp, logp, torch.tensor([[1.0], [-1.0]]), eps_low=0.0, eps_high=0.0)
    assert float(stats["clipfrac"]) == 0.0


def test_chunked_cross_entropy_names_a_wrong_shape_in_its_error():
    hidden, targets = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError) as error:
        L.chunked_cross_entropy(hidden, torch.zeros(5, 6), targets)
    assert str(error.value) == "losses.chunked_cross_entropy: weight must be (V, 4), got (5, 6)"
    with pytest.raises(ValueError) as error:
        L.chunked_cross_entropy(hidden, torch.zeros(5, 4), torch.zeros(2, 4, dtype=torch.long))
    assert str(error.value) == ("losses.chunked_cross_entropy: hidden (2, 3, 4) needs targets of shape (2, 3), "
                                "got (2, 4)")
    with pytest.raises(ValueError, match=r"^losses.chunked_cross_entropy: chunk_size=0 must be >= 1$"):
        L.chunked_cross_entropy(hidden, torch.zeros(5, 4), targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"^losses.chunked_cross_entropy: reduction='none'; choose 'mean' or 'sum'$"):
        L.chunked_cross_entropy(hidden, torch.zeros(5, 4), targets, reduction="none")


def test_soft_cross_entropy_answers_in_the_dtype_of_the_log_probs_and_reduce_names_a_bad_reduction():
    """Targets of another dtype are cast to the model's (float64 soft labels must not turn an fp32 loss into fp64)."""
    logq = torch.log_softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), -1)       # float32
    target = torch.softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    assert L.soft_cross_entropy(target, logq).dtype == torch.float32
    with pytest.raises(ValueError) as error:
        L.cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), reduction="avg")
    assert str(error.value) == "losses.py: reduction='avg'; choose 'mean', 'sum' or 'none'"


# ---------------------------------------------------------------- edges: empty, zero-length, -inf and huge logits

INF = math.inf
DEMO = {"walkthrough", "benchmark", "main", "check_args"}      # the worked example and its CLI, not losses


def public_functions():
    return {name for name, obj in vars(L).items() if callable(obj) and getattr(obj, "__module__", None) == L.__name__
            and not name.startswith(("_", "show_")) and not isinstance(obj, type)} - DEMO


@st.composite
def edge_batch(draw):
    """A (B, T, V) batch at the edges: B and T may be 0 or 1, V may be 1; logits from {+-1e4, -inf, ...} with
    the target of every position finite (a row always has a class of probability > 0), a mask that may keep
    nothing. -> dict of tensors (float64) and sizes."""
    b, t, v = draw(st.sampled_from([0, 1, 3])), draw(st.sampled_from([0, 1, 4])), draw(st.sampled_from([1, 2, 6]))
    gen = torch.Generator().manual_seed(draw(SEEDS))
    values = torch.tensor([-1e4, -30.0, -1.0, 0.0, 0.5, 7.0, 1e4], dtype=torch.float64)
    pick = lambda: values[torch.randint(len(values), (b, t, v), generator=gen)]
    targets = torch.randint(v, (b, t), generator=gen)
    on_target = F.one_hot(targets, v).bool()                                          # (B, T, V)
    neg_inf = (torch.rand(b, t, v, generator=gen) < draw(st.sampled_from([0.0, 0.5]))) & ~on_target
    logits = torch.where(neg_inf, -INF, pick())                                       # q: -inf off the target
    p_logits = torch.where(neg_inf, -INF, pick())        # p: -inf wherever q is, so p's support is inside q's
    keep = torch.rand(b, t, generator=gen) < draw(st.sampled_from([0.0, 0.6, 1.0]))
    return dict(b=b, t=t, v=v, gen=gen, logits=logits, finite_logits=pick(), p_logits=p_logits,
                targets=targets, keep=keep, denom=draw(st.sampled_from([None, 0, 5])))


def leaf(x):
    return x.clone().requires_grad_()


def edge_calls(e):
    """name -> (outputs, leaves): every public loss function of losses.py called on the edge batch."""
    z, zf, pz = leaf(e["logits"]), leaf(e["finite_logits"]), leaf(e["p_logits"])
    y, keep, denom, b, t = e["targets"], e["keep"], e["denom"], e["b"], e["t"]
    logp = L.log_likelihood(z, y)                                                     # (B, T) finite
    ref_logp = L.log_likelihood(torch.where(torch.isinf(z), z, 2 * z).detach(), y)    # the same support
    adv = torch.linspace(-2, 2, b * t, dtype=torch.float64).view(b, t)
    values, returns = leaf(torch.full((b, t), 0.5, dtype=torch.float64)), adv * 3
    seq = L.sequence_logprob(logp, keep)                                              # (B,)
    hidden = leaf(torch.randn(b, t, 3, generator=e["gen"], dtype=torch.float64) * 30)
    weight = leaf(torch.randn(e["v"], 3, generator=e["gen"], dtype=torch.float64) * 30)
    counts = torch.randint(0, 4, (b, e["v"]), generator=e["gen"]).double()
    counts[:, 0] += 1                                                                 # every row has data
    theta = leaf(torch.randn(3, dtype=torch.float64))
    return {
        "masked_sum": (L.masked_sum(logp, keep), [z]),
        "masked_mean": (L.masked_mean(logp, keep, denom=denom), [z]),
        "log_likelihood": (L.log_likelihood(z, y, mask=keep), [z]),
        "nll": (L.nll(z, y, mask=keep), [z]),
        "entropy": (L.entropy(z, keep), [z]),
        "soft_cross_entropy": (L.soft_cross_entropy(torch.softmax(pz, -1), z, keep), [z, pz]),
        "kl_divergence": (L.kl_divergence(pz, z, keep), [z, pz]),
        "perplexity": (L.perplexity(L.masked_mean(-L.log_likelihood(z / 100, y), keep)), [z]),   # <= 709 nats
        "bits_per_token": (L.bits_per_token(L.masked_mean(-logp, keep)), [z]),
        "bits_per_byte": (L.bits_per_byte(L.masked_mean(-logp, keep), int(keep.sum()), max(int(keep.sum()), 1)),
                          [z]),
        "kl_k1": (L.kl_k1(logp, ref_logp, keep), [z]),
        "kl_k2": (L.kl_k2(logp, ref_logp, keep), [z]),
        "kl_k3": (L.kl_k3(logp, ref_logp, keep), [z]),
        "cross_entropy": (L.cross_entropy(z, y, mask=keep, z_loss=1e-4, denom=denom)
                          + L.cross_entropy(zf, y, mask=keep, label_smoothing=0.1, reduction="sum"), [z, zf]),
        "chunked_cross_entropy": (L.chunked_cross_entropy(hidden, weight, y, mask=keep, label_smoothing=0.1,
                                                          z_loss=1e-4, chunk_size=2, denom=denom), [hidden, weight]),
        "sequence_logprob": (seq, [z]),
        "bradley_terry_loss": (L.bradley_terry_loss(seq, seq.detach() - 1.0, margin=0.5), [z]),
        "dpo_loss": (L.dpo_loss(seq, seq.detach() * 2, seq.detach() - 1, seq.detach()), [z]),
        "ipo_loss": (L.ipo_loss(seq, seq.detach() * 2, seq.detach() - 1, seq.detach()), [z]),
        "ppo_policy_loss": (L.ppo_policy_loss(logp, ref_logp, adv, keep, denom=denom), [z]),
        "value_loss": (L.value_loss(values, values.detach() * 0, returns, keep, denom=denom), [values]),
        "entropy_bonus": (L.entropy_bonus(z, keep, denom=denom), [z]),
        "reinforce_loss": (L.reinforce_loss(logp, returns, baseline="mean", mask=keep, denom=denom), [z]),
        "categorical_mle": (L.categorical_mle(counts), []),
        "dirichlet_posterior_mean": (L.dirichlet_posterior_mean(counts * 0, 0.5), []),
        "map_l2_loss": (L.map_l2_loss(L.masked_mean(-logp, keep), [theta], 0.5, max(b, 1)), [z, theta]),
        "adam_l2_vs_adamw": (L.adam_l2_vs_adamw(torch.ones(t, 2, dtype=torch.float64), torch.ones(2), 0.01, 0.1, t),
                             []),
        "tempered": (torch.where(torch.isinf(z), 0.0, L.tempered(z, 0.5)), [z]),   # -inf is log 0: exact
    }


def tensors_in(output):
    if isinstance(output, (tuple, list)):
        return [x for item in output for x in tensors_in(item)]
    if isinstance(output, dict):
        return [x for item in output.values() for x in tensors_in(item)]
    return [output] if torch.is_tensor(output) else []


def test_the_edge_sweep_covers_every_public_loss_function():
    """A new function in losses.py must join test_every_loss_is_finite_with_finite_gradients_at_the_edges."""
    gen = torch.Generator().manual_seed(0)
    sample = dict(b=1, t=1, v=2, gen=gen, logits=torch.zeros(1, 1, 2, dtype=torch.float64),
                  finite_logits=torch.zeros(1, 1, 2, dtype=torch.float64),
                  p_logits=torch.zeros(1, 1, 2, dtype=torch.float64), targets=torch.zeros(1, 1, dtype=torch.long),
                  keep=torch.ones(1, 1, dtype=torch.bool), denom=None)
    assert set(edge_calls(sample)) == public_functions()


@given(edge_batch())
def test_every_loss_is_finite_with_finite_gradients_at_the_edges(e):
    """Empty batches (B = 0), zero-length sequences (T = 0), single elements, a vocabulary of 1, -inf logits
    (off the target), logits of +-1e4, masks that keep nothing, a whole-batch denom of 0: every public function
    gives finite values and finite gradients (what the module docstring promises)."""
    for name, (output, leaves) in edge_calls(e).items():
        values = tensors_in(output)
        assert all(torch.isfinite(x).all() for x in values), (name, output)
        scalars = [x.sum() for x in values if x.requires_grad]
        if scalars and leaves:
            grads = torch.autograd.grad(sum(scalars), leaves, allow_unused=True, retain_graph=True)
            assert all(g is None or torch.isfinite(g).all() for g in grads), name


@given(edge_batch())
def test_an_empty_or_fully_masked_batch_gives_zero_whatever_its_denominator(e):
    """Nothing counted: every loss is exactly 0 (the sum of nothing, divided by a count of at least 1), with
    a zero gradient, for denom None, 0 (the whole batch is empty) or any count."""
    nothing = torch.zeros_like(e["keep"])
    z = leaf(e["logits"])
    adv = torch.ones(e["b"], e["t"], dtype=torch.float64)
    logp = L.log_likelihood(z, e["targets"])
    hidden = leaf(torch.ones(e["b"], e["t"], 3, dtype=torch.float64))
    losses = [L.cross_entropy(z, e["targets"], mask=nothing, denom=e["denom"]),
              L.chunked_cross_entropy(hidden, torch.ones(e["v"], 3, dtype=torch.float64), e["targets"], mask=nothing,
                                      denom=e["denom"]),
              L.ppo_policy_loss(logp, logp.detach(), adv, nothing, denom=e["denom"])[0],
              L.value_loss(logp, logp.detach(), adv, nothing, denom=e["denom"])[0],
              L.entropy_bonus(z, nothing, denom=e["denom"]),
              L.reinforce_loss(logp, adv, mask=nothing, denom=e["denom"])[0],
              L.masked_mean(logp, nothing, denom=e["denom"])]
    for loss in losses:
        assert float(loss.detach()) == 0.0
    grads = torch.autograd.grad(sum(losses), [z, hidden])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_reinforce_statistics_of_an_empty_batch_are_zero():
    loss, stats = L.reinforce_loss(torch.zeros(0, 3), torch.zeros(0, 1), baseline="mean")
    assert float(loss) == 0.0 and float(stats["advantage_mean"]) == 0.0 and float(stats["advantage_std"]) == 0.0


@given(st.integers(1, 9), st.data(), finite(1e4))
def test_entropy_of_a_one_hot_distribution_is_zero_with_a_zero_gradient(vocab, data, value):
    """One finite logit, every other -inf: p is one-hot and H(p) = 0 exactly (0 log 0 := 0); the same row
    through entropy_bonus, and its cross-entropy with itself (soft_cross_entropy(p, z) = H(p))."""
    hot = data.draw(st.integers(0, vocab - 1))
    z = torch.full((1, vocab), -INF, dtype=torch.float64)
    z[0, hot] = value
    z.requires_grad_()
    h = L.entropy(z)
    assert float(h.detach()) == 0.0
    assert float(L.entropy_bonus(z[None]).detach()) == 0.0
    assert float(L.soft_cross_entropy(F.one_hot(torch.tensor([hot]), vocab).double(), z).detach()) == 0.0
    (grad,) = torch.autograd.grad(h.sum(), z)
    assert torch.equal(grad, torch.zeros_like(grad))


@st.composite
def supports(draw, max_vocab=8):
    """(p logits, q logits, p's support S, q's support Q) with S inside Q: -inf outside each support."""
    v = draw(st.integers(2, max_vocab))
    q_support = draw(st.lists(st.booleans(), min_size=v, max_size=v).filter(any))
    p_support = [q and draw(st.booleans()) for q in q_support]
    if not any(p_support):
        p_support[q_support.index(True)] = True
    row = lambda: np.array(draw(st.lists(finite(20.0), min_size=v, max_size=v)))
    p = np.where(p_support, row(), -np.inf)
    q = np.where(q_support, row(), -np.inf)
    return torch.tensor(p)[None], torch.tensor(q)[None], np.array(p_support), np.array(q_support)


@given(supports())
def test_kl_and_cross_entropy_with_minus_inf_logits_are_sums_over_p_s_support(pair):
    """q's logit is -inf on classes where p has no mass either: KL(p||q) = sum_{v in supp p} p_v log(p_v / q_v)
    and H(p, q) = -sum_{v in supp p} p_v log q_v, brute force in numpy over the supports alone, both finite,
    with finite gradients (zero on the -inf logits)."""
    p_logits, q_logits, s, qs = pair
    p_logits.requires_grad_()
    q_logits.requires_grad_()
    lp = p_logits.detach().numpy()[0][s] - np_logsumexp(p_logits.detach().numpy()[0][s])
    lq_all = q_logits.detach().numpy()[0][qs] - np_logsumexp(q_logits.detach().numpy()[0][qs])
    lq = np.full(len(s), -np.inf)
    lq[qs] = lq_all
    kl = L.kl_divergence(p_logits, q_logits)
    ce = L.soft_cross_entropy(torch.softmax(p_logits, -1), q_logits)
    assert torch.isfinite(kl).all() and torch.isfinite(ce).all()
    np.testing.assert_allclose(kl.item(), (np.exp(lp) * (lp - lq[s])).sum(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ce.item(), -(np.exp(lp) * lq[s]).sum(), rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad((kl + ce).sum(), [p_logits, q_logits])
    assert all(torch.isfinite(g).all() for g in grads)
    assert float(grads[0][0][~torch.tensor(s)].abs().sum()) == 0.0


@given(supports())
def test_kl_is_infinite_exactly_when_p_has_mass_where_q_is_minus_inf(pair):
    """Swap the roles: q's support is then inside p's. Where p has mass that q gives none, KL(p||q) and
    H(p, q) are +inf, their exact values (a finite number would be wrong); where the supports agree, finite."""
    q_logits, p_logits, q_support, p_support = pair          # p's support now contains q's
    infinite = bool((p_support & ~q_support).any())            # a class of p's with no mass under q
    kl, ce = L.kl_divergence(p_logits, q_logits), L.soft_cross_entropy(torch.softmax(p_logits, -1), q_logits)
    assert (kl.item() == INF) == infinite and (ce.item() == INF) == infinite
    assert not torch.isnan(kl).any() and not torch.isnan(ce).any()


def test_cross_entropy_of_a_target_whose_logit_is_minus_inf_is_infinite_as_in_pytorch():
    """-log 0 = +inf, as F.cross_entropy; label smoothing's target puts eps / V on a -inf class: +inf too."""
    z, y = torch.tensor([[0.0, -INF, 1.0]]), torch.tensor([1])
    assert L.cross_entropy(z, y).item() == F.cross_entropy(z, y).item() == INF
    assert L.cross_entropy(z, torch.tensor([0]), label_smoothing=0.1).item() == INF
    assert L.cross_entropy(z, torch.tensor([0])).item() == pytest.approx(F.cross_entropy(z, torch.tensor([0])).item())


@pytest.mark.parametrize("call, message", [
    (lambda: L.tempered(torch.zeros(3), 0.0), "losses.tempered: temperature=0.0 must be > 0"),
    (lambda: L.tempered(torch.zeros(3), -1.0), "losses.tempered: temperature=-1.0 must be > 0"),
    (lambda: L.ipo_loss(*[torch.zeros(2)] * 4, beta=0.0), "losses.ipo_loss: beta=0.0 must be > 0"),
    (lambda: L.categorical_mle(torch.zeros(2, 3)), "losses.categorical_mle: counts must be >= 0"),
    (lambda: L.categorical_mle(torch.tensor([2.0, -1.0])), "losses.categorical_mle: counts must be >= 0"),
    (lambda: L.dirichlet_posterior_mean(torch.zeros(3), 0.0), "losses.dirichlet_posterior_mean: alpha=0.0"),
    (lambda: L.map_l2_loss(torch.tensor(1.0), [torch.ones(2)], 0.0, 5), "losses.map_l2_loss: prior_std=0.0"),
    (lambda: L.map_l2_loss(torch.tensor(1.0), [torch.ones(2)], 1.0, 0), "n_examples=0 >= 1"),
    (lambda: L.bits_per_byte(1.0, 4, 0), "losses.bits_per_byte: n_bytes=0 must be >= 1"),
    (lambda: L.reinforce_loss(torch.zeros(1, 2), torch.zeros(1, 1), baseline="loo"), "at least 2 samples"),
])
def test_a_parameter_outside_its_domain_is_a_one_line_value_error(call, message):
    """Where the quantity is undefined (a temperature of 0, no counts, no bytes, ...), a ValueError of one line
    naming the function and the value, never a NaN or a ZeroDivisionError."""
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_perplexity_of_a_number_is_float64_so_a_mean_nll_of_100_nats_is_finite():
    """exp(100) = 2.7e43 overflows float32 (max 3.4e38): a Python number is taken in float64 (finite to 709)."""
    assert L.perplexity(100.0).item() == pytest.approx(math.exp(100.0), rel=1e-12)
    assert L.perplexity(710.0).item() == INF                    # past float64's range: the honest overflow
