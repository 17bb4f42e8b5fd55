"""GRPO: Group Relative Policy Optimization with verifiable rewards (Shao et al. 2024, DeepSeekMath).

PPO needs a value network to tell a good action from a lucky one. GRPO drops it: for each prompt q
it samples a group of G completions o_1..o_G from the old policy, scores each with a verifiable
reward r_i (is the `#### answer` right?), and uses the completion's standing inside its group as
the advantage of every one of its tokens:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)                       (scale="group")

    J(theta) = E[ agg_{i,t} min( rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high) A_i )
                                - beta * KL_k3(pi_theta || pi_ref)_{i,t} ]
    rho_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})

Variants behind switches: Dr. GRPO (Liu et al. 2025: no std scaling, sum over tokens / constant),
DAPO (Yu et al. 2025: clip-higher eps_high > eps_low, token-level mean over the batch, dynamic
sampling that drops groups whose rewards are all equal, overlong shaping), GSPO (Zheng et al.
2025: one sequence-level ratio exp(mean_t log rho_{i,t})).

One training step is four phases, each a function below: rollout (sample G completions per prompt
and score them) -> advantages (group-relative) -> update (update_epochs passes of the clipped
surrogate, old log-probs fixed) -> log and evaluate.

`python grpo.py` (about 10 minutes on 2 CPU cores): builds its inputs if missing (synth.py data, an
SFT start from sft.py), trains with GRPO for a fixed number of steps, then runs the control that
keeps the comparison honest: SFT continued from the byte-identical start on the same demonstrations
for the same wall-clock minutes that GRPO took (sft.py as a subprocess). It ends with one table for
the SFT start, GRPO and the control, all evaluated by the same function on the same held-out prompts.
Two more controls: rejection-sampling fine-tuning (rft) for the same minutes, and GRPO's own steps on a random reward.

    python grpo.py                                   # the headline: GRPO vs its SFT start vs more SFT
    python grpo.py --controls sft,rft,random         # and vs RFT, and vs GRPO on a reward that carries nothing
    python grpo.py --no-control --max-steps 50       # GRPO alone
    python grpo.py --time-budget 3 --max-steps 0     # a wall-clock budget instead of a step budget
    torchrun --nproc_per_node=2 grpo.py --no-control # rollouts split over 2 processes
    torchrun --nproc_per_node=2 grpo.py --no-control --fsdp   # and the model sharded over them (docs/fsdp.md)
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass, asdict

import torch
import torch.distributed as dist

import model as M
from lib import checkpoints, cli, distributed, rundir, stages, tasks, tokenizer


@dataclass
class Args:
    init: str = "runs/sft/model.pt"        # SFT checkpoint to start from (built by sft.py if this default is missing)
    data: str = "data/rl_train.jsonl"      # RL prompts: {"prompt", "answer"} JSONL (GSM8K's {"question", "answer"} too)
    eval_data: str = "data/rl_test.jsonl"  # held-out prompts, the same for every row of the final table
    sft_data: str = "data/sft_train.jsonl" # demonstrations the control continues SFT on
    sft_test_data: str = "data/sft_test.jsonl"  # demonstrations for the control's eval loss
    out: str = "runs/grpo"                 # run folder: model.pt, metrics.jsonl, summary.json, args.json
    fresh_start: bool = False              # train a new SFT start with --seed into OUT/sft first (multi-seed runs)
    # rollouts
    prompts_per_step: int = 32             # P: prompts per step
    group_size: int = 8                    # G: completions sampled per prompt
    temperature: float = 1.0               # sampling temperature of rollouts (and of the ratio's log-probs)
    top_k: int = 0                         # top-k truncation of the sampler (0 = off)
    top_p: float = 1.0                     # nucleus truncation of the sampler (1 = off)
    max_new_tokens: int = tasks.MAX_NEW_TOKENS # completion length limit; longer ones are truncated
    rewards: str = "correct=1.0"           # weighted reward functions, name=weight: correct, format, overlong, expression, program
    dynamic_sampling: bool = True          # drop groups whose rewards are all equal (DAPO); refill up to --refill-rounds
    refill_rounds: int = 0                 # extra sampling rounds to refill dropped groups (0 = just drop)
    # loss
    scale: str = "group"                   # advantage scaling: group (GRPO) | batch | none (Dr. GRPO)
    aggregation: str = "dapo"              # grpo (mean per sequence) | dr_grpo (sum / constant) | dapo (token mean)
    ratio_level: str = "token"             # token | sequence (GSPO)
    eps_low: float = 0.2                   # clip range below 1
    eps_high: float = 0.28                 # clip-higher (DAPO); = eps_low for plain GRPO
    beta: float = 0.0                      # KL(pi || pi_ref) coefficient, k3 estimator; 0 loads no reference
    mask_truncated: bool = True            # truncated completions carry no loss (DAPO overlong filtering)
    update_epochs: int = 2                 # mu: optimisation passes over each batch of rollouts (old log-probs fixed)
    micro_batch: int = 64                  # sequences per forward/backward (gradient accumulation, exact)
    lr: float = 2e-5                       # AdamW learning rate (constant, <= 1)
    weight_decay: float = 0.0              # AdamW weight decay
    grad_clip: float = 1.0                 # global gradient-norm clip (0 = off)
    # budget and evaluation
    max_steps: int = 100                   # training steps (about 2 minutes on 2 CPU cores; 0 = time budget only)
    time_budget: float = 0.0               # minutes of training, generation + updates, evals excluded (0 = steps only)
    n_eval: int = 500                      # held-out prompts in the final table
    n_eval_during: int = 200               # held-out prompts in the periodic greedy eval
    eval_minutes: float = 1.0              # training minutes between periodic evals
    pass_k: int = 4                        # samples per prompt for sampled accuracy and pass@k
    control: bool = True                   # run the control arms (--controls) and add them to the table
    controls: str = "sft"                  # arms: sft (more SFT), rft (rejection sampling) for GRPO's minutes; random
    random_reward_mean: float = 0.5        # P(reward 1) of the `random` reward (the random arm sets the start's)
    png: bool = True                       # write a PNG plot when matplotlib is installed
    control_lr: float = 0.0                # the control's peak learning rate (0 = sft.py's default; give the SFT start's for a real model)
    chat_template: str = "auto"            # auto|none|chatml|llama3: how prompts are wrapped (auto: from the checkpoint)
    system_prompt: str = ""                # a system turn before every prompt, kept in the checkpoint ("" = its own)
    lora_rank: int = 0                     # train LoRA adapters of this rank, the base frozen (0 = every weight)
    lora_alpha: float = 16.0               # LoRA's scale is lora_alpha / lora_rank
    dtype: str = "float32"                 # float32|bfloat16: the weights' precision (bf16 halves their memory)
    grad_checkpoint: bool = False          # recompute each block in the backward pass: less activation memory
    compile_train: bool = False            # torch.compile each block for the training forward (GPT.compile_blocks)
    compile: str = "auto"                  # the rollouts' decode step: auto (a CUDA graph on CUDA, eager on a CPU) | on | off
    threads: int = 0                       # torch CPU threads, passed on to the control too (0 = torch's default)
    device: str = "auto"                   # auto | cpu | cuda
    fsdp: bool = False                     # shard weights, gradients, optimizer state over torchrun processes (FSDP2)
    seed: int = 0                          # seeds sampling, prompt order and (with --fresh-start) the SFT start


# A pretrained start (--init names a Hugging Face folder, a .gguf file or a checkpoint fine-tuned from one) takes
# these defaults instead of the ones above, sized for the 0.8M-parameter model: 32 completions a step instead of
# 256, a short held-out set. An option given on the command line still wins.
PRETRAINED_DEFAULTS = {"prompts_per_step": 8, "group_size": 4, "micro_batch": 8, "lr": 1e-5, "max_steps": 20,
                       "n_eval": 100, "n_eval_during": 50, "eval_minutes": 5.0, "pass_k": 2}


def check_args(args) -> None:
    """Every option, before anything is read or written: one clear line for the first bad one."""
    parse_reward_weights(args.rewards)
    cli.check_choices(args, scale=("group", "batch", "none"), aggregation=("grpo", "dr_grpo", "dapo"),
                      ratio_level=("token", "sequence"), chat_template=("auto", *tokenizer.CHAT_FORMATS), dtype=tuple(cli.DTYPES),
                      compile=("auto", "on", "off"))
    cli.check_options(args, positive=("prompts_per_step", "update_epochs", "micro_batch", "max_new_tokens", "n_eval",
                                      "n_eval_during", "pass_k", "eval_minutes"),
                      non_negative=("refill_rounds", "top_k", "threads", "beta", "lr", "weight_decay", "grad_clip",
                                    "eps_low", "eps_high", "control_lr", "lora_rank"),
                      probability=("top_p",), seed=("seed",), temperature=("temperature",))
    cli.require_at_most(args, cli.MAX_LR, "lr", "control_lr")   # the control's lr reaches sft.py's own check too late
    cli.check_budget(args)
    if args.top_p <= 0:
        raise cli.UserError(f"--top-p must be > 0, got {args.top_p}")
    cli.require_at_least(args, 2, "group_size")   # the advantage compares completions within a group
    unknown = set(parse_controls(args.controls)) - set(CONTROL_ARMS)
    if unknown:
        raise cli.UserError(f"--controls: unknown arm {sorted(unknown)[0]!r}; choose from {', '.join(CONTROL_ARMS)}")
    if not 0 <= args.random_reward_mean <= 1:
        raise cli.UserError(f"--random-reward-mean must be in [0, 1], got {args.random_reward_mean}")
    cli.get_device(args.device)
    cli.check_fsdp(args)
    if args.lora_rank and (args.lora_alpha <= 0 or args.fsdp):
        raise cli.UserError(f"--lora-rank {args.lora_rank}: needs --lora-alpha > 0, and not --fsdp")


# ----------------------------------------------------------------------------------------------
# Rewards: functions of the decoded completion text only (never the prompt). Add one in a few lines:
# def my_reward(text, row, length, truncated, args) -> float, then register it in REWARDS.
# ----------------------------------------------------------------------------------------------

def correct_reward(text, row, length, truncated, args):
    """1 when the completion's `#### answer` equals the row's answer, else 0."""
    return float(tasks.is_correct(text, row["answer"]))


def format_reward(text, row, length, truncated, args):
    """1 when the completion ends with a well-formed `#### <answer>` line, else 0."""
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return float(last.startswith("#### ") and tasks.extract_answer(text) is not None)


def overlong_reward(text, row, length, truncated, args, buffer=16):
    """DAPO's soft overlong punishment: 0 up to L - buffer tokens, then falling linearly to -1 at L."""
    limit = args.max_new_tokens
    return 0.0 if length <= limit - buffer else -min(1.0, (length - (limit - buffer)) / buffer)


def expression_reward(text, row, length, truncated, args):
    """Countdown (TinyZero): 1 when the completion's final `#### <expression>` uses only the row's allowed
    numbers (each at most once) and evaluates to its target, else 0. Same loss, another capability."""
    return float(tasks.expression_hits_target(text, row.get("numbers", ()), row["answer"]))


RANDOM_REWARD = random.Random(0)         # the `random` reward's draws; set_up seeds it per run and rank


def random_reward(text, row, length, truncated, args):
    """Spurious Rewards' control (Shao et al. 2025, arXiv 2506.10947): 1 with probability random_reward_mean,
    drawn independently of the completion. Same scale as the real reward, no information: a gain that
    survives it was not learned from the reward."""
    return float(RANDOM_REWARD.random() < args.random_reward_mean)


def program_reward(text, row, length, truncated, args):
    """Program synthesis: the share of the row's hidden tests that the completion's final `#### <program>`
    passes, run by lib/interpreter.py (tasks.program_score). Partial credit, so a group's programs that pass
    5 and 7 of 8 tests are told apart; held-out accuracy still asks for all 8."""
    return tasks.program_score(text, row)


REWARDS = {"correct": correct_reward, "format": format_reward, "overlong": overlong_reward,
           "expression": expression_reward, "program": program_reward, "random": random_reward}


def parse_reward_weights(spec: str) -> dict:
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition("=")
        if name not in REWARDS:
            raise cli.UserError(f"--rewards: unknown reward {name!r}; choose from {', '.join(REWARDS)}")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise cli.UserError(f"--rewards: {part!r} is not name=number") from None
        if not math.isfinite(weights[name]):
            raise cli.UserError(f"--rewards: the weight of {name} must be a finite number, got {weight}")
    if not weights:
        raise cli.UserError("--rewards: give at least one reward, e.g. correct=1.0")
    return weights


def total_reward(text, row, length, truncated, args, weights) -> float:
    """r = sum_k w_k * reward_k(completion)."""
    return sum(w * REWARDS[name](text, row, length, truncated, args) for name, w in weights.items())


# ----------------------------------------------------------------------------------------------
# The math: advantages and the loss, as pure functions on tensors
# ----------------------------------------------------------------------------------------------

def group_advantages(rewards, scale: str = "group", eps: float = 1e-4):
    """rewards (P, G) -> advantages (P, G).

    group: (r - mean_group) / (std_group + eps)    GRPO
    batch: (r - mean_group) / (std_batch + eps)    (Hu et al. 2025, REINFORCE++ style)
    none:  r - mean_group                          Dr. GRPO: no std, no difficulty bias
    A group whose rewards are all equal carries no signal: its advantages are exactly 0."""
    if rewards.numel() == 0:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        advantages = centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    elif scale == "batch":
        advantages = centred / (rewards.std(unbiased=False) + eps)
    elif scale == "none":
        advantages = centred
    else:
        raise ValueError(f"scale={scale!r}; choose group, batch or none")
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return advantages.masked_fill(constant, 0.0)


MAX_LOG_RATIO = 20.0   # |log rho| is clamped here: exp(20) ~ 5e8 is finite, exp(89) is inf in fp32


def kl_k3(logprobs, ref_logprobs, max_log_ratio: float = MAX_LOG_RATIO):
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi (Schulman 2020, "k3"):
    with log r = log pi_ref - log pi,  k3 = r - 1 - log r >= 0,  E_pi[k3] = KL(pi || pi_ref).
    log r is clamped to +-max_log_ratio so that exp never overflows (such a token is far off-policy)."""
    log_r = (ref_logprobs - logprobs).clamp(-max_log_ratio, max_log_ratio)
    return (torch.expm1(log_r) - log_r).clamp(min=0.0)   # expm1: exact near r = 1; clamp: rounding only


def aggregate(per_token, mask, aggregation: str, n_seqs: int | None = None, n_tokens: float | None = None,
              max_len: int | None = None):
    """Reduce a per-token loss (N, L) under mask (N, L) to a scalar.

    grpo:    1/n_seqs   sum_i 1/|o_i| sum_t l_{i,t}     (each sequence weighs the same)
    dr_grpo: 1/(n_seqs * max_len) sum_{i,t} l_{i,t}     (a constant: no length bias)
    dapo:    1/n_tokens sum_{i,t} l_{i,t}               (each token weighs the same)
    n_seqs / n_tokens are those of the WHOLE batch, so micro-batches accumulate to the same gradient.
    An empty batch gives 0 (every normaliser is at least 1), never 0/0."""
    mask = mask.to(per_token.dtype)
    summed = per_token * mask
    n_seqs = per_token.shape[0] if n_seqs is None else n_seqs
    if aggregation == "grpo":
        return (summed.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / max(n_seqs, 1)
    if aggregation == "dr_grpo":
        return summed.sum() / max(n_seqs * (max_len or per_token.shape[1]), 1)
    if aggregation == "dapo":
        return summed.sum() / max(n_tokens if n_tokens is not None else float(mask.sum()), 1.0)
    raise ValueError(f"aggregation={aggregation!r}; choose grpo, dr_grpo or dapo")


def grpo_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, beta: float = 0.0,
              eps_low: float = 0.2, eps_high: float = 0.28, ratio_level: str = "token",
              aggregation: str = "grpo", n_seqs=None, n_tokens=None, max_len=None,
              max_log_ratio: float = MAX_LOG_RATIO):
    """The clipped GRPO surrogate (to minimise) and the statistics people log.

    logprobs, old_logprobs, ref_logprobs, mask: (N, L) over completion tokens; advantages (N,).
    token:    rho_{i,t} = exp(log pi - log pi_old)                         per token
    sequence: rho_i = exp(1/|o_i| sum_t (log pi - log pi_old))             GSPO, shared by o_i's tokens
    loss_{i,t} = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_{i,t}
    |log rho| is clamped to max_log_ratio, so exp never overflows to inf (and inf * 0 never makes NaN).
    stats: clipfrac (share of loss tokens where the clip binds, i.e. their gradient is 0), approx_kl
    (k3 estimate of KL(pi_old || pi)), ratio_mean, and kl (mean k3 to the reference) when given."""
    maskf, keep = mask.to(logprobs.dtype), mask.bool()
    # Positions outside the mask (prompt, padding) may hold -inf under top-k/top-p: zero them before any
    # arithmetic, so neither the loss nor its gradient ever sees inf * 0.
    logprobs = torch.where(keep, logprobs, torch.zeros_like(logprobs))
    old_logprobs = torch.where(keep, old_logprobs, torch.zeros_like(old_logprobs))
    if ref_logprobs is not None:
        ref_logprobs = torch.where(keep, ref_logprobs, torch.zeros_like(ref_logprobs))
    log_ratio = logprobs - old_logprobs
    if ratio_level == "sequence":
        log_ratio = (log_ratio.sum(-1, keepdim=True) / maskf.sum(-1, keepdim=True).clamp(min=1)).expand_as(logprobs)
    elif ratio_level != "token":
        raise ValueError(f"ratio_level={ratio_level!r}; choose token or sequence")
    log_ratio = log_ratio.clamp(-max_log_ratio, max_log_ratio)
    ratio = log_ratio.exp()                                                       # (N, L)
    A = advantages[:, None].to(logprobs.dtype)                                    # (N, 1)
    unclipped, clipped = ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A
    per_token = -torch.min(unclipped, clipped)
    kl = kl_k3(logprobs, ref_logprobs, max_log_ratio) if ref_logprobs is not None else None
    if beta > 0:
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, n_seqs, n_tokens, max_len)
    with torch.no_grad():
        m = mask.bool()
        binding = ((ratio > 1 + eps_high) & (A > 0)) | ((ratio < 1 - eps_low) & (A < 0))   # gradient is 0 here
        stats = {"clipfrac": binding[m].float().mean().item() if m.any() else 0.0,
                 "approx_kl": (ratio - 1 - log_ratio)[m].mean().item() if m.any() else 0.0,   # k3 of pi_old vs pi
                 "ratio_mean": ratio[m].mean().item() if m.any() else 1.0}
        if kl is not None:
            stats["kl"] = kl[m].mean().item() if m.any() else 0.0
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Phase 1: rollouts. Sample G completions per prompt from the current policy and score them.
# ----------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    tokens: torch.Tensor         # (N, T) prompt + completion, right-padded
    mask: torch.Tensor           # (N, T-1) 1 where tokens[:, t+1] is a completion token that carries loss
    old_logprobs: torch.Tensor   # (N, T-1) sampling log-probs of those tokens (0 elsewhere)
    rewards: torch.Tensor        # (P, G)
    correct: torch.Tensor        # (P, G) 1 if the answer is right
    lengths: torch.Tensor        # (N,) completion tokens
    prompt_lengths: torch.Tensor # (N,) prompt tokens (in the chat format)
    truncated: torch.Tensor      # (N,) cut by max_new_tokens (not ended with EOS)
    texts: list
    score_s: float = 0.0         # seconds spent computing rewards


def rollout(policy, enc, rows, args, weights, generator) -> Rollout:
    """Sample G completions for each of the P prompts (KV-cache sampler, eval mode) and score them."""
    G = args.group_size
    prompts = [tokenizer.encode_prompt(enc, r["prompt"]) for r in rows for _ in range(G)]
    generation = M.generate(policy, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop_ids=tokenizer.stop_ids(enc), pad_id=tokenizer.pad_id(enc), generator=generator,
                            compile={"auto": None, "on": True, "off": False}[args.compile])
    lengths, truncated = generation.lengths.cpu(), (~generation.finished).cpu()
    completions = generation.tokens.cpu()
    texts = [tokenizer.decode(enc, c[:n].tolist()) for c, n in zip(completions, lengths.tolist())]
    t_score = time.time()
    rewards = torch.tensor([total_reward(text, rows[i // G], int(lengths[i]), bool(truncated[i]), args, weights)
                            for i, text in enumerate(texts)])
    correct = torch.tensor([float(tasks.verify(text, rows[i // G])) for i, text in enumerate(texts)])
    score_s = time.time() - t_score
    # One right-padded row per completion: prompt then completion; loss positions are the completion's.
    N, T = len(prompts), max(len(p) + int(n) for p, n in zip(prompts, lengths))
    tokens = torch.full((N, T), tokenizer.pad_id(enc), dtype=torch.long)
    mask = torch.zeros(N, T - 1)
    old_logprobs = torch.zeros(N, T - 1)
    sampled_logprobs = generation.logprobs.cpu()
    for i, (prompt, n) in enumerate(zip(prompts, lengths.tolist())):
        start = len(prompt)
        tokens[i, :start] = torch.tensor(prompt)
        tokens[i, start:start + n] = completions[i, :n]
        mask[i, start - 1:start - 1 + n] = 0.0 if (args.mask_truncated and truncated[i]) else 1.0
        old_logprobs[i, start - 1:start - 1 + n] = sampled_logprobs[i, :n]
    P = len(rows)
    return Rollout(tokens, mask, old_logprobs, rewards.view(P, G), correct.view(P, G), lengths,
                   torch.tensor([len(p) for p in prompts]), truncated, texts, score_s)


def select_groups(batch: Rollout, keep) -> Rollout:
    """The rollout restricted to the groups (prompts) where `keep` (P,) is True."""
    G = batch.rewards.shape[1]
    rows = keep.repeat_interleave(G)
    return Rollout(batch.tokens[rows], batch.mask[rows], batch.old_logprobs[rows], batch.rewards[keep],
                   batch.correct[keep], batch.lengths[rows], batch.prompt_lengths[rows], batch.truncated[rows],
                   [text for text, kept in zip(batch.texts, rows.tolist()) if kept], batch.score_s)


def concat_rollouts(a: Rollout, b: Rollout, pad: int) -> Rollout:
    T = max(a.tokens.shape[1], b.tokens.shape[1])
    def pad_to(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)
    return Rollout(torch.cat([pad_to(a.tokens, T, pad), pad_to(b.tokens, T, pad)]),
                   torch.cat([pad_to(a.mask, T - 1, 0.0), pad_to(b.mask, T - 1, 0.0)]),
                   torch.cat([pad_to(a.old_logprobs, T - 1, 0.0), pad_to(b.old_logprobs, T - 1, 0.0)]),
                   torch.cat([a.rewards, b.rewards]), torch.cat([a.correct, b.correct]),
                   torch.cat([a.lengths, b.lengths]), torch.cat([a.prompt_lengths, b.prompt_lengths]),
                   torch.cat([a.truncated, b.truncated]), a.texts + b.texts,
                   a.score_s + b.score_s)


def constant_groups(rewards):
    """(P,) True for groups whose G rewards are all equal: their advantages are 0, they carry no signal."""
    return (rewards == rewards[:, :1]).all(1)


def collect_rollouts(policy, enc, next_prompts, n_prompts: int, args, weights, generator, dynamic_sampling: bool):
    """One step's batch of n_prompts groups. With dynamic sampling (DAPO), groups with all-equal rewards
    are dropped and, for up to --refill-rounds extra rounds, refilled with fresh prompts.
    -> (batch, seen) where `seen` holds every sampled group's rewards and correctness (for logging)."""
    batch = rollout(policy, enc, next_prompts(n_prompts), args, weights, generator)
    seen = {"rewards": [batch.rewards.flatten()], "correct": [batch.correct.flatten()],
            "frac_zero_var": constant_groups(batch.rewards).float().mean().item(),
            "sampled_tokens": int(batch.lengths.sum())}
    if dynamic_sampling:
        batch = select_groups(batch, ~constant_groups(batch.rewards))
        for _ in range(args.refill_rounds):
            missing = n_prompts - batch.rewards.shape[0]
            if missing <= 0:
                break
            extra = rollout(policy, enc, next_prompts(missing), args, weights, generator)
            seen["rewards"].append(extra.rewards.flatten())
            seen["correct"].append(extra.correct.flatten())
            seen["sampled_tokens"] += int(extra.lengths.sum())
            batch = concat_rollouts(batch, select_groups(extra, ~constant_groups(extra.rewards)), tokenizer.pad_id(enc))
    seen["rewards"], seen["correct"] = torch.cat(seen["rewards"]), torch.cat(seen["correct"])
    return batch, seen


# ----------------------------------------------------------------------------------------------
# Phase 3: the update. update_epochs passes of the clipped surrogate over the batch.
# ----------------------------------------------------------------------------------------------

def policy_logprobs(policy, tokens, args):
    """log pi(token) of each next token under the sampling transform (the distribution the rollout sampled
    from: same temperature and truncation), and the entropy of that distribution.
    tokens (B, T) -> (B, T-1), (B, T-1). The logits are built in chunks (model.token_logprobs)."""
    return M.token_logprobs(policy, tokens, args.temperature, args.top_k, args.top_p, entropy=True)


def forward_logprobs(model, tokens, args, micro_batch: int):
    """policy_logprobs over a batch in micro-batches, without a graph: (N, T-1)."""
    with torch.no_grad(), M.autocast(tokens.device):
        return torch.cat([policy_logprobs(model, tokens[i:i + micro_batch], args)[0]
                          for i in range(0, tokens.shape[0], micro_batch)])


def update(policy, model, optimizer, batch: Rollout, advantages, reference, args, device, step: int,
           world: int = 1) -> dict:
    """update_epochs passes of grpo_loss over the batch in micro-batches (gradient accumulation with the
    WHOLE batch's normalisers, so the gradient does not depend on the split), one optimizer step per
    pass. `model` is the policy or its DDP wrapper. A NaN/inf loss or gradient norm stops the run before the
    step, a weight past cli.MAX_WEIGHT right after it (cli.NonFiniteError naming the step and epoch), so no
    checkpoint ever holds it. -> mean stats over micro-batches, and grad_norm."""
    N = batch.tokens.shape[0]
    if N == 0:
        return {"grad_norm": 0.0}
    tokens, mask = batch.tokens.to(device), batch.mask.to(device)
    old_logprobs, advantages = batch.old_logprobs.to(device), advantages.to(device)
    if device.type == "cuda":   # bf16 sampler log-probs differ: take the old ones from the training forward
        old_logprobs = forward_logprobs(policy, tokens, args, args.micro_batch) * mask
    ref_logprobs = forward_logprobs(reference, tokens, args, args.micro_batch) if reference is not None else None
    n_tokens, n_seqs = float(mask.sum()), float(N)
    if world > 1:               # normalise by the whole batch over all ranks (DDP then averages gradients)
        totals = torch.tensor([n_tokens, n_seqs], device=device)
        dist.all_reduce(totals)
        n_tokens, n_seqs = float(totals[0]) / world, float(totals[1]) / world
    stats_sum, n_stats, grad_norm = {}, 0, 0.0
    for epoch in range(args.update_epochs):
        for start in range(0, N, args.micro_batch):
            rows = slice(start, start + args.micro_batch)
            width = int(mask[rows].nonzero()[:, 1].max()) + 2 if mask[rows].any() else 2   # trim padding
            with M.autocast(device):
                logprobs, entropy = policy_logprobs(model, tokens[rows, :width], args)
            loss, stats = grpo_loss(logprobs, old_logprobs[rows, :width - 1], advantages[rows],
                                    mask[rows, :width - 1],
                                    None if ref_logprobs is None else ref_logprobs[rows, :width - 1],
                                    args.beta, args.eps_low, args.eps_high, args.ratio_level, args.aggregation,
                                    n_seqs=n_seqs, n_tokens=n_tokens, max_len=args.max_new_tokens)
            cli.check_finite(f"step {step}, epoch {epoch + 1}", loss=loss)
            loss.backward()
            kept = mask[rows, :width - 1].bool()
            stats["entropy"] = entropy[kept].mean().item() if kept.any() else 0.0
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v
            n_stats += 1
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                                         args.grad_clip if args.grad_clip > 0 else float("inf")))
        cli.check_finite(f"step {step}, epoch {epoch + 1}", grad_norm=grad_norm)
        optimizer.step()
        cli.check_weights(f"step {step}, epoch {epoch + 1}", policy)    # no absurd weight reaches model.pt
        optimizer.zero_grad(set_to_none=True)
    return {**{k: v / max(n_stats, 1) for k, v in stats_sum.items()}, "grad_norm": grad_norm}


# ----------------------------------------------------------------------------------------------
# Evaluation: the one evaluation every row of the final table gets
# ----------------------------------------------------------------------------------------------

def eval_row(model, enc, rows, args, samples: int = 0, seed: int = 0) -> dict:
    """Greedy accuracy (with stderr and per difficulty), and, with samples > 0, accuracy and pass@k of
    `samples` completions at the training temperature."""
    greedy = tasks.evaluate(model, enc, rows, args.max_new_tokens, temperature=0.0)
    row = {"greedy": greedy["accuracy"], "stderr": greedy["stderr"], "n": greedy["n"],
           "per_difficulty": greedy["per_difficulty"], "skip_work": greedy["styles"]["bare"],
           "wrong_step": greedy["styles"]["wrong_step"], "no_answer": greedy["styles"]["no_answer"],
           "mean_length": greedy["mean_length"], "examples": greedy["completions"][:3]}
    if samples:
        device = M.unwrap(model).wte.weight.device
        sampled = tasks.evaluate(model, enc, rows, args.max_new_tokens, temperature=args.temperature, samples=samples,
                                 generator=torch.Generator(device).manual_seed(seed))
        row.update(sampled=sampled["accuracy"], pass_at_k=sampled["pass_at_k"])
    return row


# ----------------------------------------------------------------------------------------------
# Inputs: built by the upstream stages when the defaults are missing, then read and checked
# ----------------------------------------------------------------------------------------------

def data_command() -> list:
    """synth.py on its defaults: it writes every default data file of the pipeline."""
    return stages.stage_command("synth.py")


def start_command(args) -> list:
    """sft.py on its defaults: the SFT start (a fixed step budget, so a seed gives one checkpoint)."""
    if args.fresh_start:
        return stages.stage_command("sft.py", seed=args.seed, out=os.path.dirname(args.init), threads=args.threads)
    return stages.stage_command("sft.py", threads=args.threads)


def control_command(args, minutes: float, start_args: dict, data: str = "", out: str = "") -> list:
    """The equal-time control: SFT continued from the same start checkpoint, on the same demonstrations,
    for the same wall-clock training minutes GRPO took, in the same chat format, system prompt, precision and
    LoRA rank, at the batch size, micro-batch and learning rate that made the start (`start_args`, the sft.py
    arguments saved in its checkpoint; --control-lr overrides the rate), else at sft.py's own defaults. The RFT
    arm trains the same way on other `data` into another `out`."""
    start = {k: start_args[k] for k in ("batch_size", "micro_batch", "lr") if type(start_args.get(k)) in (int, float)}
    if args.control_lr > 0:
        start["lr"] = args.control_lr
    lora = {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha} if args.lora_rank else {}
    return stages.stage_command("sft.py", init=args.init, data=data or args.sft_data, test_data=args.sft_test_data,
                                eval_data=args.eval_data, n_eval=args.n_eval_during, eval_minutes=args.eval_minutes,
                                eval_every=0, max_new_tokens=args.max_new_tokens, time_budget=f"{minutes:.4f}",
                                max_steps=0, out=out or os.path.join(args.out, "control"), seed=args.seed,
                                device=args.device,
                                threads=args.threads, chat_template=args.chat_template, dtype=args.dtype,
                                system_prompt=args.system_prompt, grad_checkpoint=args.grad_checkpoint,
                                compile_train=args.compile_train, **start, **lora)


def parse_controls(spec: str) -> list:
    return [arm for arm in (part.strip() for part in spec.split(",")) if arm]


def rft_sampling_command(args, steps: int) -> list:
    """Rejection sampling from the start (synth.py --from-model): as many completions as GRPO sampled (its steps x
    prompts x group size, on the same prompts and temperature), every verified one kept (--keep-bare)."""
    return stages.stage_command("synth.py", from_model=args.init, prompts=args.data,
                                n_prompts=max(1, steps * args.prompts_per_step), k=args.group_size,
                                temperature=args.temperature, max_new_tokens=args.max_new_tokens, keep_bare=True,
                                system_prompt=args.system_prompt, out=os.path.join(args.out, "rft", "samples.jsonl"),
                                seed=args.seed, device=args.device, threads=args.threads)


def random_reward_command(args, mean: float) -> list:
    """GRPO again with every setting the same but the reward: 1 with probability `mean` (the start's mean reward),
    drawn independently of the completion, so the signal has the real reward's scale and carries nothing."""
    return stages.stage_command("grpo.py", **{**asdict(args), "out": os.path.join(args.out, "random"),
                                              "rewards": "random=1", "random_reward_mean": f"{mean:.6f}",
                                              "control": False, "png": False, "fresh_start": False})


def sft_arm(args, results) -> tuple:
    """More SFT on the demonstrations for GRPO's minutes. -> (its checkpoint, the minutes it trained)."""
    stages.run_stage(control_command(args, results["train_minutes"], results["start_args"]))
    path = os.path.join(args.out, "control", "model.pt")
    return path, checkpoints.load(path)[2]["meta"]["train_seconds"] / 60


def rft_arm(args, results) -> tuple:
    """Rejection-sampling fine-tuning (RAFT, arXiv 2504.11343; RFT; STaR): sample from the start as GRPO did, keep
    the verified completions, then SFT on them for what is left of GRPO's minutes. Its minutes are the sampling's
    and the training's; with nothing kept or no time left, it is the start itself."""
    started = time.perf_counter()
    stages.run_stage(rft_sampling_command(args, results["steps"]))
    samples = os.path.join(args.out, "rft", "samples.jsonl")
    summary = os.path.join(args.out, "rft", "samples.summary.json")     # written with samples.jsonl, or neither
    sampling = (json.load(open(summary))["seconds"] if os.path.exists(summary)
                else time.perf_counter() - started) / 60       # its own timing: sampling, not loading the model
    left = results["train_minutes"] - sampling
    if not os.path.exists(samples) or left <= 0:
        print(f"rft: {'no verified sample' if left > 0 else 'no time left after sampling'}; the arm is the start")
        return args.init, sampling
    stages.run_stage(control_command(args, left, results["start_args"], data=samples,
                                     out=os.path.join(args.out, "rft")))
    path = os.path.join(args.out, "rft", "model.pt")
    return path, sampling + checkpoints.load(path)[2]["meta"]["train_seconds"] / 60


def random_arm(args, results) -> tuple:
    stages.run_stage(random_reward_command(args, results["start"]["sampled"]))
    summary = json.load(open(os.path.join(args.out, "random", "summary.json")))
    return os.path.join(args.out, "random", "model.pt"), summary["train_minutes"]


# Each arm starts from the byte-identical start and gets GRPO's measured training minutes; its row in the table
# is keyed by the first name ("control" is the SFT arm, as summaries have always called it).
CONTROL_ARMS = {"sft": ("control", "more SFT (control)", sft_arm), "rft": ("rft", "RFT (control)", rft_arm),
                "random": ("random", "random reward (control)", random_arm)}


def prepare_inputs(args, main_process: bool, ddp: bool):
    """Make missing default inputs (rank 0), then read every input and check it before anything is
    written: prompts (too long ones skipped and counted), and the control's demonstrations."""
    defaults = Args()
    if args.fresh_start:
        args.init = os.path.join(args.out, "sft", "model.pt")
    if main_process:
        data = [(args.data, defaults.data), (args.eval_data, defaults.eval_data)]
        if args.control:
            data += [(args.sft_data, defaults.sft_data), (args.sft_test_data, defaults.sft_test_data)]
        start = [] if args.fresh_start else [(args.init, defaults.init)]
        stages.check_named_inputs(*data, *start)     # a typo fails now, not after the missing defaults are made
        for path, default in data:
            stages.ensure_input(path, default, data_command())
        tasks.read_prompts(args.data)               # a malformed file fails now, not after an SFT start is made
        tasks.read_prompts(args.eval_data)
        if args.control:
            tasks.read_demonstrations(args.sft_data)
            tasks.read_demonstrations(args.sft_test_data)
        if args.fresh_start:
            stages.run_stage(start_command(args))
        else:
            stages.ensure_input(args.init, defaults.init, start_command(args))
    if ddp:
        dist.barrier()
    policy, enc, ckpt = checkpoints.load(args.init, dtype=cli.DTYPES[args.dtype], chat_format=args.chat_template)
    policy.merge_lora()              # a start with adapters is the model they make
    if args.system_prompt:
        tokenizer.set_system_prompt(enc, args.system_prompt)
    policy.checkpoint_blocks = args.grad_checkpoint
    block = policy.config.block_size
    rows = tasks.fit_prompts(tasks.read_prompts(args.data), enc, block, args.max_new_tokens, args.data)
    eval_rows = tasks.fit_prompts(tasks.read_prompts(args.eval_data), enc, block, args.max_new_tokens, args.eval_data)
    saved = ckpt.get("meta", {}).get("args") if isinstance(ckpt.get("meta"), dict) else None
    return policy, enc, rows, eval_rows[:args.n_eval], saved if isinstance(saved, dict) else {}


# ----------------------------------------------------------------------------------------------
# Training: rollout -> advantages -> update -> log and evaluate
# ----------------------------------------------------------------------------------------------

class PromptOrder:
    """This rank's share of the training prompts, in one fixed shuffled order, cycling: rank r takes
    positions r, r + world, r + 2 * world, ... so the ranks never share a prompt within a pass.
    take(n) -> the next n rows (collect_rollouts calls it, once per sampling round)."""

    def __init__(self, rows, seed: int, rank: int, world: int):
        self.rows, self.world, self.cursor = rows, world, rank
        self.order = list(range(len(rows)))
        random.Random(seed).shuffle(self.order)

    def take(self, n: int) -> list:
        chosen = []
        for _ in range(n):
            chosen.append(self.rows[self.order[self.cursor % len(self.order)]])
            self.cursor += self.world
        return chosen


@dataclass
class Setup:
    """What set-up builds and the loop only reads."""
    args: Args
    rank: int
    world: int
    ddp: bool
    main_process: bool
    device: torch.device
    weights: dict                # reward name -> weight (--rewards)
    policy: M.GPT                # the policy (sharded under --fsdp)
    model: torch.nn.Module       # the policy, or its DDP wrapper for the training forward
    reference: M.GPT | None      # frozen copy of the start for the KL term (beta > 0), else None
    optimizer: torch.optim.Optimizer
    enc: object
    eval_rows: list
    prompts: PromptOrder
    generator: torch.Generator   # the rollouts' sampling
    logger: rundir.MetricsLogger
    init_hash: str
    params_by_role: dict
    start_args: dict             # the sft.py arguments that made the start (its checkpoint's), {} for another model


@dataclass
class RunState:
    """What the loop changes, passed to every phase (never read from a closure): steps done, training seconds
    (generation + updates, evals excluded), the training minutes at which the next periodic eval is due, and
    the curves for the report (held-out accuracy against minutes, mean training reward per step)."""
    step: int
    train_s: float
    next_eval: float
    history: dict


def train(args) -> dict:
    """Set-up, then the loop of the four phases (rollout -> advantages -> update -> log and evaluate), then
    finish: save, evaluate and summarise. -> the results dict (empty on ranks other than 0)."""
    check_args(args)
    setup = set_up(args)
    policy, device, world = setup.policy, setup.device, setup.world
    start_eval = evaluate_start(setup)
    state = RunState(step=0, train_s=0.0, next_eval=args.eval_minutes,
                     history={"minutes": [0.0], "accuracy": [start_eval.get("greedy", 0.0)], "reward": []})
    while not budget_spent(args, state.step, state.train_s, device, setup.ddp):
        t0 = time.time()
        state.step += 1
        # ALGO LOGIC: phases 1 to 3, what GRPO is
        # 1. Rollouts: G completions per prompt (dynamic sampling is off under DDP, so that every rank
        #    runs the same number of backward passes).
        #    FSDP: generation runs on the full weights, gathered once per rollout on every rank and freed
        #    before the update (distributed.gathered: its docstring gives the memory and time it costs, and what
        #    verl and OpenRLHF do instead: a separate vLLM engine).
        with distributed.gathered(policy):
            batch, seen = collect_rollouts(policy, setup.enc, setup.prompts.take, args.prompts_per_step // world,
                                           args, setup.weights, setup.generator,
                                           args.dynamic_sampling and not setup.ddp)
        gen_s = time.time() - t0 - batch.score_s    # sampling with the KV cache, decoding, batch building
        # 2. Advantages, the same for every token of a completion.
        t1 = time.time()
        advantages = group_advantages(batch.rewards, args.scale).flatten()                  # (N,)
        adv_s = time.time() - t1
        # 3. update_epochs passes of clipped-surrogate updates, old log-probs held fixed.
        t2 = time.time()
        stats = update(policy, setup.model, setup.optimizer, batch, advantages, setup.reference, args, device,
                       state.step, world)
        update_s = time.time() - t2
        step_s = time.time() - t0
        state.train_s += step_s
        # TRY NOT TO MODIFY: 4. Log, and evaluate every eval_minutes of training.
        log_step(setup, state, batch, seen, stats, gen_s=gen_s, adv_s=adv_s, update_s=update_s, step_s=step_s)
        evaluate_if_due(setup, state)
    return finish(setup, state, start_eval)


def set_up(args) -> Setup:
    """Everything before the first step: processes and device, the inputs (made if missing, all checked),
    the seeds (one per rank), the policy, its frozen reference and its optimizer (sharded under --fsdp, the
    policy wrapped under DDP), the run folder and the metrics log."""
    rank, world, ddp = distributed.setup_ddp()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    main_process = rank == 0
    device = cli.get_device(args.device)
    if ddp and device.type == "cuda":   # setup_ddp bound this process to its LOCAL_RANK GPU
        device = torch.device("cuda", torch.cuda.current_device())
    if args.prompts_per_step % world:
        raise cli.UserError(f"--prompts-per-step {args.prompts_per_step} must divide evenly over {world} processes")
    weights = parse_reward_weights(args.rewards)
    policy, enc, rows, eval_rows, start_args = prepare_inputs(args, main_process, ddp)
    if "expression" in weights and not any("numbers" in row for row in rows):
        raise cli.UserError(f"--rewards expression: {args.data} has no Countdown rows (a 'numbers' list), so every "
                            "reward would be 0; make them with `python synth.py --families countdown`")
    if "program" in weights and not any("tests" in row for row in rows):
        raise cli.UserError(f"--rewards program: {args.data} has no program rows (hidden 'tests'), so every reward "
                            "would be 0; make them with `python synth.py --families program`")
    policy.to(device)
    init_hash = rundir.sha256(args.init)
    cli.seed_everything(args.seed + rank)
    RANDOM_REWARD.seed(args.seed * 1000 + rank)
    generator = torch.Generator(device).manual_seed(args.seed * 1000 + rank)
    policy.eval()        # dropout off: the policy we update is exactly the policy we sampled from
    reference = copy.deepcopy(policy).requires_grad_(False) if args.beta > 0 else None
    if args.lora_rank:          # after the copy: the reference is the start itself, with no adapters
        policy.add_lora(args.lora_rank, args.lora_alpha)
    if args.compile_train:      # after the copy: the reference only runs without gradients, eagerly
        policy.compile_blocks()
    model = torch.nn.parallel.DistributedDataParallel(policy) if ddp and not args.fsdp else policy
    if args.fsdp:       # FSDP2: each rank keeps 1/world of the weights; gradients averaged over ranks, as DDP does
        distributed.shard_model(policy, device)
        if reference is not None:
            distributed.shard_model(reference, device)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99),
                                  fused=device.type == "cuda")
    params_by_role = {"policy": policy.num_params(), "reference": reference.num_params() if reference else 0,
                      "value": 0, "reward": 0}

    logger = rundir.MetricsLogger(args.out, total=args.max_steps or None,
                                  budget_s=60 * args.time_budget if not args.max_steps else None, enabled=main_process)
    if main_process:
        rundir.save_args(args.out, args)
        budget = " and ".join(([f"{args.max_steps} steps"] if args.max_steps else [])
                              + ([f"{args.time_budget} min"] if args.time_budget else []))
        print(f"GRPO from {args.init} | {policy.num_params() / 1e6:.2f} M params | {len(rows)} RL prompts | "
              f"{args.prompts_per_step} prompts x {args.group_size} samples per step | budget {budget} | "
              f"{world} process(es) on {device}", flush=True)
    return Setup(args, rank, world, ddp, main_process, device, weights, policy, model, reference, optimizer, enc,
                 eval_rows, PromptOrder(rows, args.seed, rank, world), generator, logger, init_hash, params_by_role,
                 start_args)


def evaluate_start(setup: Setup) -> dict:
    """The SFT start's row of the final table (eval_row), logged as the eval at step 0. -> {} on other ranks."""
    args = setup.args
    with distributed.gathered(setup.policy):    # FSDP: every rank gathers the full weights (no-op otherwise)
        start_eval = eval_row(setup.policy, setup.enc, setup.eval_rows, args, samples=args.pass_k, seed=args.seed) \
            if setup.main_process else {}
    if setup.main_process:
        setup.logger.log(0, kind="eval", train_minutes=0.0, eval_accuracy=start_eval["greedy"],
                         eval_stderr=start_eval["stderr"], eval_sampled=start_eval["sampled"])
    return start_eval


def budget_spent(args, step: int, train_s: float, device, ddp: bool) -> bool:
    """Has the run reached --max-steps or --time-budget? Under DDP rank 0's clock decides for every
    rank, so all stop at the same step."""
    spent = bool(args.max_steps and step >= args.max_steps) or bool(args.time_budget and train_s >= 60 * args.time_budget)
    if ddp:
        flag = torch.tensor([float(spent)], device=device)
        dist.broadcast(flag, src=0)
        spent = bool(flag.item())
    return spent


def log_step(setup: Setup, state: RunState, batch: Rollout, seen: dict, stats: dict, **seconds) -> None:
    """One "train" row: what the rollouts earned (every sampled group, dropped ones too), what the update
    did (stats), where the step's seconds went (gen_s, score_s, adv_s, update_s, step_s), and its tokens: sampled
    (completions) and trained (prompt and completion tokens predicted in the update, each epoch counted)."""
    N = batch.tokens.shape[0]
    state.history["reward"].append(seen["rewards"].mean().item())
    setup.logger.log(state.step, kind="train", train_minutes=state.train_s / 60,
                     reward_mean=seen["rewards"].mean().item(),
                     reward_std=seen["rewards"].std().item(), accuracy=seen["correct"].mean().item(),
                     frac_zero_var=seen["frac_zero_var"], groups_used=batch.rewards.shape[0],
                     completions=seen["rewards"].numel(),
                     response_length=batch.lengths.float().mean().item() if N else 0.0,
                     truncated=batch.truncated.float().mean().item() if N else 0.0,
                     gen_s=seconds["gen_s"], score_s=batch.score_s, adv_s=seconds["adv_s"],
                     update_s=seconds["update_s"], step_s=seconds["step_s"],
                     tokens_per_s=float(batch.lengths.sum()) / seconds["step_s"] if N else 0.0,
                     sampled_tokens=seen["sampled_tokens"],       # every completion token sampled, dropped groups too
                     trained_tokens=setup.args.update_epochs * int((batch.prompt_lengths + batch.lengths - 1).sum()),
                     peak_mem_mb=rundir.peak_memory_mb(setup.device), **stats)


def evaluate_if_due(setup: Setup, state: RunState) -> None:
    """Every eval_minutes of training: greedy accuracy on the first n_eval_during held-out prompts, an "eval"
    row and a point of the accuracy curve (rank 0)."""
    args, main_process = setup.args, setup.main_process
    eval_due = state.train_s / 60 >= state.next_eval
    if args.fsdp:   # the gather needs every rank: rank 0's clock decides, as in budget_spent
        flag = torch.tensor([float(eval_due)], device=setup.device)
        dist.broadcast(flag, src=0)
        eval_due = bool(flag.item())
    if eval_due and (main_process or args.fsdp):
        state.next_eval += args.eval_minutes
        with distributed.gathered(setup.policy):    # FSDP: every rank gathers the full weights, rank 0 evaluates
            accuracy = tasks.evaluate(setup.policy, setup.enc, setup.eval_rows[:args.n_eval_during],
                                      args.max_new_tokens) if main_process else None
        if main_process:
            state.history["minutes"].append(state.train_s / 60)
            state.history["accuracy"].append(accuracy["accuracy"])
            setup.logger.log(state.step, kind="eval", train_minutes=state.train_s / 60,
                             eval_accuracy=accuracy["accuracy"], eval_stderr=accuracy["stderr"], eval_n=accuracy["n"])


def finish(setup: Setup, state: RunState, start_eval: dict) -> dict:
    """Rank 0 saves the policy and evaluates it (the GRPO row of the table) and summarises the run; every
    rank joins the FSDP gather and the last barrier. -> the results dict (empty on other ranks)."""
    args, device, policy, step, train_s = setup.args, setup.device, setup.policy, state.step, state.train_s
    history = state.history
    results = {}
    if args.fsdp:       # collective: rank 0 gets a plain model with the full weights; it saves and evaluates it
        policy = distributed.full_model(policy, device)
    if setup.main_process:
        checkpoints.save(os.path.join(args.out, "model.pt"), policy, setup.enc, step=step, args=asdict(args),
                         init_sha256=setup.init_hash)
        end_eval = eval_row(policy, setup.enc, setup.eval_rows, args, samples=args.pass_k, seed=args.seed)
        setup.logger.log(step, kind="eval", train_minutes=train_s / 60, eval_accuracy=end_eval["greedy"],
                         eval_stderr=end_eval["stderr"], eval_sampled=end_eval["sampled"], final=True)
        history["minutes"].append(train_s / 60)
        history["accuracy"].append(end_eval["greedy"])
        train_rows = [r for r in tasks.read_jsonl(os.path.join(args.out, "metrics.jsonl")) if r.get("kind") == "train"]
        mean = lambda k: sum(r[k] for r in train_rows) / max(len(train_rows), 1)
        results = {"algo": "grpo", "init": args.init, "init_sha256": setup.init_hash, "steps": step,
                   "train_minutes": train_s / 60, "start": start_eval, "grpo": end_eval, "history": history,
                   "params_by_role": setup.params_by_role, "peak_mem_mb": rundir.peak_memory_mb(device),
                   "sec_per_step": mean("step_s"),
                   "time_split": {k: mean(k) for k in ("gen_s", "score_s", "adv_s", "update_s")},
                   "sampled_tokens": sum(r["sampled_tokens"] for r in train_rows),
                   "trained_tokens": sum(r["trained_tokens"] for r in train_rows),
                   "start_accuracy": start_eval["greedy"], "final_accuracy": end_eval["greedy"],
                   "start_args": setup.start_args}
    setup.logger.close()
    if setup.ddp:
        # Every rank leaves together, the others waiting here while rank 0 saves and evaluates. This alone
        # narrows, but does not close, the race that cli.run's os._exit closes: a gloo worker thread still
        # dropping the last all-gather (its tensors have Python objects, so it needs the GIL) meets the
        # interpreter's shutdown: SIGABRT, "terminate called without an active exception".
        dist.barrier()
        distributed.cleanup_ddp()
    return results


# ----------------------------------------------------------------------------------------------
# The control and the report
# ----------------------------------------------------------------------------------------------

def control_history(out: str) -> tuple[list, list]:
    """(minutes, held-out accuracy) points that sft.py logged during the control run, if any."""
    path = os.path.join(out, "metrics.jsonl")
    minutes, accuracy = [], []
    if os.path.exists(path):
        for row in tasks.read_jsonl(path):
            if row.get("kind") == "eval" and "eval_accuracy" in row:
                minutes.append(row["train_minutes"])
                accuracy.append(row["eval_accuracy"])
    return minutes, accuracy


def format_table(results: dict, args) -> str:
    names = [("SFT start", "start"), ("GRPO", "grpo"), *((label, key) for key, label, _ in CONTROL_ARMS.values())]
    difficulties = sorted(results["start"]["per_difficulty"], key=str)
    head = ["", "greedy acc", *[f"d={d}" for d in difficulties], "sampled acc", f"pass@{args.pass_k}",
            "skips work", "wrong step", "mean len", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key in names:
        r = results.get(key)
        if not r:
            continue
        minutes = {"start": 0.0, "grpo": results["train_minutes"]}.get(key, results.get(f"{key}_minutes"))
        cells = [label, f"{100 * r['greedy']:.1f} ± {100 * r['stderr']:.1f}",
                 *[f"{100 * r['per_difficulty'].get(d, float('nan')):.1f}" for d in difficulties],
                 f"{100 * r['sampled']:.1f}", f"{100 * r['pass_at_k']:.1f}", f"{100 * r['skip_work']:.1f}",
                 f"{100 * r['wrong_step']:.1f}", f"{r['mean_length']:.1f}", f"{minutes:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, args) -> None:
    """Held-out accuracy against training minutes: a text sparkline always, a PNG with matplotlib."""
    h = results["history"]
    print(f"GRPO held-out accuracy over {results['train_minutes']:.1f} min: {rundir.sparkline(h['accuracy'])} "
          f"({100 * h['accuracy'][0]:.1f}% -> {100 * h['accuracy'][-1]:.1f}%)")
    print(f"GRPO mean training reward per step:       {rundir.sparkline(h['reward'])}")
    control_minutes, control_accuracy = results.get("control_history", ([], []))
    if control_accuracy:
        print(f"control held-out accuracy:                {rundir.sparkline(control_accuracy)} "
              f"({100 * control_accuracy[0]:.1f}% -> {100 * control_accuracy[-1]:.1f}%)")
    if not args.png:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no PNG; `pip install matplotlib` for one)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(h["minutes"], [100 * a for a in h["accuracy"]], "o-", label="GRPO")
    if control_accuracy:
        ax.plot(control_minutes, [100 * a for a in control_accuracy], "s-", label="more SFT (control)")
    if "control" in results:
        ax.plot([results["train_minutes"]], [100 * results["control"]["greedy"]], "s", color="C1")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(args.out, "accuracy.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


def main(argv=None):
    args = cli.parse_args(Args, argv)
    if not args.fresh_start and checkpoints.is_pretrained(args.init):
        args = checkpoints.args_for_pretrained(Args, argv, PRETRAINED_DEFAULTS)
    results = train(args)
    if not results:          # a non-zero rank under torchrun
        return results
    for arm in parse_controls(args.controls) if args.control else []:
        key, _, run_arm = CONTROL_ARMS[arm]
        path, results[f"{key}_minutes"] = run_arm(args, results)     # the minutes it ran, not what it was given
        model, enc, _ = checkpoints.load(path, cli.get_device(args.device), chat_format=args.chat_template)
        if args.system_prompt:
            tokenizer.set_system_prompt(enc, args.system_prompt)
        eval_rows = tasks.fit_prompts(tasks.read_prompts(args.eval_data), enc, model.config.block_size,
                                      args.max_new_tokens, args.eval_data)[:args.n_eval]
        results[key] = eval_row(model, enc, eval_rows, args, samples=args.pass_k, seed=args.seed)
    if "control" in results:
        results["control_history"] = control_history(os.path.join(args.out, "control"))
    with rundir.atomic_write(os.path.join(args.out, "summary.json")) as f:
        json.dump(results, f, indent=1)
    table = format_table(results, args)
    with rundir.atomic_write(os.path.join(args.out, "results.md")) as f:
        f.write(table + "\n")
    print()
    print(f"Held-out prompts: {results['start']['n']} from {args.eval_data}; "
          f"greedy accuracy ± standard error; sampled at temperature {args.temperature} with {args.pass_k} samples.")
    print(table)
    gain = 100 * (results["grpo"]["greedy"] - results["start"]["greedy"])
    line = f"GRPO vs SFT start: {gain:+.1f} points"
    for key, label, _ in CONTROL_ARMS.values():
        if key in results:
            line += f" | vs {label}: {100 * (results['grpo']['greedy'] - results[key]['greedy']):+.1f}"
    print(line)
    plot(results, args)
    return results


if __name__ == "__main__":
    cli.run(main)
