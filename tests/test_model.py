"""Tests of model.py, the transformer and its generation: each property against something independent
of the code under test (lib/'s modules have their own files: test_tokenizer.py, test_checkpoints.py, ...).

References used: the property itself (causality, invariance to padding/packing/caching), closed forms
(GELU via erf, SiLU, RoPE as complex rotations), brute force (per-token loops, sorting for top-p),
PyTorch's own nn.MultiheadAttention, and a chi-square bound on sampling.
Models are tiny (n_layer <= 2, n_embd <= 32) so the file runs in well under a minute on one core.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_model.py
"""
from __future__ import annotations

import contextlib
import copy
import io
import itertools
import math
import os
import re
import shutil
import subprocess
import sys
import unittest.mock
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st

import model as M
from lib import checkpoints, tokenizer
from helpers import EOT, PAD, ROOT, random_tokens, tiny_model

FFNS = ("swiglu", "geglu", "gelu", "relu", "relu2", "moe")
torch.set_num_threads(1)


def rope_freqs(head_dim: int, base: float):
    """theta_i = base^(-2i/d) through the model's own function (a one-head config of that width)."""
    return M.rope_frequencies(M.Config(n_embd=head_dim, n_head=1, n_kv_head=1, rope_base=base))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# Causality, KV cache, padding, packing
# ----------------------------------------------------------------------------------------------

CAUSAL_CONFIGS = [dict(), dict(ffn="moe"), dict(norm="layernorm", norm_position="post"),
                  dict(pos="learned", ffn="gelu"), dict(n_kv_head=1, ffn="relu2"),
                  dict(n_kv_head=4, tie_embeddings=False, bias=True, norm="layernorm")]


@pytest.mark.parametrize("overrides", CAUSAL_CONFIGS, ids=str)
@settings(max_examples=5)
@given(seed=st.integers(0, 10 ** 6), t=st.integers(0, 14))
def test_causality_future_tokens_do_not_change_past_logits(overrides, seed, t):
    model = tiny_model(**overrides)
    a = random_tokens(seed, 2, 16)
    b = a.clone()
    b[:, t + 1:] = random_tokens(seed + 1, 2, 15 - t)
    with torch.no_grad():
        la, lb = model(a), model(b)
    close(la[:, :t + 1], lb[:, :t + 1])


KV_CONFIGS = [dict(ffn=f, norm=n, norm_position=p, pos=q)
              for f, n, p, q in itertools.product(FFNS, ("rmsnorm", "layernorm"), ("pre", "post"), ("rope", "learned"))]
KV_CONFIGS += [dict(n_kv_head=k, pos=q) for k in (1, 4) for q in ("rope", "learned")]


@pytest.mark.parametrize("cache_type", ["KVCache", "DenseKVCache"])
@pytest.mark.parametrize("overrides", KV_CONFIGS, ids=str)
def test_kv_cache_decoding_equals_full_recomputation(overrides, cache_type):
    """Prefill P tokens into a model.KVCache (or its fast path, a DenseKVCache), then feed one token at a
    time: every logit equals the logit of one forward pass over the whole sequence (fp32 tolerance). A
    KVCache's buffers hold all 12 slots from the start; a DenseKVCache's hold the written slots and room for
    at most SLOT_GROWTH - 1 more, re-laid out when full (8 slots, then 12), keeping what was written."""
    model = tiny_model(seed=1, **overrides)
    tokens = random_tokens(2, 2, 12)
    P = 5
    with torch.no_grad():
        full = model(tokens)                                                    # (B, T, V)
        cache = getattr(M, cache_type)(model.config, 2, 12, "cpu")
        steps, slots = [model(tokens[:, :P], cache=cache)], []
        for t in range(P, 12):
            slots.append(cache.k[0].shape[2])
            steps.append(model(tokens[:, t:t + 1], cache=cache))
    close(torch.cat(steps, 1), full)
    assert cache.length == 12
    assert slots == ([12] * 7 if cache_type == "KVCache" else [8] * 4 + [12] * 3)
    assert all(buffer.shape[2] == 12 for buffer in cache.k + cache.v)


@pytest.mark.parametrize("growth", [1, 2, 5])
def test_eager_cache_grows_by_slot_growth_and_keeps_its_written_slots(monkeypatch, growth):
    """Writes of 3, then 1, 1, 2, 1, ... slots into a DenseKVCache of max_len 11: after each write
    every buffer holds exactly what was written (brute force: the writes concatenated), and has room for
    at most growth - 1 more slots (never more than max_len): length <= slots <= min(11, length + growth - 1)."""
    monkeypatch.setattr(M, "SLOT_GROWTH", growth)
    cfg = tiny_model().config
    cache = M.DenseKVCache(cfg, batch_size=2, max_len=11, device="cpu")
    g = torch.Generator().manual_seed(growth)
    written = []
    for T in (3, 1, 1, 2, 1, 1, 1, 1):
        k = torch.randn(2, cfg.n_kv_head, T, cfg.head_dim, generator=g)
        written.append(k)
        for layer in range(cfg.n_layer):
            cache.update(layer, k + layer, -k - layer)
        cache.length += T
        expected = torch.cat(written, 2)
        for layer in range(cfg.n_layer):
            K, V = cache.k[layer], cache.v[layer]
            assert K.shape[:2] == V.shape[:2] == (2, cfg.n_kv_head) and K.shape[3] == cfg.head_dim
            assert cache.length <= K.shape[2] == V.shape[2] <= min(11, cache.length + growth - 1)
            assert torch.equal(K[:, :, :cache.length], expected + layer)
            assert torch.equal(V[:, :, :cache.length], -expected - layer)


def greedy_by_recomputation(model, prompt, n):
    """Greedy decoding with no cache: one full forward pass over the whole sequence per new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("overrides", KV_CONFIGS, ids=str)
def test_generate_equals_full_recomputation(overrides):
    """model.generate (KV cache): greedy tokens = argmax of full recomputation; sampled tokens' logprobs
    = log_softmax of a full forward pass at those tokens."""
    model = tiny_model(seed=3, **overrides)
    prompt = random_tokens(4, 7).tolist()
    gen = M.generate(model, [prompt], 6, temperature=0.0, stop_ids=())
    assert gen.tokens[0].tolist() == greedy_by_recomputation(model, prompt, 6)
    gen = M.generate(model, [prompt], 6, temperature=1.0, stop_ids=(),
                     generator=torch.Generator().manual_seed(0))
    seq = torch.tensor([prompt + gen.tokens[0].tolist()])
    with torch.no_grad():
        logp = model(seq)[0].log_softmax(-1)                                     # (T, V)
    expected = torch.stack([logp[len(prompt) - 1 + i, tok] for i, tok in enumerate(gen.tokens[0].tolist())])
    close(gen.logprobs[0], expected)


def test_generate_samples_in_eval_mode_and_restores_training_mode():
    """With dropout 0.5 and the model in train mode, generate still samples the deterministic policy
    (greedy tokens = recomputation in eval mode) and hands the model back in train mode."""
    model = tiny_model(seed=3, dropout=0.5).train()
    prompt = random_tokens(4, 7).tolist()
    gen = M.generate(model, [prompt], 6, temperature=0.0, stop_ids=())
    assert model.training
    assert gen.tokens[0].tolist() == greedy_by_recomputation(model.eval(), prompt, 6)


@pytest.mark.parametrize("overrides", [dict(), dict(pos="learned", ffn="moe", norm_position="post")], ids=str)
@settings(max_examples=6)
@given(lengths=st.lists(st.integers(1, 9), min_size=2, max_size=4), seed=st.integers(0, 1000))
def test_left_padding_gives_each_row_its_result_alone(overrides, lengths, seed):
    """Batched generation with left-padded prompts: greedy tokens equal each row generated alone, and
    sampled tokens' logprobs equal a full forward pass over that row alone (no padding at all)."""
    model = tiny_model(seed=5, **overrides)
    prompts = [random_tokens(seed + i, n).tolist() for i, n in enumerate(lengths)]
    batch = M.generate(model, prompts, 5, temperature=0.0, stop_ids=())
    for i, p in enumerate(prompts):
        alone = M.generate(model, [p], 5, temperature=0.0, stop_ids=())
        assert batch.tokens[i].tolist() == alone.tokens[0].tolist()
        close(batch.logprobs[i], alone.logprobs[0])
    sampled = M.generate(model, prompts, 5, temperature=1.0, stop_ids=(),
                         generator=torch.Generator().manual_seed(seed))
    for i, p in enumerate(prompts):
        seq = torch.tensor([p + sampled.tokens[i].tolist()])
        with torch.no_grad():
            logp = model(seq)[0].log_softmax(-1)
        expected = torch.stack([logp[len(p) - 1 + j, tok] for j, tok in enumerate(sampled.tokens[i].tolist())])
        close(sampled.logprobs[i], expected)


@pytest.mark.parametrize("pos", ["rope", "learned"])
@settings(max_examples=6)
@given(doc_lengths=st.lists(st.integers(1, 8), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_packed_row_gives_each_document_its_logits_alone(pos, doc_lengths, seed):
    model = tiny_model(seed=6, pos=pos)
    docs = [random_tokens(seed + i, n) for i, n in enumerate(doc_lengths)]
    tokens = torch.cat(docs)[None]                                                # (1, T)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(doc_lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in doc_lengths])[None]          # restart per document
    with torch.no_grad():
        packed = model(tokens, positions=positions, doc_ids=doc_ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    close(packed, alone)


def test_padded_batch_and_left_pad_inputs():
    tokens, mask = M.padded_batch([[1, 2, 3], [4]], pad_id=PAD, side="left")
    assert tokens.tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert mask.tolist() == [[True] * 3, [False, False, True]]
    positions, doc_ids = M.left_pad_inputs(mask)
    assert positions[1, -1] == 0 and positions[0].tolist() == [0, 1, 2]
    assert (doc_ids[1, :2] != doc_ids[1, 2]).all()
    tokens, mask = M.padded_batch([[1, 2, 3], [4]], pad_id=PAD, side="right")
    assert tokens.tolist() == [[1, 2, 3], [4, PAD, PAD]] and mask.sum() == 4


def test_generate_lengths_count_every_new_token_even_the_pad_token():
    """lengths must count the new tokens of each row: an unfinished row has max_new_tokens of them.
    Here the model always predicts <|pad|> (a bias on the head), which a sampler may legally draw."""
    model = tiny_model(seed=7)
    model.lm_head = nn.Linear(32, 258, bias=True)
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[PAD] = 100.0
    gen = M.generate(model, [[1, 2, 3], [4]], 4, temperature=0.0)
    assert not gen.finished.any()
    assert gen.lengths.tolist() == [4, 4], (
        "BUG (requests_model.md #1): generate computes lengths as (tokens != pad_id).sum(), so a sampled "
        f"<|pad|> token is not counted: lengths={gen.lengths.tolist()} for 4 generated tokens per row")


def test_generate_stops_rows_at_their_stop_token():
    """Row 0's model output is forced to EOT at once; it stops with length 1 and finished, the others run on."""
    model = tiny_model(seed=8)
    prompts = [[1, 2], [3, 4, 5]]
    free = M.generate(model, prompts, 4, temperature=0.0, stop_ids=())
    stop = int(free.tokens[0, 0])
    assume_ok = stop not in free.tokens[1].tolist()
    gen = M.generate(model, prompts, 4, temperature=0.0, stop_ids=(stop,), pad_id=PAD)
    assert gen.tokens[0, 0] == stop and (gen.tokens[0, 1:] == PAD).all()
    assert gen.lengths[0] == 1 and bool(gen.finished[0])
    assert (gen.logprobs[0, 1:] == 0).all()
    if assume_ok:
        assert gen.lengths[1] == gen.tokens.shape[1] == 4 and not bool(gen.finished[1])


# ----------------------------------------------------------------------------------------------
# RoPE, attention, activations
# ----------------------------------------------------------------------------------------------

@given(d=st.sampled_from([2, 4, 8, 16]), i=st.integers(0, 200), j=st.integers(0, 200),
       shift=st.integers(0, 200), seed=st.integers(0, 1000), base=st.sampled_from([100.0, 10000.0]))
def test_rope_score_depends_only_on_offset(d, i, j, shift, seed, base):
    """q_i . k_j after rotation equals the closed form Re sum_m q_m conj(k_m) e^{i (i-j) theta_m}
    (pairs (x_m, x_{m+d/2}) as complex numbers), which depends only on i - j."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(d, generator=g), torch.randn(d, generator=g)

    def score(pi, pj):
        cos, sin = M.rope_cos_sin(torch.tensor([[pi, pj]]), rope_freqs(d, base))            # (1, 1, 2, d/2)
        x = torch.stack([q, k])[None, None]                                      # (1, 1, 2, d)
        rq, rk = M.apply_rope(x, cos, sin)[0, 0]
        return float(rq @ rk)

    theta = base ** (-np.arange(0, d, 2) / d)
    qc = q[:d // 2].double().numpy() + 1j * q[d // 2:].double().numpy()
    kc = k[:d // 2].double().numpy() + 1j * k[d // 2:].double().numpy()
    closed = float(np.real(np.sum(qc * np.conj(kc) * np.exp(1j * (i - j) * theta))))
    tol = 1e-3 * (1 + float(q.norm() * k.norm()))
    assert abs(score(i, j) - closed) < tol
    assert abs(score(i + shift, j + shift) - closed) < tol


def test_rope_preserves_norm_and_is_identity_at_position_zero():
    x = torch.randn(1, 2, 3, 8)
    cos, sin = M.rope_cos_sin(torch.tensor([[0, 5, 77]]), rope_freqs(8, 10000.0))
    y = M.apply_rope(x, cos, sin)
    close(y.norm(dim=-1), x.norm(dim=-1))
    close(y[:, :, 0], x[:, :, 0])


def causal_scores_mask(T):
    return torch.ones(T, T).tril().bool()


@settings(max_examples=8)
@given(seed=st.integers(0, 1000), T=st.integers(1, 10), bias=st.booleans())
def test_gqa_with_all_kv_heads_equals_torch_multihead_attention(seed, T, bias):
    """n_kv_head == n_head is plain multi-head attention: PyTorch's nn.MultiheadAttention with the same
    weights (in_proj = [W_q; W_k; W_v], out_proj = W_o) and a causal mask gives the same output."""
    torch.manual_seed(seed)
    cfg = M.Config(n_embd=32, n_head=4, n_kv_head=4, bias=bias)
    attn = M.Attention(cfg).eval()
    mha = nn.MultiheadAttention(32, 4, bias=bias, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.kv.weight]))
        mha.out_proj.weight.copy_(attn.proj.weight)
        if bias:
            mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
            mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        ours = attn(x, None, None, None, 0)
        ref, _ = mha(x, x, x, attn_mask=~causal_scores_mask(T), need_weights=False)
    close(ours, ref)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("rope", [False, True])
def test_gqa_equals_hand_computed_attention_with_repeated_kv_heads(n_kv_head, rope):
    """Query head h uses key/value head h // (n_head / n_kv_head); softmax(q k^T / sqrt(d) + causal) v by loops."""
    torch.manual_seed(n_kv_head)
    H, C, T, B = 4, 32, 6, 2
    d = C // H
    attn = M.Attention(M.Config(n_embd=C, n_head=H, n_kv_head=n_kv_head)).eval()
    x = torch.randn(B, T, C)
    positions = torch.arange(T).expand(B, T)
    cos_sin = M.rope_cos_sin(positions, rope_freqs(d, 10000.0)) if rope else None
    with torch.no_grad():
        ours = attn(x, cos_sin, None, None, 0)
        q = (x @ attn.q.weight.T).view(B, T, H, d).transpose(1, 2)              # (B, H, T, d)
        kv = (x @ attn.kv.weight.T).view(B, T, 2, n_kv_head, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)         # (B, Hkv, T, d)
        if rope:
            q, k = M.apply_rope(q, *cos_sin), M.apply_rope(k, *cos_sin)
        heads = torch.zeros(B, T, H, d)
        for b in range(B):
            for h in range(H):
                g = h // (H // n_kv_head)
                for i in range(T):
                    s = torch.tensor([float(q[b, h, i] @ k[b, g, j]) / math.sqrt(d) for j in range(i + 1)])
                    w = s.exp() / s.exp().sum()
                    heads[b, i, h] = sum(w[j] * v[b, g, j] for j in range(i + 1))
        ref = heads.reshape(B, T, C) @ attn.proj.weight.T
    close(ours, ref, tol=1e-5)


@given(x=st.lists(st.floats(-20, 20), min_size=1, max_size=32))
def test_activations_equal_closed_forms(x):
    t = torch.tensor(x, dtype=torch.float64)
    erf_gelu = 0.5 * t * (1 + torch.special.erf(t / math.sqrt(2)))
    close(M.ACTIVATIONS["gelu"](t), erf_gelu, tol=1e-10)
    close(M.ACTIVATIONS["geglu"](t), erf_gelu, tol=1e-10)
    close(M.ACTIVATIONS["swiglu"](t), t * torch.sigmoid(t), tol=1e-10)
    close(M.ACTIVATIONS["relu"](t), t.clamp(min=0), tol=0)
    close(M.ACTIVATIONS["relu2"](t), t.clamp(min=0) ** 2, tol=0)


@pytest.mark.parametrize("kind", ["swiglu", "geglu", "gelu", "relu", "relu2"])
def test_feedforward_equals_hand_computed(kind):
    """W2 act(W1 x) or, gated, W2 (act(W1 x) * W3 x) with act written out by hand."""
    torch.manual_seed(0)
    ffn = M.FeedForward(M.Config(n_embd=16, ffn=kind), kind)
    x = torch.randn(3, 5, 16)
    acts = {"swiglu": lambda z: z * torch.sigmoid(z), "geglu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))),
            "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / math.sqrt(2))), "relu": lambda z: z * (z > 0),
            "relu2": lambda z: (z * (z > 0)) ** 2}
    h = acts[kind](x @ ffn.w1.weight.T)
    if kind in ("swiglu", "geglu"):
        h = h * (x @ ffn.w3.weight.T)
    with torch.no_grad():
        close(ffn(x), h @ ffn.w2.weight.T)


def test_norms_equal_closed_forms():
    x = torch.randn(4, 16) * 3 + 1
    rms = M.RMSNorm(16)
    close(rms(x), x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6))
    ln = M.make_norm(M.Config(n_embd=16, n_head=4, n_kv_head=4, norm="layernorm"))
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    close(ln(x), (x - mu) / torch.sqrt(var + 1e-5))


def test_config_rejects_invalid_choices():
    for bad in (dict(ffn="mlp"), dict(norm="batchnorm"), dict(n_head=4, n_kv_head=3),
                dict(n_embd=30, n_head=4), dict(ffn="moe", n_expert=2, moe_top_k=3)):
        with pytest.raises(ValueError):
            M.Config(**bad)


def test_tied_embeddings_share_one_matrix():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_params() - tied.num_params() == 258 * 32


# ----------------------------------------------------------------------------------------------
# Mixture of experts
# ----------------------------------------------------------------------------------------------

def moe_layer(seed=0, n_expert=4, k=2):
    torch.manual_seed(seed)
    cfg = M.Config(n_embd=16, n_head=4, n_kv_head=4, ffn="moe", n_expert=n_expert, moe_top_k=k)
    layer = M.MoE(cfg).eval()
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
    return layer


@settings(max_examples=10)
@given(seed=st.integers(0, 1000), n_expert=st.integers(1, 6), data=st.data())
def test_moe_routes_each_token_to_k_distinct_experts_with_weights_summing_to_one(seed, n_expert, data):
    k = data.draw(st.integers(1, n_expert))
    layer = moe_layer(seed, n_expert, k)
    x = torch.randn(7, 16)
    weights, experts, probs, logits = layer.route(x)
    assert weights.shape == experts.shape == (7, k)
    close(weights.sum(-1), torch.ones(7))
    assert (weights >= 0).all()
    for row, p in zip(experts.tolist(), (x @ layer.router.weight.T).softmax(-1)):
        assert len(set(row)) == k
        assert set(row) == set(p.argsort(descending=True)[:k].tolist())   # the k most probable experts


@settings(max_examples=6)
@given(seed=st.integers(0, 1000), k=st.integers(1, 4))
def test_moe_output_equals_brute_force_loop_over_tokens(seed, k):
    """y_n = sum over the top-k experts e of token n of (p_e / sum_topk p) * FFN_e(x_n), by a Python loop."""
    layer = moe_layer(seed, 4, k)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y = layer(x)
        ref = torch.zeros(10, 16)
        for n, xn in enumerate(x.reshape(10, 16)):
            p = (xn @ layer.router.weight.T).softmax(-1).tolist()
            top = sorted(range(4), key=lambda e: -p[e])[:k]
            total = sum(p[e] for e in top)
            for e in top:
                ref[n] += p[e] / total * layer.experts[e](xn[None])[0]
    close(y, ref.view(2, 5, 16))


def lb_brute_force(probs, experts, E):
    N, k = experts.shape
    f = [sum(int(e == j) for row in experts.tolist() for e in row) / (N * k) for j in range(E)]
    P = [sum(float(probs[n, j]) for n in range(N)) / N for j in range(E)]
    return E * sum(fj * pj for fj, pj in zip(f, P))


@settings(max_examples=15)
@given(E=st.integers(2, 8), N=st.integers(1, 20), seed=st.integers(0, 1000), data=st.data())
def test_load_balancing_loss_matches_formula_uniform_is_one_concentrated_is_larger(E, N, seed, data):
    k = data.draw(st.integers(1, E))
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(N, E, generator=g).softmax(-1)
    experts = probs.topk(k, -1).indices
    assert abs(float(M.load_balancing_loss(probs, experts, E)) - lb_brute_force(probs, experts, E)) < 1e-5
    # uniform: every probability 1/E and every expert chosen equally often -> exactly 1
    uniform = torch.full((E * k, E), 1.0 / E)
    rotating = torch.stack([(torch.arange(k) + n) % E for n in range(E * k)])
    assert abs(float(M.load_balancing_loss(uniform, rotating, E)) - 1.0) < 1e-6
    # concentrated: probability mass c on expert 0, which every token picks -> grows with c, up to E
    losses = []
    for c in (1.0 / E, 0.5 + 0.5 / E, 1.0):
        p = torch.full((N, E), (1 - c) / (E - 1))
        p[:, 0] = c
        losses.append(float(M.load_balancing_loss(p, torch.zeros(N, 1, dtype=torch.long), E)))
    assert losses[0] == pytest.approx(1.0) and losses[0] < losses[1] < losses[2] == pytest.approx(E)


def test_aux_loss_is_balance_plus_z_loss_for_moe_and_zero_otherwise():
    model = tiny_model(ffn="moe")
    inputs = []
    hooks = [b.ffn.register_forward_hook(lambda mod, args, out: inputs.append(args[0])) for b in model.blocks]
    model(random_tokens(0, 2, 8))
    for h in hooks:
        h.remove()
    cfg = model.config
    expected = 0.0
    for block, x in zip(model.blocks, inputs):
        logits = (x.reshape(-1, cfg.n_embd) @ block.ffn.router.weight.T).detach()
        probs = logits.softmax(-1)
        experts = probs.topk(cfg.moe_top_k, -1).indices
        z = float((torch.log(logits.exp().sum(-1)) ** 2).mean())
        expected += cfg.moe_balance_coef * lb_brute_force(probs, experts, cfg.n_expert) + cfg.moe_z_coef * z
    aux = model.aux_loss
    assert aux.requires_grad
    aux = aux.detach()
    assert float(aux) > 0
    assert float(aux) == pytest.approx(expected, rel=1e-5)
    dense = tiny_model(ffn="swiglu")
    dense(random_tokens(0, 2, 8))
    assert float(dense.aux_loss) == 0.0


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

logit_vectors = st.integers(0, 10 ** 6).flatmap(
    lambda seed: st.integers(2, 40).map(lambda V: torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3))


def kept(logp):
    return set(torch.isfinite(logp).nonzero().flatten().tolist())


@given(logits=logit_vectors, temperature=st.sampled_from([1e-4, 1e-3, 0.0]))
def test_greedy_and_vanishing_temperature_give_argmax(logits, temperature):
    top2 = logits.topk(2).values
    assume(float(top2[0] - top2[1]) > 1e-2)
    tokens, logprob = M.sample(logits[None].expand(5, -1), temperature=temperature,
                               generator=torch.Generator().manual_seed(0))
    assert (tokens == logits.argmax()).all()
    assert logprob.abs().max() < 1e-3
    assert (M.sampling_logprobs(logits, 0.0).exp() == F.one_hot(logits.argmax(), len(logits))).all()


@given(logits=logit_vectors, data=st.data())
def test_top_k_keeps_exactly_the_k_largest(logits, data):
    k = data.draw(st.integers(1, len(logits)))
    logp = M.sampling_logprobs(logits, 1.0, top_k=k)
    assert kept(logp) == set(logits.argsort(descending=True)[:k].tolist())
    close(logp.exp().sum(), torch.tensor(1.0))


@given(logits=logit_vectors, p=st.floats(0.01, 0.999), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p, temperature):
    probs = sorted(((float(q), i) for i, q in enumerate((logits.double() / temperature).softmax(-1))), reverse=True)
    cumulative, smallest = 0.0, []
    for q, i in probs:                     # brute force: add the most likely tokens until the mass reaches p
        assume(abs(cumulative - p) > 1e-5)
        if cumulative >= p:
            break
        smallest.append(i)
        cumulative += q
    logp = M.sampling_logprobs(logits, temperature, top_p=p)
    assert kept(logp) == set(smallest)
    renormalised = {i: q / cumulative for q, i in probs if i in smallest}
    for i in smallest:
        assert math.exp(float(logp[i])) == pytest.approx(renormalised[i], rel=1e-4)


@given(logits=logit_vectors, min_p=st.floats(0.001, 1.0))
def test_min_p_keeps_tokens_with_p_at_least_min_p_times_max(logits, min_p):
    probs = logits.double().softmax(-1)
    ratio = probs / probs.max()
    assume(((ratio - min_p).abs() > 1e-5).all())
    assert kept(M.sampling_logprobs(logits, 1.0, min_p=min_p)) == set((ratio >= min_p).nonzero().flatten().tolist())


@given(logits=logit_vectors, temperature=st.sampled_from([0.5, 1.0, 1.7]), top_k=st.integers(0, 10),
       top_p=st.sampled_from([1.0, 0.9, 0.5]), min_p=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 100))
def test_sample_returns_log_of_its_sampling_distribution(logits, temperature, top_k, top_p, min_p, seed):
    """Brute force: softmax(z/T) restricted to top-k, then the top-p nucleus, then min-p, renormalised."""
    V = len(logits)
    z = (logits.double() / temperature).tolist()
    allowed = sorted(range(V), key=lambda i: -z[i])[:top_k if 0 < top_k < V else V]
    def renorm(ids):
        m = max(z[i] for i in ids)
        s = sum(math.exp(z[i] - m) for i in ids)
        return {i: math.exp(z[i] - m) / s for i in ids}
    dist = renorm(allowed)
    if top_p < 1.0:
        cumulative, nucleus = 0.0, []
        for i in sorted(dist, key=lambda i: -dist[i]):
            assume(abs(cumulative - top_p) > 1e-5)
            if cumulative >= top_p:
                break
            nucleus.append(i)
            cumulative += dist[i]
        dist = renorm(nucleus)
    if min_p > 0:
        best = max(dist.values())
        assume(all(abs(q / best - min_p) > 1e-5 for q in dist.values()))
        dist = renorm([i for i, q in dist.items() if q >= min_p * best])
    tokens, logprobs = M.sample(logits[None].expand(50, -1), temperature, top_k, top_p, min_p,
                                generator=torch.Generator().manual_seed(seed))
    for tok, lp in zip(tokens.tolist(), logprobs.tolist()):
        assert tok in dist
        assert lp == pytest.approx(math.log(dist[tok]), abs=1e-4)


def test_top_p_zero_keeps_the_most_likely_token_or_is_rejected():
    """The smallest set whose mass reaches p = 0 is still one token (a sampler must draw something)."""
    logits = torch.tensor([2.0, 1.0, 0.5])
    try:
        logp = M.sampling_logprobs(logits, 1.0, top_p=0.0)
    except ValueError:
        return
    assert not torch.isnan(logp).any() and kept(logp) == {0}, (
        f"BUG (requests_model.md #3): sampling_logprobs(top_p=0.0) gives {logp.tolist()} (NaN); "
        "torch.multinomial then fails")


CHI2_999 = {3: 16.27, 4: 18.47, 7: 24.32}   # chi-square quantile at 0.999 by degrees of freedom


@pytest.mark.parametrize("V,top_k", [(8, 0), (8, 4), (5, 0)])
def test_empirical_frequencies_match_the_softmax(V, top_k):
    """20 000 draws with a fixed seed: Pearson's chi-square stays under its 0.999 quantile; tokens
    outside the top-k set are never drawn."""
    logits = torch.randn(V, generator=torch.Generator().manual_seed(V + top_k)) * 1.5
    n = 20_000
    tokens, _ = M.sample(logits[None].expand(n, -1), 1.0, top_k=top_k, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(tokens, minlength=V).double()
    support = logits.argsort(descending=True)[:top_k] if top_k else torch.arange(V)
    expected = logits.double()[support].softmax(-1) * n
    assert counts.sum() == counts[support].sum() == n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[len(support) - 1], f"chi2 {chi2:.1f}"


# ----------------------------------------------------------------------------------------------
# token_logprobs
# ----------------------------------------------------------------------------------------------

@settings(max_examples=6)
@given(seed=st.integers(0, 1000), T=st.integers(2, 10), temperature=st.sampled_from([1.0, 0.7]),
       top_k=st.sampled_from([0, 5]))
def test_token_logprobs_equals_brute_force_log_softmax_gather(seed, T, temperature, top_k):
    model = tiny_model(seed=9)
    tokens = random_tokens(seed, 2, T)
    with torch.no_grad():
        got = M.token_logprobs(model, tokens, temperature, top_k)
        logits = model(tokens).double()
    assert got.shape == (2, T - 1)
    for b in range(2):
        for t in range(1, T):
            z = (logits[b, t - 1] / temperature).tolist()
            allowed = sorted(range(len(z)), key=lambda i: -z[i])[:top_k or len(z)]
            m = max(z[i] for i in allowed)
            lse = m + math.log(sum(math.exp(z[i] - m) for i in allowed))
            tok = int(tokens[b, t])
            expected = z[tok] - lse if tok in allowed else -math.inf
            assert float(got[b, t - 1]) == pytest.approx(expected, abs=1e-4)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, -1] = False
    with torch.no_grad():
        masked = M.token_logprobs(model, tokens, temperature, top_k, mask=mask)
    assert masked[0, -1] == 0 and torch.equal(masked[1], got[1])


@pytest.mark.parametrize("overrides", [dict(), dict(ffn="moe", pos="learned")], ids=str)
def test_first_ratio_is_one_sampler_and_token_logprobs_agree(overrides):
    """Generate at temperature 0.7, top-k 20; token_logprobs on prompt + completion with the same
    transform gives the sampler's logprobs to 1e-5, both row by row and as one left-padded batch."""
    model = tiny_model(seed=10, **overrides)
    prompts = [random_tokens(11 + i, n).tolist() for i, n in enumerate([3, 7, 1, 5])]
    gen = M.generate(model, prompts, 8, temperature=0.7, top_k=20, generator=torch.Generator().manual_seed(0))
    rows = []
    for i, p in enumerate(prompts):
        new = gen.tokens[i].tolist()
        n = new.index(EOT) + 1 if EOT in new else len(new)       # count independently of gen.lengths
        rows.append((p, new[:n]))
        with torch.no_grad():
            lp = M.token_logprobs(model, torch.tensor([p + new[:n]]), temperature=0.7, top_k=20)[0, len(p) - 1:]
        close(lp, gen.logprobs[i, :n])
        assert (gen.logprobs[i, n:] == 0).all()
    tokens, mask = M.padded_batch([p + c for p, c in rows], PAD, side="left")
    positions, doc_ids = M.left_pad_inputs(mask)
    with torch.no_grad():
        lp = M.token_logprobs(model, tokens, 0.7, 20, positions=positions, doc_ids=doc_ids)
    for i, (p, c) in enumerate(rows):
        close(lp[i, lp.shape[1] - len(c):], gen.logprobs[i, :len(c)])


@given(seed=st.integers(0, 1000), chunk=st.sampled_from([258, 258 * 3, 258 * 7]), temperature=st.sampled_from([1.0, 0.7]),
       top_k=st.sampled_from([0, 5]))
@settings(max_examples=8)
def test_chunked_token_logprobs_equal_the_full_logits_in_value_and_gradient(seed, chunk, temperature, top_k):
    """token_logprobs builds the logits a few positions at a time (checkpointed under autograd): its values,
    entropies and gradients equal those computed from the whole (B, T, V) logits tensor."""
    import unittest.mock
    model = tiny_model(seed=seed % 7)
    tokens = random_tokens(seed, 3, 20)          # 57 positions: more than the width (32), so no index mix-up hides
    logits = model(tokens)[:, :-1]
    logp = M.sampling_logprobs(logits, temperature, top_k)
    want = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    want_entropy = -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)
    (want.sum() + want_entropy.sum()).backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with unittest.mock.patch.object(M, "LOGIT_CHUNK_ELEMENTS", chunk):   # chunk // 258 positions per chunk
        got, got_entropy = M.token_logprobs(model, tokens, temperature, top_k, entropy=True)
        (got.sum() + got_entropy.sum()).backward()
    close(got, want)
    close(got_entropy, want_entropy)
    for name, p in model.named_parameters():
        close(p.grad, want_grads[name], tol=1e-4)


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------

def test_model_benchmark_smoke_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "tests/bench_model.py", "--steps", "1", "--gen-tokens", "4",
                             "--gen-batches", "1,2", "--batch-size", "2", "--seq-len", "16", "--device", "cpu"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for word in ("parameters", "training", "tokens/s", "of the measured matmul peak", "generation batch   1",
                 "generation batch   2", "KV cache", "recomputing"):
        assert word in result.stdout


def test_model_benchmark_lora_mode_prints_full_and_lora_side_by_side():
    """--lora R: the table of step time, trainable parameters, gradient and AdamW bytes, full vs LoRA; the
    memory ratios are r sum (in + out) / N, the same for the three (one float per trainable parameter each)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "tests/bench_model.py", "--lora", "2", "--layers", "1", "--steps", "1",
                             "--batch-size", "2", "--seq-len", "8", "--device", "cpu"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    base = M.GPT(M.Config(n_layer=1))
    ratio = sum(2 * (m.in_features + m.out_features) for _, m in block_linears(base)) / base.num_params()
    lines = {line[:26].strip(): line[26:].split() for line in result.stdout.splitlines()[2:]}
    assert set(lines) == {"step time (ms)", "trainable parameters (M)", "gradients (MiB)", "AdamW state (MiB)"}
    for quantity in ("gradients (MiB)", "AdamW state (MiB)"):
        assert float(lines[quantity][-1]) == pytest.approx(ratio, abs=1e-4)


@pytest.mark.parametrize("tie, pos, dtype", [(True, "rope", torch.float32), (False, "learned", torch.bfloat16)])
def test_decode_bytes_per_token_reads_each_weight_once_the_head_whole_an_embedding_row_and_the_cache(tie, pos, dtype):
    """The bandwidth bound's bytes (tests/bench_vs_transformers.py) written out from the config: per layer q
    (C x H d), kv (C x 2 Hkv d), proj (H d x C), the FFN's three C x F matrices and two norms; the final norm;
    the LM head (V x C) whole, tied or not; per row of the batch one C-row of each embedding table and the keys
    and values of L layers over the context; every element in the weights' dtype on a CPU."""
    import bench_vs_transformers as bench
    C, H, Hkv, F, L, V = 32, 4, 2, 48, 3, 300
    cfg = M.Config(vocab_size=V, n_layer=L, n_embd=C, n_head=H, n_kv_head=Hkv, ffn_hidden=F, tie_embeddings=tie,
                   pos=pos)
    model = M.GPT(cfg).to(dtype)
    size, d, tables = (4 if dtype == torch.float32 else 2), C // H, (2 if pos == "learned" else 1)
    weights = L * (C * H * d + C * 2 * Hkv * d + H * d * C + 3 * C * F + 2 * C) + C + V * C
    for batch, context in ((1, 10), (8, 24.5)):
        per_step = (weights + batch * (tables * C + 2 * L * Hkv * d * context)) * size
        assert bench.decode_bytes_per_token(model, batch, context) == pytest.approx(per_step / batch)


def table_rows(text: str, shape: str) -> list:
    """The cells of every markdown table row of `shape` in text."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {shape} |")]


def test_bench_vs_transformers_prints_its_three_tables_at_a_tiny_size(tmp_path, capsys, monkeypatch):
    """tests/bench_vs_transformers.py end to end on a CPU: one layer of the default shape, aot_eager in place of
    inductor (seconds, not minutes). A decode row per batch and decoder; the fused step's greedy tokens equal the
    eager step's on the timed weights and in fp32; each share of the bound is tok/s x bytes per token / bandwidth,
    recomputed from the printed figures; the training rows and the GRPO split; --out holds the same tables."""
    pytest.importorskip("transformers", reason="transformers is the other side of the benchmark")
    import bench_vs_transformers as bench
    compile_blocks = M.GPT.compile_blocks
    monkeypatch.setattr(M, "DECODE_BACKEND", "aot_eager")
    monkeypatch.setattr(M.GPT, "compile_blocks", lambda model: compile_blocks(model, backend="aot_eager"))
    out = tmp_path / "tables.md"
    bench.main(["--shapes", "default", "--layers", "1", "--batch-size", "2", "--seq-len", "16", "--gen-batches", "1,3",
                "--gen-tokens", "6", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    bandwidth = float(re.search(r"bound = copy bandwidth ([\d,.]+) GB/s", printed)[1].replace(",", "")) * 1e9
    decode = [row for row in table_rows(printed, "default") if len(row) == 12]
    decoders = ("eager", "inductor", "transformers")
    assert [(row[1], row[2]) for row in decode] == [(batch, name) for batch in ("1", "3") for name in decoders]
    for _, _, name, speed, _, step, mb, bound, share, step_share, same_timed, same_fp32 in decode:
        speed, mb, bound = float(speed.replace(",", "")), float(mb), float(bound.replace(",", ""))
        assert speed > 0 and bound == pytest.approx(bandwidth / (mb * 1e6), rel=0.02)
        assert float(share[:-1]) / 100 == pytest.approx(speed * mb * 1e6 / bandwidth, rel=0.02, abs=6e-4)
        if name == "inductor":
            assert same_timed == same_fp32 == "True"
            assert float(step_share[:-1]) / 100 == pytest.approx(float(step.replace(",", "")) * mb * 1e6 / bandwidth,
                                                                  rel=0.02, abs=6e-4)
    training = [row for row in table_rows(printed, "default") if len(row) == 6]
    assert [row[1] for row in training] == ["transformers", "ours, eager", "ours, compiled blocks"]
    assert all(float(row[2].replace(",", "")) > 0 for row in training)
    [grpo_row] = [row for row in table_rows(printed, "default") if len(row) == 8]
    assert grpo_row[1] == "32 x 8" and all(float(seconds) >= 0 for seconds in grpo_row[4:])
    written = [line for line in out.read_text().splitlines() if line.startswith("|")]
    assert written == [line for line in printed.splitlines() if line.startswith("|")] and len(written) == 6 + 3 + 1 + 6
    from lib import cli
    with pytest.raises(cli.UserError, match="--gen-tokens >= 4"):
        bench.main(["--gen-tokens", "3", "--device", "cpu"])


def test_python_model_py_alone_fits_a_paragraph_and_generates_what_recomputation_generates(tmp_path):
    """model.py copied alone into an empty folder (no lib/, no other file) runs its demonstration: the loss
    falls, and greedy decoding with the KV cache gives the tokens recomputing the whole sequence gives."""
    shutil.copy(os.path.join(ROOT, "model.py"), tmp_path / "model.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "model.py", "--steps", "30", "--new-tokens", "8"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(line.split("loss ")[1].split()[0]) for line in result.stdout.splitlines() if "| loss " in line]
    # from ln(258) = 5.55 nats/byte at the start. The drop over --seed 0-7: 2.78-2.94, mean 2.86, std 0.06; 1.0 is
    # mean - 30 std
    assert len(losses) == 2 and losses[-1] < losses[0] - 1.0
    assert "greedy, 8 new tokens" in result.stdout and "same tokens: True" in result.stdout


# ----------------------------------------------------------------------------------------------
# The decode step: compiled (inductor on CPU) and captured (CUDA graph) equal eager
# ----------------------------------------------------------------------------------------------

DECODE_CONFIGS = {"gqa": dict(n_kv_head=2), "mha_learned": dict(n_kv_head=4, pos="learned"),
                  "moe": dict(ffn="moe", n_kv_head=2), "qk_norm_bias": dict(n_kv_head=2, qk_norm=True, qkv_bias=True)}
RAGGED_PROMPTS = [[5, 9, 1, 200, 17], [44], [3, 3, 3, 250, 1, 2, 9, 100, 7], [60, 61]]   # left padding differs per row


def decode_both_ways(model, device, temperature, backend=None):
    import unittest.mock
    prompts = RAGGED_PROMPTS
    runs = []
    for compile in (False, True):
        patch = unittest.mock.patch.object(M, "DECODE_BACKEND", backend) if backend else contextlib.nullcontext()
        with patch:
            runs.append(M.generate(model, prompts, 12, temperature=temperature, stop_ids=(),
                                   generator=torch.Generator(device).manual_seed(7), compile=compile))
    return runs


@pytest.mark.parametrize("config", list(DECODE_CONFIGS))
def test_compiled_decode_step_gives_the_eager_tokens_and_logprobs(config):
    """torch.compile of the decode step (dynamo tracing of the static cache's in-place writes and the fixed
    shapes; backend aot_eager here, inductor on the GPU machine's CPU and CUDA graphs on its GPU, see the
    README) gives the same greedy tokens, and the same sampled tokens and log-probs, as the eager step."""
    torch._dynamo.reset()
    model = tiny_model(seed=11, **DECODE_CONFIGS[config])
    for temperature in (0.0, 1.0):
        eager, compiled = decode_both_ways(model, "cpu", temperature, backend="aot_eager")
        assert torch.equal(eager.tokens, compiled.tokens)
        close(eager.logprobs, compiled.logprobs)
        assert torch.equal(eager.lengths, compiled.lengths)


def test_compiled_decode_step_is_traced_once_for_a_rollout_of_one_batch_size():
    """Every compiled step sees the same shapes and the slot as a tensor, so dynamo (its own frame counter)
    traces the step once for a whole rollout whose batch never changes (no stop ids: nothing is compacted).
    A step that read a Python int changing every step (the cache's `length`) would be traced again at each
    step, until dynamo's recompile limit sent it back to eager."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    torch._dynamo.reset()
    with unittest.mock.patch.object(M, "DECODE_BACKEND", counter):
        M.generate(tiny_model(seed=11), RAGGED_PROMPTS, 12, temperature=1.0, stop_ids=(), compile=True,
                   generator=torch.Generator().manual_seed(0))
    assert counter.frame_count == 1


def test_decoder_mode_comes_from_compile_and_what_a_device_cannot_run_is_refused():
    """compile=True is cuda_graph on CUDA and inductor on a CPU, False is eager, a mode's name is that mode; a
    mixture-of-experts FFN decodes eagerly whatever is asked; an unknown name, or cuda_graph without CUDA, is
    refused before any decoding."""
    model = tiny_model(seed=11)
    for compile, mode in ((True, "inductor"), (False, "eager"), ("eager", "eager"), ("inductor", "inductor")):
        assert M.Decoder(model, compile).mode == mode
    assert M.Decoder(tiny_model(seed=11, ffn="moe"), "inductor").mode == "eager"
    for bad in ("cuda_graph", "reduce-overhead", "", None):
        with pytest.raises(ValueError, match="compile="):
            M.Decoder(model, bad)
    with pytest.raises(ValueError, match="cuda_graph needs CUDA"):
        M.generate(model, RAGGED_PROMPTS, 2, compile="cuda_graph")


def fused_and_eager_runs(model, device, mode, temperature, stop_ids=(), seed=7):
    """generate's output with the decode step in `mode` and with the eager step, from the same generator seed."""
    return [M.generate(model, STOP_PROMPTS, 10, temperature=temperature, stop_ids=stop_ids, compile=compile,
                       generator=torch.Generator(device).manual_seed(seed)) for compile in (mode, "eager")]


def test_generate_takes_the_decoder_mode_by_name_and_inductor_drops_finished_rows_as_eager_does():
    """generate(compile="inductor") decodes as the eager step does (backend aot_eager): the same greedy tokens,
    and sampled tokens and log-probs; with stop ids, rows that finish are dropped from the batch and the compiled
    step is traced again for each smaller batch (dynamic=False), and tokens, lengths and flags still equal eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend
    model = tiny_model(seed=20)
    stop = stop_ids_for(model, STOP_PROMPTS, 10)
    for temperature, stop_ids in ((0.0, ()), (1.0, ()), (0.0, stop)):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        with unittest.mock.patch.object(M, "DECODE_BACKEND", counter):
            fused, eager = fused_and_eager_runs(model, "cpu", "inductor", temperature, stop_ids)
        assert torch.equal(fused.tokens, eager.tokens) and torch.equal(fused.lengths, eager.lengths)
        assert torch.equal(fused.finished, eager.finished)
        close(fused.logprobs, eager.logprobs)
        assert counter.frame_count == (1 if not stop_ids else 2)   # a trace per batch size: 6 rows, then one compaction
    assert eager.finished.sum() >= 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA graph and inductor paths)")
@pytest.mark.parametrize("mode", ["cuda_graph", "inductor"])
@pytest.mark.parametrize("config", list(DECODE_CONFIGS))
def test_fused_cuda_decode_steps_give_the_eager_tokens_and_logprobs_in_fp32(config, mode, monkeypatch, capsys):
    """fp32 weights with autocast off, so the fused steps differ from the eager one at most in the order of fp32
    sums: inductor's compiled step captured in a CUDA graph, and the eager step captured, each give the eager
    step's greedy tokens, and its sampled tokens and log-probs (the uniforms are drawn outside the graph, from one
    generator); with stop ids, the graphs are captured (and inductor compiles) again for each smaller batch and
    tokens, lengths and flags still agree. No step fell back to eager (generate says so when one does)."""
    monkeypatch.setattr(M, "autocast", lambda device: contextlib.nullcontext())
    torch._dynamo.reset()
    model = tiny_model(seed=20, **DECODE_CONFIGS[config]).cuda()
    stop = stop_ids_for(model, STOP_PROMPTS, 10)
    for temperature, stop_ids in ((0.0, ()), (1.0, ()), (0.0, stop)):
        fused, eager = fused_and_eager_runs(model, "cuda", mode, temperature, stop_ids)
        assert torch.equal(fused.tokens, eager.tokens) and torch.equal(fused.lengths, eager.lengths)
        assert torch.equal(fused.finished, eager.finished)
        torch.testing.assert_close(fused.logprobs, eager.logprobs, atol=1e-5, rtol=1e-5)
    assert "decoding eagerly" not in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA graph path)")
@pytest.mark.parametrize("config", list(DECODE_CONFIGS))
def test_cuda_graph_decode_gives_the_eager_tokens_and_logprobs(config):
    model = tiny_model(seed=11, **DECODE_CONFIGS[config]).cuda()
    for temperature in (0.0, 1.0):
        eager, graphed = decode_both_ways(model, "cuda", temperature)
        assert torch.equal(eager.tokens, graphed.tokens)
        torch.testing.assert_close(eager.logprobs, graphed.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 autocast)")
def test_cuda_bf16_first_update_ratio_is_one_with_recomputed_old_logprobs():
    """Under bf16 autocast the sampler's log-probs differ from the training forward's; grpo.update takes the
    old log-probs from the training forward, so the ratio at the first update is exactly 1."""
    import grpo
    model = tiny_model(seed=3).cuda()
    enc = tokenizer.get_tokenizer()
    args = grpo.Args(max_new_tokens=10, group_size=4, micro_batch=8, device="cuda")
    rows = [{"prompt": f"{a}+{a}=?\n", "answer": str(2 * a)} for a in range(4)]
    batch = grpo.rollout(model, enc, rows, args, {"correct": 1.0}, torch.Generator("cuda").manual_seed(0))
    tokens, mask = batch.tokens.cuda(), batch.mask.cuda()
    old = grpo.forward_logprobs(model, tokens, args, args.micro_batch) * mask
    with M.autocast("cuda"):
        new, _ = grpo.policy_logprobs(model, tokens, args)
    _, stats = grpo.grpo_loss(new.float(), old, torch.ones(tokens.shape[0], device="cuda"), mask)
    assert abs(stats["ratio_mean"] - 1) < 1e-6


# ----------------------------------------------------------------------------------------------
# Sampling, log-probs and generation: defaults, each transform, stop ids, compaction (issue 24: the mutants
# these tests kill passed every test above)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_sampling_logprobs_defaults_and_no_op_settings_are_the_plain_float32_log_softmax(dtype):
    """No argument, top_k = 0 or >= V, top_p = 1, min_p = 0: log_softmax(z) in float32 (bf16/fp16 logits are
    upcast first), also for tokens of probability 1e-17, which a cumulative mass rounds to 1 in float32."""
    logits = (torch.randn(3, 2, 12, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    logits[0, 0, 0] = 40.0                                            # the rest of this row: p ~ e^-40
    want = F.log_softmax(logits.float(), -1)
    for got in (M.sampling_logprobs(logits), M.sampling_logprobs(logits, 1.0, 0, 1.0, 0.0),
                M.sampling_logprobs(logits, top_k=12), M.sampling_logprobs(logits, top_k=50),
                M.sampling_logprobs(logits, top_p=1.0), M.sampling_logprobs(logits, min_p=0.0)):
        assert got.dtype == torch.float32 and got.shape == logits.shape
        close(got, want)
        assert torch.isfinite(got).all()


@given(logits=logit_vectors, temperature=st.sampled_from([0.25, 0.5, 2.0, 3.0]))
def test_temperature_alone_is_log_softmax_of_the_scaled_logits(logits, temperature):
    close(M.sampling_logprobs(logits, temperature), F.log_softmax(logits.double() / temperature, -1).float())


@given(logits=logit_vectors, p=st.floats(0.05, 0.95), min_p=st.floats(0.01, 0.5), top_k=st.integers(1, 6))
def test_transforms_on_a_batch_equal_the_same_transforms_row_by_row(logits, p, min_p, top_k):
    """(..., V): each row is transformed on its own (the sort, scatter and max run along the last dim)."""
    batch = torch.stack([logits, logits.flip(0) * 0.5, logits.roll(1)]).view(3, 1, -1)
    got = M.sampling_logprobs(batch, 0.9, top_k, p, min_p)
    for i in range(3):
        assert torch.equal(got[i, 0], M.sampling_logprobs(batch[i, 0], 0.9, top_k, p, min_p))


def test_sample_defaults_draw_from_the_softmax_with_the_given_generator_over_any_batch_shape():
    """sample(logits) at default settings: the log-prob of each drawn token is log_softmax(z) there (temperature
    1, no truncation); the same seed draws the same tokens (the generator is used, not the global RNG); a
    (2, 3, V) batch gives (2, 3) tokens."""
    logits = torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(3)) * 2
    first, logp = M.sample(logits, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)                                                  # the global RNG must not matter
    again, _ = M.sample(logits, generator=torch.Generator().manual_seed(5))
    assert first.shape == logp.shape == (2, 3) and torch.equal(first, again)
    close(logp, F.log_softmax(logits, -1).gather(-1, first[..., None]).squeeze(-1))
    draws = torch.stack([M.sample(logits, generator=torch.Generator().manual_seed(s))[0] for s in range(40)])
    assert len(set(draws.flatten().tolist())) > 3                           # it samples: not always the argmax
    greedy, greedy_logp = M.sample(logits, temperature=0.0)
    assert torch.equal(greedy, logits.argmax(-1)) and torch.equal(greedy_logp, torch.zeros(2, 3))


def brute_force_logprob(z, token, temperature, top_k, top_p, min_p):
    """log q(token) for softmax(z / T) restricted to top-k, then the top-p nucleus, then min-p; None when a
    cumulative mass or a probability ratio sits within 1e-5 of its threshold (a rounding question)."""
    z = [x / temperature for x in z]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    ids = order[:top_k] if 0 < top_k < len(z) else order

    def renorm(ids):
        top = max(z[i] for i in ids)
        total = sum(math.exp(z[i] - top) for i in ids)
        return {i: math.exp(z[i] - top) / total for i in ids}
    q = renorm(ids)
    if top_p < 1.0:
        nucleus, mass = [], 0.0
        for i in ids:
            if abs(mass - top_p) < 1e-5:
                return None
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += q[i]
        q = renorm(nucleus)
    if min_p > 0:
        best = max(q.values())
        if any(abs(v / best - min_p) < 1e-5 for v in q.values()):
            return None
        q = renorm([i for i, v in q.items() if v >= min_p * best])
    return (math.log(q[token]) if token in q else -math.inf), -sum(v * math.log(v) for v in q.values())


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [(1.0, 0, 0.7, 0.0), (0.8, 0, 1.0, 0.1),
                                                              (1.2, 7, 0.9, 0.05), (1.0, 0, 1.0, 0.0)])
def test_token_logprobs_and_entropy_equal_brute_force_for_top_p_and_min_p(temperature, top_k, top_p, min_p):
    model = tiny_model(seed=12)
    tokens = random_tokens(13, 2, 8)
    with torch.no_grad():
        got, entropy = M.token_logprobs(model, tokens, temperature, top_k, top_p, min_p, entropy=True)
        plain = M.token_logprobs(model, tokens, temperature, top_k, top_p, min_p)
        logits = model(tokens).double()
    assert torch.equal(plain, got)
    checked = 0
    for b in range(2):
        for t in range(7):
            want = brute_force_logprob(logits[b, t].tolist(), int(tokens[b, t + 1]), temperature, top_k, top_p, min_p)
            if want is None:
                continue
            assert float(got[b, t]) == pytest.approx(want[0], abs=1e-4)
            assert float(entropy[b, t]) == pytest.approx(want[1], abs=1e-4) and float(entropy[b, t]) >= 0
            checked += 1
    assert checked >= 10


def test_token_logprobs_defaults_mask_positions_and_an_empty_row():
    """Defaults: log_softmax at temperature 1, no truncation. mask (B, T) zeroes the positions whose TARGET
    token is padding (mask[:, 1:]), never its context. positions/doc_ids reach the model: a packed row of two
    documents gives each document its log-probs alone. T = 1 gives (B, 0)."""
    model = tiny_model(seed=14)
    tokens = random_tokens(15, 2, 9)
    with torch.no_grad():
        got = M.token_logprobs(model, tokens)
        want = model(tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)
        close(got, want)
        mask = torch.ones(2, 9, dtype=torch.bool)
        mask[0, 0] = False                   # a padded first token: no target is there, nothing changes
        mask[1, 4] = False                   # the target at t = 4 is padding: position 3 of the output is 0
        masked = M.token_logprobs(model, tokens, mask=mask)
        expected = got.clone()
        expected[1, 3] = 0.0
        assert torch.equal(masked, expected)
        a, b = tokens[0, :4], tokens[1, :5]
        packed = torch.cat([a, b])[None]
        positions = torch.cat([torch.arange(4), torch.arange(5)])[None]
        doc_ids = torch.tensor([[0] * 4 + [1] * 5])
        both = M.token_logprobs(model, packed, positions=positions, doc_ids=doc_ids)[0]
        close(both[:3], M.token_logprobs(model, a[None])[0])
        close(both[4:], M.token_logprobs(model, b[None])[0])
        empty, empty_entropy = M.token_logprobs(model, tokens[:, :1], entropy=True)
        assert empty.shape == empty_entropy.shape == (2, 0)


@pytest.mark.parametrize("chunk", [258, 258 * 2, 258 * 5, 258 * 16, 258 * 100])
def test_chunked_token_logprobs_without_autograd_equal_one_chunk(chunk):
    """Under no_grad the logits are still built a chunk of positions at a time (no checkpointing): every chunk
    size, dividing the 16 positions or not, gives the whole-tensor values and entropies."""
    import unittest.mock
    model = tiny_model(seed=16)
    tokens = random_tokens(17, 2, 9)
    with torch.no_grad():
        logp = M.sampling_logprobs(model(tokens)[:, :-1], 0.8, 0, 0.9)
        want = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        want_entropy = -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)
        with unittest.mock.patch.object(M, "LOGIT_CHUNK_ELEMENTS", chunk):
            got, got_entropy = M.token_logprobs(model, tokens, 0.8, 0, 0.9, entropy=True)
    close(got, want)
    close(got_entropy, want_entropy)


def greedy_until_stop(model, prompt, n, stop_ids):
    """Greedy by full recomputation, cut after the first stop id: (tokens, ended with a stop id)."""
    tokens = greedy_by_recomputation(model, prompt, n)
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i + 1], True
    return tokens, False


STOP_PROMPTS = [[5, 9, 1], [44, 2, 7, 8, 100], [3, 3], [60, 61, 62, 63], [17], [200, 201, 9, 9, 9, 1]]


def stop_ids_for(model, prompts, n):
    """Stop ids that end at least four of the six rows early: greedy tokens 1, 3, 2 and 5 of rows 0-3."""
    free = M.generate(model, prompts, n, temperature=0.0, stop_ids=())
    return tuple(int(free.tokens[row, t]) for row, t in ((0, 0), (1, 2), (2, 1), (3, 4)))


@pytest.mark.parametrize("check_every", [1, 3])
def test_generate_stops_each_row_at_its_first_stop_id_pads_the_rest_and_flags_it(check_every):
    """Against greedy recomputation per row: tokens up to and including the first of several stop ids, then
    pad_id (here a non-default one); lengths = tokens kept; finished = ended with a stop id; log-probs 0 past
    the end; the output is as wide as the longest row. check_every > 1 checks less often, same result."""
    model = tiny_model(seed=18)
    n = 10
    stop = stop_ids_for(model, STOP_PROMPTS, n)
    gen = M.generate(model, STOP_PROMPTS, n, temperature=0.0, stop_ids=stop, pad_id=7, check_every=check_every)
    expected = [greedy_until_stop(model, p, n, stop) for p in STOP_PROMPTS]
    assert gen.tokens.shape[1] == max(len(t) for t, _ in expected)
    for i, (tokens, ended) in enumerate(expected):
        assert gen.tokens[i].tolist() == tokens + [7] * (gen.tokens.shape[1] - len(tokens))
        assert int(gen.lengths[i]) == len(tokens) and bool(gen.finished[i]) == ended
        assert (gen.logprobs[i, len(tokens):] == 0).all() and (gen.logprobs[i, :len(tokens)] <= 0).all()
    assert gen.finished.sum() >= 4


def test_generate_all_rows_stopping_early_trims_the_output_and_one_token_works():
    model = tiny_model(seed=19)
    prompts = [[1, 2, 3], [4, 5]]
    free = M.generate(model, prompts, 6, temperature=0.0, stop_ids=())
    stop = (int(free.tokens[0, 0]), int(free.tokens[1, 0]))
    gen = M.generate(model, prompts, 6, temperature=0.0, stop_ids=stop)
    assert gen.tokens.shape == (2, 1) and gen.finished.all() and gen.lengths.tolist() == [1, 1]
    one = M.generate(model, prompts, 1, temperature=0.0, stop_ids=())
    assert torch.equal(one.tokens, free.tokens[:, :1]) and one.lengths.tolist() == [1, 1] and not one.finished.any()
    learned = tiny_model(seed=19, pos="learned", block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        M.generate(learned, prompts, 6, temperature=0.0)


@pytest.mark.parametrize("overrides", [dict(), dict(pos="learned", ffn="moe")], ids=str)
def test_compacting_finished_rows_changes_nothing_greedy_and_keeps_sampled_logprobs_exact(overrides, monkeypatch):
    """compact=True drops finished rows from the batch and the cache once half are done. Greedy decoding
    gives identical tokens, lengths and flags either way (and equal to recomputation); sampling draws fewer
    rows per step after a compaction, so the RNG stream (hence the tokens) may differ, but every sampled
    token's log-prob still equals a full forward pass over its own row."""
    model = tiny_model(seed=20, **overrides)
    n = 10
    stop = stop_ids_for(model, STOP_PROMPTS, n)
    kept = []
    original_keep = M.KVCache.keep
    monkeypatch.setattr(M.KVCache, "keep", lambda cache, rows: (kept.append(len(rows)), original_keep(cache, rows))[1])
    compact = M.generate(model, STOP_PROMPTS, n, temperature=0.0, stop_ids=stop, compact=True)
    assert kept, "the stop ids should end at least half of the rows early"
    calls = len(kept)
    full = M.generate(model, STOP_PROMPTS, n, temperature=0.0, stop_ids=stop, compact=False)
    assert len(kept) == calls                                              # compact=False never drops a row
    assert torch.equal(compact.tokens, full.tokens) and torch.equal(compact.lengths, full.lengths)
    assert torch.equal(compact.finished, full.finished)
    close(compact.logprobs, full.logprobs)
    for i, p in enumerate(STOP_PROMPTS):
        tokens, _ = greedy_until_stop(model, p, n, stop)
        assert compact.tokens[i, :len(tokens)].tolist() == tokens
    sampled = M.generate(model, STOP_PROMPTS, n, temperature=1.0, stop_ids=stop, compact=True,
                         generator=torch.Generator().manual_seed(0))
    for i, p in enumerate(STOP_PROMPTS):
        new = sampled.tokens[i, :int(sampled.lengths[i])].tolist()
        with torch.no_grad():
            logp = model(torch.tensor([p + new]))[0].log_softmax(-1)
        expected = torch.stack([logp[len(p) - 1 + j, tok] for j, tok in enumerate(new)])
        close(sampled.logprobs[i, :len(new)], expected)
        assert bool(sampled.finished[i]) == (new[-1] in stop)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_attention_equals_scaled_dot_product_attention_with_a_mask_and_gqa(n_kv_head, dtype):
    """One query per row against L keys, some masked out, H = 4 query heads over n_kv_head K/V heads: PyTorch's
    F.scaled_dot_product_attention with the K/V heads repeated (query head h reads K/V head h // (H/Hkv))."""
    g = torch.Generator().manual_seed(n_kv_head)
    B, H, L, d = 3, 4, 7, 8
    q = torch.randn(B, H, 1, d, generator=g, dtype=dtype)
    k = torch.randn(B, n_kv_head, L, d, generator=g, dtype=dtype)
    v = torch.randn(B, n_kv_head, L, d, generator=g, dtype=dtype)
    mask = torch.rand(B, 1, 1, L, generator=g) < 0.6
    mask[..., 0] = True                                       # every row sees at least one key
    mask[1] = False
    mask[1, ..., 3] = True                                    # a row that sees exactly one key: its value
    repeat = H // n_kv_head
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                                          attn_mask=mask)
    got = M.decode_attention(q, k, v, mask)
    assert got.shape == (B, H, 1, d) and got.dtype == dtype
    close(got, want, tol=1e-5)                                # the softmax runs in float32 for any input dtype
    close(got[1, :, 0], v[1, torch.arange(H) // repeat, 3], tol=1e-6)


def test_min_p_one_keeps_exactly_the_most_likely_tokens_ties_included():
    """min_p = 1 keeps the tokens with p >= max p: the argmax, and every token tied with it (p = max p is kept)."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 2.0], [3.0, 1.0, 0.0, -2.0]])
    logp = M.sampling_logprobs(logits, 1.0, min_p=1.0)
    assert kept(logp[0]) == {1, 3} and kept(logp[1]) == {0}
    close(logp[0, [1, 3]].exp(), torch.tensor([0.5, 0.5]))


def test_generate_fills_a_learned_position_context_exactly_and_a_kept_cache_sizes_new_layers():
    """prompt + max_new_tokens == block_size is allowed (the last new token sits at position block_size - 1).
    A cache whose rows were dropped (keep) before a layer was ever written allocates that layer for the
    rows it kept: its prefill equals the model on those rows alone."""
    model = tiny_model(seed=21, pos="learned", block_size=8)
    prompt = [1, 2, 3]
    gen = M.generate(model, [prompt], 5, temperature=0.0, stop_ids=())
    assert gen.tokens.shape == (1, 5) and gen.tokens[0].tolist() == greedy_by_recomputation(model, prompt, 5)
    tokens = random_tokens(22, 4, 6)
    cache = M.KVCache(model.config, 4, 8, "cpu")
    cache.keep(torch.tensor([1, 3]))
    with torch.no_grad():
        close(model(tokens[[1, 3]], cache=cache), model(tokens[[1, 3]]))
    assert cache.k[0].shape[0] == 2 and cache.doc_ids.shape == (2, 8)


# ---- contracts the mutation run (tools/mutation.py model) found unpinned ----------------------------------

def test_padded_batch_returns_long_tokens_and_a_bool_mask_pads_right_by_default_and_refuses_other_sides():
    for side in ("left", "right"):
        tokens, mask = M.padded_batch([[1, 2, 3], [4]], pad_id=PAD, side=side)
        assert tokens.dtype == torch.long and mask.dtype == torch.bool
    tokens, mask = M.padded_batch([[1, 2, 3], [4]], pad_id=PAD)
    assert tokens.tolist() == [[1, 2, 3], [4, PAD, PAD]] and mask.tolist() == [[True] * 3, [True, False, False]]
    with pytest.raises(ValueError, match="side"):
        M.padded_batch([[1]], pad_id=PAD, side="top")


def test_generate_returns_long_tokens_and_lengths_float32_logprobs_and_bool_flags():
    """lengths index the tokens (tokens[i, :lengths[i]]) and count them, so they are integers, as the tokens are."""
    gen = M.generate(tiny_model(seed=21), [[1, 2, 3], [4]], 3, generator=torch.Generator().manual_seed(0))
    assert gen.tokens.dtype == gen.lengths.dtype == torch.long
    assert gen.logprobs.dtype == torch.float32 and gen.finished.dtype == torch.bool


def test_generate_outputs_are_ordinary_tensors_a_training_step_can_use():
    """generate decodes in inference mode, but what it returns is trained on (GRPO's tokens and old log-probs):
    an inference tensor cannot be saved for backward, so an embedding of the tokens, scaled by the log-probs
    and backpropagated, would raise. It must not, and the gradient is the product rule's."""
    model = tiny_model(seed=22)
    gen = M.generate(model, [[1, 2, 3], [4]], 3, generator=torch.Generator().manual_seed(0))
    assert not any(t.is_inference() for t in (gen.tokens, gen.logprobs, gen.lengths, gen.finished))
    weight = model.wte.weight
    (model.wte(gen.tokens) * gen.logprobs[..., None]).sum().backward()          # saves tokens and log-probs
    expected = torch.zeros_like(weight).index_add_(0, gen.tokens.reshape(-1),
                                                   gen.logprobs.reshape(-1, 1).expand(-1, weight.shape[1]))
    close(weight.grad, expected)


def test_generate_defaults_sample_the_plain_softmax_of_a_full_forward_pass():
    """At its defaults (temperature 1, no top-k/top-p/min-p) generate samples from softmax(z): every new token's
    log-prob is log_softmax of the logits a full forward pass gives at its position."""
    model, prompt = tiny_model(seed=22), [5, 9, 1]
    gen = M.generate(model, [prompt], 6, stop_ids=(), generator=torch.Generator().manual_seed(3))
    new = gen.tokens[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new.tolist()]))[0].float()        # (T, V)
    expected = F.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(-1, new[:, None]).squeeze(-1)
    close(gen.logprobs[0], expected, tol=1e-4)


def test_top_p_stops_when_the_mass_reaches_p_exactly():
    """Four equally likely tokens (softmax of zeros: exactly 1/4 each in binary floating point, and exact partial
    sums): the smallest set whose mass reaches p = 1/2 has two tokens, not three; p = 0.7 needs three."""
    for p, size in [(0.25, 1), (0.5, 2), (0.7, 3), (0.75, 3), (0.76, 4)]:
        assert len(kept(M.sampling_logprobs(torch.zeros(4), top_p=p))) == size, p


def test_kv_cache_buffers_take_the_dtype_of_the_first_write_and_store_later_writes_in_it():
    """A layer's buffers are allocated at the first write in the dtype the layer produced (bf16 under autocast:
    half the memory of fp32), zero where nothing is written; a later write in another dtype is rounded into them."""
    cfg = tiny_model().config
    cache = M.KVCache(cfg, batch_size=2, max_len=5, device="cpu")
    k = torch.randn(2, cfg.n_kv_head, 3, cfg.head_dim, generator=torch.Generator().manual_seed(0)).bfloat16()
    K, V = cache.update(0, k, k + 1, torch.arange(3))
    assert K.dtype == V.dtype == torch.bfloat16 and K.shape == V.shape == (2, cfg.n_kv_head, 5, cfg.head_dim)
    assert torch.equal(K[:, :, :3], k) and torch.equal(V[:, :, :3], k + 1) and (K[:, :, 3:] == 0).all()
    later = torch.randn(2, cfg.n_kv_head, 1, cfg.head_dim, generator=torch.Generator().manual_seed(1))   # fp32
    K, V = cache.update(0, later, -later, torch.tensor([3]))
    assert K.dtype == torch.bfloat16 and torch.equal(K[:, :, 3:4], later.bfloat16())
    assert torch.equal(V[:, :, 3:4], (-later).bfloat16())


def test_generate_runs_one_decode_step_per_new_token_after_the_first(monkeypatch):
    """The prefill's logits give the first new token and each further token costs one decode step:
    max_new_tokens - 1 steps for rows that never stop (a step after the last token computes unread logits)."""
    steps, decode = [], M.Decoder.__call__
    monkeypatch.setattr(M.Decoder, "__call__", lambda self, *a, **k: steps.append(1) or decode(self, *a, **k))
    gen = M.generate(tiny_model(seed=23), [[1, 2], [3]], 5, temperature=0.0, stop_ids=())
    assert gen.tokens.shape == (2, 5) and len(steps) == 4


# ---- rollout speed: one prefill per distinct prompt, eager attention over the written slots only ----

def test_generate_prefills_each_distinct_prompt_once_and_every_copy_samples_as_the_prompt_alone(monkeypatch):
    """GRPO repeats each prompt G times. The prefill runs on the distinct prompts (a cache of 3 rows for 6
    prompts) and its rows are copied: greedy rows equal greedy decoding of the prompt alone by recomputation,
    and every sampled token's log-prob equals a full forward pass over its own row."""
    model = tiny_model(seed=24)
    a, b, c = [5, 9, 1], [44, 2, 7, 8, 100], [17]
    prompts = [a, b, a, a, c, b]
    sizes, original_init = [], M.KVCache.__init__
    monkeypatch.setattr(M.KVCache, "__init__", lambda cache, cfg, batch_size, *rest, **options: (
        sizes.append(batch_size), original_init(cache, cfg, batch_size, *rest, **options))[1])
    greedy = M.generate(model, prompts, 6, temperature=0.0, stop_ids=())
    assert sizes == [3]
    for i, prompt in enumerate(prompts):
        assert greedy.tokens[i].tolist() == greedy_by_recomputation(model, prompt, 6)
    sampled = M.generate(model, prompts, 6, stop_ids=(), generator=torch.Generator().manual_seed(4))
    for i, prompt in enumerate(prompts):
        new = sampled.tokens[i].tolist()
        with torch.no_grad():
            logp = model(torch.tensor([prompt + new]))[0].log_softmax(-1)
        close(sampled.logprobs[i], torch.stack([logp[len(prompt) - 1 + j, t] for j, t in enumerate(new)]))


def test_eager_decoding_never_reads_an_unwritten_slot_of_its_uninitialised_cache(monkeypatch):
    """Eager decoding uses the fast path's DenseKVCache, uninitialised because it reads written slots only.
    Filled with NaN instead of whatever memory held, and compacted along the way, it still gives the tokens,
    lengths and log-probs of the plain path's zero-filled KVCache (compile=True with aot_eager reads the whole
    buffer, so it must get the zeroed KVCache: checked too)."""
    model, n = tiny_model(seed=30), 10
    stop = stop_ids_for(model, STOP_PROMPTS, n)
    runs, kinds = {}, []
    plain, dense = M.KVCache.buffer, M.DenseKVCache.buffer

    def zeros(cache, like, batch_size, slots):
        kinds.append("zeros")
        return plain(cache, like, batch_size, slots)

    def nan(cache, like, batch_size, slots):
        kinds.append("nan")
        return dense(cache, like, batch_size, slots).fill_(math.nan)
    monkeypatch.setattr(M.KVCache, "buffer", zeros)
    monkeypatch.setattr(M.DenseKVCache, "buffer", nan)
    for name, cache_type in (("zeros", M.KVCache), ("nan", M.DenseKVCache)):
        with unittest.mock.patch.object(M, "DenseKVCache", cache_type):
            kinds.clear()
            runs[name] = M.generate(model, STOP_PROMPTS + STOP_PROMPTS[:2], n, stop_ids=stop, compile=False,
                                    generator=torch.Generator().manual_seed(8))
            assert kinds and set(kinds) == {name}
    assert torch.equal(runs["nan"].tokens, runs["zeros"].tokens) and torch.equal(runs["nan"].lengths, runs["zeros"].lengths)
    assert torch.isfinite(runs["nan"].logprobs).all()
    close(runs["nan"].logprobs, runs["zeros"].logprobs)
    kinds.clear()
    with unittest.mock.patch.object(M, "DECODE_BACKEND", "aot_eager"):
        torch._dynamo.reset()
        M.generate(model, STOP_PROMPTS, 4, temperature=0.0, stop_ids=(), compile=True)
    assert kinds and set(kinds) == {"zeros"}


def test_a_bfloat16_model_decodes_on_a_cpu_and_the_dense_cache_gives_the_plain_caches_tokens():
    """Weights in bf16 (--dtype bfloat16 on a CPU): both caches hold keys and values in the dtype the layers
    produce (a float32 buffer would meet bf16 queries in attention), and the fast path's DenseKVCache gives
    the plain KVCache's sampled tokens and log-probs bit for bit (the same arithmetic on the same slots, and the
    same random numbers)."""
    model = tiny_model(seed=31).to(torch.bfloat16)
    prompts = [[5, 9, 1], [44, 2, 7, 8]]
    runs = {}
    for name in ("KVCache", "DenseKVCache"):
        with unittest.mock.patch.object(M, "DenseKVCache", getattr(M, name)):
            runs[name] = M.generate(model, prompts, 6, stop_ids=(), compile=False,
                                    generator=torch.Generator().manual_seed(3))
    assert torch.equal(runs["KVCache"].tokens, runs["DenseKVCache"].tokens)
    assert torch.equal(runs["KVCache"].logprobs, runs["DenseKVCache"].logprobs)
    assert torch.isfinite(runs["DenseKVCache"].logprobs).all()


def test_eager_decode_attends_to_the_written_slots_only(monkeypatch):
    """The eager decode step reads the slots written so far (prompt + tokens decoded), not the whole static
    buffer of prompt + max_new_tokens slots: with a 3-token prompt and 6 new tokens the five decode steps
    attend to 4, 5, 6, 7 and 8 keys, in each of the 2 layers."""
    widths, original = [], M.decode_attention
    monkeypatch.setattr(M, "decode_attention", lambda q, k, v, mask: (widths.append(k.shape[2]), original(q, k, v, mask))[1])
    M.generate(tiny_model(seed=25), [[1, 2, 3]], 6, temperature=0.0, stop_ids=(), compile=False)
    assert widths == [w for w in (4, 5, 6, 7, 8) for _ in range(2)]


@pytest.mark.parametrize("cache_type", ["KVCache", "DenseKVCache"])
def test_kv_cache_keep_moves_kept_rows_to_the_front_in_place_and_repeats_rows_into_new_buffers(cache_type):
    """keep(rows), brute force against indexing copies taken before: dropping rows (any order) leaves the
    batch's written slots equal to old[rows] and every slot past `length` as it was (zeros, doc id -1), in
    the same memory (no new buffer: the front rows of the old one); repeating rows makes buffers with more
    rows and the same slots."""
    cfg = tiny_model().config
    cache = getattr(M, cache_type)(cfg, batch_size=4, max_len=6, device="cpu")
    g = torch.Generator().manual_seed(0)
    k = torch.randn(4, cfg.n_kv_head, 3, cfg.head_dim, generator=g)
    for layer in range(cfg.n_layer):
        cache.update(layer, k + layer, -k - layer)
    cache.doc_ids[:, :3] = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 0, 1]])
    cache.length = 3
    before = [(K.clone(), V.clone()) for K, V in zip(cache.k, cache.v)]
    doc_before, pointer = cache.doc_ids.clone(), cache.k[0].data_ptr()
    rows = torch.tensor([3, 1, 2])
    cache.keep(rows)
    assert cache.shape[0] == 3 and cache.k[0].data_ptr() == pointer
    for (K, V), (K0, V0) in zip(zip(cache.k, cache.v), before):
        assert K.shape == (3, cfg.n_kv_head, 6, cfg.head_dim)
        assert torch.equal(K[:, :, :3], K0[rows, :, :3]) and torch.equal(V[:, :, :3], V0[rows, :, :3])
        if cache_type == "KVCache":
            assert (K[:, :, 3:] == 0).all() and (V[:, :, 3:] == 0).all()
    assert torch.equal(cache.doc_ids[:, :3], doc_before[rows, :3]) and (cache.doc_ids[:, 3:] == -1).all()
    moved = [(K.clone(), V.clone()) for K, V in zip(cache.k, cache.v)]
    repeat = torch.tensor([0, 0, 2, 1, 2])
    cache.keep(repeat)
    assert cache.shape[0] == 5 and cache.k[0].data_ptr() != pointer
    for (K, V), (K0, V0) in zip(zip(cache.k, cache.v), moved):
        assert K.shape == V.shape == (5, cfg.n_kv_head, 6, cfg.head_dim)              # as many slots as before
        assert torch.equal(K[:, :, :3], K0[repeat, :, :3]) and torch.equal(V[:, :, :3], V0[repeat, :, :3])
    assert (cache.doc_ids[:, 3:] == -1).all()
    grown = [K.clone() for K in cache.k]
    pointer, order = cache.k[0].data_ptr(), torch.tensor([4, 3, 2, 1, 0])
    cache.keep(order)                                          # the same size, another order: still in place
    assert cache.k[0].data_ptr() == pointer
    assert all(torch.equal(K[:, :, :3], K0[order, :, :3]) for K, K0 in zip(cache.k, grown))


def test_sample_draws_the_first_token_whose_cumulative_probability_reaches_u_and_never_a_zero_probability_one(
        monkeypatch):
    """Inverse-transform sampling with the uniform replaced by chosen values: the token is the first i with
    p_1 + ... + p_i >= u (brute force over Python floats), u = 1 - rand. At both extremes (u = 1 and u just
    above 0) the token drawn has positive probability, though the first and last tokens have probability 0
    (cut by top-k), and its log-prob is log p of that token."""
    logits = torch.tensor([[-9.0, 0.5, 2.0, -1.0, 1.0, 0.0, -8.0]])
    p = M.sampling_logprobs(logits, top_k=5)[0].exp().double().tolist()
    assert p[0] == p[-1] == 0.0
    for r in [0.0, 1.0 - 2.0 ** -53, 0.25, 0.5, 0.9, 0.999]:
        monkeypatch.setattr(torch, "rand", lambda *shape, r=r, dtype=None, **kw: torch.full(shape[0], r, dtype=dtype))
        token, logp = M.sample(logits, top_k=5)
        u, total, cumulative = 1.0 - r, sum(p), 0.0
        want = next(i for i, q in enumerate(p) if (cumulative := cumulative + q) >= u * total)
        assert token.tolist() == [want] and p[want] > 0, r
        close(logp, torch.tensor([math.log(p[want])]), tol=1e-6)
    batch = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(1)) * 2          # (2, 3, V): rows differ
    r = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.7, 0.99]], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda *shape, dtype=None, **kw: r.to(dtype))
    tokens, _ = M.sample(batch)
    for i, j in itertools.product(range(2), range(3)):
        p = M.sampling_logprobs(batch[i, j]).double().exp().tolist()
        u, cumulative = 1.0 - float(r[i, j]), 0.0
        assert int(tokens[i, j]) == next(t for t, q in enumerate(p) if (cumulative := cumulative + q) >= u * sum(p))


# ---- compiled blocks for training (GPT.compile_blocks) ----------------------------------------------------------

@pytest.mark.parametrize("overrides", [dict(), dict(pos="learned", n_kv_head=1), dict(ffn="moe"), dict(checkpoint=True),
                                       dict(lora_rank=4, checkpoint=True)], ids=str)
def test_compiled_blocks_give_the_eager_loss_and_gradients(overrides):
    """torch.compile'd blocks (backend aot_eager here: the same graph dynamo captures for inductor, run by
    eager kernels) give the eager loss and every parameter's gradient, with GQA, learned positions, MoE routing,
    LoRA adapters (tiny_model draws B != 0) and gradient checkpointing; the parameters and state_dict are the eager model's own."""
    torch._dynamo.reset()
    overrides = dict(overrides)
    checkpoint = overrides.pop("checkpoint", False)
    model = tiny_model(seed=26, **overrides).train()
    model.checkpoint_blocks = checkpoint
    tokens = random_tokens(27, 3, 10)
    keys = list(model.state_dict())

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = -M.token_logprobs(model, tokens).mean() + model.aux_loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = loss_and_grads()
    model.compile_blocks(backend="aot_eager")
    compiled_loss, compiled_grads = loss_and_grads()
    close(compiled_loss, eager_loss)
    assert compiled_grads.keys() == eager_grads.keys()
    for name in eager_grads:
        close(compiled_grads[name], eager_grads[name])
    assert list(model.state_dict()) == keys


def test_compiled_blocks_run_only_in_training_forwards():
    """The compiled blocks serve forwards with gradients and no cache; a forward under no_grad (evaluation, the
    reference model) and decoding with a KV cache use the eager blocks. Checked with recording stand-ins."""
    model = tiny_model(seed=28)
    calls = []
    model.compiled_blocks = [(lambda block: lambda *a: calls.append(1) or block(*a))(b) for b in model.blocks]
    tokens = random_tokens(29, 2, 6)
    with torch.no_grad():
        model(tokens)
    M.generate(model, tokens.tolist(), 3, temperature=0.0, stop_ids=())
    assert calls == []
    model(tokens).sum().backward()
    assert len(calls) == len(model.blocks)


# ----------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021): low-rank adapters beside the frozen weights of the blocks' linear layers
# ----------------------------------------------------------------------------------------------

LORA_CONFIGS = [dict(), dict(ffn="gelu", bias=True, norm="layernorm"), dict(qkv_bias=True, qk_norm=True, n_kv_head=1),
                dict(pos="learned", ffn="geglu", tie_embeddings=False, norm_position="post")]


def block_linears(model):
    """(name, module) of every nn.Linear inside the blocks: the layers LoRA adapts."""
    return [(name, m) for name, m in model.named_modules() if name.startswith("blocks.") and isinstance(m, nn.Linear)]


def randomise_adapters(model, seed: int, std: float = 0.2):
    """Every A and B drawn from N(0, std^2): an adapter as training might leave it (B no longer 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_a", "lora_b")):
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def test_lora_adapts_every_linear_layer_of_the_blocks_under_its_own_name_and_nothing_else():
    """q, kv, proj, w1, w2, w3 of each block get A (r, in) and B (out, r) named <layer>.lora_a / .lora_b; the
    base tensors keep their names and values; the embedding, LM head and norms get no adapter."""
    base = tiny_model(tie_embeddings=False, bias=True)
    model = copy.deepcopy(base).add_lora(3)
    state, base_state = model.state_dict(), base.state_dict()
    layers = block_linears(base)
    assert {name.split(".", 2)[2] for name, _ in layers} == {"attn.q", "attn.kv", "attn.proj", "ffn.w1", "ffn.w2", "ffn.w3"}
    assert set(state) - set(base_state) == {f"{name}.lora_{ab}" for name, _ in layers for ab in "ab"}
    for name, linear in layers:
        assert state[f"{name}.lora_a"].shape == (3, linear.in_features)
        assert state[f"{name}.lora_b"].shape == (linear.out_features, 3)
    assert all(torch.equal(state[k], v) for k, v in base_state.items())


@pytest.mark.parametrize("overrides", LORA_CONFIGS, ids=str)
@settings(max_examples=4)
@given(seed=st.integers(0, 1000), rank=st.integers(1, 8), alpha=st.sampled_from([1.0, 16.0, 32.0]))
def test_lora_starts_from_b_zero_so_the_adapted_model_gives_the_base_models_logits(overrides, seed, rank, alpha):
    """B = 0 at the start (Hu et al. 2021, sec. 4.1), A random: the adapted model computes exactly what the base
    model computes, whether made by add_lora or built by GPT(config with lora_rank) and given the base weights
    (GPT's weight initialisation must leave B at 0)."""
    base = tiny_model(seed=seed, **overrides)
    tokens = random_tokens(seed, 2, 12)
    added = copy.deepcopy(base).add_lora(rank, alpha)
    built = M.GPT(M.Config(**{**asdict(base.config), "lora_rank": rank, "lora_alpha": alpha})).eval()
    missing, unexpected = built.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == sorted(k for k in built.state_dict() if "lora" in k)
    with torch.no_grad():
        want = base(tokens)
        for model in (added, built):
            adapters = {name: p for name, p in model.named_parameters() if "lora" in name}
            assert len(adapters) == 2 * len(block_linears(base))
            assert all(p.eq(0).all() == name.endswith("lora_b") for name, p in adapters.items())
            assert torch.equal(model(tokens), want)


@pytest.mark.parametrize("overrides", LORA_CONFIGS, ids=str)
@settings(max_examples=4)
@given(seed=st.integers(0, 1000), rank=st.integers(1, 8), alpha=st.sampled_from([1.0, 4.0, 16.0]))
def test_lora_logits_equal_the_merged_model_and_the_weights_w_plus_scaled_ba_written_out(overrides, seed, rank, alpha):
    """With random A and B, the adapted model, its merge_lora() copy, and the base model with each weight replaced
    by W + (alpha / r) B A (written out here) give the same logits up to fp32 rounding (1e-5 of the logits'
    scale). The merged copy is the base model's layout again: plain nn.Linear layers, the same state-dict
    names, lora_rank 0 (alpha is kept), every parameter trainable; the model it was copied from keeps its adapters."""
    base = tiny_model(seed=seed, **overrides)
    lora = randomise_adapters(copy.deepcopy(base).add_lora(rank, alpha), seed)
    brute = copy.deepcopy(base)
    merged = copy.deepcopy(lora).merge_lora()
    with torch.no_grad():
        for name, linear in block_linears(brute):
            A, B = lora.get_parameter(f"{name}.lora_a"), lora.get_parameter(f"{name}.lora_b")   # (r, in), (out, r)
            linear.weight += alpha / rank * B @ A
        tokens = random_tokens(seed, 2, 12)
        want, base_logits = brute(tokens), base(tokens)
        scale = float(want.abs().max())
        assert (want - base_logits).abs().max() > 0.01 * scale                   # the adapters matter
        for got in (lora(tokens), merged(tokens)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    assert all(type(m) is nn.Linear for _, m in block_linears(merged))
    assert list(merged.state_dict()) == list(base.state_dict()) and merged.config == replace(base.config, lora_alpha=alpha)
    assert all(p.requires_grad for p in merged.parameters())
    assert lora.config.lora_rank == rank and len(block_linears(lora)) == len(block_linears(base))
    assert all(isinstance(m, M.LoRALinear) for _, m in block_linears(lora))


@settings(max_examples=4)
@given(seed=st.integers(0, 1000), rank=st.integers(1, 6))
def test_only_adapters_get_gradients_and_they_follow_from_the_merged_weights_gradient(seed, rank):
    """For W' = W + s B A (s = alpha / r), the chain rule gives dL/dB = s (dL/dW') A^T and dL/dA = s B^T (dL/dW'),
    with dL/dW' taken from the merged model. Every other parameter is frozen and gets no gradient. At the start
    B = 0, so dL/dA = 0 exactly and only B moves in the first step; once B is not 0, A's gradient is not."""
    alpha = 8.0
    tokens = random_tokens(seed, 2, 10)
    lora = copy.deepcopy(tiny_model(seed=seed)).add_lora(rank, alpha).train()
    for start in (True, False):
        if not start:
            randomise_adapters(lora, seed)
        lora.zero_grad(set_to_none=True)
        merged = copy.deepcopy(lora).merge_lora()
        for model in (lora, merged):
            (-M.token_logprobs(model, tokens).mean()).backward()
        for name, p in lora.named_parameters():
            if not name.endswith(("lora_a", "lora_b")):
                assert not p.requires_grad and p.grad is None, name
        for name, linear in block_linears(lora):
            dW = merged.get_submodule(name).weight.grad                                   # (out, in)
            A, B = linear.lora_a.detach(), linear.lora_b.detach()
            close(linear.lora_b.grad, alpha / rank * dW @ A.T, tol=1e-4)
            close(linear.lora_a.grad, alpha / rank * B.T @ dW, tol=1e-4)
            if start:
                assert linear.lora_b.grad.abs().max() > 0 and not linear.lora_a.grad.any()
            else:
                assert linear.lora_a.grad.abs().max() > 0


def test_adamw_state_holds_two_floats_per_adapter_parameter_and_scales_with_the_rank():
    """AdamW keeps exp_avg and exp_avg_sq for each trainable parameter: with LoRA, 2 sum_layers r (in + out)
    floats (from the base model's layer shapes), proportional to r; with full fine-tuning, 2 N."""
    base = tiny_model(seed=3)
    tokens = random_tokens(3, 2, 10)

    def adam_state_floats(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        (-M.token_logprobs(model.train(), tokens).mean()).backward()
        optimizer.step()
        return sum(state[k].numel() for state in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))

    full = adam_state_floats(copy.deepcopy(base))
    assert full == 2 * base.num_params()
    lora = {rank: adam_state_floats(copy.deepcopy(base).add_lora(rank)) for rank in (1, 4)}
    for rank, floats in lora.items():
        assert floats == 2 * sum(rank * (m.in_features + m.out_features) for _, m in block_linears(base))
    assert lora[4] == 4 * lora[1] and lora[4] < full / 5


def test_a_lora_checkpoint_reloads_into_gpt_of_its_config_with_the_same_logits():
    """state_dict + asdict(config) through torch.save and torch.load(weights_only=True) (a BytesIO): lib's
    config_from_checkpoint accepts it (field types, tensor names and shapes), GPT(config) loads it strictly,
    and gives the same logits, with the same parameters trainable."""
    model = randomise_adapters(tiny_model(seed=4, qkv_bias=True).add_lora(3, 6.0), seed=5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    reloaded = M.GPT(checkpoints.config_from_checkpoint(ckpt, "lora.pt")).eval()
    reloaded.load_state_dict(ckpt["model"])
    tokens = random_tokens(6, 2, 12)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), model(tokens))
    trainable = {name for name, p in reloaded.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in model.named_parameters() if p.requires_grad} and trainable


@pytest.mark.parametrize("bad", [dict(lora_rank=-1), dict(lora_rank=2.0), dict(lora_alpha=0.0), dict(lora_alpha=-1.0),
                                 dict(lora_alpha=math.inf), dict(lora_alpha=math.nan), dict(lora_rank=4, ffn="moe")],
                         ids=str)
def test_config_refuses_a_negative_rank_a_non_positive_alpha_and_lora_with_moe(bad):
    with pytest.raises(ValueError):
        M.Config(**bad)


def test_add_lora_refuses_a_second_adapter_moe_and_rank_zero_and_merge_lora_without_adapters_changes_nothing():
    for make, rank, alpha in ((lambda: tiny_model().add_lora(2), 2, 16.0), (lambda: tiny_model(ffn="moe"), 2, 16.0),
                              (tiny_model, 0, 16.0), (tiny_model, -1, 16.0), (tiny_model, 2, 0.0)):
        model = make()
        before = model.config
        with pytest.raises(ValueError):
            model.add_lora(rank, alpha)
        assert model.config == before
    plain = tiny_model()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    assert plain.merge_lora() is plain and plain.config.lora_rank == 0
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items()) and list(plain.state_dict()) == list(state)
    assert all(p.requires_grad for p in plain.parameters())


def test_add_lora_puts_adapters_on_the_weights_dtype_and_merging_keeps_it():
    """In bf16 the adapters take the weights' dtype, and merging writes W + (alpha / r) B A summed in fp32 and
    rounded once to bf16. Comparing the two bf16 models with each other would compare two different roundings,
    so each is compared with the exact function (the fp32 copy of the adapted model): bf16's unit roundoff is
    u = 2^-8, a 2-layer block chain rounds about 10 times per layer plus 4 at the ends, and the relative error
    of the logits (in norm) stays below that many u, the worst case of errors that add up (measured: 1.5-5 %)."""
    model = tiny_model(seed=7).to(torch.bfloat16).add_lora(2)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    randomise_adapters(model, seed=8)
    merged = copy.deepcopy(model).merge_lora()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    scale = model.config.lora_alpha / model.config.lora_rank
    assert len(block_linears(model)) == len(block_linears(merged)) > 0
    for (_, adapted), (_, plain) in zip(block_linears(model), block_linears(merged)):
        exact = adapted.weight.float() + scale * adapted.lora_b.float() @ adapted.lora_a.float()   # (out, in)
        torch.testing.assert_close(plain.weight.float(), exact, rtol=2 ** -8, atol=1e-6)   # one rounding to bf16
    exact_model = copy.deepcopy(model).float()
    tokens = random_tokens(9, 2, 8)
    bound = (10 * model.config.n_layer + 4) * 2 ** -8
    with torch.no_grad():
        reference = exact_model(tokens)
        for candidate in (model, merged):
            error = (candidate(tokens).float() - reference).norm() / reference.norm()
            assert error < bound, (float(error), bound)


def test_generate_with_adapters_gives_the_merged_models_tokens_and_logprobs_eager_and_compiled():
    """The KV-cache decode goes through the adapters: greedy tokens, and sampled tokens and log-probs, of the
    adapted model (eager, and the compiled decode step, backend aot_eager) equal the merged model's."""
    torch._dynamo.reset()
    model = randomise_adapters(tiny_model(seed=11, n_kv_head=2).add_lora(4, 8.0), seed=12, std=0.1)
    merged = copy.deepcopy(model).merge_lora()
    base_tokens = M.generate(tiny_model(seed=11, n_kv_head=2), RAGGED_PROMPTS, 12, temperature=0.0, stop_ids=()).tokens
    for temperature in (0.0, 1.0):
        want = M.generate(merged, RAGGED_PROMPTS, 12, temperature=temperature, stop_ids=(),
                          generator=torch.Generator().manual_seed(7))
        if temperature == 0.0:
            assert not torch.equal(want.tokens, base_tokens)                     # the adapters change the tokens
        for got in decode_both_ways(model, "cpu", temperature, backend="aot_eager"):
            assert torch.equal(got.tokens, want.tokens)
            close(got.logprobs, want.logprobs, tol=1e-4)
