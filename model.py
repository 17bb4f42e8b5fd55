"""The transformer and its generation: a decoder-only language model a reader can take in at one sitting.

A decoder-only transformer (Radford et al. 2019; Vaswani et al. 2017) whose design choices are config
switches, because the choices are the lesson:

    x_0     = E[tokens] (+ P[positions] with learned positions)
    x_{l+1} = x_l + Attn(Norm(x_l)) ;  x_{l+1} = x_{l+1} + FFN(Norm(x_{l+1}))      (pre-norm)
    logits  = Norm(x_L) W_out^T ,  p(x_t | x_<t) = softmax(logits_{t-1})

then sampling (temperature, top-k, top-p, min-p as one pure function on logits), batched generation with a
KV cache, and the per-token log-probabilities that SFT, DPO, PPO and GRPO all train on.

The file reads in that order: 1. the model, 2. sampling, 3. generation, 4. log-probabilities, then
5. the fast paths (a denser eager cache, a CPU decode kernel, a compiled or CUDA-graph decode step), each
tested to give what the plain path gives, and 6. a demonstration. It imports only torch and the standard
library, so it can be copied alone; tokenizers, checkpoint files and run plumbing live in lib/.

    python model.py              # train a tiny GPT on a paragraph, then generate from it with the KV cache
    python model.py export --checkpoint runs/grpo/model.pt --to hf/grpo      # a folder transformers loads
"""
from __future__ import annotations

import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (the demo too)
import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# The default vocabulary, the byte tokenizer's (lib/tokenizer.py): 256 byte tokens, then these two.
BYTE_EOT_ID, BYTE_PAD_ID = 256, 257   # <|endoftext|>, <|pad|>


# ----------------------------------------------------------------------------------------------
# 1. The model
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
    # LoRA (Hu et al. 2021): trainable low-rank adapters beside the frozen weights of every linear layer in the blocks
    lora_rank: int = 0           # r, the rank of each adapter; 0 = no adapters (every parameter trains)
    lora_alpha: float = 16.0     # alpha: the update B A is scaled by alpha / r

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_head", "n_kv_head", "n_embd", "n_expert", "moe_top_k",
                     "rope_original_context"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Config.{name}={value!r} must be a positive integer")
        for name in ("n_layer", "ffn_hidden", "head_dim", "lora_rank"):   # 0 layers: a bigram model; 0 width: automatic
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"Config.{name}={value!r} must be an integer >= 0")
        for name, low in (("rope_base", 1.0), ("rope_factor", 0.0), ("rope_low_freq_factor", 0.0),
                          ("rope_high_freq_factor", 0.0), ("norm_eps", 0.0), ("lora_alpha", 0.0)):
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
        if self.lora_rank and self.ffn == "moe":
            raise ValueError("LoRA adapters (lora_rank > 0) are not supported with ffn='moe'")

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


class LoRALinear(nn.Linear):
    """A linear layer with a trainable low-rank update beside its frozen weight (Hu et al. 2021, LoRA:
    Low-Rank Adaptation of Large Language Models, arXiv 2106.09685):

        y = x W^T + b + (alpha / r) (x A^T) B^T ,    A (r, in), B (out, r), r << min(in, out)

    i.e. the weight W + (alpha / r) B A, learned through r (in + out) numbers instead of in * out. A starts
    random (kaiming-uniform, as in Hu et al.'s loralib) and B at zero, so training starts exactly from the
    base model. merged() folds the update into W: the adapted model then costs nothing extra to run."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))     # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))    # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @classmethod
    def adapting(cls, linear: nn.Linear, rank: int, alpha: float) -> LoRALinear:
        """`linear` with an adapter: its own weight and bias, a new A and B = 0 on the weight's device and dtype."""
        lora = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, alpha,
                   device=linear.weight.device, dtype=linear.weight.dtype)
        lora.weight, lora.bias = linear.weight, linear.bias
        return lora

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function: W' = W + (alpha / r) B A (summed in fp32), same bias."""
        with torch.no_grad():
            weight = self.weight.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())   # (out, in)
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight, linear.bias = nn.Parameter(weight.to(self.weight.dtype)), self.bias
        return linear

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


def make_linear(cfg: Config, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """A linear layer of a block: with cfg.lora_rank > 0, one with a LoRA adapter (GPT freezes its weight)."""
    if cfg.lora_rank:
        return LoRALinear(in_features, out_features, bias, cfg.lora_rank, cfg.lora_alpha)
    return nn.Linear(in_features, out_features, bias=bias)


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


class Attention(nn.Module):
    """Multi-head causal self-attention with grouped-query attention (Ainslie et al. 2023).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + mask) V, through F.scaled_dot_product_attention
    (fused kernels on CUDA). With n_kv_head < n_head each K/V head serves n_head / n_kv_head query heads.
    With a cache (KVCache), this call's keys and values are written into it and the queries attend to
    every cached slot the mask lets them see.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q = make_linear(cfg, cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias or cfg.qkv_bias)
        self.kv = make_linear(cfg, cfg.n_embd, 2 * cfg.n_kv_head * cfg.head_dim, bias=cfg.bias or cfg.qkv_bias)
        self.proj = make_linear(cfg, cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
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
            if T == 1 and x.device.type == "cpu":    # FAST PATH: one query per row on a CPU (section 5)
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
        self.w1 = make_linear(cfg, cfg.n_embd, cfg.ffn_width, bias=cfg.bias)
        self.w3 = make_linear(cfg, cfg.n_embd, cfg.ffn_width, bias=cfg.bias) if self.gated else None
        self.w2 = make_linear(cfg, cfg.ffn_width, cfg.n_embd, bias=cfg.bias)
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
    With config.lora_rank > 0 the blocks' linear layers carry LoRA adapters and only the adapters train;
    add_lora turns a (pretrained) model into one, merge_lora folds the adapters back into the weights.
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
        self.checkpoint_blocks = False   # MEMORY: gradient checkpointing, activations of one block, not all L
        self.compiled_blocks = None      # FAST PATH: compile_blocks()'s torch.compile'd blocks, for training
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight   # Press & Wolf 2017
        if cfg.lora_rank:
            self.freeze_all_but_adapters()

    def _init_weights(self, module):
        """N(0, 0.02); residual output projections N(0, 0.02 / sqrt(2 L)) so the residual stream's
        variance does not grow with depth (GPT-2)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def add_lora(self, rank: int, alpha: float = 16.0) -> GPT:
        """LoRA in place (Hu et al. 2021): an adapter of rank r on every linear layer of the blocks (attention
        q, kv, proj; FFN w1, w2, w3; not the embedding or LM head), A random and B = 0 so the logits do not
        change; every other parameter frozen. config becomes the one GPT(config) builds this model from."""
        if self.config.lora_rank:
            raise ValueError(f"the model already has LoRA adapters of rank {self.config.lora_rank} (merge_lora first)")
        if type(rank) is not int or rank < 1:
            raise ValueError(f"LoRA rank={rank!r} must be a positive integer")
        self.config = replace(self.config, lora_rank=rank, lora_alpha=alpha)   # validates alpha, refuses MoE
        self.replace_block_linears(lambda linear: LoRALinear.adapting(linear, rank, alpha))
        self.freeze_all_but_adapters()
        return self

    def merge_lora(self) -> GPT:
        """Fold each adapter into its weight, W <- W + (alpha / r) B A, leaving plain nn.Linear layers, no
        adapter tensors, config.lora_rank = 0 and every parameter trainable. copy.deepcopy(model).merge_lora()
        exports a copy. Without adapters, a no-op."""
        if self.config.lora_rank:
            self.replace_block_linears(LoRALinear.merged)
            self.config = replace(self.config, lora_rank=0)
            self.requires_grad_(True)
        return self

    def replace_block_linears(self, make) -> None:
        """Each nn.Linear inside the blocks becomes make(linear), under the same name (so the same state-dict keys)."""
        for block in self.blocks:
            for parent in list(block.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, make(child))

    def freeze_all_but_adapters(self) -> None:
        """LoRA trains A and B only: every other parameter (embeddings and norms included) is frozen."""
        for name, p in self.named_parameters():
            p.requires_grad = name.endswith(("lora_a", "lora_b"))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())   # tied weights are counted once

    @property
    def aux_loss(self):
        """MoE load-balancing + router z-loss of the last forward pass (0 without MoE): add it to the loss."""
        losses = [b.ffn.aux_loss for b in self.blocks if isinstance(b.ffn, MoE)]
        return sum(losses) if losses else torch.zeros((), device=self.wte.weight.device)

    def forward(self, tokens, positions=None, doc_ids=None, cache: KVCache | None = None, cache_index=None,
                return_hidden: bool = False):
        """Logits (B, T, V) in float32; or, with return_hidden, the final hidden states (B, T, C), for
        callers that apply the LM head in chunks (token_logprobs) and still go through forward (DDP)."""
        h = self.hidden(tokens, positions, doc_ids, cache, cache_index)
        return h if return_hidden else self.lm_head(h).float()

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
        x = self.drop(self.embed(tokens, positions))                              # (B, T, C)
        rope = None
        if self.wpe is None:   # fp32 frequencies from the config on every call: cheap, and never cast to bf16
            rope = rope_cos_sin(positions, rope_frequencies(self.config, tokens.device))
        if cache is not None:
            mask = self.cache_mask(cache, doc_ids, cache_index, advance)            # (B, 1, T, L)
        elif doc_ids is not None:
            index = torch.arange(T, device=tokens.device)
            mask = attention_mask(doc_ids, doc_ids, index, index)                   # (B, 1, T, T)
        else:
            mask = None                                                             # plain causal
        for layer, block in enumerate(self.blocks):
            x = self.run_block(block, layer, x, rope, mask, cache, None if advance else cache_index)
        if advance:
            cache.length += T
        return self.norm_f(x)

    def embed(self, tokens, positions):
        """Token embeddings (B, T, C), plus position embeddings when positions are learned."""
        x = self.wte(tokens)
        if self.wpe is not None:
            capturing = torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())
            if not capturing and int(positions.max()) >= self.config.block_size:
                raise ValueError(f"position {int(positions.max())} >= block_size {self.config.block_size}")
            x = x + self.wpe(positions)
        return x

    def cache_mask(self, cache: KVCache, doc_ids, cache_index, advance: bool):
        """Record this call's document ids (B, T) at its slots; the mask (B, 1, T, L) over the cached slots.
        Which slots the mask covers, and so attention reads: the written ones when this call knows where it
        writes (a Python int; eager decoding attends to 20 slots, not the buffer's 100+), the whole buffer when
        the slots are a tensor (a compiled step: the same shapes every step)."""
        T = cache_index.shape[0]
        if doc_ids is None:
            doc_ids = torch.zeros(cache.shape[0], T, dtype=torch.long, device=cache.doc_ids.device)
        cache.write(cache.doc_ids, 1, doc_ids, None if advance else cache_index)
        visible = cache.length + T if advance else cache.doc_ids.shape[1]
        return attention_mask(doc_ids, cache.doc_ids[:, :visible], cache_index, cache.slots[:visible])

    def run_block(self, block, layer: int, x, rope, mask, cache, cache_index):
        """One block. A training forward (no cache, gradients on) may run the block compiled (FAST PATH:
        compile_blocks) or recompute it in the backward pass (MEMORY: checkpoint_blocks keeps only its input)."""
        training = cache is None and torch.is_grad_enabled()
        if training and self.compiled_blocks is not None:
            block = self.compiled_blocks[layer]
        if training and self.checkpoint_blocks:
            return torch.utils.checkpoint.checkpoint(block, x, rope, mask, None, layer, use_reentrant=False)
        return block(x, rope, mask, cache, layer, cache_index)

    def compile_blocks(self, backend: str = "inductor") -> None:
        """FAST PATH: torch.compile each transformer block for the training forward (no cache, gradients on),
        as torchtitan compiles per block: a block's norms, RoPE and activations fuse, and its Python overhead
        goes. The compiled blocks wrap these ones, so the parameters, state_dict, optimizer and checkpoints
        are unchanged; forwards without gradients (evaluation, a reference) and decoding stay eager. Tests
        check the loss and gradients equal the eager ones."""
        self.compiled_blocks = [torch.compile(block, backend=backend) for block in self.blocks]


def unwrap(model) -> GPT:
    """The GPT inside a DistributedDataParallel (or any .module) wrapper."""
    return model.module if hasattr(model, "module") else model


def autocast(device):
    """bf16 autocast on CUDA (matmuls in bf16, reductions in fp32); plain fp32 on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# 2. Sampling: one distribution for drawing tokens and for scoring them
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
    if temperature == 0:        # greedy: a point mass on argmax z, log-prob 0 (sampling_logprobs' greedy case)
        tokens = logits.argmax(-1)
        return tokens, torch.zeros(tokens.shape, device=logits.device)
    logp = sampling_logprobs(logits, temperature, top_k, top_p, min_p)
    cumulative = logp.double().exp().cumsum(-1)                                                # (..., V)
    u = 1.0 - torch.rand(logp.shape[:-1], generator=generator, dtype=torch.float64, device=logp.device)
    tokens = torch.searchsorted(cumulative, (u * cumulative[..., -1])[..., None]).squeeze(-1)   # (...,)
    return tokens, logp.gather(-1, tokens[..., None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# 3. Generation: a KV cache, prefill once, then decode one token per row per step
# ----------------------------------------------------------------------------------------------

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


class KVCache:
    """A static key/value cache (Pope et al. 2022; gpt-fast's static cache): each layer's keys and values
    live in one buffer (B, n_kv_head, max_len, head_dim), allocated at the first write and zeroed, and
    written in place at the slots of the current call, so decoding one token costs O(T), not O(T^2), and
    every decode step can see the same tensor shapes (it can be compiled or captured as a CUDA graph).

    doc_ids (B, max_len): the document of each written slot, -1 where nothing is written yet, so an
    empty slot is never attended to. `length` slots are written (the same for every row: prompts are
    left-padded to one length). keep(rows) drops finished rows or repeats a row."""

    def __init__(self, cfg: Config, batch_size: int, max_len: int, device):
        self.k = [None] * cfg.n_layer
        self.v = [None] * cfg.n_layer
        self.shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.doc_ids = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)                       # (L,) key index of each slot
        self.length = 0

    def buffer(self, like, batch_size: int, slots: int):
        """A (batch_size, Hkv, slots, d) buffer of zeros in like's dtype and device. Zeros, because a step at
        fixed shapes reads every slot: an empty slot gets weight 0, and 0 times an uninitialised NaN is NaN."""
        return torch.zeros((batch_size, self.shape[1], slots, self.shape[3]), dtype=like.dtype, device=like.device)

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
        caller attends to the slots its mask covers: all of them at fixed shapes, the written ones eagerly).
        The buffers are allocated at the first write, in the dtype the layer produces (bf16 under autocast)."""
        if self.k[layer] is None:
            self.k[layer] = self.buffer(k, self.shape[0], self.shape[2])
            self.v[layer] = self.buffer(v, self.shape[0], self.shape[2])
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


@dataclass
class Generation:
    tokens: torch.Tensor     # (B, N) new tokens, right-padded with pad_id; a stop token is included
    logprobs: torch.Tensor   # (B, N) log-prob of each new token under the sampling distribution, 0 at pads
    lengths: torch.Tensor    # (B,) new tokens per row
    finished: torch.Tensor   # (B,) True: ended with a stop token; False: truncated at max_new_tokens


def decode_one_token(model: GPT, token, position, cache: KVCache, slot=None):
    """logits (B, V) of the next token of every row: the model on one token per row (B,) at rope position
    (B,), written into the cache at `slot` (a (1,) tensor, for a step at fixed shapes, or None: the next
    slot, cache.length, and attention over the written slots only). gpt-fast's decode_one_token."""
    real = torch.ones_like(token)[:, None]                                   # (B, 1) document 1: real tokens
    return model(token[:, None], position[:, None], real, cache, cache_index=slot)[:, -1]   # (B, V)


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, stop_ids=(BYTE_EOT_ID,), pad_id: int = BYTE_PAD_ID,
             generator=None, compile: bool | str | None = None, compact: bool = True, check_every: int = 0) -> Generation:
    """Batched sampling with a static KV cache: prefill the left-padded prompts in one forward (each distinct
    prompt once; its samples copy its cache rows), then decode one token per row per step (Decoder), attending
    to the written slots only when the step runs eagerly. Pads form their own document and positions start at
    each row's first real token, so a row samples as it would alone. A row stops at its first stop id (the
    defaults are the byte tokenizer's; pass enc-specific ids).

    compile: the Decoder's mode: "eager", "cuda_graph" or "inductor" (see Decoder), or True (cuda_graph on CUDA,
    inductor on a CPU), False (eager), None (the default: True on CUDA, False on a CPU). On CUDA the default stays
    the hand-captured graph of the eager step until a GPU measurement shows inductor's faster at GRPO's shapes
    (docs/performance.md; inductor compiles anew for each batch size). On a CPU inductor's first compile takes
    about a minute, more than it saves in a run.
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
        cache_type = DenseKVCache if decoder.mode == "eager" else KVCache      # eager: the denser layout
        cache = cache_type(model.config, len(distinct), P + max_new_tokens, device)
        stop = torch.tensor(list(stop_ids), device=device, dtype=torch.long)
        out_tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        out_logprobs = torch.zeros(B, max_new_tokens, device=device)
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
                done |= torch.isin(token, stop)
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
        # Each row's end, read off its tokens once rather than tracked every step: a row stops at its first stop
        # id and holds pad_id after it, so that first stop id is its own (even when pad_id is a stop id).
        stops = torch.isin(out_tokens[:, :n], stop)                             # (B, n)
        finished = stops.any(1)                                                 # (B,)
        lengths = (stops.cumsum(1) == 0).sum(1) + finished                      # (B,) tokens to the stop, included
    model.train(was_training)
    return Generation(out_tokens[:, :n].clone(), out_logprobs[:, :n].clone(), lengths.clone(), finished.clone())


# ----------------------------------------------------------------------------------------------
# 4. Log-probabilities: log pi(x_t | x_<t), the quantity SFT, DPO, PPO and GRPO train on
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
# 5. Fast paths: the same numbers as the plain path above, for less time (tests compare the two)
# ----------------------------------------------------------------------------------------------

SLOT_GROWTH = 4   # a DenseKVCache's buffers grow this many slots at a time


class DenseKVCache(KVCache):
    """FAST PATH: the cache of eager decoding, which attends to the written slots only. Its buffers hold those
    slots and room for at most SLOT_GROWTH - 1 more, uninitialised, and are re-laid out (the written slots
    copied to a larger buffer) when a write does not fit. Attention reads each (row, head)'s slots [0, length);
    with rows max_len slots apart, as in KVCache, a CPU's prefetchers stream those reads at a third of the
    speed of rows a few slots apart (GRPO's rollout from a trained policy: 1.2x faster overall, the same
    numbers; docs/performance.md). Eager writes only (index None): a compiled step needs KVCache."""

    def buffer(self, like, batch_size: int, slots: int):
        """Uninitialised: eager decoding never reads a slot it has not written (a test fills them with NaN)."""
        return torch.empty((batch_size, self.shape[1], slots, self.shape[3]), dtype=like.dtype, device=like.device)

    def update(self, layer: int, k, v, index=None):
        needed = self.length + k.shape[2]
        if self.k[layer] is None or needed > self.k[layer].shape[2]:
            slots = min(self.shape[2], needed + SLOT_GROWTH - 1)
            self.k[layer], self.v[layer] = self.relaid(self.k[layer], k, slots), self.relaid(self.v[layer], v, slots)
        return super().update(layer, k, v, index)

    def relaid(self, old, like, slots: int):
        """A buffer of `slots` slots in like's dtype, holding old's written slots (old: None before the first write)."""
        new = self.buffer(like, self.shape[0], slots)
        if old is not None:
            new[:, :, :self.length] = old[:, :, :self.length]
        return new


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


DECODE_BACKEND = "inductor"   # torch.compile backend of the "inductor" decode step (tests swap in "aot_eager")
DECODE_MODES = ("eager", "cuda_graph", "inductor")


class Decoder:
    """The decode step generate runs max_new_tokens times: decode_one_token, eager or (FAST PATH) fused.
    Prefill (the prompt, once) stays a plain forward. The modes, each tested to give the eager step's greedy
    tokens and sampling log-probs:

    eager:       eager PyTorch; attention reads the written slots only.
    cuda_graph:  (CUDA) the eager step captured as a CUDA graph (one per batch size, re-captured when finished
                 rows are dropped) and replayed: one launch per step instead of a few hundred (a small model
                 decoding a small batch is launch-bound). The default on CUDA.
    inductor:    the step compiled by torch.compile (inductor): the norms, RoPE, activations, mask and cache
                 writes fuse into a few kernels between the matmuls. On CUDA the compiled step is then captured
                 in the same hand-made CUDA graph, as vLLM does (inductor fuses, the graph removes the launches),
                 so it is cuda_graph with fewer kernels; on a CPU it is called as it is. Each batch size compiles
                 anew (dynamic=False: the fastest kernels), about a minute the first time, which is why it is not
                 the default for rollouts whose batch shrinks as rows finish.
    compile=True picks cuda_graph on CUDA and inductor on a CPU; False, eager. A mixture-of-experts FFN routes
    with data-dependent shapes, so it always decodes eagerly. Not torch.compile(mode="reduce-overhead"): its
    CUDA graphs skip a step that writes into its inputs (the cache) unless each buffer is marked with
    torch._dynamo.mark_static_address, and re-record on their own terms; one capture serves both modes here."""

    def __init__(self, model: GPT, compile: bool | str = False):
        self.model = model
        cuda = model.wte.weight.device.type == "cuda"
        mode = {True: "cuda_graph" if cuda else "inductor", False: "eager"}.get(compile, compile)
        if mode not in DECODE_MODES or (mode == "cuda_graph" and not cuda):
            raise ValueError(f"compile={compile!r}: True, False or one of {DECODE_MODES} (cuda_graph needs CUDA)")
        self.mode = "eager" if model.config.ffn == "moe" else mode
        self.graph = None
        self.fixed_shape_step = self.step             # the step at fixed shapes, the slot a tensor: what is captured
        if self.mode == "inductor":
            self.fixed_shape_step = torch.compile(self.step, dynamic=False, backend=DECODE_BACKEND)

    def step(self, token, position, slot, cache: KVCache):
        return decode_one_token(self.model, token, position, cache, slot)

    def __call__(self, token, position, slot: int, cache: KVCache):
        if self.mode != "eager" and token.is_cuda:
            try:
                logits = self.replay(token, position, slot, cache)
            except RuntimeError as e:       # a compile or capture this device or op cannot do: decode eagerly instead
                print(f"note: {self.mode} decode step failed ({str(e).splitlines()[0][:120]}); decoding eagerly",
                      flush=True)
                self.mode, self.graph = "eager", None
        elif self.mode == "inductor":
            logits = self.fixed_shape_step(token, position, torch.tensor([slot], device=token.device), cache)
        if self.mode == "eager":            # the slot as cache.length: attention reads the written slots only
            cache.length = slot
            logits = self.step(token, position, None, cache)
        cache.length = slot + 1
        return logits

    def replay(self, token, position, slot: int, cache: KVCache):
        """CUDA graph: static input buffers, captured once per batch size (after warm-up on a side stream, where an
        inductor step compiles and tunes its kernels), then replayed with this step's inputs copied in. The
        cache's buffers are fixed addresses."""
        if self.graph is None or self.graph_batch != token.shape[0] or self.graph_cache is not cache.k[0]:
            self.inputs = (token.clone(), position.clone(), torch.tensor([slot], device=token.device))
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):     # warm-up: writes this slot, which the real replay overwrites
                    self.fixed_shape_step(*self.inputs, cache)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.fixed_shape_step(*self.inputs, cache)
            self.graph_batch, self.graph_cache = token.shape[0], cache.k[0]
        self.inputs[0].copy_(token)
        self.inputs[1].copy_(position)
        self.inputs[2].fill_(slot)
        self.graph.replay()
        return self.outputs


# ----------------------------------------------------------------------------------------------
# 6. A demonstration: python model.py
# ----------------------------------------------------------------------------------------------

DEMO_TEXT = ("A language model reads a sequence of tokens and predicts the next one. A transformer does it in "
             "layers: in each, every token looks back at the tokens before it, takes what it needs, and passes "
             "the result on. Trained on text, it learns to continue text; sampled one token at a time, it writes. ")


@torch.no_grad()
def greedy_by_recomputing(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    """The baseline a KV cache removes: run the whole sequence again for every new token (greedy)."""
    seq = torch.tensor([prompt], device=model.wte.weight.device)
    for _ in range(new_tokens):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, len(prompt):].tolist()


def main(argv=None) -> None:
    """Fit the default GPT to DEMO_TEXT byte by byte, then continue a prompt greedily with generate (KV cache)
    and by recomputing the whole sequence per token: the same tokens, at a fraction of the work."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:      # lib's commands (checkpoint files are not the model's business)
        from lib import checkpoints, cli
        return cli.run(lambda: checkpoints.export(argv[1:]))
    if argv[:1] == ["chat"]:
        from lib import chat, cli
        return cli.run(lambda: chat.main(argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="AdamW steps on the paragraph (default: 300)")
    parser.add_argument("--new-tokens", type=int, default=100, help="bytes to generate (default: 100)")
    parser.add_argument("--prompt", default="A transformer", help="the text to continue (default: 'A transformer')")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.steps < 0 or not 1 <= args.new_tokens <= 1000 or not args.prompt:
        parser.error("--steps must be >= 0, --new-tokens in [1, 1000], --prompt not empty")
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = torch.tensor(list(DEMO_TEXT.encode()), device=device)               # bytes are token ids 0..255
    model = GPT(Config()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"GPT: {model.num_params() / 1e6:.2f} M parameters, fit to {len(data)} bytes of text on {device.type}")
    T, B = 128, 8
    for step in range(args.steps + 1):
        starts = torch.randint(0, len(data) - T, (B,)).tolist()
        batch = torch.stack([data[s:s + T + 1] for s in starts])                   # (B, T + 1)
        with autocast(device):
            loss = -token_logprobs(model, batch).mean()                            # next-byte cross-entropy
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d} | loss {loss.item():.3f} nats/byte")
        if step < args.steps:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    prompt = list(args.prompt.encode())[-128:]
    timed = {}
    for name, run in (("KV cache", lambda: generate(model, [prompt], args.new_tokens, temperature=0.0,
                                                    stop_ids=()).tokens[0].tolist()),
                      ("recomputing", lambda: greedy_by_recomputing(model, prompt, args.new_tokens))):
        start = time.perf_counter()
        timed[name] = (run(), time.perf_counter() - start)
    tokens = timed["KV cache"][0]
    print("\n" + (bytes(prompt) + bytes(t for t in tokens if t < 256)).decode("utf-8", "replace") + "\n")
    speed = {name: args.new_tokens / seconds for name, (_, seconds) in timed.items()}
    print(f"greedy, {args.new_tokens} new tokens: KV cache {speed['KV cache']:,.0f} tokens/s, recomputing the whole "
          f"sequence {speed['recomputing']:,.0f} tokens/s ({speed['KV cache'] / speed['recomputing']:.1f}x); "
          f"same tokens: {tokens == timed['recomputing'][0]}")


if __name__ == "__main__":
    main()
