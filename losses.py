"""Probability, information theory, and every loss that trains or aligns a language model.

A language model turns a context into logits z and a distribution q = softmax(z) over the next
token. For tokens x drawn from a data distribution p, these are one quantity seen from different
angles:

    likelihood       q(x)                          a sequence multiplies them
    log-likelihood   log q(x)                      a sequence adds them
    NLL              -log q(x)                     the pre-training / SFT loss
    cross-entropy    H(p, q) = E_{x~p}[-log q(x)]  the expected NLL; the mean NLL estimates it
    entropy          H(p)    = H(p, p)             the floor that no model can go below
    KL divergence    KL(p||q) = H(p, q) - H(p)     >= 0: what training can still remove
    perplexity       exp(H(p, q)),   bits/token = H(p, q) / ln 2

Every training loss below is a pure function of such log-probabilities: cross-entropy with label
smoothing (Szegedy et al. 2016) and z-loss (PaLM, Chowdhery et al. 2022); a chunked cross-entropy
that never builds the (tokens x vocab) logits; Bradley-Terry (1952) for reward models; DPO
(Rafailov et al. 2023) and IPO (Azar et al. 2023); PPO's clipped surrogate and value loss (Schulman
et al. 2017), the entropy bonus, REINFORCE with a baseline (Williams 1992); and the k1/k2/k3
estimators of KL from samples (Schulman 2020, "Approximating KL Divergence"). Section 6 is the
statistics under them: maximum likelihood is the minimum of the NLL, MAP with a Gaussian prior is L2
regularisation (and AdamW's decoupled decay is not), a Dirichlet prior's posterior mean is add-alpha
smoothing (label smoothing's target), and sampling temperature is a tempered distribution.

Conventions: `mask` is a bool tensor (True = the position counts), `ignore_index` marks padded
targets. What sits under the mask never matters: every masked input is replaced (torch.where) BEFORE
any arithmetic, so a masked position holding +-inf, NaN or 1e300 gives a finite loss and a gradient
that is exactly 0 there (multiplying by the mask afterwards would compute 0 * inf = NaN in the
forward or the backward pass). A fully masked input gives 0 with a zero gradient; unmasked logits up
to 1e4 and log-ratios of +-100 give finite values and gradients.

Edges: an empty batch, a zero-length sequence, a fully masked batch and a whole-batch `denom` of 0 (the
count of an empty batch) give 0, with a zero gradient; a single element is a batch like any other. A
logit of -inf is a class of probability 0: it counts 0 wherever it is weighted by its own probability
(entropy, the p side of KL and of soft cross-entropy, log Z), so those stay finite. A value is +inf only
where it is infinite in exact arithmetic, as in F.cross_entropy: the NLL of a target whose logit is -inf,
label smoothing or a soft target p that puts mass on such a class, KL(p||q) where p has mass and q's logit
is -inf. A parameter outside its domain (a temperature or IPO beta <= 0, a row of counts summing to 0, ...)
is a one-line ValueError. Inputs that are not numbers of the kind asked for (NaN or +inf logits, a row of
all -inf logits, a sampled token's log-prob of -inf, all outside the mask) give NaN or inf: garbage in.

Run:  python losses.py   (a worked example, then chunked vs plain cross-entropy at vocab 50257)
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import gc
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib import cli

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# 1. Masks and reductions
# ----------------------------------------------------------------------------------------------

def masked_sum(values, mask=None, dim=None):
    """sum_i m_i * x_i  over `dim` (all dims when None).

    Masked entries are *replaced* by 0 (torch.where), not multiplied by 0, so an inf or NaN under
    the mask never reaches the result or the gradient (0 * inf = NaN would)."""
    if mask is not None:
        values, mask = torch.broadcast_tensors(values, mask.bool())
        values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values, mask=None, dim=None, denom=None):
    """sum_i m_i * x_i / max(sum_i m_i, 1)      (0, with a zero gradient, when nothing counts)

    denom: divide by this count instead, e.g. the number of tokens in the whole batch, so that a
    batch split into micro-batches with gradient accumulation gets the same gradient as the batch
    at once (dividing each micro-batch by its own count would weight tokens unequally). A count
    below 1 (0: the whole batch is empty, so is this sum) divides by 1, as the mask's count does."""
    total = masked_sum(values, mask, dim)
    if denom is not None:
        return total / (denom.clamp_min(1) if torch.is_tensor(denom) else max(denom, 1))
    if mask is None:
        count = values.numel() if dim is None else values.shape[dim]
        return total / max(count, 1)
    values, mask = torch.broadcast_tensors(values, mask.bool())
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp_min(1).to(total.dtype)


def _reduce(per_item, valid, reduction, denom=None):
    """'none' -> per item (0 where invalid), 'sum', or 'mean' over the valid items."""
    if reduction == "none":
        return torch.where(valid, per_item, torch.zeros((), dtype=per_item.dtype, device=per_item.device))
    if reduction == "sum":
        return masked_sum(per_item, valid)
    if reduction == "mean":
        return masked_mean(per_item, valid, denom=denom)
    raise ValueError(f"losses.py: reduction={reduction!r}; choose 'mean', 'sum' or 'none'")


def _keep(values, mask):
    """values where mask is True, 0 elsewhere (broadcast): a masked entry is REPLACED before any
    arithmetic, so inf/NaN under the mask reach neither the value nor the gradient (whose entry
    there is exactly 0). mask None: values unchanged."""
    if mask is None:
        return values
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def _keep_rows(logits, mask):
    """_keep for (..., V) rows with a (...) mask: a masked row becomes all zeros (uniform)."""
    return logits if mask is None else _keep(logits, mask.bool().unsqueeze(-1))


def _valid(targets, ignore_index, mask):
    """Bool tensor of the positions that count: target != ignore_index and mask."""
    valid = targets != ignore_index
    return valid if mask is None else valid & mask.bool()


def _fp32(logits):
    """Half-precision logits are upcast: log-sum-exp over 50k classes needs fp32."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


# ----------------------------------------------------------------------------------------------
# 2. Probability and information: likelihood, entropy, cross-entropy, KL, perplexity
# ----------------------------------------------------------------------------------------------

def log_likelihood(logits, targets, ignore_index=-100, mask=None):
    """log q(y) = z_y - log Z,   log Z = logsumexp_v z_v      (log-sum-exp: stable for any z)

    logits (..., V), targets (...) long -> (...) log-probability of each target, 0 where ignored.
    A sequence's log-likelihood is the sum over its tokens (`sequence_logprob`)."""
    valid = _valid(targets, ignore_index, mask)
    logits = _keep_rows(_fp32(logits), valid)                                   # (..., V)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))       # -100 is no index
    log_z = torch.logsumexp(logits, dim=-1)                                     # (...)
    target_logit = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)    # (...)
    return _reduce(target_logit - log_z, valid, "none")


def nll(logits, targets, ignore_index=-100, mask=None):
    """Negative log-likelihood -log q(y) per token (...), 0 where ignored. Its mean over the valid
    tokens is the cross-entropy loss; exp of that mean is the perplexity."""
    return -log_likelihood(logits, targets, ignore_index, mask)


def entropy(logits, mask=None):
    """H(p) = -sum_v p_v log p_v,  p = softmax(z);   0 <= H <= log V      logits (..., V) -> (...)

    Terms with p_v = 0 (logit -inf, e.g. after top-k) count 0, with a zero gradient.
    mask (...): 0 where False, whatever the logits hold there."""
    logp = torch.log_softmax(_keep_rows(_fp32(logits), mask), dim=-1)   # (..., V)
    p = logp.exp()
    plogp = p * logp.masked_fill(p == 0, 0.0)                          # 0 * log 0 := 0
    h = -plogp.sum(-1)                                                  # (...)
    return h if mask is None else _reduce(h, mask.bool(), "none")


def soft_cross_entropy(target_probs, logits, mask=None):
    """H(p, q) = -sum_v p_v log q_v  for soft targets p (..., V) and q = softmax(logits) (..., V).

    With one-hot p this is the hard-target NLL; with p = q it is the entropy H(q). -> (...)
    Classes with p_v = 0 count 0 (q's logit may be -inf there); +inf, the exact value, when p puts mass
    on a class whose logit is -inf. mask (...): 0 where False, whatever the targets and logits hold there."""
    logq = torch.log_softmax(_keep_rows(_fp32(logits), mask), dim=-1)
    target_probs = _keep_rows(target_probs.to(logq.dtype), mask)               # masked rows: p = 0, H = 0
    return -(target_probs * logq.masked_fill(target_probs == 0, 0.0)).sum(-1)


def kl_divergence(p_logits, q_logits, mask=None):
    """KL(p||q) = sum_v p_v (log p_v - log q_v) = H(p, q) - H(p) >= 0, exactly, from two sets of
    logits (..., V) -> (...). Zero iff p == q (logits equal up to a constant per row).

    Direction matters: KL(p||q) weights by p, so it is large where p has mass and q does not.
    A class whose p-logit is -inf counts 0 whatever q holds there (q's -inf too): KL is the sum over
    p's support, finite when q gives that support mass; +inf, its exact value, when p has mass on a
    class whose q-logit is -inf. mask (...): 0 where False, whatever either set of logits holds there."""
    logp = torch.log_softmax(_keep_rows(_fp32(p_logits), mask), dim=-1)
    logq = torch.log_softmax(_keep_rows(_fp32(q_logits), mask), dim=-1)
    p = logp.exp()                                       # masked rows: p = q = uniform, KL = 0 exactly
    return (p * (logp - logq).masked_fill(p == 0, 0.0)).sum(-1)


def perplexity(mean_nll):
    """PPL = exp(mean NLL in nats) = 1 / (geometric mean of q(x_t)): the effective number of
    equally likely tokens the model is choosing between (V for a uniform model). A number is taken
    in float64, finite up to a mean NLL of 709 nats (float32 overflows past 88); beyond, +inf."""
    return (mean_nll if torch.is_tensor(mean_nll) else torch.tensor(mean_nll, dtype=torch.float64)).exp()


def bits_per_token(mean_nll):
    """bits/token = mean NLL / ln 2   (nats -> bits)."""
    return torch.as_tensor(mean_nll) / LN2


def bits_per_byte(mean_nll, n_tokens, n_bytes):
    """bits/byte = (mean NLL per token * n_tokens) / (ln 2 * n_bytes): the tokenizer-independent
    number, comparable across vocabularies (a byte-level tokenizer has bits/byte = bits/token).
    n_bytes must be >= 1 (ValueError): no text has no bits per byte."""
    if not n_bytes >= 1:
        raise ValueError(f"losses.bits_per_byte: n_bytes={n_bytes} must be >= 1")
    return torch.as_tensor(mean_nll) * n_tokens / (LN2 * n_bytes)


# KL from samples. In RL we only have the log-probs of the *sampled* tokens, not full
# distributions. For x ~ pi (the distribution that generated the tokens), with
#     log r = log pi_ref(x) - log pi(x),
# Schulman (2020) gives three per-sample estimators of KL(pi || pi_ref):
#     k1 = -log r                 unbiased, high variance, can be negative per sample
#     k2 = (log r)^2 / 2          biased, low variance; its expectation agrees with KL to 2nd order
#     k3 = (r - 1) - log r        unbiased (E_pi[r] = 1), >= 0 per sample (GRPO's per-token KL)
# Swap the roles and you estimate the other direction: name it.
# Numerical range: k1 and k2 have no exp and are finite for any finite log r (log r = +-100 gives
# k1 = -+100, k2 = 5000); k3 has e^u, which overflows float32 at u ~ 89, so its log r is clamped.

def _log_ratio(logp, ref_logp, max_log_ratio):
    log_ratio = ref_logp - logp
    return log_ratio if max_log_ratio is None else log_ratio.clamp(-max_log_ratio, max_log_ratio)


def kl_k1(logp, ref_logp, mask=None):
    """k1 = -log r = log pi(x) - log pi_ref(x),  x ~ pi;  E_pi[k1] = KL(pi || pi_ref).  (...)

    No exp: finite for any finite log-probs (a log-ratio of +-100 gives -+100). mask: 0 where False."""
    logp, ref_logp = _keep(logp, mask), _keep(ref_logp, mask)        # masked: both 0, so k1 = 0
    return logp - ref_logp


def kl_k2(logp, ref_logp, mask=None):
    """k2 = (log r)^2 / 2,  x ~ pi;  E_pi[k2] = KL(pi || pi_ref) + O(log r ^3) (biased).  (...)

    No exp: finite for any finite log-ratio (+-100 gives 5000). mask: 0 where False."""
    logp, ref_logp = _keep(logp, mask), _keep(ref_logp, mask)        # masked: both 0, so k2 = 0
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp, ref_logp, mask=None, max_log_ratio=20.0):
    """k3 = (r - 1) - log r,  r = pi_ref(x)/pi(x),  x ~ pi;  E_pi[k3] = KL(pi || pi_ref).  (...)

    Non-negative per sample (e^u >= 1 + u). Computed as expm1(u) - u for accuracy at small u.
    |log r| is clamped to max_log_ratio (default 20: e^20 = 4.9e8) so that exp cannot overflow:
    a log-ratio of +-100 gives a finite k3 (that of +-20) with a zero gradient (as in ppo_policy_loss).
    max_log_ratio=None removes the clamp: then float32 overflows to inf from log r ~ 89 on.
    mask: 0 where False."""
    logp, ref_logp = _keep(logp, mask), _keep(ref_logp, mask)        # masked: u = 0, so k3 = 0
    u = _log_ratio(logp, ref_logp, max_log_ratio)
    return (torch.expm1(u) - u).clamp_min(0.0)


# ----------------------------------------------------------------------------------------------
# 3. Pre-training / SFT: cross-entropy, label smoothing, z-loss, chunked cross-entropy
# ----------------------------------------------------------------------------------------------

def cross_entropy(logits, targets, ignore_index=-100, mask=None, label_smoothing=0.0, z_loss=0.0,
                  reduction="mean", denom=None):
    """loss_t = (1 - eps) * (log Z - z_y)  +  eps * (log Z - mean_v z_v)  +  c_z * (log Z)^2

    = (1-eps) * NLL + eps * mean over classes of -log q_v  (label smoothing: the target is
      (1-eps) * one_hot + eps * uniform, as in F.cross_entropy), plus PaLM's z-loss, which pulls
      log Z toward 0 so that the softmax normaliser stays near 1 in bf16.
    logits (..., V), targets (...) -> scalar ('mean' over valid tokens, or 'sum'), or (...) ('none').
    A fully masked batch gives 0 (F.cross_entropy gives NaN). Masked and ignored rows are zeroed
    before the arithmetic (one copy of the logits; chunked_cross_entropy never builds them). A -inf
    logit is a class of probability 0: +inf (as F.cross_entropy) if it is the target, or with label
    smoothing (whose target puts eps / V on it); z-loss's (log Z)^2 overflows float32 past |log Z| ~ 1e19."""
    valid = _valid(targets, ignore_index, mask)
    logits = _keep_rows(_fp32(logits), valid)                                   # (..., V)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    log_z = torch.logsumexp(logits, dim=-1)                                     # (...)
    loss = log_z - logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)    # NLL (...)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (log_z - logits.mean(-1))
    if z_loss:
        loss = loss + z_loss * log_z ** 2
    return _reduce(loss, valid, reduction, denom)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits = hidden @ weight.T, one chunk of rows at a time.

    The (N, V) logits of a large vocabulary dwarf everything else in the step (N = 8k tokens,
    V = 50k: 1.6 GB in fp32, and autograd keeps two or three such tensors). Because the loss is a
    sum of per-row terms, the gradient w.r.t. a chunk's logits is known in closed form the moment
    that chunk's logits exist:
        dloss_t / dz_t = w_t * [ q_t * (1 + 2 c_z log Z_t) - (1 - eps) * onehot(y_t) - eps / V ]
    (w_t = 1/count for 'mean', 0 for ignored rows). So the forward pass computes each chunk's
    logits, its loss and its contribution to d/dhidden and d/dweight, and drops the logits; the
    backward pass only scales the stored gradients by the incoming scalar. Peak extra memory is
    one (chunk, V) block instead of (N, V). (Liger-Kernel's fused linear cross-entropy does this;
    recomputing each chunk under torch.utils.checkpoint is the other way to get it.)"""

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weight, chunk_size, label_smoothing, z_loss, need_grad):
        # hidden (N, C), weight (V, C), targets (N,) long (ignored rows hold any valid index),
        # row_weight (N,) = the loss weight of each row (0 for ignored rows)
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.zeros_like(hidden) if need_grad and ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if need_grad and ctx.needs_input_grad[1] else None
        loss = torch.zeros((), dtype=row_weight.dtype, device=hidden.device)
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            h, y, w = hidden[rows], targets[rows], row_weight[rows]           # (n, C), (n,), (n,)
            logits = _fp32(h @ weight.T).to(row_weight.dtype)                 # (n, V): the only big tensor
            row_loss = -logits.gather(1, y[:, None]).squeeze(1)              # -z_y (n,)
            if label_smoothing:
                row_loss = (1 - label_smoothing) * row_loss - label_smoothing * logits.mean(-1)
            max_logit = logits.amax(-1)                                       # (n,)
            probs = logits.sub_(max_logit[:, None]).exp_()                   # in place: exp(z - max)
            sum_exp = probs.sum(-1)                                           # (n,)
            log_z = max_logit + sum_exp.log()                                 # log-sum-exp (n,)
            row_loss = row_loss + log_z                                       # (1-eps)NLL + eps*smooth
            if z_loss:
                row_loss = row_loss + z_loss * log_z ** 2
            loss = loss + (w * row_loss).sum()
            if grad_hidden is not None or grad_weight is not None:
                grad_logits = probs.div_(sum_exp[:, None])                    # q, in place (n, V)
                grad_logits.mul_((w * (1 + 2 * z_loss * log_z))[:, None])
                if label_smoothing:
                    grad_logits.sub_((w * label_smoothing / vocab)[:, None])
                grad_logits.scatter_add_(1, y[:, None], -(1 - label_smoothing) * w[:, None])
                grad_logits = grad_logits.to(hidden.dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits @ weight                  # (n, C)
                if grad_weight is not None and grad_weight.dtype == grad_logits.dtype == h.dtype:
                    grad_weight.addmm_(grad_logits.T, h)                      # (V, C), in place
                elif grad_weight is not None:
                    grad_weight += grad_logits.T @ h                          # mixed dtypes (autocast)
                del grad_logits
            del logits, probs   # free this chunk's (n, V) block before the next one is allocated
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_cross_entropy(hidden, weight, targets, ignore_index=-100, mask=None, label_smoothing=0.0,
                          z_loss=0.0, chunk_size=1024, reduction="mean", denom=None):
    """cross_entropy(hidden @ weight.T, targets, ...) without ever holding the full logits.

    hidden (..., C) final hidden states, weight (V, C) the output matrix (model.lm_head.weight),
    targets (...). Same value and same gradients (w.r.t. hidden and weight) as the plain version;
    reduction 'mean' (over valid tokens, or / denom) or 'sum' -> scalar. The hidden states of
    masked or ignored rows are replaced by 0 first (their gradient is exactly 0)."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"losses.chunked_cross_entropy: hidden {tuple(hidden.shape)} needs targets of "
                         f"shape {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"losses.chunked_cross_entropy: weight must be (V, {hidden.shape[-1]}), "
                         f"got {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"losses.chunked_cross_entropy: chunk_size={chunk_size} must be >= 1")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"losses.chunked_cross_entropy: reduction={reduction!r}; choose 'mean' or 'sum'")
    hidden2d, targets1d = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)   # (N, C), (N,)
    valid = _valid(targets1d, ignore_index, None if mask is None else mask.reshape(-1))
    hidden2d = _keep_rows(hidden2d, valid)               # masked rows -> 0: inf/NaN there cannot leak
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    row_weight = valid.to(acc_dtype)                                                   # (N,)
    if reduction == "mean":                                    # as masked_mean: a count below 1 divides by 1
        count = valid.sum() if denom is None else torch.as_tensor(denom, device=valid.device)
        row_weight = row_weight / count.clamp_min(1).to(acc_dtype)
    safe_targets = torch.where(valid, targets1d, torch.zeros_like(targets1d))
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return ChunkedCrossEntropy.apply(hidden2d, weight, safe_targets, row_weight, int(chunk_size),
                                     float(label_smoothing), float(z_loss), need_grad)


# ----------------------------------------------------------------------------------------------
# 4. Preferences: Bradley-Terry reward models, DPO, IPO
# ----------------------------------------------------------------------------------------------

def sequence_logprob(token_logprobs, mask=None):
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t) over the completion's tokens: (B, T) -> (B,).
    DPO and IPO compare these SUMS (an average would change the objective and its optimum)."""
    return masked_sum(token_logprobs, mask, dim=-1)


def bradley_terry_loss(r_chosen, r_rejected, margin=0.0, mask=None):
    """-log sigmoid(r_c - r_r - m), mean over pairs (B,).  Bradley & Terry (1952); P(c > r) =
    sigmoid(r_c - r_r). The optional margin m (Llama 2) asks for a gap of at least m.
    Depends only on r_c - r_r: adding a constant to every reward changes nothing. -log sigmoid
    is computed as softplus, finite for any finite gap. mask (B,): the pairs that count.
    -> (loss, stats{accuracy: share of counted pairs with r_c > r_r (a tie is not correct),
                    margin: mean r_c - r_r over them})"""
    r_chosen, r_rejected = _keep(r_chosen, mask), _keep(r_rejected, mask)
    delta = r_chosen - r_rejected                                      # (B,)
    loss = masked_mean(-F.logsigmoid(delta - margin), mask)
    with torch.no_grad():
        delta = _fp32(delta)
        stats = {"accuracy": masked_mean((delta > 0).to(delta.dtype), mask),
                 "margin": masked_mean(delta, mask)}
    return loss, stats


def _implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, mask):
    """DPO's implicit reward beta * log(pi/pi_ref) of each completion, and the statistics people log,
    as means over the counted pairs: reward_chosen, reward_rejected, reward_margin (chosen -
    rejected) and reward_accuracy (share with chosen > rejected; a tie is not correct)."""
    with torch.no_grad():
        chosen = beta * _fp32(policy_chosen - ref_chosen)              # (B,)
        rejected = beta * _fp32(policy_rejected - ref_rejected)        # (B,)
        return {"reward_chosen": masked_mean(chosen, mask),
                "reward_rejected": masked_mean(rejected, mask),
                "reward_accuracy": masked_mean((chosen > rejected).to(chosen.dtype), mask),
                "reward_margin": masked_mean(chosen - rejected, mask)}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, mask=None):
    """DPO (Rafailov et al. 2023), the sigmoid loss; all inputs are SUMMED sequence log-probs (B,):

        h = [log pi(y_c|x) - log pi_ref(y_c|x)] - [log pi(y_r|x) - log pi_ref(y_r|x)]
        loss = -log sigmoid(beta * h)          (= log 2 when pi == pi_ref)

    Bradley-Terry on the implicit reward beta * log(pi/pi_ref). No exp of a log-ratio is taken:
    -log sigmoid is a stable softplus, so log-ratios of +-100 (or summed log-probs of -1e4) give
    finite values and gradients. mask (B,): the pairs that count. -> (loss, stats)"""
    policy_chosen, policy_rejected = _keep(policy_chosen, mask), _keep(policy_rejected, mask)
    ref_chosen, ref_rejected = _keep(ref_chosen, mask), _keep(ref_rejected, mask)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)          # (B,)
    loss = masked_mean(-F.logsigmoid(beta * h), mask)
    return loss, _implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, mask)


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, mask=None):
    """IPO (Azar et al. 2023), with beta playing tau; inputs are SUMMED sequence log-probs (B,):

        loss = (h - 1 / (2 beta))^2,   h as in DPO

    A squared loss regresses h to a finite target, so unlike DPO it does not push h to infinity
    on deterministic preferences. A polynomial in the log-ratios (no exp): finite for log-ratios of
    +-100. beta must be > 0 (ValueError: 1 / (2 beta)). mask (B,): the pairs that count. -> (loss, stats)"""
    if not beta > 0:
        raise ValueError(f"losses.ipo_loss: beta={beta} must be > 0 (the target margin is 1 / (2 beta))")
    policy_chosen, policy_rejected = _keep(policy_chosen, mask), _keep(policy_rejected, mask)
    ref_chosen, ref_rejected = _keep(ref_chosen, mask), _keep(ref_rejected, mask)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)          # (B,)
    loss = masked_mean((h - 1.0 / (2.0 * beta)) ** 2, mask)
    return loss, _implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, mask)


# ----------------------------------------------------------------------------------------------
# 5. Reinforcement learning: PPO surrogate, value loss, entropy bonus, REINFORCE
# ----------------------------------------------------------------------------------------------

def ppo_policy_loss(logp, old_logp, advantages, mask=None, eps_low=0.2, eps_high=None, denom=None,
                    max_log_ratio=20.0):
    """PPO's clipped surrogate per token (Schulman et al. 2017), asymmetric clip (DAPO):

        ratio_t = pi(a_t|s_t) / pi_old(a_t|s_t) = exp(logp - old_logp)
        loss_t  = -min( ratio_t * A_t,  clip(ratio_t, 1 - eps_low, 1 + eps_high) * A_t )
        loss    = masked mean over tokens (or sum / denom)

    The min makes the objective pessimistic: once the ratio has moved past the clip range in the
    direction the advantage pushes it (A > 0 and ratio > 1 + eps_high, or A < 0 and ratio <
    1 - eps_low) the token's gradient is exactly 0. At ratio == 1 it is the policy gradient
    -A * grad log pi. old_logp must be the log-probs of the distribution that sampled the tokens.
    logp, old_logp (B, T); advantages broadcastable to them. |log ratio| is clamped to
    max_log_ratio (default 20) so exp cannot overflow: a log-ratio of +-100 gives a finite loss and
    a zero gradient for that token (it is that far off policy). Masked tokens are replaced by 0
    before any arithmetic: whatever they hold (inf, NaN), their gradient is exactly 0.
    Returns (loss, stats) with stats:
        clipfrac   share of the counted tokens whose gradient the clip zeroed (the condition
                   above; A = 0 is never clipped); 0 on a fully masked batch
        approx_kl  k3 estimate of KL(pi_old || pi) from the sampled tokens (tokens ~ pi_old)
        ratio_mean mean ratio (1 at the first step after a rollout)"""
    eps_high = eps_low if eps_high is None else eps_high
    logp, old_logp, advantages = _keep(logp, mask), _keep(old_logp, mask), _keep(advantages, mask)
    log_ratio = (logp - old_logp).clamp(-max_log_ratio, max_log_ratio)          # (B, T)
    ratio = torch.exp(log_ratio)
    surrogate = ratio * advantages
    surrogate_clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = masked_mean(-torch.minimum(surrogate, surrogate_clipped), mask, denom=denom)
    with torch.no_grad():
        clipped = (((advantages > 0) & (ratio > 1.0 + eps_high))
                   | ((advantages < 0) & (ratio < 1.0 - eps_low)))
        stats = {"clipfrac": masked_mean(clipped.to(ratio.dtype), mask),
                 "approx_kl": masked_mean(kl_k3(old_logp, logp, max_log_ratio=max_log_ratio), mask),
                 "ratio_mean": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask=None, value_clip=0.2, denom=None):
    """PPO's clipped value loss (the PPO2 / OpenAI baselines form):

        V_clip = V_old + clip(V - V_old, -value_clip, value_clip)
        loss_t = 1/2 * max( (V - R)^2, (V_clip - R)^2 )        (value_clip None: 1/2 (V - R)^2)

    Masked tokens are replaced by 0 before the arithmetic (their gradient is exactly 0).
    -> (loss, stats{vf_clipfrac: fraction of tokens where the clipped term is the larger})"""
    values, old_values, returns = _keep(values, mask), _keep(old_values, mask), _keep(returns, mask)
    unclipped = (values - returns) ** 2
    if value_clip is None:
        loss = masked_mean(0.5 * unclipped, mask, denom=denom)
        return loss, {"vf_clipfrac": torch.zeros((), device=values.device)}
    values_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    clipped = (values_clipped - returns) ** 2
    loss = masked_mean(0.5 * torch.maximum(unclipped, clipped), mask, denom=denom)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(clipped.dtype), mask)}
    return loss, stats


def entropy_bonus(logits, mask=None, denom=None):
    """Mean entropy of the policy over the counted positions, logits (B, T, V) -> scalar.
    Training *subtracts* coef * entropy_bonus from the loss to keep exploration alive.
    denom: divide the masked sum by this count instead (see masked_mean)."""
    return masked_mean(entropy(logits, mask), mask, denom=denom)


def reinforce_loss(logp, returns, baseline=0.0, mask=None, denom=None):
    """REINFORCE with a baseline (Williams 1992):

        grad J = E[ (R - b) * grad log pi(a|s) ]        loss = -mean_t (R - b).detach() * log pi_t

    Any b that does not depend on the action leaves the expected gradient unchanged (since
    E[grad log pi] = 0) and a good one lowers its variance. logp (B, T) token log-probs; returns
    broadcastable to logp (e.g. (B, 1) per sequence); baseline a number, a tensor (e.g. values),
    'mean' (batch mean of returns) or 'loo' (leave-one-out mean over dim 0, unbiased as in RLOO).
    mask: the tokens that count (masked ones are replaced by 0 before the product); denom: divide
    the masked sum by this count instead (see masked_mean).
    -> (loss, stats{advantage_mean, advantage_std} over the advantages as given, unmasked; 0 when empty)"""
    if isinstance(baseline, str):
        if baseline == "mean":
            baseline = returns.mean(0, keepdim=True)
        elif baseline == "loo":
            n = returns.shape[0]
            if n < 2:
                raise ValueError("losses.reinforce_loss: baseline='loo' needs at least 2 samples")
            baseline = (returns.sum(0, keepdim=True) - returns) / (n - 1)
        else:
            raise ValueError(f"losses.reinforce_loss: baseline={baseline!r}; use a number, a tensor, "
                             "'mean' or 'loo'")
    advantages = (returns - baseline).detach()
    loss = masked_mean(-_keep(advantages, mask) * _keep(logp, mask), mask, denom=denom)
    with torch.no_grad():
        advantages = _fp32(advantages)
        mean = advantages.sum() / max(advantages.numel(), 1)                # an empty batch: 0, not NaN
        stats = {"advantage_mean": mean,
                 "advantage_std": ((advantages - mean) ** 2).sum().div(max(advantages.numel(), 1)).sqrt()}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# 6. Statistics behind the losses: MLE, MAP, conjugate priors, tempered sampling
# ----------------------------------------------------------------------------------------------

def categorical_mle(counts):
    """Maximum likelihood for a categorical from counts n_k (..., K): p_k = n_k / N.

    It minimises the mean NLL  -1/N sum_k n_k log p_k  over the simplex (Lagrange: n_k / p_k = lambda),
    and the minimum equals the empirical entropy H(n / N): training a model by cross-entropy on data from
    p is fitting p by maximum likelihood, and the loss cannot go below the data's own entropy.
    Counts must be >= 0 with every row's sum > 0 (ValueError): no data, no estimate."""
    counts = counts.to(torch.float64)
    if (counts < 0).any() or (counts.sum(-1) <= 0).any():
        raise ValueError("losses.categorical_mle: counts must be >= 0 and every row must have one > 0")
    return counts / counts.sum(-1, keepdim=True)


def dirichlet_posterior_mean(counts, alpha):
    """Conjugate Bayesian estimate: prior Dirichlet(alpha, ..., alpha) on a categorical, counts n_k observed,
    posterior Dirichlet(alpha + n_k), whose mean is add-alpha (Laplace, for alpha = 1) smoothing:

        E[p_k | n] = (n_k + alpha) / (N + K alpha) = (1 - w) * n_k / N + w * 1 / K,   w = K alpha / (N + K alpha)

    the same mixture of the data and the uniform distribution that label smoothing trains towards
    (cross_entropy's label_smoothing = w: the target is (1 - w) onehot + w / K). alpha must be > 0
    (ValueError): alpha = 0 is the maximum-likelihood estimate, categorical_mle."""
    if not alpha > 0:
        raise ValueError(f"losses.dirichlet_posterior_mean: alpha={alpha} must be > 0 (0 is categorical_mle)")
    counts = counts.to(torch.float64)
    K = counts.shape[-1]
    return (counts + alpha) / (counts.sum(-1, keepdim=True) + K * alpha)


def map_l2_loss(nll_value, params, prior_std: float, n_examples: int):
    """MAP with a Gaussian prior theta ~ N(0, sigma^2 I) is NLL plus an L2 penalty:

        -1/N log p(theta | D) = mean NLL + ||theta||^2 / (2 N sigma^2) + const

    so L2 regularisation with coefficient lambda = 1 / (N sigma^2) (loss + lambda/2 ||theta||^2) is MAP.
    Adam with that penalty in its gradient is NOT AdamW: Adam divides the penalty's gradient by sqrt(v)
    like any other, so heavily-updated weights are barely decayed; AdamW's decoupled decay
    theta <- theta - lr * wd * theta shrinks every weight at the same rate (Loshchilov & Hutter 2019;
    adam_l2_vs_adamw shows the two apart). prior_std > 0 and n_examples >= 1 (else ValueError)."""
    if not (prior_std > 0 and n_examples >= 1):
        raise ValueError(f"losses.map_l2_loss: prior_std={prior_std} must be > 0 and n_examples={n_examples} >= 1")
    return nll_value + sum(p.pow(2).sum() for p in params) / (2 * n_examples * prior_std ** 2)


def adam_l2_vs_adamw(grads, weight, lr: float, wd: float, steps: int, betas=(0.9, 0.999), eps: float = 1e-8):
    """Run Adam with an L2 term in the gradient (g + wd * theta) and AdamW (decoupled decay) from the same
    start on the same gradient sequence (steps, D) of a separable problem; returns both end weights.
    Closed form for a weight whose gradient is 0: AdamW shrinks it to w (1 - lr wd)^steps, while Adam+L2's
    normalised step is about -lr * sign(w) (the penalty's gradient divided by its own root mean square)."""
    adam_l2, adamw = weight.clone(), weight.clone()
    states = [[torch.zeros_like(weight), torch.zeros_like(weight)] for _ in range(2)]
    for t in range(1, steps + 1):
        for kind, theta, (m, v) in (("l2", adam_l2, states[0]), ("decoupled", adamw, states[1])):
            g = grads[t - 1] + (wd * theta if kind == "l2" else 0.0)
            m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
            v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            update = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
            if kind == "decoupled":
                theta.mul_(1 - lr * wd)
            theta.sub_(lr * update)
    return adam_l2, adamw


def tempered(logits, temperature: float):
    """Sampling at temperature tau is sampling from the tempered distribution p_tau(x) ∝ p(x)^(1/tau):
    softmax(z / tau) = p^(1/tau) / sum p^(1/tau), since p = softmax(z) ∝ e^z. tau -> 0 is the argmax
    (greedy), tau = 1 the model itself, tau -> inf uniform; the entropy rises with tau. -> log p_tau
    (-inf for a class whose logit is -inf: log 0). tau must be > 0 (ValueError): greedy is a limit."""
    if not temperature > 0:
        raise ValueError(f"losses.tempered: temperature={temperature} must be > 0 (greedy is its limit, argmax)")
    return (_fp32(logits) / temperature).log_softmax(-1)


# ----------------------------------------------------------------------------------------------
# 7. Worked example
# ----------------------------------------------------------------------------------------------

def _format_vector(values) -> str:
    """A 1-D tensor as "[0.500 0.250 ...]"."""
    return "[" + " ".join(f"{v:.3f}" for v in values.tolist()) + "]"


def _vec(*values):
    """A float64 tensor of the numbers given."""
    return torch.tensor(values, dtype=torch.float64)


def show_likelihood(vocab, p, q_logits, x):
    """Section 1: likelihood, log-likelihood and NLL of 8 sampled tokens: one quantity."""
    print("== 1. Probability, likelihood, NLL: one quantity ==")
    print(f"vocabulary {vocab};  data p = {_format_vector(p)};  model q = softmax(z) = "
          f"{_format_vector(torch.softmax(q_logits, 0))}  with logits z = log q + 3")
    seq = x[:8]
    ll = log_likelihood(q_logits.expand(8, 4), seq)                       # (8,) log q(x_t)
    print(f"8 tokens drawn from p: {' '.join(vocab[i] for i in seq.tolist())}")
    print(f"  likelihood      prod_t q(x_t)      = {ll.sum().exp().item():.3e}")
    print(f"  log-likelihood  sum_t log q(x_t)   = {ll.sum().item():.4f}")
    print(f"  NLL             -sum_t log q(x_t)  = {-ll.sum().item():.4f}   (per token "
          f"{-ll.mean().item():.4f})")


def show_expectations(p, p_logits, q_logits) -> dict:
    """Section 2: entropy, cross-entropy and KL in both directions, exact over the vocabulary:
    H(p, q) = H(p) + KL(p||q)."""
    print("\n== 2. Expectations over the vocabulary (exact) ==")
    h_p, h_pq = entropy(p_logits).item(), soft_cross_entropy(p, q_logits).item()
    kl_pq, kl_qp = kl_divergence(p_logits, q_logits).item(), kl_divergence(q_logits, p_logits).item()
    print(f"  entropy        H(p)    = {h_p:.4f} nats = {h_p / LN2:.4f} bits   (in [0, log 4 = "
          f"{math.log(4):.4f}])")
    print(f"  cross-entropy  H(p,q)  = {h_pq:.4f} nats = {h_pq / LN2:.4f} bits")
    print(f"  KL(p||q)               = {kl_pq:.4f} nats;   H(p) + KL(p||q) = {h_p + kl_pq:.4f} = H(p,q)")
    print(f"  KL(q||p)               = {kl_qp:.4f} nats   (not symmetric: always name the direction)")
    h_qq, h_q = soft_cross_entropy(torch.softmax(q_logits, 0), q_logits).item(), entropy(q_logits).item()
    kl_shifted = kl_divergence(q_logits, q_logits + 7).item()
    print(f"  H(q,q) = {h_qq:.4f} = H(q) = {h_q:.4f};   KL(q || softmax(z + 7)) = {kl_shifted:.1e}"
          "  (softmax is shift invariant)")
    return {"entropy_p": h_p, "cross_entropy_pq": h_pq, "kl_pq": kl_pq, "kl_qp": kl_qp}


def show_mean_nll(q_logits, x, h_p, h_pq) -> dict:
    """Section 3: the mean NLL of samples x ~ p estimates H(p, q); perplexity and bits from it."""
    samples = len(x)
    print(f"\n== 3. From {samples} samples: mean NLL estimates H(p, q) ==")
    logits_n = q_logits.expand(samples, 4)                                # (n, 4)
    token_nll = nll(logits_n, x)                                          # (n,)
    mean_nll = token_nll.mean().item()
    stderr = token_nll.std().item() / math.sqrt(samples)
    soft_one_hot = soft_cross_entropy(F.one_hot(x, 4).double(), logits_n).mean().item()
    print(f"  mean NLL under q        = {mean_nll:.4f} +- {stderr:.4f} nats   (exact H(p,q) = {h_pq:.4f})")
    print(f"  F.cross_entropy         = {F.cross_entropy(logits_n, x).item():.4f}   (the training loss is "
          "the mean NLL)")
    print(f"  soft CE, one-hot target = {soft_one_hot:.4f}")
    print(f"  perplexity exp(mean NLL)= {perplexity(mean_nll).item():.4f}   (best possible exp(H(p)) = "
          f"{math.exp(h_p):.4f} = 2^1.75; uniform model = V = 4)")
    print(f"  bits/token              = {bits_per_token(mean_nll).item():.4f};  bits/byte if each token "
          f"were 2 bytes = {bits_per_byte(mean_nll, samples, 2 * samples).item():.4f}")
    return {"mean_nll": mean_nll, "mean_nll_stderr": stderr, "perplexity": perplexity(mean_nll).item()}


def show_kl_estimators(p, q, x, kl_pq) -> dict:
    """Section 4: k1, k2 and k3 from samples x ~ p, each an estimate of the exact KL(p||q)."""
    samples = len(x)
    print(f"\n== 4. KL from samples x ~ p (p plays the policy, q the reference), log r = log q(x) - log p(x):"
          f"\n   each estimates KL(p||q) = {kl_pq:.4f} ==")
    logp_x, logq_x = p.log()[x], q.log()[x]                               # log-probs of sampled tokens
    means = {}
    for name, fn, note in [("k1 = -log r       ", kl_k1, "unbiased, can be < 0 per sample"),
                           ("k2 = (log r)^2 / 2", kl_k2, "biased, 2nd-order approximation"),
                           ("k3 = r - 1 - log r", kl_k3, "unbiased, >= 0 per sample")]:
        k = fn(logp_x, logq_x)                                            # (n,)
        print(f"  {name}: mean {k.mean().item():.4f} +- {k.std().item() / math.sqrt(samples):.4f}  "
              f"per-sample std {k.std().item():.3f}  min {k.min().item():+.3f}   {note}")
        means[f"{fn.__name__}_mean"] = k.mean().item()
    return means


def show_training_losses(q_logits, x, mean_nll) -> dict:
    """Section 5: label smoothing, z-loss, Bradley-Terry, DPO and PPO's clip on this example, each beside
    the closed form it should equal."""
    print("\n== 5. The training losses on this example ==")
    logits_n = q_logits.expand(len(x), 4)                                 # (n, 4)
    smooth = cross_entropy(logits_n, x, label_smoothing=0.1).item()
    closed = 0.9 * mean_nll + 0.1 * (-torch.log_softmax(q_logits, 0)).mean().item()
    print(f"  label smoothing 0.1: {smooth:.4f} = 0.9 * NLL + 0.1 * mean_v(-log q_v) = {closed:.4f}")
    z_term = (cross_entropy(logits_n, x, z_loss=1e-4) - cross_entropy(logits_n, x)).item()
    print(f"  z-loss 1e-4 * (log Z)^2, log Z = logsumexp(z) = {torch.logsumexp(q_logits, 0).item():.4f}: "
          f"{z_term:.6f} (= 1e-4 * 3^2)")
    bt, _ = bradley_terry_loss(_vec(1.0), _vec(0.0))
    bt_shift, _ = bradley_terry_loss(_vec(11.0), _vec(10.0))
    print(f"  Bradley-Terry, rewards (1, 0): {bt.item():.4f} = -log sigmoid(1);  rewards (11, 10): "
          f"{bt_shift.item():.4f} (only the difference counts)")
    ref_chosen, ref_rejected = _vec(-12.0), _vec(-15.0)                   # summed sequence log-probs
    dpo_same, _ = dpo_loss(ref_chosen, ref_rejected, ref_chosen, ref_rejected, beta=0.1)
    dpo_moved, st = dpo_loss(_vec(-11.0), _vec(-16.0), ref_chosen, ref_rejected, beta=0.1)
    print(f"  DPO, policy == reference: {dpo_same.item():.4f} = log 2;  policy +1 nat on chosen, -1 on "
          f"rejected: {dpo_moved.item():.4f} (implicit reward margin {st['reward_margin'].item():.2f})")
    ratio, adv = _vec(0.7, 0.9, 1.0, 1.1, 1.3, 1.3), _vec(-1.0, -1.0, 1.0, 1.0, 1.0, -1.0)
    ppo, st = ppo_policy_loss(ratio.log(), torch.zeros_like(ratio), adv, eps_low=0.2, eps_high=0.28)
    print(f"  PPO, ratios {_format_vector(ratio)} advantages {_format_vector(adv)} eps 0.2/0.28: loss "
          f"{ppo.item():.4f}, clipfrac {st['clipfrac'].item():.3f}\n    (clipped: 0.7 with A<0 and 1.3 with A>0; "
          "not 1.3 with A<0, where the min keeps the unclipped, more pessimistic term)")
    return {"label_smoothing": smooth, "dpo_at_reference": dpo_same.item(), "ppo_clipfrac": st["clipfrac"].item()}


def walkthrough(samples=4000, seed=0):
    """Print every quantity on a 4-token vocabulary with known distributions, and the identities
    that tie them together, section by section. Returns the numbers in a dict."""
    vocab = ["a", "b", "c", "d"]
    p = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)     # the data distribution
    q = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)          # a model that loves 'a'
    p_logits, q_logits = p.log(), q.log() + 3.0                            # logits: any shift works
    gen = torch.Generator().manual_seed(seed)
    x = torch.multinomial(p, samples, replacement=True, generator=gen)    # (n,) tokens from p
    show_likelihood(vocab, p, q_logits, x)
    r = show_expectations(p, p_logits, q_logits)
    r.update(show_mean_nll(q_logits, x, r["entropy_p"], r["cross_entropy_pq"]))
    r.update(show_kl_estimators(p, q, x, r["kl_pq"]))
    r.update(show_training_losses(q_logits, x, r["mean_nll"]))
    return r


# ----------------------------------------------------------------------------------------------
# 8. Benchmark: chunked vs plain cross-entropy at a large vocabulary
# ----------------------------------------------------------------------------------------------

def _bench_inputs(vocab, tokens, n_embd, seed, device):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, n_embd, generator=gen).to(device).requires_grad_()      # (N, C)
    weight = (0.02 * torch.randn(vocab, n_embd, generator=gen)).to(device).requires_grad_()  # (V, C)
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(device)              # (N,)
    return hidden, weight, targets


def _bench_step(variant, hidden, weight, targets, chunk_size):
    """One forward + backward of the loss w.r.t. hidden and weight."""
    hidden.grad = weight.grad = None
    if variant == "plain":
        loss = F.cross_entropy(hidden @ weight.T, targets)          # builds the (N, V) logits
    else:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    loss.backward()
    return loss.detach()


def _rss_bytes():
    """(current, peak) resident set size of this process from /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _peak_rss_worker(variant, vocab, tokens, n_embd, chunk_size, seed, threads):
    """Run in a fresh process: the peak RSS increase of one forward+backward over the RSS before it.
    The warm-up step is tiny (it starts thread pools and kernels but leaves no large freed blocks
    for malloc to hand back without touching new pages); then the peak counter is reset (Linux:
    writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS)."""
    torch.set_num_threads(threads)
    _bench_step(variant, *_bench_inputs(64, 16, n_embd, seed, "cpu"), min(chunk_size, 8))
    hidden, weight, targets = _bench_inputs(vocab, tokens, n_embd, seed, "cpu")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, _ = _rss_bytes()
    _bench_step(variant, hidden, weight, targets, chunk_size)
    _, peak = _rss_bytes()
    return peak - before


def _measure_peak_rss(variant, args):
    """_peak_rss_worker in a fresh Python process. MALLOC_MMAP_THRESHOLD_ (glibc) makes every block
    over 1 MiB its own mapping, returned to the OS when freed, so the RSS follows the live tensors
    rather than malloc's cached heap (which otherwise hides or inflates blocks of ~25 MiB)."""
    here, name = os.path.split(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {here!r}); import {os.path.splitext(name)[0]} as L; "
            "print(L._peak_rss_worker(sys.argv[1], *map(int, sys.argv[2:])))")
    numbers = [args.vocab, args.tokens, args.n_embd, args.chunk_size, args.seed, torch.get_num_threads()]
    proc = subprocess.run([sys.executable, "-c", code, variant, *map(str, numbers)], capture_output=True,
                          text=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2 ** 20)))
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise OSError(f"memory subprocess for {variant} failed: {last}")
    return int(proc.stdout.split()[-1])


def benchmark(args, device):
    """Time (median of args.repeats, the two variants interleaved in this process) and peak memory
    (CUDA: max_memory_allocated above the inputs; CPU: peak-RSS increase in a fresh subprocess per
    variant) of one forward+backward of plain vs chunked cross-entropy."""
    n, v, c = args.tokens, args.vocab, args.n_embd
    print(f"\n== Benchmark: cross-entropy forward+backward, N={n} tokens x V={v} vocab, C={c}, "
          f"chunk {args.chunk_size} rows, {device.type}, {torch.get_num_threads()} threads ==")
    hidden, weight, targets = _bench_inputs(v, n, c, args.seed, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result, grads = {}, {}
    for variant in ("plain", "chunked"):                                # warm-up, and correctness
        loss = _bench_step(variant, hidden, weight, targets, args.chunk_size)
        grads[variant] = (loss, hidden.grad.clone(), weight.grad.clone())
    times = {"plain": [], "chunked": []}
    for _ in range(args.repeats):
        for variant in ("plain", "chunked"):
            sync()
            t0 = time.perf_counter()
            _bench_step(variant, hidden, weight, targets, args.chunk_size)
            sync()
            times[variant].append(time.perf_counter() - t0)
    memory, how = {}, ""
    if device.type == "cuda":
        how = "torch.cuda.max_memory_allocated above the inputs"
        for variant in ("plain", "chunked"):
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _bench_step(variant, hidden, weight, targets, args.chunk_size)
            torch.cuda.synchronize()
            memory[variant] = torch.cuda.max_memory_allocated() - base
    elif args.memory_subprocess:
        how = "peak RSS increase (VmHWM - VmRSS) of one step, in a fresh subprocess per variant"
        try:
            for variant in ("plain", "chunked"):
                memory[variant] = _measure_peak_rss(variant, args)
        except (OSError, KeyError) as e:                                # no /proc (not Linux)
            memory, how = {}, f"not measured ({e.__class__.__name__}: {e})"
    else:
        how = "not measured (--no-memory-subprocess)"
    loss_p, gh_p, gw_p = grads["plain"]
    loss_c, gh_c, gw_c = grads["chunked"]
    result["loss_diff"] = (loss_p - loss_c).abs().item()
    result["grad_hidden_diff"] = (gh_p - gh_c).abs().max().item()
    result["grad_weight_diff"] = (gw_p - gw_c).abs().max().item()
    print(f"  same result: |loss diff| {result['loss_diff']:.1e}, max |grad diff| hidden "
          f"{result['grad_hidden_diff']:.1e}, weight {result['grad_weight_diff']:.1e}")
    for variant in ("plain", "chunked"):
        result[f"{variant}_seconds"] = statistics.median(times[variant])
    result["time_ratio"] = result["chunked_seconds"] / result["plain_seconds"]
    print(f"  time (median of {args.repeats}): plain {result['plain_seconds'] * 1e3:.0f} ms, chunked "
          f"{result['chunked_seconds'] * 1e3:.0f} ms   -> chunked/plain = {result['time_ratio']:.2f}x")
    biggest = {"plain": n * v * 4, "chunked": min(args.chunk_size, n) * v * 4}
    print(f"  largest single logits tensor (fp32, counted): plain {biggest['plain'] / 2**20:.1f} MiB "
          "(N x V), "
          f"chunked {biggest['chunked'] / 2**20:.1f} MiB (chunk x V)")
    if memory:
        result.update(plain_peak_bytes=memory["plain"], chunked_peak_bytes=memory["chunked"],
                      memory_ratio=memory["plain"] / max(memory["chunked"], 1))   # guard: 0 bytes is possible
        print(f"  peak memory ({how}): plain {memory['plain'] / 2**20:.1f} MiB, chunked "
              f"{memory['chunked'] / 2**20:.1f} MiB   -> plain/chunked = {result['memory_ratio']:.1f}x")
    else:
        print(f"  peak memory: {how}")
    result["memory_method"] = how
    return result


# ----------------------------------------------------------------------------------------------
# 9. main
# ----------------------------------------------------------------------------------------------

@dataclass
class Args:
    samples: int = 4000             # Monte-Carlo samples in the worked example (mean NLL, k1/k2/k3)
    vocab: int = 50257              # benchmark vocabulary size (GPT-2's)
    tokens: int = 1024              # benchmark rows of hidden states (batch x sequence)
    n_embd: int = 128               # benchmark hidden size C
    chunk_size: int = 128           # rows per chunk in the chunked cross-entropy
    repeats: int = 3                # timed forward+backward runs per variant (median reported)
    memory_subprocess: bool = True  # CPU: measure each variant's peak RSS in a fresh subprocess
    device: str = "auto"            # auto|cpu|cuda (the benchmark's device)
    seed: int = 0                   # seeds the samples and the benchmark inputs


def check_args(args):
    """Every option, before anything runs: sizes, the device name and the seed."""
    cli.require_at_least(args, 2, "samples", "vocab")
    cli.require_at_least(args, 1, "tokens", "n_embd", "chunk_size", "repeats")
    cli.check_options(args, seed=("seed",))
    cli.get_device(args.device)                           # auto | cpu | cuda[:N], and CUDA present


def main(argv=None):
    args = cli.parse_args(Args, argv)
    check_args(args)
    device = cli.get_device(args.device)
    cli.seed_everything(args.seed)
    result = walkthrough(args.samples, args.seed)
    result.update(benchmark(args, device))
    return result


if __name__ == "__main__":
    cli.run(main)
