"""The language model and what every stage of the pipeline shares.

A decoder-only transformer (Radford et al. 2019; Vaswani et al. 2017) whose design choices are
config switches, because the choices are the lesson:

    x_0     = E[tokens] (+ P[positions] with learned positions)
    x_{l+1} = x_l + Attn(Norm(x_l)) ;  x_{l+1} = x_{l+1} + FFN(Norm(x_{l+1}))      (pre-norm)
    logits  = Norm(x_L) W_out^T ,  p(x_t | x_<t) = softmax(logits_{t-1})

and the plumbing the stages need: a byte-level tiktoken tokenizer built in code (and real ones read from
tokenizer.json, tiktoken ranks files or GGUF metadata), one pure sampling function, batched generation with
a static KV cache and a compiled decode step, per-token log-probabilities in chunks, atomic checkpoints in
and out (this project's .pt, Hugging Face folders and GGUF files for the Llama and Qwen families; export to
a folder transformers loads), the verifiers (`#### answer`, Countdown expressions), and run helpers
(device, seeding, DDP and FSDP2, option checks, JSONL, a run-folder lock, metrics).

    python model.py                  # benchmark: train tokens/s and MFU, generation at batch 1 and 64, peak memory
    python model.py --shape 135m     # the same at SmolLM2-135M's shape (0.5b: Qwen2.5-0.5B's), random weights
    python model.py export --checkpoint runs/grpo/model.pt --to hf/grpo     # a folder transformers loads
    python model.py --help

Sections: 1. model  2. tokenizer  3. sampling and generation  4. log-probabilities
          5. checkpoints  6. verifiable answers  7. run plumbing  8. benchmark (main)
"""
from __future__ import annotations

import argparse
import ast
import base64
import binascii
import contextlib
import dataclasses
import datetime
import hashlib
import inspect
import io
import json
import math
import mmap
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
import tokenize
import traceback
import typing
import unicodedata
from dataclasses import dataclass, asdict

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


# ----------------------------------------------------------------------------------------------
# 1. Model
# ----------------------------------------------------------------------------------------------

@dataclass
class Config:
    vocab_size: int = 258        # 256 bytes + <|endoftext|> + <|pad|>
    block_size: int = 256        # longest sequence (learned positions have this many rows)
    n_layer: int = 4             # transformer blocks
    n_head: int = 4              # query heads
    n_kv_head: int = 4           # key/value heads; < n_head is grouped-query attention (GQA)
    n_embd: int = 128            # residual width C
    ffn: str = "swiglu"          # swiglu | geglu | gelu | relu | relu2 | moe
    ffn_hidden: int = 0          # FFN width; 0 = 4C (plain) or 8C/3 (gated, rounded to 16)
    norm: str = "rmsnorm"        # rmsnorm | layernorm
    norm_position: str = "pre"   # pre | post (post = the original Transformer)
    pos: str = "rope"            # rope | learned
    rope_base: float = 10000.0   # RoPE frequency base theta
    rope_scaling: str = "none"   # none | llama3 (Llama 3.1's frequency-dependent context extension)
    rope_factor: float = 8.0     # llama3: how much longer the extended context is
    rope_low_freq_factor: float = 1.0    # llama3: wavelengths beyond original_context / this are divided by the factor
    rope_high_freq_factor: float = 4.0   # llama3: wavelengths below original_context / this are kept
    rope_original_context: int = 8192    # llama3: the context the model was pre-trained at
    head_dim: int = 0            # width of one attention head; 0 = n_embd / n_head (Qwen3-0.6B: 128 with n_embd 1024, 16 heads)
    norm_eps: float = 1e-6       # epsilon of every norm (Llama, SmolLM2, Qwen: 1e-5 or 1e-6, from their config)
    qk_norm: bool = False        # RMSNorm on each head's queries and keys before RoPE (Qwen3)
    qkv_bias: bool = False       # biases on the query, key and value projections only (Qwen2, Qwen2.5)
    tie_embeddings: bool = True  # output matrix = input embedding matrix
    bias: bool = False           # biases in linear layers and LayerNorm
    dropout: float = 0.0         # dropout on attention and residual branches
    n_expert: int = 4            # MoE: experts per layer
    moe_top_k: int = 2           # MoE: experts per token
    moe_balance_coef: float = 0.01  # MoE: weight of the Switch load-balancing loss in aux_loss
    moe_z_coef: float = 0.001       # MoE: weight of the router z-loss in aux_loss

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_head", "n_kv_head", "n_embd", "n_expert", "moe_top_k",
                     "rope_original_context"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Config.{name}={value!r} must be a positive integer")
        for name in ("n_layer", "ffn_hidden", "head_dim"):   # 0 layers: a bigram model; 0 width: automatic
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"Config.{name}={value!r} must be an integer >= 0")
        for name, low in (("rope_base", 1.0), ("rope_factor", 0.0), ("rope_low_freq_factor", 0.0),
                          ("rope_high_freq_factor", 0.0), ("norm_eps", 0.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > low):
                raise ValueError(f"Config.{name}={value!r} must be a finite number > {low:g}")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ValueError("Config.rope_high_freq_factor must be > rope_low_freq_factor")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"Config.dropout={self.dropout!r} must be in [0, 1)")
        choices = {"ffn": ("swiglu", "geglu", "gelu", "relu", "relu2", "moe"),
                   "norm": ("rmsnorm", "layernorm"), "norm_position": ("pre", "post"),
                   "pos": ("rope", "learned"), "rope_scaling": ("none", "llama3")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"Config.{name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (or set head_dim)")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.head_dim % 2 and self.pos == "rope":
            raise ValueError("RoPE needs an even head dimension")
        if self.ffn == "moe" and not 1 <= self.moe_top_k <= self.n_expert:
            raise ValueError(f"moe_top_k={self.moe_top_k} must be in [1, n_expert={self.n_expert}]")

    @property
    def ffn_width(self) -> int:
        """The FFN's inner width: ffn_hidden, or by default 4C (plain) or 8C/3 rounded up to 16 (gated)."""
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.ffn in ("swiglu", "geglu", "moe"):   # 8C/3 keeps gated FFNs at 4C's parameter count
            return 16 * math.ceil(8 * self.n_embd / 3 / 16)
        return 4 * self.n_embd


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * g. No mean subtraction.
    Computed in fp32 and cast back (as Llama and Qwen do), so bf16 weights normalise exactly."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def make_norm(cfg: Config, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.n_embd
    return RMSNorm(dim, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_frequencies(cfg: Config, device=None):
    """theta_i = base^(-2i/d) for i < d/2 (RoFormer), written 1 / base^(2i/d) as Llama does, bit for bit.

    rope_scaling "llama3" (Llama 3.1) stretches the context by `factor` without touching short wavelengths:
    with lambda_i = 2 pi / theta_i and L the original context,
        lambda_i > L / low_freq_factor   ->  theta_i / factor                      (long waves: interpolated)
        lambda_i < L / high_freq_factor  ->  theta_i                               (short waves: kept)
        otherwise, with s = (L / lambda_i - low) / (high - low):  (1 - s) theta_i / factor + s theta_i."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if cfg.rope_scaling == "llama3":
        L, low, high, factor = cfg.rope_original_context, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_factor
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > L / low, inv_freq / factor, inv_freq)
        smooth = (L / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < L / high) & ~(wavelength > L / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq                                                         # (d/2,)


def rope_cos_sin(positions, inv_freq):
    """Rotary position embedding angles (Su et al. 2021, RoFormer): angle[t, i] = position_t * theta_i.
    positions (B, T), inv_freq (d/2,) -> cos, sin (B, 1, T, d): [cos, cos] and [-sin, sin] over the two halves,
    the factors apply_rope multiplies x and its swapped halves by."""
    angles = positions.float()[..., None] * inv_freq            # (B, T, d/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]


def apply_rope(x, cos, sin):
    """Rotate each pair (x1_i, x2_i) of the two halves by angle[t, i]; then q_i . k_j depends only on i - j:
        (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)   = x [cos, cos] + [x2, x1] [-sin, sin]
    (bit for bit the same: negation is exact). x (B, H, T, d)"""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([x2, x1], dim=-1) * sin).type_as(x)


def attention_mask(q_doc, k_doc, q_index, k_index):
    """Boolean mask (B, 1, Tq, Tk): key j is visible to query i iff j <= i (causal, by index in the row)
    and both belong to the same document (packing, and left padding: pads are their own document)."""
    causal = k_index[None, None, :] <= q_index[None, :, None]            # (1, Tq, Tk)
    same_doc = q_doc[:, :, None] == k_doc[:, None, :]                    # (B, Tq, Tk)
    return (causal & same_doc)[:, None]


SLOT_GROWTH = 4   # an eager cache's buffers grow this many slots at a time (KVCache)


class KVCache:
    """A static key/value cache (Pope et al. 2022; gpt-fast's static cache): each layer's keys and values
    live in one buffer (B, n_kv_head, max_len, head_dim), allocated once and zeroed, and written in place at
    the slots of the current call, so decoding one token costs O(T), not O(T^2), and every decode step sees
    the same tensor shapes (it can be compiled or captured as a CUDA graph).

    doc_ids (B, max_len): the document of each written slot, -1 where nothing is written yet, so an
    empty slot is never attended to. `length` slots are written (the same for every row: prompts are
    left-padded to one length). keep(rows) drops finished rows or repeats a row.

    zeroed=False is for eager decoding, which attends to the written slots only: its buffers hold those slots
    and room for at most SLOT_GROWTH - 1 more, and are re-laid out (the written slots copied to a larger buffer)
    when a write does not fit. Attention reads each (row, head)'s slots [0, length); with rows max_len slots
    apart, a CPU's prefetchers stream those reads at a third of the speed of rows a few slots apart (GRPO's
    rollout from a trained policy: 1.2x faster overall, the same numbers; docs/performance.md)."""

    def __init__(self, cfg: Config, batch_size: int, max_len: int, device, zeroed: bool = True):
        self.k = [None] * cfg.n_layer
        self.v = [None] * cfg.n_layer
        self.shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.doc_ids = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)                       # (L,) key index of each slot
        self.length = 0
        self.zeroed = zeroed

    def buffer(self, like, batch_size: int, slots: int):
        """A (batch_size, Hkv, slots, d) buffer in like's dtype and device: zeros, for a step that reads every
        slot (fixed shapes: an empty slot gets weight 0, and 0 times an uninitialised NaN is NaN), or
        uninitialised with zeroed=False, for callers that read written slots only (eager decoding)."""
        new = torch.zeros if self.zeroed else torch.empty
        return new((batch_size, self.shape[1], slots, self.shape[3]), dtype=like.dtype, device=like.device)

    def grown(self, old, like):
        """A buffer with room for the write `like` (B, Hkv, T, d) at `length`, holding old's written slots (old:
        None before the first write): all max_len slots when zeroed (allocated once), else the slots needed
        plus SLOT_GROWTH - 1 (at most max_len)."""
        needed = self.length + like.shape[2]
        slots = self.shape[2] if self.zeroed else min(self.shape[2], needed + SLOT_GROWTH - 1)
        new = self.buffer(like, self.shape[0], slots)
        if old is not None:
            new[:, :, :self.length] = old[:, :, :self.length]
        return new

    def write(self, buffer, dim: int, values, index=None) -> None:
        """Write values into buffer along its slot dimension dim: at the slots `index` (T,), a tensor (a compiled
        or captured step: the slot is data, so one graph serves every step), or with index None at the next T
        slots from `length` on (eager: a strided copy, cheaper than index_copy_). Values take buffer's dtype."""
        if index is None:
            buffer.narrow(dim, self.length, values.shape[dim]).copy_(values)
        else:
            buffer.index_copy_(dim, index, values.to(buffer.dtype))

    def update(self, layer: int, k, v, index=None):
        """Write this call's k, v (B, Hkv, T, d) at the slots `index` (see write); return the whole buffers (the
        caller attends to the slots its mask covers: all of them at fixed shapes, the written ones eagerly)."""
        # allocated at the first write, in the dtype the layer produces (bf16 under autocast); grown when an eager
        # write does not fit (a compiled step writes at a slot tensor into full buffers and never reads `length`,
        # a Python int that torch.compile would otherwise recompile the step for at every new value)
        if self.k[layer] is None or (index is None and self.length + k.shape[2] > self.k[layer].shape[2]):
            self.k[layer], self.v[layer] = self.grown(self.k[layer], k), self.grown(self.v[layer], v)
        self.write(self.k[layer], 2, k, index)
        self.write(self.v[layer], 2, v, index)
        return self.k[layer], self.v[layer]                                      # (B, Hkv, L, d)

    def keep(self, rows) -> None:
        """The batch becomes the rows `rows` (a LongTensor) of this one: finished rows dropped stop costing
        work, and a row repeated copies a prompt's prefilled keys and values to each of its samples. The
        `length` written slots are copied: to the front rows of the same buffers when the batch shrinks (the
        rows are gathered before they are written, so any order is safe; fresh memory would cost more to
        touch than the copy), into new buffers when it grows. Slots past `length` are unwritten in every row."""
        written = slice(0, self.length)
        in_place = len(rows) <= self.shape[0]

        def take(old):
            if old is None:
                return None
            new = old[:len(rows)] if in_place else self.buffer(old, len(rows), old.shape[2])
            new[:, :, written] = old[rows, :, written]
            return new
        self.k, self.v = [take(k) for k in self.k], [take(v) for v in self.v]
        if in_place:
            doc_ids = self.doc_ids[:len(rows)]
        else:
            doc_ids = self.doc_ids.new_full((len(rows), self.shape[2]), -1)
        doc_ids[:, written] = self.doc_ids[rows, written]
        self.doc_ids = doc_ids
        self.shape = (len(rows), *self.shape[1:])


def decode_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v for ONE query per row, as two batched matmuls.
    q (B, H, 1, d), k/v (B, Hkv, L, d), mask (B, 1, 1, L) bool. Grouped-query heads share their K/V
    without copying them: the H query heads are viewed as (Hkv, H/Hkv) groups (SDPA needs repeated heads
    or enable_gqa, torch >= 2.5). Speed against scaled_dot_product_attention on torch 2.13, 2 CPU cores:
    on par at GRPO's 256 rows, slower at 1-32 rows (docs/performance.md)."""
    B, H, _, d = q.shape
    Hkv = k.shape[1]
    q = q.reshape(B, Hkv, H // Hkv, d)                                          # (B, Hkv, H/Hkv, d)
    scores = (q @ k.transpose(-1, -2)) * d ** -0.5                              # (B, Hkv, H/Hkv, L)
    scores = torch.where(mask, scores.float(), -math.inf)
    y = scores.softmax(-1).to(v.dtype) @ v                                      # (B, Hkv, H/Hkv, d)
    return y.reshape(B, H, 1, d)


class Attention(nn.Module):
    """Multi-head causal self-attention with grouped-query attention (Ainslie et al. 2023).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + mask) V, through F.scaled_dot_product_attention
    (fused kernels on CUDA). With n_kv_head < n_head each K/V head serves n_head / n_kv_head query heads.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias or cfg.qkv_bias)
        self.kv = nn.Linear(cfg.n_embd, 2 * cfg.n_kv_head * cfg.head_dim, bias=cfg.bias or cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.proj.residual = True   # scaled init
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None   # Qwen3
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int, cache_index=None):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)        # (B, H, T, d)
        k, v = self.kv(x).view(B, T, 2, self.n_kv_head, self.head_dim).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)                                  # (B, Hkv, T, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v, cache_index)
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]                # (B, Hkv, L, d): the visible slots
            if T == 1 and x.device.type == "cpu":
                return self.proj(decode_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))
        if self.n_kv_head != self.n_head:
            repeat = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.cfg.dropout if self.training else 0.0)                   # (B, H, T, d)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


ACTIVATIONS = {
    "gelu": F.gelu,                                   # GELU(x) = x * Phi(x) (Hendrycks & Gimpel 2016)
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),            # squared ReLU (So et al. 2021, Primer)
    "swiglu": F.silu,                                 # SwiGLU = SiLU(x W1) * (x W3)  (Shazeer 2020)
    "geglu": F.gelu,                                  # GEGLU  = GELU(x W1) * (x W3)
}


class FeedForward(nn.Module):
    """Position-wise FFN: W2 act(W1 x) or, gated (GLU variants, Shazeer 2020), W2 (act(W1 x) * W3 x)."""

    def __init__(self, cfg: Config, kind: str):
        super().__init__()
        self.act = ACTIVATIONS[kind]
        self.gated = kind in ("swiglu", "geglu")
        self.w1 = nn.Linear(cfg.n_embd, cfg.ffn_width, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.n_embd, cfg.ffn_width, bias=cfg.bias) if self.gated else None
        self.w2 = nn.Linear(cfg.ffn_width, cfg.n_embd, bias=cfg.bias)
        self.w2.residual = True

    def forward(self, x):
        h = self.act(self.w1(x))
        return self.w2(h * self.w3(x) if self.gated else h)


def load_balancing_loss(router_probs, expert_index, n_expert: int):
    """Switch Transformer load-balancing loss (Fedus et al. 2021):  L = E * sum_e f_e * P_e

    f_e = share of the N*k token->expert assignments that go to expert e, P_e = mean router probability
    of e. Equals 1 when routing is uniform and grows as it concentrates (up to E).
    router_probs (N, E), expert_index (N, k)."""
    counts = torch.zeros(n_expert, device=router_probs.device).index_add_(
        0, expert_index.reshape(-1), torch.ones(expert_index.numel(), device=router_probs.device))
    f = counts / expert_index.numel()                                             # (E,)
    P = router_probs.float().mean(0)                                              # (E,)
    return n_expert * (f * P).sum()


def router_z_loss(router_logits):
    """Router z-loss (Zoph et al. 2022, ST-MoE): mean over tokens of (log sum_e exp z_e)^2."""
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()


class MoE(nn.Module):
    """Mixture of experts FFN: each token goes to its top-k of n experts, outputs mixed by the
    renormalised router probabilities:  y = sum_{e in topk(p)} (p_e / sum_{topk} p) * FFN_e(x)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(cfg.n_embd, cfg.n_expert, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg, "swiglu") for _ in range(cfg.n_expert))
        self.aux_loss = torch.zeros(())

    def route(self, x):
        """x (N, C) -> weights (N, k) summing to 1, experts (N, k), probs (N, E), logits (N, E)."""
        logits = self.router(x)                                                   # (N, E)
        probs = logits.float().softmax(-1)
        top_p, experts = probs.topk(self.cfg.moe_top_k, dim=-1)                   # (N, k)
        return top_p / top_p.sum(-1, keepdim=True), experts, probs, logits

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                              # (N, C)
        weights, experts, probs, logits = self.route(x)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (experts == e).nonzero(as_tuple=True)                   # tokens routed to e
            if token.numel():
                y.index_add_(0, token, (expert(x[token]) * weights[token, slot, None]).to(y.dtype))
        self.aux_loss = (self.cfg.moe_balance_coef * load_balancing_loss(probs, experts, self.cfg.n_expert)
                         + self.cfg.moe_z_coef * router_z_loss(logits))
        return y.view(shape)


class Block(nn.Module):
    """One transformer block; pre-norm x + f(Norm(x)) (GPT-2) or post-norm Norm(x + f(x)) (Vaswani)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = Attention(cfg)
        self.ffn = MoE(cfg) if cfg.ffn == "moe" else FeedForward(cfg, cfg.ffn)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache, layer, cache_index=None):
        if self.pre:
            x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache, layer, cache_index))
            return x + self.drop(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, rope, mask, cache, layer, cache_index)))
        return self.norm2(x + self.drop(self.ffn(x)))


class GPT(nn.Module):
    """Decoder-only transformer. forward(tokens (B, T)) -> logits (B, T, V) in float32.

    Optional per-token `positions` (B, T) and `doc_ids` (B, T): with doc_ids a token attends only to
    earlier tokens of the same document, so a packed row (or a left-padded one) gives each document
    the logits it would have alone. `cache` (a KVCache) appends this call's tokens after the cached ones.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.checkpoint_blocks = False   # gradient checkpointing: activation memory of one block, not all L
        self.compiled_blocks = None      # compile_blocks(): torch.compile'd blocks for training forwards
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight   # Press & Wolf 2017

    def _init_weights(self, module):
        """N(0, 0.02); residual output projections N(0, 0.02 / sqrt(2 L)) so the residual stream's
        variance does not grow with depth (GPT-2)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def compile_blocks(self, backend: str = "inductor") -> None:
        """torch.compile each transformer block for the training forward (no cache, gradients on), as
        torchtitan compiles per block: a block's norms, RoPE and activations fuse, and its Python overhead
        goes. The compiled blocks wrap these ones, so the parameters, state_dict, optimizer and checkpoints
        are unchanged; forwards without gradients (evaluation, a reference) and decoding stay eager."""
        self.compiled_blocks = [torch.compile(block, backend=backend) for block in self.blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())   # tied weights are counted once

    @property
    def aux_loss(self):
        """MoE load-balancing + router z-loss of the last forward pass (0 without MoE): add it to the loss."""
        losses = [b.ffn.aux_loss for b in self.blocks if isinstance(b.ffn, MoE)]
        return sum(losses) if losses else torch.zeros((), device=self.wte.weight.device)

    def hidden(self, tokens, positions=None, doc_ids=None, cache: KVCache | None = None, cache_index=None):
        """Final normalised hidden states (B, T, C): what the LM head, a reward head or a value head reads.

        With a cache, this call's tokens are written at the slots `cache_index` (T,) (by default the next
        T slots, and cache.length advances) and attend to every written slot of their own document up to
        their own. A caller that passes cache_index (the compiled decode step) advances cache.length itself."""
        B, T = tokens.shape
        advance = cache is not None and cache_index is None
        if advance:
            cache_index = torch.arange(cache.length, cache.length + T, device=tokens.device)
        if positions is None:
            positions = (cache_index if cache is not None else torch.arange(T, device=tokens.device)).expand(B, T)
        x = self.wte(tokens)                                                      # (B, T, C)
        if self.wpe is not None:
            capturing = torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())
            if not capturing and int(positions.max()) >= self.config.block_size:
                raise ValueError(f"position {int(positions.max())} >= block_size {self.config.block_size}")
            x = x + self.wpe(positions)
        x = self.drop(x)
        rope = None
        if self.wpe is None:   # fp32 frequencies from the config on every call: cheap, and never cast to bf16
            rope = rope_cos_sin(positions, rope_frequencies(self.config, tokens.device))
        mask = None                                  # None = plain causal (fast path)
        if cache is not None:
            if doc_ids is None:
                doc_ids = torch.zeros(B, T, dtype=torch.long, device=tokens.device)
            cache.write(cache.doc_ids, 1, doc_ids, None if advance else cache_index)
            # Which slots the mask covers, and so attention reads: the written ones when this call knows
            # where it writes (a Python int; eager decoding attends to 20 slots, not the buffer's 100+),
            # the whole buffer when the slots are a tensor (a compiled step: the same shapes every step).
            visible = cache.length + T if advance else cache.doc_ids.shape[1]
            mask = attention_mask(doc_ids, cache.doc_ids[:, :visible], cache_index, cache.slots[:visible])   # (B,1,T,L)
        elif doc_ids is not None:
            index = torch.arange(T, device=tokens.device)
            mask = attention_mask(doc_ids, doc_ids, index, index)
        training = cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            if training and self.compiled_blocks is not None:
                block = self.compiled_blocks[layer]
            if self.checkpoint_blocks and training:
                # gradient checkpointing: keep only each block's input, recompute the block in backward
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, layer, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, layer, None if advance else cache_index)
        if advance:
            cache.length += T
        return self.norm_f(x)

    def forward(self, tokens, positions=None, doc_ids=None, cache: KVCache | None = None, cache_index=None,
                return_hidden: bool = False):
        """Logits (B, T, V) in float32; or, with return_hidden, the final hidden states (B, T, C), for
        callers that apply the LM head in chunks (token_logprobs) and still go through forward (DDP)."""
        h = self.hidden(tokens, positions, doc_ids, cache, cache_index)
        return h if return_hidden else self.lm_head(h).float()


def unwrap(model) -> GPT:
    """The GPT inside a DistributedDataParallel (or any .module) wrapper."""
    return model.module if hasattr(model, "module") else model


def padded_batch(seqs, pad_id: int, side: str = "right", device=None):
    """list of token lists -> tokens (B, T) padded with pad_id on `side`, mask (B, T) True at real tokens."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        tokens[i, sl] = torch.as_tensor(s, dtype=torch.long)
        mask[i, sl] = True
    return tokens.to(device), mask.to(device)


def left_pad_inputs(mask):
    """For a left-padded batch: positions that start at 0 on the first real token, and doc_ids that
    put pads in a document of their own (0; real tokens 1), so every row's logits equal the row alone."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions, mask.long()


# ----------------------------------------------------------------------------------------------
# 2. Tokenizer
# ----------------------------------------------------------------------------------------------

EOT, PAD = "<|endoftext|>", "<|pad|>"
BYTE_EOT_ID, BYTE_PAD_ID = 256, 257
# GPT-2's pre-tokenisation split; with no merges it does not change the byte-level result.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def get_tokenizer(name: str = "bytes") -> tiktoken.Encoding:
    """"bytes": 256 byte tokens, <|endoftext|> = 256, <|pad|> = 257; built in code, no download.
    Any named tiktoken encoding ("gpt2", "cl100k_base", "o200k_base") gains a <|pad|> token at the end."""
    if name == "bytes":
        return tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN,
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={EOT: BYTE_EOT_ID, PAD: BYTE_PAD_ID})
    try:
        base = tiktoken.get_encoding(name)
    except Exception as e:   # unknown name, or the ranks file cannot be downloaded offline
        raise UserError(f"tokenizer {name!r} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        "offline, use the built-in 'bytes' tokenizer") from None
    specials = dict(base._special_tokens)
    specials.setdefault(PAD, base.n_vocab)
    return tiktoken.Encoding(name=name, pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens=specials)


def pad_id(enc: tiktoken.Encoding) -> int:
    """The id that fills padded positions: <|pad|> where the tokenizer has one (ours), else the checkpoint's
    pad or end-of-sequence token (a real vocabulary has no spare row). Padded positions never carry loss."""
    specials = enc._special_tokens
    if PAD in specials:
        return specials[PAD]
    return getattr(enc, "pad_token_id", None) if getattr(enc, "pad_token_id", None) is not None else enc.eot_token


# Chat templates: an instruct model expects its prompts wrapped in the turns it was tuned on. The user's
# text is always encoded as ordinary text; only the template's own markers are special tokens.
CHAT_FORMATS = ("none", "chatml", "llama3")


def chat_format_of(enc: tiktoken.Encoding, choice: str = "auto") -> str:
    """auto: ChatML if the tokenizer has <|im_start|> (Qwen, SmolLM2), Llama 3's headers if it has
    <|start_header_id|>, else none (the byte-level models of this project: plain prompts)."""
    if choice != "auto":
        if choice not in CHAT_FORMATS:
            raise UserError(f"--chat-template {choice}: choose auto, {', '.join(CHAT_FORMATS)}")
        return choice
    specials = enc._special_tokens
    return "chatml" if "<|im_start|>" in specials else "llama3" if "<|start_header_id|>" in specials else "none"


def set_chat_format(enc: tiktoken.Encoding, choice: str = "auto") -> tiktoken.Encoding:
    """Record on the tokenizer which template its prompts get (encode_prompt, end_of_turn and stop_ids
    read it); a template whose markers the tokenizer lacks is a UserError."""
    template = chat_format_of(enc, choice)
    needed = {"chatml": ("<|im_start|>", "<|im_end|>"), "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
    missing = [t for t in needed.get(template, ()) if t not in enc._special_tokens]
    if missing:
        raise UserError(f"--chat-template {template}: this tokenizer has no {missing[0]} token")
    enc.chat_format = template
    return enc


def encode_prompt(enc: tiktoken.Encoding, prompt: str) -> list[int]:
    """A prompt as the model expects it before its answer:
    none:   the text itself
    chatml: <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n
    llama3: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>
            <|start_header_id|>assistant<|end_header_id|>\n\n"""
    template = getattr(enc, "chat_format", "none")
    special = enc._special_tokens
    if template == "chatml":
        start, end = special["<|im_start|>"], special["<|im_end|>"]
        return ([start] + encode(enc, "user\n" + prompt) + [end] + encode(enc, "\n") + [start]
                + encode(enc, "assistant\n"))
    if template == "llama3":
        begin = [special["<|begin_of_text|>"]] if "<|begin_of_text|>" in special else []
        head, tail = special["<|start_header_id|>"], special["<|end_header_id|>"]
        return (begin + [head] + encode(enc, "user") + [tail] + encode(enc, "\n\n" + prompt) + [special["<|eot_id|>"]]
                + [head] + encode(enc, "assistant") + [tail] + encode(enc, "\n\n"))
    return encode(enc, prompt)


def end_of_turn(enc: tiktoken.Encoding) -> int:
    """The token that ends an answer: <|im_end|> (ChatML), <|eot_id|> (Llama 3), else <|endoftext|>."""
    template = getattr(enc, "chat_format", "none")
    if template == "chatml":
        return enc._special_tokens["<|im_end|>"]
    if template == "llama3":
        return enc._special_tokens["<|eot_id|>"]
    return enc.eot_token


def stop_ids(enc: tiktoken.Encoding) -> tuple:
    """Where sampling stops: the end of the turn, and the end-of-sequence token(s) of the checkpoint."""
    return tuple(sorted({end_of_turn(enc), enc.eot_token, *getattr(enc, "stop_token_ids", ())}))


def encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Ordinary text to ids; special-token strings in the text are encoded as plain text, never as specials."""
    return enc.encode_ordinary(text)


def decode(enc: tiktoken.Encoding, ids) -> str:
    """Ids to text, dropping <|endoftext|> and <|pad|>."""
    skip = {enc.eot_token, pad_id(enc), end_of_turn(enc)}
    return enc.decode([int(i) for i in ids if int(i) not in skip])


def tokenizer_spec(enc: tiktoken.Encoding) -> dict:
    """What a checkpoint stores of its tokenizer: the name of a built-in or tiktoken encoding, or the whole
    spec of a real model's tokenizer (tokens as bytes, so it reloads offline); and its chat format."""
    spec = dict(enc.spec) if isinstance(enc, SpecEncoding) else {"name": enc.name, "n_vocab": enc.n_vocab}
    spec["chat_format"] = getattr(enc, "chat_format", "none")
    return spec


def tokenizer_from_spec(spec: dict) -> tiktoken.Encoding:
    """The tokenizer a checkpoint stores. A full spec (with "ranks") is checked field by field; a name must
    be the built-in byte encoding or one of tiktoken's, so a checkpoint can never make us fetch a file."""
    if isinstance(spec, dict) and "ranks" in spec:
        try:
            enc = encoding_from_spec({k: v for k, v in spec.items() if k != "chat_format"})
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or type(spec.get("n_vocab")) is not int:
            raise UserError("tokenizer spec must be {'name': str, 'n_vocab': int} or a full spec")
        if spec["name"] != "bytes" and spec["name"] not in tiktoken.list_encoding_names():
            raise UserError(f"unknown tokenizer {spec['name'][:40]!r}")
        enc = get_tokenizer(spec["name"])
        if enc.n_vocab != spec["n_vocab"]:
            raise UserError(f"tokenizer {spec['name']!r} has {enc.n_vocab} tokens, the checkpoint expects {spec['n_vocab']}")
    format_ = spec.get("chat_format", "auto")
    return set_chat_format(enc, format_ if format_ in CHAT_FORMATS else "auto")


# Pre-tokenisation splits beside GPT-2's (SPLIT_PATTERN, Hugging Face's ByteLevel(use_regex=True)):
# Digits(individual_digits=True) then GPT-2's split (SmolLM2, StarCoder; llama.cpp's "smollm"), as one
# regex: a digit stands alone, and whitespace before a digit ends where the digit-free piece ended.
DIGITS_GPT2_PATTERN = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# GGUF's tokenizer.ggml.pre -> the split llama.cpp applies (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*).
GGUF_PRE_PATTERNS = {"gpt2": SPLIT_PATTERN, "smollm": DIGITS_GPT2_PATTERN, "starcoder": DIGITS_GPT2_PATTERN,
                     "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN,
                     "qwen2": QWEN2_PATTERN, "deepseek-r1-qwen": QWEN2_PATTERN}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py): bytes that are printable
    Latin-1 map to themselves, the other 68 to U+0100.. in byte order. tokenizer.json and GGUF spell
    every byte-level token in these characters (a space is "Ġ", U+0120)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}


def token_bytes(token: str) -> bytes | None:
    """A byte-level token's raw bytes; None if it uses a character outside GPT-2's table."""
    try:
        return bytes(CHAR_TO_BYTE[char] for char in token)
    except KeyError:
        return None


def check_merges(merges, ids: dict[str, int], where: str) -> None:
    """tiktoken's BPE merges, at each step, the adjacent pair whose concatenation has the lowest rank
    (= token id); Hugging Face's merges the pair listed first in `merges`. So tiktoken can follow the
    list only if merge k makes a token whose id does not decrease with k, and whose parts are tokens.
    GPT-2, Llama 3 (which lists every split of a token, consecutively), Qwen and SmolLM2 pass; a file
    that fails is refused rather than encoded differently. (tiktoken may still merge an adjacent pair
    that the list lacks but whose concatenation is a token; on Qwen3's and Llama 3's tokenizer.json
    and SmolLM2's GGUF that never changed an encoding in 4,000 random texts.)"""
    previous = -1
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = ids.get(left + right)
        if left not in ids or right not in ids or merged is None:
            raise ValueError(f"{where}: merge {index} ({left!r} + {right!r}) uses or makes a token not in the vocab")
        if merged < previous:
            raise ValueError(f"{where}: merge {index} makes token {merged}, below an earlier merge's {previous}; "
                             "tiktoken ranks merges by token id, so this vocabulary cannot be a tiktoken Encoding")
        previous = merged


def pattern_from_pre_tokenizer(pre_tokenizer, where: str) -> str:
    """tokenizer.json's pre_tokenizer -> one tiktoken split regex. Accepted (what byte-level models ship):
    ByteLevel(use_regex=True) -> GPT-2's; [Digits(individual_digits), ByteLevel(use_regex=True)] ->
    DIGITS_GPT2_PATTERN; [Split(Regex P, Isolated), ByteLevel(use_regex=False)] -> P."""
    steps = pre_tokenizer.get("pretokenizers", []) if isinstance(pre_tokenizer, dict) and \
        pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    kinds = [step.get("type") if isinstance(step, dict) else None for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
            return SPLIT_PATTERN
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
            return DIGITS_GPT2_PATTERN
        split = steps[0]
        if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True) and \
                isinstance(split.get("pattern"), dict) and isinstance(split["pattern"].get("Regex"), str) and \
                split.get("behavior") == "Isolated" and not split.get("invert"):
            return split["pattern"]["Regex"]
    raise ValueError(f"{where}: pre_tokenizer {kinds} is not a byte-level split this reader knows "
                     "(ByteLevel; Digits + ByteLevel; Split(Regex, Isolated) + ByteLevel)")


def normalizer_from_json(normalizer, where: str) -> str | None:
    """tokenizer.json's normalizer -> "NFC" or None (Qwen's is NFC; GPT-2's, Llama 3's, SmolLM2's none)."""
    steps = normalizer.get("normalizers", []) if isinstance(normalizer, dict) and \
        normalizer.get("type") == "Sequence" else [normalizer] if normalizer else []
    kinds = [step.get("type") if isinstance(step, dict) else None for step in steps]
    if kinds in ([], ["NFC"]):
        return "NFC" if kinds else None
    raise ValueError(f"{where}: normalizer {kinds} is not supported (none or NFC)")


def token_content(value) -> str | None:
    """tokenizer_config.json writes a token as "text" or as {"content": "text", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def finish_spec(spec: dict, where: str) -> dict:
    """Check bos/eos/pad name tokens, vocab_size covers every id, and check_spec; returns the spec."""
    known = {*spec["special_tokens"], *spec["added_tokens"]}
    for role in ("bos", "eos", "pad"):
        token = spec[role]
        if token is not None and token not in known and token.encode("utf-8") not in spec["ranks"]:
            raise ValueError(f"{where}: the {role} token {token[:80]!r} is not in the vocabulary")
    top = max([*spec["ranks"].values(), *spec["special_tokens"].values(), *spec["added_tokens"].values()],
              default=-1)
    if spec["vocab_size"] is None:
        spec["vocab_size"] = top + 1
    if type(spec["vocab_size"]) is not int or spec["vocab_size"] <= top:
        raise ValueError(f"{where}: vocab_size {spec['vocab_size']} is not above the largest token id {top}")
    check_spec(spec, where)
    return spec


def tokenizer_spec_from_json(tokenizer_json: dict, tokenizer_config: dict | None = None,
                             vocab_size: int | None = None, where: str = "tokenizer.json") -> dict:
    """The spec of a Hugging Face byte-level BPE tokenizer.json (GPT-2, Llama 3, Qwen2/2.5/3, SmolLM2).

    Spec: {"name", "pat_str", "ranks": {bytes: id}, "special_tokens": {str: id}, "added_tokens": {str: id},
    "normalized_added_tokens": [str], "normalizer": "NFC" | None, "bos", "eos", "pad": str | None,
    "vocab_size": int (embedding rows, >= the largest id + 1), "chat_template": str (optional)}.
    - ranks: the vocabulary through GPT-2's byte table; a token's rank is its id (see check_merges).
    - added tokens marked "special" are special_tokens (never produced from text by encode_text);
      the others (Qwen3's <think>) are added_tokens, split out of text as single ids like HF does;
      those with "normalized": true are matched after normalisation (normalized_added_tokens).
    - vocab_size: pass config.json's; the default is the largest id + 1."""
    try:
        return spec_from_json(tokenizer_json, tokenizer_config or {}, vocab_size, str(where))
    except (KeyError, TypeError, AttributeError, IndexError) as error:   # a field missing or of the wrong type
        raise ValueError(f"{where}: malformed tokenizer files ({type(error).__name__}: {error})") from None


def spec_from_json(tokenizer_json: dict, config: dict, vocab_size: int | None, where: str) -> dict:
    """The work of the function above, which turns a missing or mistyped field into a ValueError."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix") or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{where}: not a byte-level BPE model (model.type BPE, no byte_fallback, no affixes)")
    decoder = tokenizer_json.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise ValueError(f"{where}: decoder {decoder.get('type')!r} is not ByteLevel")
    pat_str = pattern_from_pre_tokenizer(tokenizer_json.get("pre_tokenizer"), where)
    special_tokens, added_tokens, normalized_added = {}, {}, []
    for token in tokenizer_json.get("added_tokens") or []:
        content, token_id = token["content"], token["id"]
        if token.get("special"):
            special_tokens[content] = token_id
            continue
        if token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            raise ValueError(f"{where}: added token {content!r} uses lstrip/rstrip/single_word, not supported")
        added_tokens[content] = token_id
        if token.get("normalized"):
            normalized_added.append(content)
    added_ids = {*special_tokens.values(), *added_tokens.values()}
    vocab = model["vocab"]
    check_merges(model.get("merges") or [], vocab, where)
    ranks = {}
    for token, token_id in vocab.items():
        if token_id in added_ids:
            continue
        raw = token_bytes(token)
        if raw is None:
            raise ValueError(f"{where}: vocabulary token {token[:40]!r} is not in GPT-2's byte alphabet")
        ranks[raw] = token_id
    spec = {"name": "tokenizer.json", "pat_str": pat_str, "ranks": ranks, "special_tokens": special_tokens,
            "added_tokens": added_tokens, "normalized_added_tokens": normalized_added,
            "normalizer": normalizer_from_json(tokenizer_json.get("normalizer"), where),
            "bos": token_content(config.get("bos_token")), "eos": token_content(config.get("eos_token")),
            "pad": token_content(config.get("pad_token")), "vocab_size": vocab_size}
    if isinstance(config.get("chat_template"), str):
        spec["chat_template"] = config["chat_template"]
    return finish_spec(spec, where)


def tokenizer_spec_from_gguf(metadata: dict, vocab_size: int | None = None, where: str = "GGUF") -> dict:
    """The spec of a GGUF file's tokenizer (tokenizer.ggml.model == "gpt2", byte-level BPE).
    tokenizer.ggml.tokens are the vocabulary (id = position), token_type 3 (control) -> special_tokens,
    4 (user-defined) -> added_tokens, the rest -> ranks; tokenizer.ggml.merges are checked like
    tokenizer.json's; tokenizer.ggml.pre picks the split (GGUF_PRE_PATTERNS); bos/eos/padding ids
    name the tokens; tokenizer.chat_template is kept. vocab_size defaults to {arch}.vocab_size."""
    try:
        return spec_from_gguf(metadata, vocab_size, str(where))
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"{where}: malformed tokenizer metadata ({type(error).__name__}: {error})") from None


def spec_from_gguf(metadata: dict, vocab_size: int | None, where: str) -> dict:
    """The work of the function above, which turns a missing or mistyped field into a ValueError."""
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{where}: tokenizer.ggml.model {metadata.get('tokenizer.ggml.model')!r} is not 'gpt2' "
                         "(byte-level BPE)")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre not in GGUF_PRE_PATTERNS:
        raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r} is not one of {sorted(GGUF_PRE_PATTERNS)}")
    tokens = metadata.get("tokenizer.ggml.tokens")
    token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens or [])
    if not isinstance(tokens, list) or len(token_types) != len(tokens):
        raise ValueError(f"{where}: tokenizer.ggml.tokens and token_type must be lists of one length")
    ranks, special_tokens, added_tokens = {}, {}, {}
    for token_id, (token, token_type) in enumerate(zip(tokens, token_types)):
        if token_type == 3:
            special_tokens[token] = token_id
        elif token_type == 4:
            added_tokens[token] = token_id
        else:   # as transformers' GGUF reader: a token outside the byte alphabet is its UTF-8 bytes
            ranks[token_bytes(token) or token.encode("utf-8")] = token_id
    check_merges(metadata.get("tokenizer.ggml.merges") or [], {token: i for i, token in enumerate(tokens)}, where)

    def token_named(key):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if type(token_id) is int and 0 <= token_id < len(tokens) else None

    architecture = metadata.get("general.architecture")
    spec = {"name": f"gguf:{pre}", "pat_str": GGUF_PRE_PATTERNS[pre], "ranks": ranks,
            "special_tokens": special_tokens, "added_tokens": added_tokens, "normalized_added_tokens": [],
            "normalizer": None, "bos": token_named("bos_token_id"), "eos": token_named("eos_token_id"),
            "pad": token_named("padding_token_id"),
            "vocab_size": vocab_size or metadata.get(f"{architecture}.vocab_size")}
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        spec["chat_template"] = metadata["tokenizer.chat_template"]
    return finish_spec(spec, where)


def tokenizer_spec_from_tiktoken_file(path: str, special_tokens: dict[str, int], pat_str: str = LLAMA3_PATTERN,
                                      bos: str | None = None, eos: str | None = None, pad: str | None = None,
                                      vocab_size: int | None = None) -> dict:
    """The spec of a tiktoken ranks file (Llama 3's tokenizer.model): one "base64(token bytes) rank"
    per line. Its special tokens are not in the file: pass them (Llama 3's tokenizer_config.json
    lists them in added_tokens_decoder: <|begin_of_text|> = 128000, ...)."""
    ranks = {}
    try:
        with open(path, "rb") as file:
            for line_number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                fields = line.split()
                if len(fields) != 2 or not fields[1].isdigit():
                    raise ValueError(f"{path}:{line_number}: expected 'base64-token rank'")
                try:
                    token = base64.b64decode(fields[0], validate=True)
                except binascii.Error:
                    raise ValueError(f"{path}:{line_number}: the token is not base64") from None
                if token in ranks:
                    raise ValueError(f"{path}:{line_number}: token {token!r} appears twice")
                ranks[token] = int(fields[1])
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({type(error).__name__}: {error})") from None
    if not ranks:
        raise ValueError(f"{path}: no tokens")
    spec = {"name": f"tiktoken:{os.path.basename(path)}", "pat_str": pat_str, "ranks": ranks,
            "special_tokens": dict(special_tokens), "added_tokens": {}, "normalized_added_tokens": [],
            "normalizer": None, "bos": bos, "eos": eos, "pad": pad, "vocab_size": vocab_size}
    return finish_spec(spec, path)


def tokenizer_spec_from_encoding(enc: tiktoken.Encoding, vocab_size: int | None = None) -> dict:
    """The spec of a plain tiktoken Encoding (model.get_tokenizer's "bytes", "gpt2", ...), for export."""
    specials = dict(enc._special_tokens)
    spec = {"name": enc.name, "pat_str": enc._pat_str, "ranks": dict(enc._mergeable_ranks),
            "special_tokens": specials, "added_tokens": {}, "normalized_added_tokens": [], "normalizer": None,
            "bos": None, "eos": "<|endoftext|>" if "<|endoftext|>" in specials else None,
            "pad": "<|pad|>" if "<|pad|>" in specials else None, "vocab_size": vocab_size}
    return finish_spec(spec, enc.name)


def check_spec(spec, where: str = "tokenizer spec") -> None:
    """A spec read from a checkpoint is checked before use: every field's type, ids that do not collide,
    a vocab_size above every id. (tiktoken itself rejects a pat_str that is not a valid regex.)"""
    fields = {"name": str, "pat_str": str, "ranks": dict, "special_tokens": dict, "added_tokens": dict,
              "normalized_added_tokens": list, "vocab_size": int}
    if not isinstance(spec, dict) or any(type(spec.get(k)) is not t for k, t in fields.items()) or \
            spec.get("normalizer") not in (None, "NFC") or \
            not all(spec.get(k) is None or type(spec[k]) is str for k in ("bos", "eos", "pad", "chat_template")):
        raise ValueError(f"{where}: needs {', '.join(f'{k} ({t.__name__})' for k, t in fields.items())}, "
                         "normalizer (None or 'NFC'), bos/eos/pad (str or None)")
    groups = [spec["ranks"], spec["special_tokens"], spec["added_tokens"]]
    for group, key_type in zip(groups, (bytes, str, str)):
        if not all(type(k) is key_type and type(v) is int and v >= 0 for k, v in group.items()):
            raise ValueError(f"{where}: token tables must map {key_type.__name__} to ids >= 0")
    ids = [token_id for group in groups for token_id in group.values()]
    if len(set(ids)) != len(ids) or max(ids, default=-1) >= spec["vocab_size"]:
        raise ValueError(f"{where}: two tokens share an id, or an id is not below vocab_size")


class SpecEncoding(tiktoken.Encoding):
    """A tiktoken.Encoding that encodes and decodes like Hugging Face's tokenizer it came from.

    encode_ordinary(text) = encode_text(self, text); decode(ids) = decode_text(self, ids). Attributes:
    spec; normalizer ("NFC" or None); added_tokens {str: id} (non-special, split out of text);
    unknown_bytes (byte values the vocabulary lacks) and unknown_byte_ids (the ids tiktoken gives
    them here, see encoding_from_spec; encode_text never returns them).
    Special and added tokens are also tiktoken special tokens, so encode_single_token and
    encode(..., allowed_special=...) know them. Pickles as its spec."""

    def __init__(self, spec: dict, mergeable_ranks: dict, unknown_byte_ids: frozenset):
        super().__init__(name=spec["name"], pat_str=spec["pat_str"], mergeable_ranks=mergeable_ranks,
                         special_tokens={**spec["special_tokens"], **spec["added_tokens"]})
        self.spec, self.normalizer, self.unknown_byte_ids = spec, spec.get("normalizer"), unknown_byte_ids
        self.added_tokens = dict(spec["added_tokens"])
        normalized = set(spec["normalized_added_tokens"])
        self.raw_added_pattern = added_tokens_pattern([t for t in self.added_tokens if t not in normalized])
        self.normalized_added_pattern = added_tokens_pattern([t for t in self.added_tokens if t in normalized])
        self.known_ids = frozenset((*spec["ranks"].values(), *self._special_tokens.values()))
        self.unknown_bytes = frozenset(b for b in range(256) if bytes([b]) not in spec["ranks"])

    def token_id(self, token: str | None) -> int | None:
        """The id of a special/added token or a vocabulary token named by its text, else None."""
        if token is None:
            return None
        return self._special_tokens.get(token, self.spec["ranks"].get(token.encode("utf-8")))

    @property
    def eot_token(self) -> int:
        """End of sequence: the spec's eos token (Llama 3 has no <|endoftext|>), else <|endoftext|>."""
        found = self.token_id(self.spec.get("eos")) if self.spec.get("eos") else None
        return found if found is not None else self._special_tokens["<|endoftext|>"]

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.spec.get("pad"))

    def encode_ordinary(self, text: str) -> list[int]:
        return encode_text(self, text)

    def decode(self, tokens, errors: str = "replace") -> str:
        return decode_text(self, tokens, errors)

    def __reduce__(self):
        return encoding_from_spec, (self.spec,)


def added_tokens_pattern(tokens) -> re.Pattern | None:
    """Leftmost-longest match of literal tokens (Hugging Face's added-token matcher): longest first."""
    tokens = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def split_on_added(text: str, pattern: re.Pattern | None, added_tokens: dict) -> list:
    """text -> [str | int]: pieces of text between added tokens, and the added tokens' ids."""
    if pattern is None:
        return [text]
    pieces, start = [], 0
    for match in pattern.finditer(text):
        pieces += [text[start:match.start()], added_tokens[match.group()]]
        start = match.end()
    return pieces + [text[start:]]


def encoding_from_spec(spec: dict) -> SpecEncoding:
    """The tiktoken Encoding of a spec.

    Missing single bytes: tiktoken's BPE starts from single bytes and panics (a pyo3 PanicException,
    which `except Exception` does not catch) on a byte with no rank. SmolLM2 lacks 21 of the 256
    (0x04, 0x06, 0x13, 0x14, 0x16, 0x1d, 0xc0, 0xc1, 0xf1, 0xf2, 0xf5-0xff). Each missing byte gets an
    id above every token id and above vocab_size - 1 (no embedding row exists for it), so tiktoken
    never panics. Such an id in tiktoken's output only says "this byte has no token": Hugging Face
    (no unk token) drops the byte, and encode_text does the same."""
    check_spec(spec)
    ranks = dict(spec["ranks"])
    next_free = spec["vocab_size"]          # check_spec: above every token id
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    unknown_byte_ids = frozenset(range(next_free, next_free + len(missing)))
    ranks.update(zip(missing, sorted(unknown_byte_ids)))
    return SpecEncoding(spec, ranks, unknown_byte_ids)


def encode_text(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Text -> ids as Hugging Face's tokenizer encodes it with add_special_tokens=False and special
    tokens treated as text (tokenizers' encode_special_tokens=True): the steps of its
    AddedVocabulary.extract_and_normalize, then BPE:
      1. split out added tokens matched on the raw text (HF's "normalized": false);
      2. normalise (NFC) each remaining piece and split out "normalized": true added tokens;
      3. tiktoken's encode_ordinary on each piece (the pat_str split, then BPE), dropping the ids of
         bytes the vocabulary lacks. (Hugging Face drops such a byte BEFORE its BPE merges, so in the
         rare text holding one, e.g. SmolLM2's six missing ASCII control characters, the tokens on
         either side of it can differ from Hugging Face's; all other text encodes identically.)
    Special-token strings in the text stay plain text. Works on plain tiktoken Encodings too."""
    if not isinstance(enc, SpecEncoding):
        return enc.encode_ordinary(text)
    ids = []
    for piece in split_on_added(text, enc.raw_added_pattern, enc.added_tokens):
        if isinstance(piece, int):
            ids.append(piece)
            continue
        if enc.normalizer:
            piece = unicodedata.normalize(enc.normalizer, piece)
        for part in split_on_added(piece, enc.normalized_added_pattern, enc.added_tokens):
            if isinstance(part, int):
                ids.append(part)
                continue
            ids += [i for i in tiktoken.Encoding.encode_ordinary(enc, part) if i not in enc.unknown_byte_ids]
    return ids


def decode_text(enc: tiktoken.Encoding, ids, errors: str = "replace") -> str:
    """Ids -> text; like Hugging Face's decode(skip_special_tokens=False), ids the tokenizer does not
    have (embedding rows past the vocabulary, the missing-byte ids) are skipped, and invalid UTF-8
    becomes U+FFFD."""
    if not isinstance(enc, SpecEncoding):
        return enc.decode(ids, errors=errors)
    known = [int(i) for i in ids if int(i) in enc.known_ids]
    return tiktoken.Encoding.decode(enc, known, errors=errors)


def tokenizer_json_from_spec(spec: dict) -> dict:
    """A tokenizer.json that Hugging Face's tokenizers/transformers load and that encodes like
    encoding_from_spec(spec). BPE whose vocab is the ranks through GPT-2's byte table; its merges are
    every split of each token into two tokens, ordered by the token's rank (transformers'
    TikTokenConverter does the same), with ignore_merges (a piece that is a token is taken whole):
    Hugging Face then merges, like tiktoken, the adjacent pair whose concatenation ranks lowest.
    Pre-tokenizer: Split(pat_str, Isolated) then ByteLevel; special and added tokens as added_tokens."""
    check_spec(spec)
    ranks = spec["ranks"]
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        for left, right in sorted(splits, key=lambda pair: (ranks[pair[0]], ranks[pair[1]])):
            merges.append(" ".join("".join(BYTE_TO_CHAR[b] for b in part) for part in (left, right)))
    added = [{"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": content in spec["normalized_added_tokens"], "special": special}
             for special, table in ((True, spec["special_tokens"]), (False, spec["added_tokens"]))
             for content, token_id in table.items()]
    # tokenizers gives an added token the id its content has in model.vocab, else the next free id
    # (not the id written in added_tokens), so the vocab lists special and added tokens too, as HF's do.
    vocab = {"".join(BYTE_TO_CHAR[b] for b in token): rank for token, rank in ranks.items()}
    for token in added:
        vocab.setdefault(token["content"], token["id"])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": sorted(added, key=lambda token: token["id"]),
            "normalizer": {"type": "NFC"} if spec.get("normalizer") == "NFC" else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": spec["pat_str"]}, "behavior": "Isolated", "invert": False},
                byte_level]},
            "post_processor": byte_level, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": vocab, "merges": merges}}


def tokenizer_config_from_spec(spec: dict) -> dict:
    """The tokenizer_config.json beside tokenizer_json_from_spec's file (transformers' fast tokenizer):
    no BOS/EOS added by encode, the bos/eos/pad tokens, and the chat template if the spec has one."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "bos_token": spec.get("bos"), "eos_token": spec.get("eos"),
              "pad_token": spec.get("pad"), "unk_token": None, "model_max_length": 1 << 30}
    if spec.get("chat_template"):
        config["chat_template"] = spec["chat_template"]
    return config


# ----------------------------------------------------------------------------------------------
# 3. Sampling and generation
# ----------------------------------------------------------------------------------------------

def sampling_logprobs(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """Log-probabilities (..., V) of the distribution we actually sample from; -inf outside the kept set.

    temperature: softmax(z / tau) (tau == 0: greedy, a point mass on argmax z)
    top_k:       keep the k largest logits (Fan et al. 2018)
    top_p:       keep the smallest set of most likely tokens whose mass reaches p (Holtzman et al. 2020)
    min_p:       keep tokens with p >= min_p * max p (Nguyen et al. 2024)
    The same function serves sampling and the importance ratio, so both use one distribution.
    """
    logits = logits.float()
    if temperature == 0:
        greedy = F.one_hot(logits.argmax(-1), logits.shape[-1]).bool()
        return torch.zeros_like(logits).masked_fill(~greedy, -math.inf)
    if temperature != 1.0:                                      # x / 1 is x: skip the copy
        logits = logits / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, -math.inf)
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(dim=-1, descending=True)
        mass_before = probs.cumsum(-1) - probs                  # mass of the strictly more likely tokens
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True                              # always keep the most likely token
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, keep_sorted)
        logits = logits.masked_fill(~keep, -math.inf)
    if min_p > 0.0:
        logp = logits.log_softmax(-1)
        logits = logits.masked_fill(logp < logp.max(-1, keepdim=True).values + math.log(min_p), -math.inf)
    return logits.log_softmax(-1)


def sample(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           generator=None):
    """Draw one token per row of logits (..., V); return tokens (...,) and their sampling log-probs (...,).

    Inverse-transform sampling: with the cumulative sums c_i = p_1 + ... + p_i and one uniform u in (0, 1] per
    row, the token is the first i with c_i >= u c_V, so P(i) = (c_i - c_(i-1)) / c_V = p_i / c_V. One random
    number per row, where torch.multinomial draws one per token (V of them: 9 % of a CPU rollout at V = 258).
    A token of probability 0 is never drawn: its c_i equals c_(i-1), which was already >= u c_V; and u > 0.
    The sums and u are float64: in fp32 a token's share c_i - c_(i-1) is rounded to about 3e-8 and u comes
    in steps of 6e-8, which at a 152k-token vocabulary would misplace up to 0.5 % of the probability mass."""
    logp = sampling_logprobs(logits, temperature, top_k, top_p, min_p)
    if temperature == 0:
        tokens = logp.argmax(-1)
    else:
        cumulative = logp.double().exp().cumsum(-1)                                            # (..., V)
        u = 1.0 - torch.rand(logp.shape[:-1], generator=generator, dtype=torch.float64, device=logp.device)
        tokens = torch.searchsorted(cumulative, (u * cumulative[..., -1])[..., None]).squeeze(-1)   # (...,)
    return tokens, logp.gather(-1, tokens[..., None]).squeeze(-1)


@dataclass
class Generation:
    tokens: torch.Tensor     # (B, N) new tokens, right-padded with pad_id; a stop token is included
    logprobs: torch.Tensor   # (B, N) log-prob of each new token under the sampling distribution, 0 at pads
    lengths: torch.Tensor    # (B,) new tokens per row
    finished: torch.Tensor   # (B,) True: ended with a stop token; False: truncated at max_new_tokens


DECODE_BACKEND = "inductor"   # torch.compile backend of the CPU decode step (tests swap in "aot_eager")


class Decoder:
    """The decode step, one token per row: logits (B, V) = model(token (B,), at rope position (B,), written
    at cache slot `slot`). Prefill (the prompt, once) stays a plain forward; this is the part that runs
    max_new_tokens times, at fixed shapes thanks to the static cache (gpt-fast's decode_one_token).

    compile=False: eager PyTorch.
    compile=True:  on CUDA the step is captured as a CUDA graph (one per batch size, re-captured when
                   finished rows are dropped) and replayed, so a step costs one launch instead of a few
                   hundred (decoding a small model at small batch is launch-bound); on a CPU it is compiled
                   with torch.compile (inductor). Both compute what the eager step computes; tests check
                   that greedy tokens and sampling log-probs agree. A mixture-of-experts FFN routes with
                   data-dependent shapes, so it always decodes eagerly."""

    def __init__(self, model: GPT, compile: bool = False):
        self.model = model
        self.mode = "eager"
        if compile and model.config.ffn != "moe":
            self.mode = "cuda_graph" if model.wte.weight.device.type == "cuda" else "inductor"
        self.graph = None
        self.compiled = torch.compile(self.step, dynamic=False, backend=DECODE_BACKEND) if self.mode == "inductor" else None

    def step(self, token, position, slot, cache: KVCache):
        """slot: a (1,) tensor (compiled: fixed shapes, the whole buffer attended with a mask), or None
        (eager: the next slot, cache.length, and attention over the written slots only)."""
        real = torch.ones_like(token)[:, None]                                   # (B, 1) document 1: real tokens
        return self.model(token[:, None], position[:, None], real, cache, cache_index=slot)[:, -1]   # (B, V)

    def __call__(self, token, position, slot: int, cache: KVCache):
        if self.mode == "inductor":
            logits = self.compiled(token, position, torch.tensor([slot], device=token.device), cache)
        elif self.mode == "cuda_graph":
            try:
                logits = self.replay(token, position, slot, cache)
            except RuntimeError as e:       # a capture this device or op cannot do: decode eagerly instead
                print(f"note: CUDA graph capture failed ({str(e).splitlines()[0][:120]}); decoding eagerly", flush=True)
                self.mode, self.graph = "eager", None
        if self.mode == "eager":            # the slot as cache.length: attention reads the written slots only
            cache.length = slot
            logits = self.step(token, position, None, cache)
        cache.length = slot + 1
        return logits

    def replay(self, token, position, slot: int, cache: KVCache):
        """CUDA graph: static input buffers, captured once per batch size (after warm-up on a side stream),
        then replayed with this step's inputs copied in. The cache's buffers are fixed addresses."""
        if self.graph is None or self.graph_batch != token.shape[0] or self.graph_cache is not cache.k[0]:
            self.inputs = (token.clone(), position.clone(), torch.tensor([slot], device=token.device))
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):     # warm-up: writes this slot, which the real replay overwrites
                    self.step(*self.inputs, cache)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.step(*self.inputs, cache)
            self.graph_batch, self.graph_cache = token.shape[0], cache.k[0]
        self.inputs[0].copy_(token)
        self.inputs[1].copy_(position)
        self.inputs[2].fill_(slot)
        self.graph.replay()
        return self.outputs


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, stop_ids=(BYTE_EOT_ID,), pad_id: int = BYTE_PAD_ID,
             generator=None, compile: bool | None = None, compact: bool = True, check_every: int = 0) -> Generation:
    """Batched sampling with a static KV cache: prefill the left-padded prompts in one forward (each distinct
    prompt once; its samples copy its cache rows), then decode one token per row per step (Decoder), attending
    to the written slots only when the step runs eagerly. Pads form their own document and positions start at
    each row's first real token, so a row samples as it would alone. A row stops at its first stop id (the
    defaults are the byte tokenizer's; pass enc-specific ids).

    compile: the Decoder's compiled step; None = on CUDA (a CUDA graph: same tokens, a fraction of the launch
    cost), not on a CPU (inductor's first compile takes about a minute there, more than it saves in a run).
    compact: once at most half of the rows are still running, the finished ones are dropped from the batch
    and the cache (they would otherwise keep costing a full row of work per step). check_every: steps
    between checks of which rows are done (each check makes a GPU wait for the CPU; 0 = every step on a
    CPU, every 8 on CUDA)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()                                    # sampling policy = eval mode: no dropout
    device = model.wte.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    if model.wpe is not None and P + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) > block_size {model.config.block_size}")
    check_every = check_every or (8 if device.type == "cuda" else 1)
    # Inference mode: no autograd bookkeeping (a small model's decode step is mostly per-op overhead). Tensors
    # made in it are inference tensors, which autograd cannot save: the outputs are cloned after it, to train on.
    with torch.inference_mode():
        distinct = {}                               # prompt -> its row in the prefill (GRPO repeats each G times)
        prefill_row = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=device)
        tokens, mask = padded_batch(list(distinct), pad_id, side="left", device=device)
        positions, doc_ids = left_pad_inputs(mask)
        decoder = Decoder(model, device.type == "cuda" if compile is None else compile)
        cache = KVCache(model.config, len(distinct), P + max_new_tokens, device, zeroed=decoder.mode != "eager")
        stop = torch.tensor(list(stop_ids), device=device, dtype=torch.long)
        out_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        out_logprobs = torch.zeros(B, max_new_tokens, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)       # the original row of each row still in the batch
        done = torch.zeros(B, dtype=torch.bool, device=device)
        next_pos = positions[prefill_row, -1] + 1                                 # (B,)
        n = 0
        with autocast(device):
            logits = model(tokens, positions, doc_ids, cache)[prefill_row, -1]   # (B, V) prefill, once per prompt
            if len(distinct) < B:
                cache.keep(prefill_row)                                           # each sample gets its prompt's rows
            for t in range(max_new_tokens):
                token, logprob = sample(logits, temperature, top_k, top_p, min_p, generator)
                token, logprob = token.masked_fill(done, pad_id), logprob.masked_fill(done, 0.0)
                out_tokens[rows, t] = token
                out_logprobs[rows, t] = logprob
                lengths[rows] += (~done).long()        # count tokens, not non-pad ids
                hit = torch.isin(token, stop) & ~done
                finished[rows] |= hit
                done |= hit
                n = t + 1
                if t == max_new_tokens - 1:
                    break
                if (t + 1) % check_every == 0:
                    running = int((~done).sum())
                    if running == 0:
                        break
                    if compact and running <= len(rows) // 2:
                        keep = (~done).nonzero().squeeze(1)
                        rows, done, token, next_pos = rows[keep], done[keep], token[keep], next_pos[keep]
                        cache.keep(keep)
                logits = decoder(token, next_pos, P + t, cache)
                next_pos = next_pos + 1
    model.train(was_training)
    return Generation(out_tokens[:, :n].clone(), out_logprobs[:, :n].clone(), lengths.clone(), finished.clone())


# ----------------------------------------------------------------------------------------------
# 4. Log-probabilities
# ----------------------------------------------------------------------------------------------

LOGIT_CHUNK_ELEMENTS = 2 ** 26   # at most this many fp32 logits (256 MB) exist at once in token_logprobs


def token_logprobs(model, tokens, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0, positions=None, doc_ids=None, mask=None, entropy: bool = False):
    """log pi(x_t | x_<t) for t = 1..T-1 under the sampling transform (the quantity SFT, DPO, PPO and
    GRPO all need). tokens (B, T) -> (B, T-1); with mask (B, T), positions whose token is padding give 0.
    With entropy=True also returns H(pi(. | x_<t)) (B, T-1) of the same (transformed) distribution.

    The (B, T-1, V) fp32 logits are never built whole: the LM head runs on chunks of positions of at
    most LOGIT_CHUNK_ELEMENTS logits, and under autograd each chunk is checkpointed (recomputed in the
    backward pass), so a 152k-token vocabulary costs one chunk of logits, not B x T of them.
    The model is used in the mode it is in: for an importance ratio against `generate`'s log-probs, call
    it in eval mode (no dropout), as generate samples."""
    hidden = model(tokens, positions, doc_ids, return_hidden=True)[:, :-1]      # (B, T-1, C)
    head = unwrap(model).lm_head
    B, T1, C = hidden.shape
    flat, targets = hidden.reshape(-1, C), tokens[:, 1:].reshape(-1)             # (N, C), (N,)

    def chunk_logprobs(h, y):
        logp = sampling_logprobs(head(h).float(), temperature, top_k, top_p, min_p)   # (n, V)
        chosen = logp.gather(-1, y[:, None]).squeeze(-1)                                # (n,)
        if not entropy:
            return chosen, chosen
        return chosen, -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)

    rows = max(1, LOGIT_CHUNK_ELEMENTS // head.out_features)
    chosen, entropies = [], []
    for start in range(0, flat.shape[0], rows):
        h, y = flat[start:start + rows], targets[start:start + rows]
        if torch.is_grad_enabled() and flat.shape[0] > rows:
            out = torch.utils.checkpoint.checkpoint(chunk_logprobs, h, y, use_reentrant=False)
        else:
            out = chunk_logprobs(h, y)
        chosen.append(out[0])
        entropies.append(out[1])
    out = torch.cat(chosen).view(B, T1) if chosen else hidden.new_zeros(B, T1)
    if mask is not None:
        out = out.masked_fill(~mask[:, 1:].bool(), 0.0)
    if not entropy:
        return out
    return out, (torch.cat(entropies).view(B, T1) if entropies else hidden.new_zeros(B, T1))


# ----------------------------------------------------------------------------------------------
# 5. Checkpoints
# ----------------------------------------------------------------------------------------------

class UserError(Exception):
    """Bad input from the user (a path, a line of a file, an argument): printed as one line by `cli`."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, truncated or not ours; the message names the path."""


class NonFiniteError(UserError, ArithmeticError):
    """A loss, gradient or weight that is NaN or infinite: training stops before it reaches a checkpoint."""


def temp_path(path: str) -> str:
    """Where `path` is written before the rename that makes it appear whole: .<name>.<pid>.tmp beside it."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):   # alive under another user, or a platform without signals
        return True
    return True


def remove_stale_temps(path: str) -> None:
    """Delete the temporary files of `path` left by writers that were killed (their pid is gone)."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.tmp$")
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, entry))


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Open a temporary file beside `path`; on success rename it over `path` (os.replace is atomic), on
    any error delete it. Readers see the old file or the new one, never half of one; temporary files of
    killed writers are cleaned up first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold a NaN or an infinity."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite(where: str, **values) -> None:
    """Each value (a number or a tensor) must be finite; else NonFiniteError naming `where` and the value.
    Call it on the loss and the gradient norm BEFORE optimizer.step(), so the weights stay finite."""
    for name, value in values.items():
        value = value.detach() if torch.is_tensor(value) else value
        finite = bool(torch.isfinite(value).all()) if torch.is_tensor(value) else math.isfinite(float(value))
        if not finite:
            shown = float(value) if not torch.is_tensor(value) or value.numel() == 1 else "not finite"
            raise NonFiniteError(f"{where}: {name} is {shown}; stopped before the update, so no saved "
                                 "checkpoint holds it (a smaller --lr, or --grad-clip, usually helps)")


def save(path: str, model, enc: tiktoken.Encoding, **meta) -> None:
    """Write config, weights, tokenizer spec and metadata (optimizer state, step, ...) atomically:
    a temporary file in the same folder, then os.replace, so a crash never leaves a half-written model.
    Weights holding NaN or inf are refused (NonFiniteError): the previous file at `path` stays as it was."""
    model = unwrap(model)
    state = model.state_dict()
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteError(f"{path}: not saved, {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]}); "
                             "the previous checkpoint, if any, is kept")
    ckpt = {"config": asdict(model.config), "model": state, "tokenizer": tokenizer_spec(enc), "meta": meta}
    buffer = io.BytesIO()                       # refuse meta that load(weights_only=True) could not read
    torch.save(meta, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: meta holds objects that load(weights_only=True) cannot read "
                         f"(use tensors, numbers, strings, lists, dicts): {str(e).splitlines()[0][:120]}") from None
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def config_from_checkpoint(ckpt, path: str) -> Config:
    """The checkpoint's Config, validated against its own state dict BEFORE any weight is allocated:
    known fields of the right types, and exactly the tensor names and shapes that Config implies
    (built on the meta device, which allocates nothing). A hostile or damaged file fails here."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: not a checkpoint of this project (no config and model state)")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(ckpt["config"]) - set(fields))
    if unknown:
        raise CheckpointError(f"{path}: config has unknown field(s) {', '.join(map(str, unknown[:5]))}")
    try:
        cfg = Config(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config ({e})") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    state = ckpt["model"]
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and (not torch.is_tensor(state[k]) or tuple(state[k].shape) != expected[k])]
    if missing or extra or wrong:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                  f"{wrong[0]} has shape {tuple(getattr(state[wrong[0]], 'shape', ()))}, config implies {expected[wrong[0]]}")
        raise CheckpointError(f"{path}: weights do not match its config ({detail})")
    return cfg


def load(path: str, device="cpu", dtype=None, chat_format: str = "auto"):
    """-> (model, enc, ckpt) from this project's .pt checkpoint, a Hugging Face model folder (config.json,
    safetensors, tokenizer files) or a .gguf file. A .pt file is read with torch.load(weights_only=True):
    tensors and plain containers only, no code; its config is checked against its weights before the model
    is built (config_from_checkpoint). dtype: cast the weights (e.g. torch.bfloat16) after loading.
    chat_format: auto | none | chatml | llama3 (auto: what the checkpoint recorded, else from the tokenizer).
    Any problem is a CheckpointError naming the path."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path}: is a directory without config.json, not a Hugging Face model folder")
        model, enc, ckpt = load_hf(path)
    elif not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    elif path.endswith(".gguf"):
        model, enc, ckpt = load_gguf(path)
    else:
        model, enc, ckpt = load_pt(path)
    bad = non_finite_tensors(model.state_dict())
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]})")
    if chat_format != "auto":
        set_chat_format(enc, chat_format)
    return model.to(device=device, dtype=dtype), enc, ckpt


def load_pt(path: str):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg = config_from_checkpoint(ckpt, path)
        enc = tokenizer_from_spec(ckpt.get("tokenizer"))
        if enc.n_vocab > cfg.vocab_size and not isinstance(enc, SpecEncoding):
            raise CheckpointError(f"{path}: tokenizer has {enc.n_vocab} tokens, the model only {cfg.vocab_size}")
        model = GPT(cfg)
        model.load_state_dict(ckpt["model"])
    except UserError as e:
        raise CheckpointError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    except Exception as e:
        reason = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).splitlines() or [""])[0])[:160]   # no terminal codes
        if "Weights only load failed" in reason:
            reason = "holds objects other than tensors and plain containers"
        raise CheckpointError(f"{path}: not a readable checkpoint; truncated, corrupt or not ours "
                              f"({type(e).__name__}: {reason})") from None
    return model, enc, ckpt


# The files real models ship in. safetensors (https://huggingface.co/docs/safetensors, "Format"), and
# GGUF v2/v3 (ggml/docs/gguf.md; gguf-py's gguf_reader.py and quants.py), read with numpy. A bad file is a
# ValueError whose one-line message starts with the path (load turns it into a CheckpointError).

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
SAFETENSORS_MAX_HEADER = 100_000_000          # the safetensors library's own limit


def safetensors_layout(path: str, header_bytes: bytes, data_size: int) -> dict:
    """Check a safetensors header against the data area; returns {name: (dtype, shape, begin, end)}."""
    def no_duplicates(pairs):
        if len({key for key, _ in pairs}) != len(pairs):
            raise ValueError("duplicate key")
        return dict(pairs)
    try:
        header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"{path}: the safetensors header is not valid JSON (or repeats a name)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    layout = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                and all(type(n) is int and n >= 0 for n in entry["shape"])
                and len(entry["data_offsets"]) == 2 and all(type(n) is int for n in entry["data_offsets"])):
            raise ValueError(f"{path}: tensor {name[:80]!r} needs a known dtype, a shape and two data_offsets")
        dtype, shape, (begin, end) = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        if not 0 <= begin <= end <= data_size:
            raise ValueError(f"{path}: tensor {name[:80]!r} lies outside the file's {data_size} data bytes")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name[:80]!r} of shape {shape} {entry['dtype']} has "
                             f"{end - begin} bytes, not {math.prod(shape) * dtype.itemsize}")
        layout[name] = (dtype, shape, begin, end)
    previous_end, previous_name = 0, None
    for name, (_, _, begin, end) in sorted(layout.items(), key=lambda item: item[1][2:]):
        if begin < previous_end:
            raise ValueError(f"{path}: tensors {previous_name[:80]!r} and {name[:80]!r} overlap")
        if end > begin:
            previous_end, previous_name = end, name
    return layout


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file; every tensor owns its memory.

    Layout: u64 little-endian N | N bytes of JSON header | data area.
    Header: {name: {"dtype": "BF16"|"F16"|"F32"|..., "shape": [d0, d1, ...], "data_offsets": [begin, end]},
             "__metadata__": {str: str}}   (optional); offsets count from the start of the data area,
    and a tensor's bytes are prod(shape) * itemsize, row-major, little-endian.
    Every size and offset is checked against the file's size before any tensor is allocated."""
    try:
        with open(path, "rb") as file:
            file_size = os.fstat(file.fileno()).st_size
            if file_size < 8:
                raise ValueError(f"{path}: {file_size} bytes is too short for a safetensors file")
            (header_size,) = struct.unpack("<Q", file.read(8))
            if header_size > min(file_size - 8, SAFETENSORS_MAX_HEADER):
                raise ValueError(f"{path}: the header length {header_size} runs past the end of the file")
            layout = safetensors_layout(path, file.read(header_size), file_size - 8 - header_size)
            tensors = {}
            for name, (dtype, shape, begin, end) in layout.items():
                tensor = torch.empty(shape, dtype=dtype)
                file.seek(8 + header_size + begin)
                if end > begin and file.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                    raise ValueError(f"{path}: tensor {name[:80]!r} is cut short")
                tensors[name] = tensor
            return tensors
    except (OSError, struct.error) as error:
        raise ValueError(f"{path}: cannot read ({type(error).__name__}: {error})") from None


def read_safetensors_folder(folder: str) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face model folder: model.safetensors, or the shards that
    model.safetensors.index.json names ({"weight_map": {tensor name: shard file name}})."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index_path):
        return read_safetensors(os.path.join(folder, "model.safetensors"))
    try:
        with open(index_path, encoding="utf-8") as file:
            weight_map = json.load(file)["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        raise ValueError(f"{index_path}: not a safetensors index (JSON with a 'weight_map')") from None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise ValueError(f"{index_path}: shard {shard[:80]!r} is not a file name inside the folder")
        tensors.update(read_safetensors(os.path.join(folder, shard)))
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        raise ValueError(f"{index_path}: {len(missing)} tensors of the weight_map are in no shard, "
                         f"e.g. {missing[0][:80]!r}")
    return tensors


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors in the safetensors format (layout in read_safetensors), atomically: a temporary
    file beside `path`, then os.replace. Each tensor's own elements are written (a view of a larger
    storage writes only its view); tied weights appear once per name the caller passes. The header
    is padded with spaces to a multiple of 8 bytes and tensors are ordered by item size, largest
    first, so every tensor starts at an offset aligned to its item size."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: safetensors metadata must map str to str")
    contiguous = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__" or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{path}: cannot write {name!r}: names are str (not '__metadata__'), values tensors")
        if tensor.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, which safetensors here does not take")
        contiguous[name] = tensor.detach().to("cpu").contiguous()
    header, offset = {}, 0
    order = sorted(contiguous, key=lambda name: (-contiguous[name].element_size(), name))
    for name in order:
        size = contiguous[name].numel() * contiguous[name].element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[contiguous[name].dtype],
                        "shape": list(contiguous[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
            for name in order:
                file.write(contiguous[name].reshape(-1).view(torch.uint8).numpy().data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


# Metadata value types (ggml/docs/gguf.md, enum gguf_metadata_value_type): struct format, size.
GGUF_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
                6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGUF_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
              10: "<u8", 11: "<i8", 12: "<f8"}
# Tensor types we dequantise (ggml.h enum ggml_type): name, elements per block, bytes per block.
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}
GGML_OTHER_TYPE_NAMES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
                         14: "Q6_K", 15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}
GGUF_MAX_DIMS, GGUF_MAX_NESTING = 4, 8


def dequantize(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """GGML blocks (n_blocks, bytes per block) uint8 -> float32 (n_blocks * elements per block,).
    Math as in gguf-py's quants.py (and ggml-quants.c's dequantize_row_*), computed in float32:
      F16, BF16: the 2-byte float (bf16 = the top 16 bits of a float32), widened to float32.
      Q8_0: [fp16 d][32 x int8 q]                    x_i = d * q_i
      Q4_0: [fp16 d][16 bytes of 4-bit q]            x_i = d * (q_i - 8)
      Q4_1: [fp16 d][fp16 m][16 bytes of 4-bit q]    x_i = d * q_i + m
    In Q4 blocks byte j holds element j in its low nibble and element j + 16 in its high nibble."""
    if type_name == "F32":
        return blocks.reshape(-1).view("<f4").copy()
    if type_name == "F16":
        return blocks.reshape(-1).view("<f2").astype(np.float32)
    if type_name == "BF16":
        return (blocks.reshape(-1).view("<u2").astype(np.uint32) << 16).view(np.float32)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)                        # (n_blocks, 1)
    if type_name == "Q8_0":
        return (blocks[:, 2:].view(np.int8).astype(np.float32) * scale).reshape(-1)
    packed = blocks[:, -16:]                                                           # (n_blocks, 16)
    nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1)                     # (n_blocks, 32)
    if type_name == "Q4_0":
        return (scale * (nibbles.astype(np.int8) - np.int8(8)).astype(np.float32)).reshape(-1)
    minimum = blocks[:, 2:4].copy().view("<f2").astype(np.float32)                     # (n_blocks, 1)
    return (scale * nibbles.astype(np.float32) + minimum).reshape(-1)                 # Q4_1


class GGUFCursor:
    """Reads GGUF's little-endian values from a memory-mapped file, never past its end."""

    def __init__(self, path: str, data: mmap.mmap):
        self.path, self.data, self.position = path, data, 0

    def take(self, size: int, what: str) -> bytes:
        if size > len(self.data) - self.position:
            raise ValueError(f"{self.path}: the file ends inside {what}")
        self.position += size
        return self.data[self.position - size:self.position]

    def scalar(self, value_type: int, what: str):
        layout, size = GGUF_SCALARS[value_type]
        return struct.unpack(layout, self.take(size, what))[0]

    def string(self, what: str) -> str:
        size = self.scalar(10, what)
        try:
            return self.take(size, what).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: {what} is not UTF-8") from None

    def value(self, value_type: int, what: str, depth: int = 0):
        """One metadata value: a scalar, a string (u64 length + UTF-8 bytes), or an array
        (u32 element type, u64 count, the elements; arrays may nest)."""
        if value_type in GGUF_SCALARS:
            return self.scalar(value_type, what)
        if value_type == GGUF_STRING:
            return self.string(what)
        if value_type != GGUF_ARRAY or depth >= GGUF_MAX_NESTING:
            raise ValueError(f"{self.path}: {what} has value type {value_type}, which GGUF does not define")
        element_type, count = self.scalar(4, what), self.scalar(10, what)
        smallest = GGUF_SCALARS[element_type][1] if element_type in GGUF_SCALARS else 8
        if count * smallest > len(self.data) - self.position:
            raise ValueError(f"{self.path}: the file ends inside {what} ({count} elements)")
        if element_type in GGUF_SCALARS:                   # numbers in one go
            values = np.frombuffer(self.take(count * smallest, what), dtype=GGUF_NUMPY[element_type])
            return values.astype(bool).tolist() if element_type == 7 else values.tolist()
        return [self.value(element_type, what, depth + 1) for _ in range(count)]


def read_gguf(path: str, tensor_names=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a GGUF file (version 2 or 3), tensors dequantised to float32.

    Layout (ggml/docs/gguf.md), all little-endian:
      "GGUF" | u32 version | u64 tensor_count | u64 kv_count
      kv_count x  (string key, u32 value type, value)            string = u64 length + UTF-8 bytes
      tensor_count x (string name, u32 n_dims, n_dims x u64 dims, u32 ggml type, u64 offset)
      padding to `general.alignment` (default 32) | tensor data (offsets count from here).
    dims run fastest-first (ggml's ne[0] is the row length), so the torch shape is reversed(dims).
    `tensor_names`: dequantise only these (default: all). Counts, lengths and tensor extents are
    checked against the file size before anything is allocated for them."""
    file_size = os.path.getsize(path) if os.path.isfile(path) else -1
    if file_size < 24:
        raise ValueError(f"{path}: not a GGUF file ({'missing' if file_size < 0 else f'{file_size} bytes'})")
    with open(path, "rb") as file:   # the map outlives the file object; it closes when unreferenced
        cursor = GGUFCursor(path, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
    if cursor.take(4, "the magic") != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (no 'GGUF' magic)")
    version = cursor.scalar(4, "the header")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    tensor_count, kv_count = cursor.scalar(10, "the header"), cursor.scalar(10, "the header")
    if kv_count * 12 + tensor_count * 24 > file_size:    # a kv takes >= 12 bytes, a tensor info >= 24
        raise ValueError(f"{path}: {tensor_count} tensors and {kv_count} metadata keys cannot fit in {file_size} bytes")
    metadata = {}
    for index in range(kv_count):
        key = cursor.string(f"metadata key {index}")
        if key in metadata:
            raise ValueError(f"{path}: metadata key {key[:80]!r} appears twice")
        metadata[key] = cursor.value(cursor.scalar(4, f"metadata {key[:80]!r}"), f"metadata {key[:80]!r}")
    infos = {}
    for index in range(tensor_count):
        name = cursor.string(f"tensor info {index}")
        n_dims = cursor.scalar(4, f"tensor {name[:80]!r}")
        if n_dims > GGUF_MAX_DIMS or name in infos:
            raise ValueError(f"{path}: tensor {name[:80]!r} has {n_dims} dims or appears twice")
        dims = [cursor.scalar(10, f"tensor {name[:80]!r}") for _ in range(n_dims)]
        infos[name] = (dims, cursor.scalar(4, f"tensor {name[:80]!r}"), cursor.scalar(10, f"tensor {name[:80]!r}"))
    alignment = metadata.get("general.alignment", 32)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-cursor.position // alignment) * alignment
    wanted = infos if tensor_names is None else {name: infos.get(name) for name in tensor_names}
    extents = {}
    for name, info in wanted.items():
        if info is None:
            raise ValueError(f"{path}: has no tensor {name[:80]!r}")
        dims, ggml_type, offset = info
        if ggml_type not in GGML_TYPES:
            type_name = GGML_OTHER_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")
            raise ValueError(f"{path}: tensor {name[:80]!r} is {type_name}; only "
                             f"{', '.join(t[0] for t in GGML_TYPES.values())} can be dequantised here")
        type_name, block_elements, block_bytes = GGML_TYPES[ggml_type]
        n_elements = math.prod(dims)
        if dims and dims[0] % block_elements or offset % alignment or max(dims, default=0) > 2 * file_size:
            raise ValueError(f"{path}: tensor {name[:80]!r} ({type_name}, dims {dims}, offset {offset}) "
                             f"is not whole {block_elements}-element blocks at an aligned offset in this file")
        n_bytes = n_elements // block_elements * block_bytes
        if data_start + offset + n_bytes > file_size:
            raise ValueError(f"{path}: tensor {name[:80]!r} ({n_bytes} bytes at {offset}) runs past the file's end")
        extents[name] = (data_start + offset, n_elements // block_elements, block_bytes, type_name, dims)
    tensors = {}
    for name, (start, n_blocks, block_bytes, type_name, dims) in extents.items():
        blocks = np.frombuffer(cursor.data, np.uint8, n_blocks * block_bytes, start).reshape(n_blocks, block_bytes)
        tensors[name] = torch.from_numpy(dequantize(blocks, type_name).reshape(dims[::-1]))
    return metadata, tensors


def unpermute_llama_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute):

        gguf = hf.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(hf.shape)

    Hugging Face's RoPE rotates row i of a head with row i + head_dim/2 (the two halves); llama.cpp's
    rotates rows 2i and 2i+1 (interleaved pairs), so the converter moves HF row h*D + s*D/2 + i to
    GGUF row h*D + 2i + s (s = 0, 1). The inverse reads GGUF's (n_heads, D/2, 2) rows back as
    (n_heads, 2, D/2). weight: (n_heads * head_dim, ...) -- q_proj with n_heads = n_head, k_proj with
    n_heads = n_kv_head; works for biases (1-D) too."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    return (weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])   # (H, D/2, 2, ...)
            .transpose(1, 2).reshape(weight.shape))                              # (H, 2, D/2, ...) -> rows


# Hugging Face and GGUF checkpoints: Llama (Llama 3.x, SmolLM2), Qwen2 / Qwen2.5 and Qwen3 map onto GPT
# with these switches. Names: ours on the left, Hugging Face's on the right ({i} = layer).

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                    "Qwen3ForCausalLM": "qwen3"}
HF_NAMES = {"wte.weight": "model.embed_tokens.weight", "norm_f.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}
HF_LAYER_NAMES = {"norm1.weight": "input_layernorm.weight", "norm2.weight": "post_attention_layernorm.weight",
                  "attn.q.weight": "self_attn.q_proj.weight", "attn.q.bias": "self_attn.q_proj.bias",
                  "attn.proj.weight": "self_attn.o_proj.weight", "attn.q_norm.weight": "self_attn.q_norm.weight",
                  "attn.k_norm.weight": "self_attn.k_norm.weight", "ffn.w1.weight": "mlp.gate_proj.weight",
                  "ffn.w3.weight": "mlp.up_proj.weight", "ffn.w2.weight": "mlp.down_proj.weight"}
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_LAYER_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
                    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
                    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
                    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
                    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def config_from_hf(hf: dict, path: str) -> Config:
    """Our Config from a Hugging Face config.json (transformers 4.x keys and 5.x `rope_parameters`)."""
    architecture = (hf.get("architectures") or ["?"])[0]
    family = HF_ARCHITECTURES.get(architecture)
    if family is None:
        raise CheckpointError(f"{path}: architecture {architecture!r} is not supported; "
                              f"choose one of {', '.join(HF_ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias") or (family == "llama" and hf.get("attention_bias")):
        raise CheckpointError(f"{path}: only SiLU-gated FFNs without MLP biases (and Llama without attention biases) are supported")
    rope = dict(hf.get("rope_scaling") or {})
    rope.update(hf.get("rope_parameters") or {})
    scaling = rope.get("rope_type", rope.get("type", "default"))
    if scaling not in ("default", "llama3"):
        raise CheckpointError(f"{path}: rope scaling {scaling!r} is not supported (default, llama3)")
    n_head = hf["num_attention_heads"]
    try:
        return Config(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                      n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                      n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                      ffn="swiglu", ffn_hidden=hf["intermediate_size"], norm="rmsnorm",
                      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                      rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                      rope_scaling="llama3" if scaling == "llama3" else "none",
                      rope_factor=float(rope.get("factor", 8.0)),
                      rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                      rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                      rope_original_context=int(rope.get("original_max_position_embeddings", 8192)),
                      qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: config.json is missing or has a bad value ({type(e).__name__}: {e})") from None


def config_to_hf(cfg: Config) -> dict:
    """A config.json that transformers loads unchanged: Qwen3 (q/k norms), Qwen2 (q/k/v biases) or Llama."""
    llama_like = (cfg.ffn == "swiglu" and cfg.norm == "rmsnorm" and cfg.norm_position == "pre" and cfg.pos == "rope"
                  and not cfg.bias)
    if not llama_like:
        raise UserError("only pre-norm RMSNorm + RoPE + SwiGLU models without biases (the Llama family) can be "
                        f"exported to Hugging Face; this one has ffn={cfg.ffn}, norm={cfg.norm}, "
                        f"norm_position={cfg.norm_position}, pos={cfg.pos}, bias={cfg.bias}")
    architecture, model_type = (("Qwen3ForCausalLM", "qwen3") if cfg.qk_norm else
                                ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama"))
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_context)
    hf = {"architectures": [architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
          "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_width, "num_hidden_layers": cfg.n_layer,
          "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
          "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
          "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
          "rope_theta": cfg.rope_base, "rope_scaling": None if cfg.rope_scaling == "none" else
          {k: v for k, v in rope.items() if k != "rope_theta"}, "rope_parameters": rope,
          "torch_dtype": "float32", "dtype": "float32"}
    if model_type == "qwen2":
        hf["attention_bias"] = True
    return hf


def state_dict_from_hf(tensors: dict, cfg: Config, path: str) -> dict:
    """Hugging Face tensor names -> ours; k_proj and v_proj become the rows of our fused kv projection."""
    state = {}
    try:
        for ours, theirs in HF_NAMES.items():
            if theirs in tensors:
                state[ours] = tensors[theirs]
        for i in range(cfg.n_layer):
            prefix = f"model.layers.{i}."
            for ours, theirs in HF_LAYER_NAMES.items():
                if prefix + theirs in tensors:
                    state[f"blocks.{i}.{ours}"] = tensors[prefix + theirs]
            for kind in ("weight", "bias"):
                k, v = prefix + f"self_attn.k_proj.{kind}", prefix + f"self_attn.v_proj.{kind}"
                if k in tensors:
                    state[f"blocks.{i}.attn.kv.{kind}"] = torch.cat([tensors[k], tensors[v]], 0)   # (2 Hkv d, ...)
    except KeyError as e:
        raise CheckpointError(f"{path}: tensor {e} is missing") from None
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    return state


def state_dict_to_hf(state: dict, cfg: Config) -> dict:
    """Ours -> Hugging Face names (the inverse of state_dict_from_hf); a tied lm_head is not written."""
    tensors = {theirs: state[ours] for ours, theirs in HF_NAMES.items() if ours in state}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    kv_rows = cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        for ours, theirs in HF_LAYER_NAMES.items():
            if f"blocks.{i}.{ours}" in state:
                tensors[f"model.layers.{i}.{theirs}"] = state[f"blocks.{i}.{ours}"]
        for kind in ("weight", "bias"):
            if f"blocks.{i}.attn.kv.{kind}" in state:
                kv = state[f"blocks.{i}.attn.kv.{kind}"]
                tensors[f"model.layers.{i}.self_attn.k_proj.{kind}"] = kv[:kv_rows]
                tensors[f"model.layers.{i}.self_attn.v_proj.{kind}"] = kv[kv_rows:]
    return {name: t.detach().contiguous() for name, t in tensors.items()}


def read_json_file(path: str, required: bool = True) -> dict:
    if not os.path.isfile(path):
        if required:
            raise CheckpointError(f"{path}: missing")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def build_checkpoint_model(cfg: Config, state: dict, path: str) -> GPT:
    """A GPT from a state dict read from someone else's file: its names and shapes are compared with the
    config's on the meta device first (nothing allocated for a file that does not fit its config)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or wrong:
        detail = f"missing {missing[0]}" if missing else f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {expected[wrong[0]]}"
        raise CheckpointError(f"{path}: weights do not match its config ({detail})")
    model = GPT(cfg)
    model.load_state_dict({k: state[k].float() for k in expected})
    return model


def load_hf(folder: str):
    """A Hugging Face model folder: config.json, model.safetensors (or shards with
    model.safetensors.index.json), tokenizer.json (or Llama 3's tiktoken tokenizer.model),
    tokenizer_config.json and generation_config.json (its eos ids stop generation)."""
    hf = read_json_file(os.path.join(folder, "config.json"))
    cfg = config_from_hf(hf, folder)
    try:
        tensors = read_safetensors_folder(folder)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    model = build_checkpoint_model(cfg, state_dict_from_hf(tensors, cfg, folder), folder)
    tokenizer_config = read_json_file(os.path.join(folder, "tokenizer_config.json"), required=False)
    try:
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            spec = tokenizer_spec_from_json(read_json_file(os.path.join(folder, "tokenizer.json")), tokenizer_config,
                                            cfg.vocab_size, os.path.join(folder, "tokenizer.json"))
        elif os.path.isfile(os.path.join(folder, "tokenizer.model")):
            specials = {token_content(v): int(k) for k, v in tokenizer_config.get("added_tokens_decoder", {}).items()}
            spec = tokenizer_spec_from_tiktoken_file(os.path.join(folder, "tokenizer.model"), specials,
                                                     bos=token_content(tokenizer_config.get("bos_token")),
                                                     eos=token_content(tokenizer_config.get("eos_token")),
                                                     pad=token_content(tokenizer_config.get("pad_token")),
                                                     vocab_size=cfg.vocab_size)
        else:
            raise CheckpointError(f"{folder}: no tokenizer.json or tokenizer.model")
        enc = encoding_from_spec(spec)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    eos = read_json_file(os.path.join(folder, "generation_config.json"), required=False).get("eos_token_id", [])
    enc.stop_token_ids = tuple(eos if isinstance(eos, list) else [eos])
    return model, set_chat_format(enc), {"config": asdict(cfg), "meta": {}, "source": folder}


def config_from_gguf(metadata: dict, tensors: dict, path: str) -> Config:
    """Our Config from GGUF metadata ({arch}.block_count, .embedding_length, ...; arch = llama, qwen2, qwen3)."""
    arch = metadata.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)")
    key = lambda name, default=None: metadata.get(f"{arch}.{name}", default)
    try:
        n_head = int(key("attention.head_count"))
        n_embd = int(key("embedding_length"))
        return Config(vocab_size=int(key("vocab_size") or len(metadata["tokenizer.ggml.tokens"])),
                      block_size=int(key("context_length", 2048)), n_layer=int(key("block_count")), n_head=n_head,
                      n_kv_head=int(key("attention.head_count_kv", n_head)), n_embd=n_embd,
                      head_dim=int(key("attention.key_length", n_embd // n_head)), ffn="swiglu",
                      ffn_hidden=int(key("feed_forward_length")), norm="rmsnorm",
                      norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
                      rope_base=float(key("rope.freq_base", 10000.0)), qkv_bias="blk.0.attn_q.bias" in tensors,
                      qk_norm="blk.0.attn_q_norm.weight" in tensors, tie_embeddings="output.weight" not in tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: GGUF metadata is missing or has a bad value ({type(e).__name__}: {e})") from None


def load_gguf(path: str):
    """A GGUF file (llama.cpp's format): tensors dequantised to fp32, the tokenizer from its metadata.
    llama.cpp stores Llama's q and k rows permuted for its interleaved RoPE; they are put back in the
    half-split order of Hugging Face and of this file's apply_rope (unpermute_llama_qk)."""
    try:
        metadata, tensors = read_gguf(path)
        cfg = config_from_gguf(metadata, tensors, path)
        hf_names = {gguf: hf for hf, gguf in GGUF_NAMES.items()}
        for i in range(cfg.n_layer):
            hf_names.update({f"blk.{i}.{gguf}": f"model.layers.{i}.{hf}" for hf, gguf in GGUF_LAYER_NAMES.items()})
        hf_tensors = {hf_names.get(name, name): tensor for name, tensor in tensors.items()}
        if metadata["general.architecture"] == "llama":
            for i in range(cfg.n_layer):
                for proj, heads in (("q_proj", cfg.n_head), ("k_proj", cfg.n_kv_head)):
                    name = f"model.layers.{i}.self_attn.{proj}.weight"
                    if name in hf_tensors:
                        hf_tensors[name] = unpermute_llama_qk(hf_tensors[name], heads)
        model = build_checkpoint_model(cfg, state_dict_from_hf(hf_tensors, cfg, path), path)
        enc = encoding_from_spec(tokenizer_spec_from_gguf(metadata, cfg.vocab_size, path))
    except ValueError as e:
        raise CheckpointError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    return model, set_chat_format(enc), {"config": asdict(cfg), "meta": {}, "source": path}


def save_hf(directory: str, model, enc: tiktoken.Encoding) -> None:
    """A folder that transformers (and vLLM) load unchanged: config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json and generation_config.json, each written atomically.
    Only Llama-family models (pre-norm RMSNorm, RoPE, SwiGLU, no biases but Qwen2's) can be exported."""
    model = unwrap(model)
    hf = config_to_hf(model.config)
    spec = enc.spec if isinstance(enc, SpecEncoding) else tokenizer_spec_from_encoding(enc, model.config.vocab_size)
    state = model.state_dict()
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteError(f"{directory}: not exported, {bad[0]} holds NaN or inf")
    hf.update(bos_token_id=getattr(enc, "token_id", lambda t: None)(spec.get("bos")),
              eos_token_id=end_of_turn(enc), pad_token_id=pad_id(enc))
    claim_run_dir(directory)
    write_safetensors(os.path.join(directory, "model.safetensors"), state_dict_to_hf(state, model.config),
                      {"format": "pt"})
    files = {"config.json": hf, "tokenizer.json": tokenizer_json_from_spec(spec),
             "tokenizer_config.json": tokenizer_config_from_spec(spec),
             "generation_config.json": {"eos_token_id": sorted(set(stop_ids(enc))), "pad_token_id": pad_id(enc)}}
    for name, content in files.items():
        with atomic_write(os.path.join(directory, name)) as f:
            json.dump(content, f, indent=1, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# 6. Verifiable answers: the `#### answer` convention (GSM8K) and worked steps "lhs=rhs"
# ----------------------------------------------------------------------------------------------

NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def extract_answer(text: str) -> str | None:
    """The answer after the LAST '####': its first whitespace-separated token, commas removed."""
    at = text.rfind("####")
    if at < 0:
        return None
    rest = text[at + 4:].split()
    return rest[0].replace(",", "").rstrip(".") if rest else None


def is_correct(completion: str, answer) -> bool:
    """Does the completion's final answer equal `answer`? Numbers compare by value ("12.0" == "12")."""
    pred, gold = extract_answer(completion), str(answer).replace(",", "").strip()
    if pred is None:
        return False
    if NUMBER.match(pred) and NUMBER.match(gold):
        return float(pred) == float(gold)
    return pred == gold


ARITH_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
             ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
             ast.Pow: lambda a, b: a ** b}
ARITH_MAX_CHARS, ARITH_MAX_DEPTH, ARITH_MAX_ABS = 200, 32, 10 ** 60


def arith(expr: str):
    """Evaluate + - * / // % ** and parentheses on numbers, by walking the `ast` (never eval).
    Bounded: at most 200 characters, nesting 32, |values| <= 1e60, exponents checked before computing.
    Anything else (syntax, names, calls, overflow, division by zero) raises ValueError with the reason,
    and nothing else is ever raised."""
    if not isinstance(expr, str) or len(expr) > ARITH_MAX_CHARS:
        raise ValueError(f"expression longer than {ARITH_MAX_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an arithmetic expression ({type(e).__name__})") from None

    def check(value):
        if not isinstance(value, (int, float)):   # e.g. (-8) ** 0.5 is complex
            raise ValueError(f"not a real number: {value!r}")
        if isinstance(value, float) and not math.isfinite(value) or abs(value) > ARITH_MAX_ABS:
            raise ValueError("value out of range")
        return value

    def walk(node, depth):
        if depth > ARITH_MAX_DEPTH:
            raise ValueError("expression nested too deeply")
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return check(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = walk(node.operand, depth + 1)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in ARITH_OPS:
            a, b = walk(node.left, depth + 1), walk(node.right, depth + 1)
            if isinstance(node.op, ast.Pow):
                if abs(b) > 256 or (a != 0 and abs(b) * math.log10(abs(a) + 1) > 60):
                    raise ValueError("exponent too large")
                if a == 0 and b < 0:
                    raise ValueError("division by zero")
            if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
                raise ValueError("division by zero")
            try:
                return check(ARITH_OPS[type(node.op)](a, b))
            except OverflowError:   # float results past ~1.8e308, e.g. 0.01 ** -200
                raise ValueError("value out of range") from None
        raise ValueError(f"unsupported syntax: {type(node).__name__}")

    return walk(tree.body, 0)


def final_expression(text: str) -> str | None:
    """The whole rest of the line after the LAST '####' (an expression may hold spaces), or None."""
    at = text.rfind("####")
    if at < 0:
        return None
    line = text[at + 4:].split("\n", 1)[0].strip()
    return line or None


def expression_numbers(expr: str) -> list:
    """The number literals of an arithmetic expression, in order (a unary minus is an operator, not part
    of the literal). Raises ValueError where arith would."""
    arith(expr)                                       # the same bounds and the same accepted syntax
    tree = ast.parse(expr.strip(), mode="eval")
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)]


def expression_hits_target(text: str, numbers, target) -> bool:
    """Countdown (as in TinyZero): does the completion's final '#### <expression>' use only the allowed
    numbers, each at most as often as it is given, and evaluate to the target? Anything that does not
    parse, uses another number, or misses the target is False; this function never raises."""
    expr = final_expression(text)
    if expr is None:
        return False
    try:
        used, value = expression_numbers(expr), arith(expr)
        goal = float(target)
    except (ValueError, TypeError):
        return False
    try:
        pool = list(numbers)
    except TypeError:
        return False
    for number in used:
        if number not in pool:                     # 2 == 2.0, so "2.0" uses an allowed 2
            return False
        pool.remove(number)
    return math.isclose(value, goal, rel_tol=0.0, abs_tol=1e-9)


def verify(text: str, row: dict) -> bool:
    """The task's own verifier for a prompt row: a Countdown row (it lists its "numbers") is solved by an
    expression that hits its "answer"; any other row by a final answer equal to its "answer"."""
    if "numbers" in row:
        return expression_hits_target(text, row["numbers"], row["answer"])
    return is_correct(text, row["answer"])


def step_lines(text: str) -> list[tuple[str, str]]:
    """The worked steps before the '####' line: lines 'lhs=rhs' with an integer rhs -> [(lhs, rhs)]."""
    body = text[:text.rfind("####")] if "####" in text else text
    steps = []
    for line in body.splitlines():
        lhs, eq, rhs = line.rpartition("=")
        if eq and re.fullmatch(r"\s*-?\d+\s*", rhs) and lhs.strip():
            steps.append((lhs.strip(), rhs.strip()))
    return steps


def completion_style(text: str) -> str:
    """'no_answer' (no #### answer), 'bare' (an answer with no steps), 'wrong_step' (a step whose
    left side does not evaluate to its right side) or 'worked' (at least one step, all correct)."""
    if extract_answer(text) is None:
        return "no_answer"
    steps = step_lines(text)
    if not steps:
        return "bare"
    for lhs, rhs in steps:
        try:
            if arith(lhs) != int(rhs):
                return "wrong_step"
        except ValueError:
            return "wrong_step"
    return "worked"


MAX_NEW_TOKENS = 96   # the completion length limit every stage samples and evaluates with, by default


@torch.no_grad()
def evaluate(model, enc, rows, max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0, samples: int = 1,
             batch_size: int = 256, generator=None) -> dict:
    """Held-out accuracy on {"prompt", "answer"[, "difficulty"]} rows, the one protocol every stage reports.

    Greedy (temperature 0, samples 1) or `samples` sampled completions per prompt. Returns
      accuracy      mean correctness over all completions, with stderr = sqrt(p (1 - p) / n)
      pass_at_k     share of prompts with at least one correct completion among the `samples`
      per_difficulty {difficulty: accuracy};  styles {worked|bare|wrong_step|no_answer: share}
      mean_length   new tokens per completion;  truncated: share cut by max_new_tokens
      completions   the decoded texts (prompt-major: samples consecutive completions per prompt)."""
    prompts = [encode_prompt(enc, r["prompt"]) for r in rows for _ in range(samples)]
    expanded = [r for r in rows for _ in range(samples)]
    texts, lengths, truncated = [], [], []
    for start in range(0, len(prompts), batch_size):
        gen = generate(model, prompts[start:start + batch_size], max_new_tokens, temperature=temperature,
                       stop_ids=stop_ids(enc), pad_id=pad_id(enc), generator=generator)
        texts += [decode(enc, row) for row in gen.tokens.tolist()]
        lengths += gen.lengths.tolist()
        truncated += (~gen.finished).tolist()
    correct = np.array([verify(text, row) for text, row in zip(texts, expanded)], dtype=float)
    per_prompt = correct.reshape(len(rows), samples)
    p, n = float(correct.mean()), len(correct)
    by_difficulty = {}
    for r, c in zip(rows, per_prompt.mean(1)):
        by_difficulty.setdefault(r.get("difficulty", "all"), []).append(c)
    styles = [completion_style(t) for t in texts]
    return {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / n), "n": n,
            "pass_at_k": float(per_prompt.max(1).mean()),
            "per_difficulty": {k: float(np.mean(v)) for k, v in sorted(by_difficulty.items())},
            "styles": {s: styles.count(s) / n for s in ("worked", "bare", "wrong_step", "no_answer")},
            "mean_length": float(np.mean(lengths)), "truncated": float(np.mean(truncated)),
            "completions": texts}


# ----------------------------------------------------------------------------------------------
# 7. Run plumbing: device, seeds, DDP, arguments, JSONL, metrics, upstream stages
# ----------------------------------------------------------------------------------------------

def get_device(name: str = "auto") -> torch.device:
    """auto (CUDA when present) | cpu | cuda | cuda:N; anything else, or CUDA where there is none, is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"--device {name}: choose auto, cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def autocast(device):
    """bf16 autocast on CUDA (matmuls in bf16, reductions in fp32); plain fp32 on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_ddp():
    """Under torchrun (RANK/WORLD_SIZE set): join the process group (nccl on CUDA, gloo on CPU).
    -> (rank, world_size, is_ddp). A plain `python file.py` gives (0, 1, False)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist
    # nccl when every process on this node has a GPU of its own; otherwise (a CPU, or more processes than
    # GPUs, as in the CPU tests on a one-GPU machine) gloo, with the tensors on the CPU
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # rank 0 evaluates alone while the other ranks wait at the next collective: a timeout of an hour instead
        # of NCCL's default 10 minutes, so that a long evaluation of a real model is not taken for a hang
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    return dist.get_rank(), dist.get_world_size(), True


def cleanup_ddp() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# FSDP2 (Zhao et al. 2023, "PyTorch FSDP"; torch.distributed.fsdp.fully_shard): every rank keeps 1/world of
# each parameter (a DTensor sharded on dim 0), of its gradient and of the optimizer state built on it. A unit's
# forward all-gathers its parameters and frees them after; its backward reduce-scatters the gradients. Under
# `torchrun`, after setup_ddp: shard_model, then build the optimizer on the sharded parameters.

def fsdp_units(model) -> list:
    """The FSDP2 units inside `model` (the root first, then the blocks): [] for a model that is not sharded."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def shard_model(model: GPT, device, sum_gradients: bool = False) -> GPT:
    """Fully shard `model` (in place) over the default process group: each Block is one unit, then the root
    (embedding, final norm, LM head). Tied embeddings are one parameter, so wte and lm_head share one unit.

    Memory per rank for a full fine-tune with AdamW, P parameters, W ranks (activations apart):
        DDP:  16 P bytes            (bf16 weights and gradients, fp32 master weights and two moments)
        FSDP: 16 P / W bytes + the gathered bf16 weights of one or two units at a time
    Cost: each step all-gathers the weights twice (forward, backward) and reduce-scatters the gradients:
    1.5x DDP's all-reduce volume, overlapped with compute on CUDA.

    Mixed precision on CUDA (MixedPrecisionPolicy): units compute in bf16 from gathered bf16 weights, the
    gradients are reduced in fp32 into fp32 shards, and the optimizer updates fp32 master weights. On a CPU
    everything stays fp32 (gloo). Gradients are averaged over ranks, as DDP does; sum_gradients=True sums
    them instead (for a loss already divided by the whole batch's token count, as sft.py's is).

    The root keeps its gathered weights from the forward to the backward (FSDP's default for the root): the
    LM head runs after forward, in chunks, in token_logprobs. So after a forward under no_grad the root stays
    gathered until a backward or gathered()'s exit reshards it; an optimizer step taken in between would leave
    the next forward on the old root weights (model.reshard() first)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise UserError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                        f"this is torch {torch.__version__}") from None
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    device = torch.device(device)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if device.type == "cuda" else MixedPrecisionPolicy())
    # the mesh on the run's device: fully_shard's default would take a GPU whenever one exists
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if model.config.ffn == "moe":   # an expert no token reached on one rank still joins the reduce-scatter
        model.set_reduce_scatter_unused_params(True)
    if sum_gradients:   # a plain SUM (gloo has no pre-multiplied sum, which a divide factor of 1 would use)
        for unit in fsdp_units(model):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return model


@contextlib.contextmanager
def gathered(model):
    """Every rank holds the full weights inside the block: for generation and evaluation under FSDP
    (a no-op for a model that is not sharded). On entry, one all-gather per unit (collective: every rank
    enters); inside, forwards run on the gathered weights with no communication, so ranks may run different
    numbers of forwards (generate stops when its rows end) and rank 0 may evaluate alone; on exit the
    gathered copies are freed (local, no communication).

    Memory: the full weights in compute precision (2 P bytes in bf16) beside the shards, for the whole block,
    plus the KV cache. Time: one all-gather of 2 P bytes per block, instead of one per unit per forward
    (one per generated token). Production RL systems (verl, OpenRLHF) do not generate through the training
    model at all: a separate vLLM engine (paged KV cache, continuous batching, tensor parallelism) receives
    the new weights after each update and generates; the trainer only computes log-probabilities."""
    units = fsdp_units(model)
    for unit in units:
        unit.unshard()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)   # shard_model's setting
            unit.reshard()


def full_model(model, device="cpu"):
    """Collective: every rank calls it. Rank 0 gets a plain GPT holding the full fp32 weights, gathered from
    the shards (get_model_state_dict with full_state_dict=True, cpu_offload=True), for model.save and for
    evaluation in one process; the other ranks get None. A model that is not sharded is returned as it is."""
    if not fsdp_units(model):
        return model
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):     # allocates nothing: the gathered tensors become its parameters
        copy = GPT(model.config)
    copy.load_state_dict(state, assign=True)
    if model.config.tie_embeddings:
        copy.lm_head.weight = copy.wte.weight
    return copy.to(device)


def optimizer_parameter_names(model, optimizer) -> list[str]:
    """The name of each parameter of `optimizer`, in its param_groups order: index i of optimizer.state_dict()."""
    names = {param: name for name, param in model.named_parameters()}
    return [names[param] for group in optimizer.param_groups for param in group["params"]]


def full_optimizer_state(model, optimizer):
    """Collective. Rank 0: the full (unsharded) optimizer state in torch.optim's own format (state keyed by
    parameter index), the format optimizer.state_dict() gives one process, so a run saved under FSDP resumes
    in one process and the other way round. Other ranks: None. Not sharded: optimizer.state_dict()."""
    if not fsdp_units(model):
        return optimizer.state_dict()
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    index = {name: i for i, name in enumerate(optimizer_parameter_names(model, optimizer))}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def load_full_optimizer_state(model, optimizer, state) -> None:
    """Collective. Load a full optimizer state (torch.optim's format, as full_optimizer_state or one process
    saved it) into the sharded optimizer: rank 0's copy is broadcast and each rank keeps its shards
    (set_optimizer_state_dict with full_state_dict=True, broadcast_from_rank0=True). Every rank checks the
    state's structure first (ValueError), so a state that does not fit fails on all ranks, not in a collective."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = optimizer_parameter_names(model, optimizer)
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    shapes = [tuple(param.shape) for group in optimizer.param_groups for param in group["params"]]
    if [len(group["params"]) for group in state["param_groups"]] != sizes:
        raise ValueError(f"parameter groups of sizes {sizes} expected")
    for i, values in state["state"].items():
        if not isinstance(i, int) or not 0 <= i < len(names):
            raise ValueError(f"state for parameter {i!r}, but the optimizer has {len(names)}")
        for key, value in values.items():
            if torch.is_tensor(value) and value.dim() and tuple(value.shape) != shapes[i]:
                raise ValueError(f"state {key} of parameter {names[i]} has shape {tuple(value.shape)}, not {shapes[i]}")
    named = {}
    if dist.get_rank() == 0:
        named = {"state": {names[i]: values for i, values in state["state"].items()},
                 "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                  for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def is_main(rank: int = 0) -> bool:
    return rank == 0


def field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field in a dataclass's source: the help text of its option."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        name = None
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and name is None:
                name = tok.string
            elif tok.type == tokenize.COMMENT and name is not None:
                comments[name] = tok.string.lstrip("# ").strip()
            elif tok.type in (tokenize.NEWLINE, tokenize.NL):
                name = None
    return comments


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2): `error: argument --lr: 'nan' is not a finite number`."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def finite_float(text: str) -> float:
    """argparse type for float options: a number, never NaN or infinity."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_args(cls, argv=None, description: str | None = None, defaults: dict | None = None):
    """An argparse CLI from a dataclass: --field-name for each field, its trailing comment as help,
    its default shown; bools become --flag / --no-flag; floats must be finite. `defaults` replaces
    field defaults (a resumed run's saved arguments); an option on the command line still wins.
    Returns an instance of `cls` (whose __post_init__ may check the values further)."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    defaults = defaults or {}
    if description is None:
        main_doc = sys.modules["__main__"].__doc__
        description = main_doc if main_doc and cls.__module__ == "__main__" else cls.__doc__
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = defaults.get(f.name, default)
        help_text = comments.get(f.name, "").replace("%", "%%")     # argparse %-formats help text
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_text} (default: {default})")
        else:
            parser.add_argument(flag, dest=f.name, type={float: finite_float, int: int}.get(kind, str),
                                default=default, metavar=kind.__name__.upper() if hasattr(kind, "__name__") else "X",
                                help=f"{help_text} (default: {default})")
    try:
        return cls(**vars(parser.parse_args(argv)))
    except (TypeError, ValueError) as e:     # a __post_init__ check that raised a plain error
        raise UserError(str(e)) from None


def resume_args(cls, saved: dict, argv=None, quiet=("resume",)):
    """The arguments of a resumed run: the run's saved ones, except the options given again on this
    command line, each announced with one line. Unknown saved keys (an older version) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    base = {k: v for k, v in saved.items() if k in names}
    args = parse_args(cls, argv, defaults=base)
    for name in sorted(base):
        if name not in quiet and getattr(args, name) != base[name]:
            print(f"--{name.replace('_', '-')} {getattr(args, name)} given: overrides the saved {base[name]}")
    return args


# One rule per kind of option value; nan fails every one of them (every comparison with nan is False).
OPTION_RULES = {
    "positive": (lambda v: v > 0, "> 0"),
    "non_negative": (lambda v: v >= 0, ">= 0"),
    "probability": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "open_unit": (lambda v: 0 < v < 1, "in (0, 1)"),
    "unit_interval": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
    "temperature": (lambda v: v == 0 or 1e-6 <= v < 1e6, "0 (greedy) or in [1e-6, 1e6)"),   # z / tau stays finite
}


def check_options(args, **rules) -> None:
    """check_options(args, positive=("lr", "batch_size"), probability=("top_p",), ...): each named option
    must satisfy its rule (OPTION_RULES); the first that does not is a UserError naming its flag.
    Call it before anything is written."""
    for kind, names in rules.items():
        test, text = OPTION_RULES[kind]
        for name in names:
            value = getattr(args, name)
            if not test(value):
                raise UserError(f"--{name.replace('_', '-')} must be {text}, got {value}")


def check_choices(args, **choices) -> None:
    """check_choices(args, scale=("group", "batch", "none")): each option must be one of its choices."""
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: choose one of {', '.join(allowed)}")


def require_at_least(args, minimum: int, *names: str) -> None:
    """Each named option must be >= minimum; the first that is not is a UserError naming its flag."""
    for name in names:
        if not getattr(args, name) >= minimum:
            raise UserError(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(args, name)}")


def check_fsdp(args) -> None:
    """sft.py's and grpo.py's --fsdp: it needs torchrun with 2 or more processes, and not --compile-train."""
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UserError("--fsdp shards the model over processes: run under torchrun --nproc_per_node N (N >= 2)")
    if args.compile_train and args.fsdp:
        raise UserError("--compile-train with --fsdp is not supported: compile the blocks or shard them, not both")


def require_at_most(args, maximum, *names: str) -> None:
    """Each named option must be <= maximum (a bound that keeps a run from overflowing or never ending)."""
    for name in names:
        if not getattr(args, name) <= maximum:
            raise UserError(f"--{name.replace('_', '-')} must be <= {maximum:g}, got {getattr(args, name)}")


def check_budget(args) -> None:
    """A training run needs an end: --max-steps N or --time-budget MINUTES (either > 0)."""
    check_options(args, non_negative=("max_steps", "time_budget"))
    if args.max_steps <= 0 and args.time_budget <= 0:
        raise UserError("set a budget: --max-steps N or --time-budget MINUTES (both are 0)")


def cli(main) -> None:
    """Run main(); a UserError becomes one line on stderr and exit status 2, not a traceback.

    One of torchrun's ranks (WORLD_SIZE > 1) leaves with os._exit once main() is done, after flushing
    stdout and stderr: it skips the interpreter's shutdown. A gloo worker thread can still be dropping
    a finished collective whose tensors belong to Python objects; taking the GIL while the interpreter
    shuts down stops that thread with a forced unwind, which aborts the process (SIGABRT, "terminate
    called without an active exception": an SFT run on two ranks in CI, once). Whatever a stage writes
    is closed and renamed into place before main() returns, so nothing is lost."""
    world_size = os.environ.get("WORLD_SIZE", "1")
    a_rank = world_size.isdigit() and int(world_size) > 1
    try:
        main()
        status = 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except SystemExit as e:  # sys.exit(n) or sys.exit("message"): the status the interpreter would give
        if not a_rank:
            raise
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        status = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # a bug: the traceback the interpreter would print
        if not a_rank:
            raise
        traceback.print_exc()
        status = 1
    if a_rank:
        exit_without_shutdown(status)
    if status:
        sys.exit(status)


def exit_without_shutdown(status: int) -> None:
    """Flush stdout and stderr, then end this process at once (os._exit): no atexit handlers, no interpreter
    shutdown. For a process that joined a gloo process group (see cli)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({str: "a string", int: "an integer", float: "a number", list: "a list",
                        dict: "an object"}.get(t, t.__name__) for t in types)


def jsonl_objects(path: str):
    """Yield (line number, object) for each non-blank line of a JSONL file. Anything unreadable (a missing
    file, a directory, bytes that are not UTF-8, bad JSON, nesting or a number too big to parse, a line
    that is not an object) is a UserError naming file:line."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, not a JSONL file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            except RecursionError:
                raise UserError(f"{where}: JSON nested too deeply") from None
            except ValueError as e:      # e.g. an integer of more than 4300 digits
                raise UserError(f"{where}: unreadable JSON value ({str(e).splitlines()[0][:80]})") from None
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def check_row(row: dict, schema, where: str) -> None:
    """`schema`: the keys the row needs, or {key: type or (types)} to check each value's type too
    (bool is never a number). A missing key or a wrong type is a UserError naming `where`."""
    types = schema if isinstance(schema, dict) else dict.fromkeys(schema)
    missing = [k for k in types if k not in row]
    if missing:
        raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
    for key, want in types.items():
        if want is not None and (not isinstance(row[key], want) or isinstance(row[key], bool)):
            raise UserError(f"{where}: '{key}' must be {type_names(want)}, got {type(row[key]).__name__}")


def read_jsonl(path: str, schema=()) -> list[dict]:
    """Read a JSONL file of objects, each checked against `schema` (check_row) before any row is used.
    Every problem, an empty file included, is a UserError naming file:line (jsonl_objects)."""
    rows = []
    for number, row in jsonl_objects(path):
        check_row(row, schema, f"{path}:{number}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: empty, no rows")
    return rows


def final_answer(answer) -> str:
    """An answer field as the verifier compares it: a number as text, or, for a GSM8K-style worked
    solution ('... #### 72'), the final answer after its last '####' (commas removed)."""
    text = str(answer)
    if "####" in text:
        return extract_answer(text) or ""
    return text.replace(",", "").strip()


def read_prompts(path: str) -> list[dict]:
    """RL / evaluation prompts: rows {"prompt": str, "answer": str or number} (TRL's format), or GSM8K's own
    {"question", "answer"} where the answer is a worked solution ending in '#### n'. Every row comes back
    with "prompt" and "answer" (the final answer, as text) beside its other keys; an answer with no final
    answer is an error naming its line, never a silent 0 reward."""
    rows = []
    for number, row in jsonl_objects(path):
        where = f"{path}:{number}"
        key = "prompt" if "prompt" in row else "question"
        check_row(row, {key: str, "answer": (str, int, float)}, where)
        if "numbers" in row:              # a Countdown row: the numbers its expression may use
            check_row(row, {"numbers": list}, where)
            if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in row["numbers"]):
                raise UserError(f"{where}: 'numbers' must be a list of numbers")
        answer = final_answer(row["answer"])
        if not answer:
            raise UserError(f"{where}: 'answer' holds no final answer")
        rows.append({**row, "prompt": row[key], "answer": answer})
    if not rows:
        raise UserError(f"{path}: empty, no rows")
    return rows


def read_demonstrations(path: str) -> list[dict]:
    """SFT demonstrations: rows {"prompt": str, "completion": str} (TRL's format), or GSM8K's own
    {"question", "answer"}, whose worked answer is the completion."""
    rows = []
    for number, row in jsonl_objects(path):
        if "prompt" in row or "completion" in row or "question" not in row:
            check_row(row, {"prompt": str, "completion": str}, f"{path}:{number}")
            rows.append(row)
        else:
            check_row(row, {"question": str, "answer": str}, f"{path}:{number}")
            rows.append({**row, "prompt": row["question"], "completion": row["answer"]})
    if not rows:
        raise UserError(f"{path}: empty, no rows")
    return rows


def fit_prompts(rows: list[dict], enc, block_size: int, max_new_tokens: int, path: str,
                verbose: bool = True) -> list[dict]:
    """The rows whose prompt leaves room for max_new_tokens in the context (prompt + completion <=
    block_size); the others are skipped and counted in one printed line (verbose: say it on rank 0 only).
    None left is a UserError."""
    kept = [r for r in rows if 0 < len(encode(enc, r["prompt"])) and
            len(encode_prompt(enc, r["prompt"])) + max_new_tokens <= block_size]
    if verbose and len(kept) < len(rows):
        print(f"{path}: skipped {len(rows) - len(kept)} of {len(rows)} prompts longer than the context "
              f"({block_size} tokens, {max_new_tokens} of them kept for the completion) or empty", flush=True)
    if not kept:
        raise UserError(f"{path}: no prompt fits the context of {block_size} tokens with {max_new_tokens} new tokens")
    return kept


def write_jsonl(path: str, rows) -> None:
    """Write rows atomically (temporary file, then rename): readers never see half a file."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


_RUN_LOCKS: dict = {}


def claim_run_dir(run_dir: str) -> None:
    """Make `run_dir` this process's folder to write: create it and hold an exclusive lock on
    run_dir/.lock until the process exits. A second process that claims it gets a UserError naming the
    folder and the holder's pid, before it writes anything: a run folder has one writer."""
    key = os.path.realpath(run_dir)
    if key in _RUN_LOCKS:
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
        handle = open(os.path.join(run_dir, ".lock"), "a+")
    except OSError as e:      # a file where the folder should be, no permission, ...
        raise UserError(f"{run_dir}: cannot use it as a run folder ({e.strerror})") from None
    try:
        import fcntl
    except ImportError:          # no advisory locks on this platform: single-writer by convention only
        _RUN_LOCKS[key] = handle
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise UserError(f"{run_dir}: another run (pid {holder}) is writing to this folder; "
                        "wait for it to finish or choose another output folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _RUN_LOCKS[key] = handle


def save_args(run_dir: str, args) -> None:
    """Claim the run folder (claim_run_dir) and write the arguments the run uses, atomically."""
    claim_run_dir(run_dir)
    with atomic_write(os.path.join(run_dir, "args.json")) as f:
        json.dump(asdict(args) if dataclasses.is_dataclass(args) else dict(args), f, indent=2)


def stage_command(script: str, **options) -> list[str]:
    """The command line of another stage from its Args field names: stage_command("sft.py", init="a.pt",
    control=False) -> ["sft.py", "--init", "a.pt", "--no-control"]. tests/test_pipeline.py parses every
    command built this way with the target's own parser."""
    command = [script]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            command.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            command += [flag, str(value)]
    return command


def format_seconds(s: float) -> str:
    s = int(min(max(s, 0), 10 ** 9)) if math.isfinite(s) else 10 ** 9
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class MetricsLogger:
    """One JSON line per log call into run_dir/metrics.jsonl, and a readable progress line with an ETA.
    `total` is the number of steps, or None when a time budget (`budget_s`) sets the end instead."""

    def __init__(self, run_dir: str, total: int | None = None, budget_s: float | None = None,
                 enabled: bool = True, append: bool = False):
        self.enabled, self.total, self.budget_s = enabled, total, budget_s
        self.start = time.time()
        self.file = None
        if enabled:
            claim_run_dir(run_dir)
            self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a" if append else "w")

    def log(self, step: int, echo: bool = True, **metrics) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.start
        row = {"step": step, "time_s": round(elapsed, 3)}
        row.update({k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in metrics.items()})
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if echo:
            if self.budget_s:
                eta = self.budget_s - elapsed
            elif self.total:
                eta = elapsed / max(step, 1) * (self.total - step)
            else:
                eta = None
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                             if k not in ("step", "time_s") and not isinstance(v, (list, dict)))
            where = f"step {step}" + (f"/{self.total}" if self.total else "")
            tail = f" | {format_seconds(elapsed)} elapsed" + (f", ETA {format_seconds(eta)}" if eta is not None else "")
            print(f"{where} | {shown}{tail}", flush=True)

    def close(self) -> None:
        if self.file:
            self.file.close()


def check_named_inputs(*inputs) -> None:
    """inputs: (path, default_path) pairs. Before a stage makes any missing default input (which can take
    minutes: data, then an SFT start), every input the user named must exist, so that a typo in the last one
    is one line at once, not an error after the upstream stages have run."""
    for path, default_path in inputs:
        if not os.path.exists(path) and os.path.normpath(path) != os.path.normpath(default_path):
            raise UserError(f"{path}: no such file")


def ensure_inputs(*inputs) -> None:
    """inputs: (path, default_path, command) triples. Every input the user named is checked first
    (check_named_inputs), then each missing default is made in order (ensure_input)."""
    check_named_inputs(*((path, default_path) for path, default_path, _ in inputs))
    for path, default_path, command in inputs:
        ensure_input(path, default_path, command)


def ensure_input(path: str, default_path: str, command: list[str]) -> str:
    """A stage's input: if `path` exists, use it. If it is missing and is the stage's default, make it by
    running the upstream stage (`command` = script and its arguments, run with this Python, printed
    first). If the user named it explicitly, that is an error naming the path."""
    if os.path.exists(path):
        return path
    check_named_inputs((path, default_path))
    print(f"{path} is missing; making it with: python {' '.join(command)}", flush=True)
    try:
        run_stage(command, echo=False)
    except UserError as e:
        raise UserError(f"{path}: could not make it: {e}") from None
    if not os.path.exists(path):
        raise UserError(f"{path}: `python {' '.join(command)}` finished without making it")
    return path


def run_stage(command: list[str], echo: bool = True) -> None:
    """Run another stage of the pipeline in its own process: `command` = a script beside model.py and its
    arguments, run with this Python. A non-zero exit is a UserError naming the command."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), command[0])
    if echo:
        print(f"running: python {' '.join(command)}", flush=True)
    result = subprocess.run([sys.executable, script, *command[1:]])
    if result.returncode != 0:
        raise UserError(f"`python {' '.join(command)}` failed with exit status {result.returncode}")


def sha256(path: str) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, in name order): proves that two runs
    started from the byte-identical checkpoint."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    for name in files:
        if len(files) > 1:
            digest.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}   # --dtype: the weights' own precision


def sparkline(values, width: int = 40) -> str:
    """A text plot: one block character per value, scaled between the min and the max."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    lo, hi = min(values), max(values)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in values)


def peak_memory_mb(device) -> float:
    """Peak memory of this process: CUDA's max_memory_allocated on a GPU, else the peak resident set."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


# ----------------------------------------------------------------------------------------------
# 8. Benchmark
# ----------------------------------------------------------------------------------------------

BENCH_SHAPES = {   # random weights at real shapes
    "default": {},
    "135m": dict(vocab_size=49152, n_layer=30, n_embd=576, n_head=9, n_kv_head=3, ffn_hidden=1536,
                 rope_base=100000.0, norm_eps=1e-5, block_size=2048),                      # SmolLM2-135M
    "0.5b": dict(vocab_size=151936, n_layer=24, n_embd=896, n_head=14, n_kv_head=2, ffn_hidden=4864,
                 qkv_bias=True, rope_base=1000000.0, norm_eps=1e-6, block_size=2048),      # Qwen2.5-0.5B
}


@dataclass
class BenchArgs:
    shape: str = "default"       # default (this project's 0.84 M model) | 135m (SmolLM2-135M) | 0.5b (Qwen2.5-0.5B)
    batch_size: int = 32         # sequences per training step
    seq_len: int = 128           # tokens per training sequence
    steps: int = 10              # timed training steps (after 2 warm-up steps)
    gen_batches: str = "1,64"    # generation batch sizes, comma-separated
    gen_tokens: int = 96         # new tokens per prompt (greedy, no early stop, so every row makes them all)
    recompute: bool = True       # also time generation without a cache (the whole sequence per token)
    compile: bool = False        # also time compiled blocks in training and the compiled decode step (CUDA graph / inductor)
    device: str = "auto"         # auto | cpu | cuda
    seed: int = 0                # random seed


def matmul_peak_flops(device, n: int = 2048, reps: int = 10) -> float:
    """This machine's measured dense fp32 (bf16 on CUDA) matmul throughput, 2 n^3 FLOPs per product."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int = 1) -> float:
    """Seconds per call of fn() after one warm-up call (compilation, CUDA graph capture, allocator)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def generate_by_recomputing(model, prompts, new_tokens: int, pad: int):
    """The baseline a KV cache removes: run the whole sequence again for every new token (greedy)."""
    device = model.wte.weight.device
    seq, mask = padded_batch(prompts, pad, side="left", device=device)
    for _ in range(new_tokens):
        positions, doc_ids = left_pad_inputs(mask)
        with autocast(device):
            next_token = model(seq, positions, doc_ids)[:, -1].argmax(-1)
        seq = torch.cat([seq, next_token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return seq[:, -new_tokens:]


@dataclass
class ExportArgs:
    checkpoint: str = ""         # what to export: a .pt checkpoint, a Hugging Face folder or a .gguf file
    to: str = ""                 # the Hugging Face folder to write (config.json, model.safetensors, tokenizer files)


def export(argv) -> None:
    """python model.py export --checkpoint runs/grpo/model.pt --to hf/grpo: a folder transformers loads."""
    args = parse_args(ExportArgs, argv, description=export.__doc__)
    if not args.checkpoint or not args.to:
        raise UserError("export needs --checkpoint PATH and --to FOLDER")
    model, enc, _ = load(args.checkpoint)
    save_hf(args.to, model, enc)
    print(f"wrote {args.to}: {', '.join(sorted(os.listdir(args.to)))}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export(argv[1:])
    args = parse_args(BenchArgs, argv)
    check_choices(args, shape=tuple(BENCH_SHAPES))
    check_options(args, positive=("batch_size", "seq_len", "steps", "gen_tokens"), seed=("seed",))
    try:
        gen_batches = [int(b) for b in args.gen_batches.split(",")]
        assert gen_batches and min(gen_batches) > 0
    except (ValueError, AssertionError):
        raise UserError(f"--gen-batches {args.gen_batches!r}: give positive integers, e.g. 1,64") from None
    seed_everything(args.seed)
    device = get_device(args.device)
    enc = get_tokenizer("bytes")
    cfg = Config(**{"vocab_size": enc.n_vocab, "block_size": max(256, args.seq_len), **BENCH_SHAPES[args.shape]})
    model = GPT(cfg).to(device)
    n_params = model.num_params()
    print(f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''} | shape "
          f"{args.shape}: {n_params / 1e6:.2f} M parameters ({cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} "
          f"heads / {cfg.n_kv_head} kv, ffn {cfg.ffn} {cfg.ffn_width}, vocab {cfg.vocab_size}) | random weights, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")

    # Training: forward + backward + AdamW (fused on CUDA) on random tokens; loss from chunked log-probs.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step():
        with autocast(device):
            loss = -token_logprobs(model, x).mean() + model.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_s = timed(train_step, device, args.steps)
    tokens_per_s = args.batch_size * args.seq_len / train_s
    # FLOPs per token (Kaplan et al. 2020; PaLM appendix B): 6 N for the matmuls + 12 L C T for attention.
    n_matmul = n_params - cfg.vocab_size * cfg.n_embd * (1 if cfg.tie_embeddings else 0)
    flops_per_token = 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * args.seq_len
    peak = matmul_peak_flops(device)
    achieved = flops_per_token * tokens_per_s
    print(f"training   {tokens_per_s:,.0f} tokens/s ({train_s * 1e3:.1f} ms/step, batch {args.batch_size}x{args.seq_len}) "
          f"| {achieved / 1e12:.3f} TFLOP/s = {achieved / peak:.1%} of the measured matmul peak "
          f"({peak / 1e12:.2f} TFLOP/s) | peak memory {peak_memory_mb(device):,.0f} MB")
    if args.compile:    # the same step with torch.compile'd blocks; the first call (the compilation) is the warm-up
        model.compile_blocks()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        compiled_s = timed(train_step, device, args.steps)
        model.compiled_blocks = None
        print(f"training, compiled blocks: {args.batch_size * args.seq_len / compiled_s:,.0f} tokens/s "
              f"({compiled_s * 1e3:.1f} ms/step), {train_s / compiled_s:.2f}x eager | peak memory "
              f"{peak_memory_mb(device):,.0f} MB")
    del optimizer, x
    model.zero_grad(set_to_none=True)

    # Generation: greedy, every row makes gen_tokens new tokens; the static KV cache, the compiled decode
    # step, and recomputing the whole sequence per token, all producing the same tokens.
    model.eval()
    rng = random.Random(args.seed)
    for batch in gen_batches:
        prompts = [encode(enc, f"{rng.randint(100, 999)}+{rng.randint(100, 999)}=?\n") for _ in range(batch)]
        new = batch * args.gen_tokens
        runs = {"KV cache": dict(compile=False)}
        if args.compile:
            runs["compiled"] = dict(compile=True)
        results, speeds = {}, {}
        for name, options in runs.items():
            def run():
                results[name] = generate(model, prompts, args.gen_tokens, temperature=0.0, stop_ids=(), **options).tokens
            speeds[name] = new / timed(run, device)
        line = f"generation batch {batch:3d}: " + " | ".join(f"{name} {s:,.0f} new tokens/s" for name, s in speeds.items())
        if "compiled" in speeds:
            line += (f" | compiled / eager {speeds['compiled'] / speeds['KV cache']:.2f}x, same tokens: "
                     f"{torch.equal(results['compiled'], results['KV cache'])}")
        if args.recompute:
            def recompute():
                results["recompute"] = generate_by_recomputing(model, prompts, args.gen_tokens, BYTE_PAD_ID)
            speed = new / timed(recompute, device)
            line += (f" | recomputing {speed:,.0f} new tokens/s: KV cache {speeds['KV cache'] / speed:.2f}x faster, "
                     f"same tokens: {torch.equal(results['recompute'], results['KV cache'])}")
        print(line, flush=True)


if __name__ == "__main__":
    cli(main)
