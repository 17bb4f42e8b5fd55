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

`python grpo.py` (about 15 minutes on 2 CPU cores): builds its inputs if missing (synth.py data, an
SFT start from sft.py), trains with GRPO for a wall-clock budget, then runs the control that keeps
the comparison honest: SFT continued from the byte-identical start on the same demonstrations for
the same minutes (sft.py as a subprocess). It ends with one table for the SFT start, GRPO and the
control, all evaluated by the same function on the same held-out prompts.

    python grpo.py                                   # the headline: GRPO vs its SFT start vs more SFT
    python grpo.py --no-control --time-budget 2      # GRPO alone
    torchrun --nproc_per_node=2 grpo.py --no-control # rollouts split over 2 processes
"""
import copy
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, asdict

import torch
import torch.distributed as dist

from model import (UserError, autocast, run_stage, cleanup_ddp, decode, encode, ensure_input, evaluate, extract_answer,
                   generate, get_device, is_correct, load, pad_id, parse_args, peak_memory_mb, read_jsonl,
                   require_at_least, sampling_logprobs, save, save_args, seed_everything, setup_ddp, unwrap, MetricsLogger,
                   cli)


@dataclass
class Args:
    init: str = "runs/sft/model.pt"        # SFT checkpoint to start from (built by sft.py if this default is missing)
    data: str = "data/rl_train.jsonl"      # RL prompts: {"prompt", "answer"} JSONL
    eval_data: str = "data/rl_test.jsonl"  # held-out prompts, the same for every row of the final table
    sft_data: str = "data/sft_train.jsonl" # demonstrations the control continues SFT on
    sft_test_data: str = "data/sft_test.jsonl"  # demonstrations for the control's eval loss
    out: str = "runs/grpo"                 # run folder: model.pt, metrics.jsonl, summary.json, args.json
    fresh_start: bool = False              # train a new SFT start with --seed into OUT/sft first (multi-seed runs)
    sft_minutes: float = 5.0               # SFT budget of the start when grpo.py has to train one
    # rollouts
    prompts_per_step: int = 32             # P: prompts per step
    group_size: int = 8                    # G: completions sampled per prompt
    temperature: float = 1.0               # sampling temperature of rollouts (and of the ratio's log-probs)
    top_k: int = 0                         # top-k truncation of the sampler (0 = off)
    top_p: float = 1.0                     # nucleus truncation of the sampler (1 = off)
    max_new_tokens: int = 96               # completion length limit; longer ones are truncated
    rewards: str = "correct=1.0"           # weighted reward functions, name=weight: correct, format, overlong
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
    mu: int = 2                            # optimisation passes over each batch of rollouts (old log-probs fixed)
    micro_batch: int = 64                  # sequences per forward/backward (gradient accumulation, exact)
    lr: float = 2e-5                       # AdamW learning rate (constant)
    weight_decay: float = 0.0              # AdamW weight decay
    grad_clip: float = 1.0                 # global gradient-norm clip (0 = off)
    # budget and evaluation
    time_budget: float = 3.0               # minutes of training (generation + updates; evaluation excluded)
    max_steps: int = 0                     # stop after this many steps too (0 = time budget only)
    n_eval: int = 500                      # held-out prompts in the final table
    n_eval_during: int = 200               # held-out prompts in the periodic greedy eval
    eval_minutes: float = 1.0              # training minutes between periodic evals
    pass_k: int = 4                        # samples per prompt for sampled accuracy and pass@k
    control: bool = True                   # run the equal-time SFT control and add it to the table
    compare_ppo: bool = False              # instead: GRPO vs PPO (ppo.py --reward verifier) on the same task and budget
    compare_seeds: str = "0,1,2"           # seeds of the GRPO-vs-PPO comparison
    png: bool = True                       # write a PNG plot when matplotlib is installed
    threads: int = 0                       # torch CPU threads, passed on to the control too (0 = torch's default)
    device: str = "auto"                   # auto | cpu | cuda
    seed: int = 0                          # seeds sampling, prompt order and (with --fresh-start) the SFT start


# ----------------------------------------------------------------------------------------------
# Rewards: functions of the decoded completion text only (never the prompt). Add one in a few lines:
# def my_reward(text, row, length, truncated, args) -> float, then register it in REWARDS.
# ----------------------------------------------------------------------------------------------

def correct_reward(text, row, length, truncated, args):
    """1 when the completion's `#### answer` equals the row's answer, else 0."""
    return float(is_correct(text, row["answer"]))


def format_reward(text, row, length, truncated, args):
    """1 when the completion ends with a well-formed `#### <answer>` line, else 0."""
    last = text.strip().splitlines()[-1] if text.strip() else ""
    return float(last.startswith("#### ") and extract_answer(text) is not None)


def overlong_reward(text, row, length, truncated, args, buffer=16):
    """DAPO's soft overlong punishment: 0 up to L - buffer tokens, then falling linearly to -1 at L."""
    limit = args.max_new_tokens
    return 0.0 if length <= limit - buffer else -min(1.0, (length - (limit - buffer)) / buffer)


REWARDS = {"correct": correct_reward, "format": format_reward, "overlong": overlong_reward}


def parse_reward_weights(spec: str) -> dict:
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition("=")
        if name not in REWARDS:
            raise UserError(f"--rewards: unknown reward {name!r}; choose from {', '.join(REWARDS)}")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"--rewards: {part!r} is not name=number") from None
    if not weights:
        raise UserError("--rewards: give at least one reward, e.g. correct=1.0")
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


def kl_k3(logprobs, ref_logprobs):
    """Per-token estimate of KL(pi || pi_ref) on tokens sampled from pi (Schulman 2020, "k3"):
    with log r = log pi_ref - log pi,  k3 = r - 1 - log r >= 0,  E_pi[k3] = KL(pi || pi_ref)."""
    log_r = ref_logprobs - logprobs
    return (torch.expm1(log_r) - log_r).clamp(min=0.0)   # expm1: exact near r = 1; clamp: rounding only


def aggregate(per_token, mask, aggregation: str, n_seqs: int | None = None, n_tokens: float | None = None,
              max_len: int | None = None):
    """Reduce a per-token loss (N, L) under mask (N, L) to a scalar.

    grpo:    1/n_seqs   sum_i 1/|o_i| sum_t l_{i,t}     (each sequence weighs the same)
    dr_grpo: 1/(n_seqs * max_len) sum_{i,t} l_{i,t}     (a constant: no length bias)
    dapo:    1/n_tokens sum_{i,t} l_{i,t}               (each token weighs the same)
    n_seqs / n_tokens are those of the WHOLE batch, so micro-batches accumulate to the same gradient."""
    mask = mask.to(per_token.dtype)
    summed = per_token * mask
    n_seqs = per_token.shape[0] if n_seqs is None else n_seqs
    if aggregation == "grpo":
        return (summed.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seqs
    if aggregation == "dr_grpo":
        return summed.sum() / (n_seqs * (max_len or per_token.shape[1]))
    if aggregation == "dapo":
        return summed.sum() / max(n_tokens if n_tokens is not None else float(mask.sum()), 1.0)
    raise ValueError(f"aggregation={aggregation!r}; choose grpo, dr_grpo or dapo")


def grpo_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, beta: float = 0.0,
              eps_low: float = 0.2, eps_high: float = 0.28, ratio_level: str = "token",
              aggregation: str = "grpo", n_seqs=None, n_tokens=None, max_len=None):
    """The clipped GRPO surrogate (to minimise) and the statistics people log.

    logprobs, old_logprobs, ref_logprobs, mask: (N, L) over completion tokens; advantages (N,).
    token:    rho_{i,t} = exp(log pi - log pi_old)                         per token
    sequence: rho_i = exp(1/|o_i| sum_t (log pi - log pi_old))             GSPO, shared by o_i's tokens
    loss_{i,t} = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_{i,t}"""
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
    ratio = log_ratio.exp()                                                       # (N, L)
    A = advantages[:, None].to(logprobs.dtype)                                    # (N, 1)
    unclipped, clipped = ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A
    per_token = -torch.min(unclipped, clipped)
    kl = kl_k3(logprobs, ref_logprobs) if ref_logprobs is not None else None
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
# Rollouts
# ----------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    tokens: torch.Tensor         # (N, T) prompt + completion, right-padded
    mask: torch.Tensor           # (N, T-1) 1 where tokens[:, t+1] is a completion token that carries loss
    old_logprobs: torch.Tensor   # (N, T-1) sampling log-probs of those tokens (0 elsewhere)
    rewards: torch.Tensor        # (P, G)
    correct: torch.Tensor        # (P, G) 1 if the answer is right
    lengths: torch.Tensor        # (N,) completion tokens
    truncated: torch.Tensor      # (N,) cut by max_new_tokens (not ended with EOS)
    texts: list
    score_s: float = 0.0         # seconds spent computing rewards


def rollout(policy, enc, rows, args, weights, generator) -> Rollout:
    """Sample G completions for each of the P prompts (KV-cache sampler, eval mode) and score them."""
    G = args.group_size
    prompts = [encode(enc, r["prompt"]) for r in rows for _ in range(G)]
    gen = generate(policy, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop_ids=(enc.eot_token,), pad_id=pad_id(enc), generator=generator)
    lengths, truncated = gen.lengths.cpu(), (~gen.finished).cpu()
    completions = gen.tokens.cpu().tolist()
    texts = [decode(enc, c[:n]) for c, n in zip(completions, lengths.tolist())]
    t_score = time.time()
    rewards = torch.tensor([total_reward(t, rows[i // G], int(lengths[i]), bool(truncated[i]), args, weights)
                            for i, t in enumerate(texts)])
    correct = torch.tensor([float(is_correct(t, rows[i // G]["answer"])) for i, t in enumerate(texts)])
    score_s = time.time() - t_score
    # One right-padded row per completion: prompt then completion; loss positions are the completion's.
    N, T = len(prompts), max(len(p) + int(n) for p, n in zip(prompts, lengths))
    tokens = torch.full((N, T), pad_id(enc), dtype=torch.long)
    mask = torch.zeros(N, T - 1)
    old_logprobs = torch.zeros(N, T - 1)
    sampled_logprobs = gen.logprobs.cpu()
    for i, (p, n) in enumerate(zip(prompts, lengths.tolist())):
        tokens[i, :len(p)] = torch.tensor(p)
        tokens[i, len(p):len(p) + n] = gen.tokens[i, :n].cpu()
        mask[i, len(p) - 1:len(p) - 1 + n] = 0.0 if (args.mask_truncated and truncated[i]) else 1.0
        old_logprobs[i, len(p) - 1:len(p) - 1 + n] = sampled_logprobs[i, :n]
    P = len(rows)
    return Rollout(tokens, mask, old_logprobs, rewards.view(P, G), correct.view(P, G), lengths, truncated, texts,
                   score_s)


def select_groups(ro: Rollout, keep) -> Rollout:
    """The rollout restricted to the groups (prompts) where `keep` (P,) is True."""
    G = ro.rewards.shape[1]
    rows = keep.repeat_interleave(G)
    return Rollout(ro.tokens[rows], ro.mask[rows], ro.old_logprobs[rows], ro.rewards[keep], ro.correct[keep],
                   ro.lengths[rows], ro.truncated[rows], [t for t, k in zip(ro.texts, rows.tolist()) if k], ro.score_s)


def concat_rollouts(a: Rollout, b: Rollout, pad: int) -> Rollout:
    T = max(a.tokens.shape[1], b.tokens.shape[1])
    def pad_to(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)
    return Rollout(torch.cat([pad_to(a.tokens, T, pad), pad_to(b.tokens, T, pad)]),
                   torch.cat([pad_to(a.mask, T - 1, 0.0), pad_to(b.mask, T - 1, 0.0)]),
                   torch.cat([pad_to(a.old_logprobs, T - 1, 0.0), pad_to(b.old_logprobs, T - 1, 0.0)]),
                   torch.cat([a.rewards, b.rewards]), torch.cat([a.correct, b.correct]),
                   torch.cat([a.lengths, b.lengths]), torch.cat([a.truncated, b.truncated]), a.texts + b.texts,
                   a.score_s + b.score_s)


def policy_logprobs(policy, tokens, args):
    """log pi(token) of each next token under the sampling transform, and the entropy of that
    distribution. tokens (B, T) -> (B, T-1), (B, T-1)."""
    logits = policy(tokens)[:, :-1]                                               # (B, T-1, V)
    logp = sampling_logprobs(logits, args.temperature, args.top_k, args.top_p)
    chosen = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)
    return chosen, entropy


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def sparkline(values, width: int = 40) -> str:
    """A text plot: one block character per value, scaled between the min and the max."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    lo, hi = min(values), max(values)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in values)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def eval_row(model, enc, rows, args, samples: int = 0, seed: int = 0) -> dict:
    """The one evaluation every row of the table gets: greedy accuracy (with stderr and per difficulty),
    and, with samples > 0, accuracy and pass@k of `samples` completions at the training temperature."""
    greedy = evaluate(model, enc, rows, args.max_new_tokens, temperature=0.0)
    row = {"greedy": greedy["accuracy"], "stderr": greedy["stderr"], "n": greedy["n"], "per_difficulty": greedy["per_difficulty"],
           "skip_work": greedy["styles"]["bare"], "wrong_step": greedy["styles"]["wrong_step"],
           "no_answer": greedy["styles"]["no_answer"], "mean_length": greedy["mean_length"],
           "examples": greedy["completions"][:3]}
    if samples:
        device = unwrap(model).wte.weight.device
        sampled = evaluate(model, enc, rows, args.max_new_tokens, temperature=args.temperature, samples=samples,
                           generator=torch.Generator(device).manual_seed(seed))
        row.update(sampled=sampled["accuracy"], pass_at_k=sampled["pass_at_k"])
    return row


def train(args) -> dict:
    rank, world, ddp = setup_ddp()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    main_process = rank == 0
    device = get_device(args.device)
    if ddp and device.type == "cuda":   # setup_ddp bound this process to its LOCAL_RANK GPU
        device = torch.device("cuda", torch.cuda.current_device())
    weights = parse_reward_weights(args.rewards)
    for name, allowed in (("scale", ("group", "batch", "none")), ("aggregation", ("grpo", "dr_grpo", "dapo")),
                          ("ratio_level", ("token", "sequence"))):
        if getattr(args, name) not in allowed:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: choose one of {', '.join(allowed)}")
    require_at_least(args, 1, "prompts_per_step", "mu", "micro_batch", "max_new_tokens", "n_eval", "n_eval_during",
                     "pass_k")
    require_at_least(args, 0, "refill_rounds", "top_k", "max_steps", "threads")
    if args.prompts_per_step % world:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must divide evenly over {world} processes")
    if args.group_size < 2:
        raise UserError("--group-size must be at least 2: the advantage compares completions within a group")

    # Inputs: made by the upstream stages when the defaults are missing (rank 0 only).
    defaults = Args()
    if main_process:
        for path, default, command in ((args.data, defaults.data, ["synth.py"]),
                                       (args.eval_data, defaults.eval_data, ["synth.py"])):
            ensure_input(path, default, command)
        if args.fresh_start:
            args.init = os.path.join(args.out, "sft", "model.pt")
            run_stage(["sft.py", "--seed", str(args.seed), "--time-budget", str(args.sft_minutes),
                       "--out", os.path.dirname(args.init), "--threads", str(args.threads)])
        else:
            ensure_input(args.init, defaults.init, ["sft.py", "--time-budget", str(args.sft_minutes)])
    if ddp:
        dist.barrier()
        if args.fresh_start:
            args.init = os.path.join(args.out, "sft", "model.pt")
    rows = read_jsonl(args.data, ("prompt", "answer"))
    eval_rows = read_jsonl(args.eval_data, ("prompt", "answer"))[:args.n_eval]
    policy, enc, _ = load(args.init, device)
    init_hash = sha256(args.init)
    seed_everything(args.seed + rank)
    generator = torch.Generator(device).manual_seed(args.seed * 1000 + rank)
    policy.eval()        # dropout off: the policy we update is exactly the policy we sampled from
    reference = None
    if args.beta > 0:
        reference = copy.deepcopy(policy).requires_grad_(False)
    model = torch.nn.parallel.DistributedDataParallel(policy) if ddp else policy
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    params_by_role = {"policy": policy.num_params(), "reference": reference.num_params() if reference else 0,
                      "value": 0, "reward": 0}

    logger = MetricsLogger(args.out, budget_s=60 * args.time_budget, enabled=main_process)
    if main_process:
        save_args(args.out, args)
        print(f"GRPO from {args.init} | {policy.num_params() / 1e6:.2f} M params | {len(rows)} RL prompts | "
              f"{args.prompts_per_step} prompts x {args.group_size} samples per step | budget {args.time_budget} min"
              + (f", {args.max_steps} steps" if args.max_steps else "") + f" | {world} process(es) on {device}", flush=True)
    start_eval = eval_row(policy, enc, eval_rows, args, samples=args.pass_k, seed=args.seed) if main_process else {}
    if main_process:
        logger.log(0, kind="eval", train_minutes=0.0, eval_accuracy=start_eval["greedy"],
                   eval_stderr=start_eval["stderr"], eval_sampled=start_eval["sampled"])

    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    cursor, step, train_s, next_eval = rank, 0, 0.0, args.eval_minutes
    local_prompts = args.prompts_per_step // world
    history = {"minutes": [0.0], "accuracy": [start_eval.get("greedy", 0.0)], "reward": []}

    def next_rows(n):
        nonlocal cursor
        out = []
        for _ in range(n):
            out.append(rows[order[cursor % len(order)]])
            cursor += world
        return out

    while True:
        if args.max_steps and step >= args.max_steps:
            break
        if args.time_budget and train_s >= 60 * args.time_budget:
            break
        if ddp:   # every process stops at the same step
            flag = torch.tensor([float(args.time_budget and train_s >= 60 * args.time_budget)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0:
                break
        t0 = time.time()
        step += 1

        # 1. Rollouts: G completions per prompt; with dynamic sampling, drop constant groups and refill.
        ro = rollout(policy, enc, next_rows(local_prompts), args, weights, generator)
        sampled, all_rewards, all_correct = ro.rewards.numel(), [ro.rewards.flatten()], [ro.correct.flatten()]
        zero_var = (ro.rewards == ro.rewards[:, :1]).all(1)
        frac_zero_var = zero_var.float().mean().item()
        if args.dynamic_sampling and not ddp:
            ro = select_groups(ro, ~zero_var)
            for _ in range(args.refill_rounds):
                missing = local_prompts - ro.rewards.shape[0]
                if missing <= 0:
                    break
                extra = rollout(policy, enc, next_rows(missing), args, weights, generator)
                sampled += extra.rewards.numel()
                all_rewards.append(extra.rewards.flatten())
                all_correct.append(extra.correct.flatten())
                ro = concat_rollouts(ro, select_groups(extra, ~(extra.rewards == extra.rewards[:, :1]).all(1)), pad_id(enc))
        score_s = ro.score_s                    # reward functions on the decoded texts
        gen_s = time.time() - t0 - score_s      # sampling with the KV cache, decoding, batch building

        # 2. Advantages, the same for every token of a completion.
        t1 = time.time()
        advantages = group_advantages(ro.rewards, args.scale).flatten()                  # (N,)
        adv_s = time.time() - t1

        # 3. mu passes of clipped-surrogate updates over the rollout, old log-probs held fixed.
        t2 = time.time()
        stats_sum, n_stats, grad_norm = {}, 0, 0.0
        N = ro.tokens.shape[0]
        if N:
            tokens, mask = ro.tokens.to(device), ro.mask.to(device)
            old_logprobs, advantages = ro.old_logprobs.to(device), advantages.to(device)
            if device.type == "cuda":   # bf16 sampler log-probs differ: take the old ones from the training forward
                with torch.no_grad(), autocast(device):
                    old_logprobs = torch.cat([policy_logprobs(policy, tokens[i:i + args.micro_batch], args)[0]
                                              for i in range(0, N, args.micro_batch)]) * mask
            ref_logprobs = None
            if reference is not None:
                with torch.no_grad(), autocast(device):
                    ref_logprobs = torch.cat([policy_logprobs(reference, tokens[i:i + args.micro_batch], args)[0]
                                              for i in range(0, N, args.micro_batch)])
            n_tokens = float(mask.sum())
            if ddp:
                total = torch.tensor([n_tokens, float(N)], device=device)
                dist.all_reduce(total)
                n_tokens, n_seqs = float(total[0]) / world, float(total[1]) / world   # DDP averages gradients
            else:
                n_seqs = N
            for _ in range(args.mu):
                for i in range(0, N, args.micro_batch):
                    sl = slice(i, i + args.micro_batch)
                    width = int(mask[sl].nonzero()[:, 1].max()) + 2 if mask[sl].any() else 2   # trim padding
                    with autocast(device):
                        logprobs, entropy = policy_logprobs(model, tokens[sl, :width], args)
                    loss, stats = grpo_loss(logprobs, old_logprobs[sl, :width - 1], advantages[sl], mask[sl, :width - 1],
                                            None if ref_logprobs is None else ref_logprobs[sl, :width - 1],
                                            args.beta, args.eps_low, args.eps_high, args.ratio_level,
                                            args.aggregation, n_seqs=n_seqs, n_tokens=n_tokens,
                                            max_len=args.max_new_tokens)
                    loss.backward()
                    m = mask[sl, :width - 1].bool()
                    stats["entropy"] = entropy[m].mean().item() if m.any() else 0.0
                    for k, v in stats.items():
                        stats_sum[k] = stats_sum.get(k, 0.0) + v
                    n_stats += 1
                if args.grad_clip > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        update_s = time.time() - t2
        step_s = time.time() - t0
        train_s += step_s

        rewards_seen, correct_seen = torch.cat(all_rewards), torch.cat(all_correct)
        history["reward"].append(rewards_seen.mean().item())
        stats = {k: v / max(n_stats, 1) for k, v in stats_sum.items()}
        logger.log(step, kind="train", train_minutes=train_s / 60, reward_mean=rewards_seen.mean().item(),
                   reward_std=rewards_seen.std().item(), accuracy=correct_seen.mean().item(),
                   frac_zero_var=frac_zero_var, groups_used=ro.rewards.shape[0], completions=sampled,
                   response_length=ro.lengths.float().mean().item() if N else 0.0,
                   truncated=ro.truncated.float().mean().item() if N else 0.0,
                   grad_norm=grad_norm, gen_s=gen_s, score_s=score_s, adv_s=adv_s, update_s=update_s, step_s=step_s,
                   tokens_per_s=float(ro.lengths.sum()) / step_s if N else 0.0,
                   peak_mem_mb=peak_memory_mb(device), **stats)

        if main_process and train_s / 60 >= next_eval:
            next_eval += args.eval_minutes
            acc = evaluate(policy, enc, eval_rows[:args.n_eval_during], args.max_new_tokens)
            history["minutes"].append(train_s / 60)
            history["accuracy"].append(acc["accuracy"])
            logger.log(step, kind="eval", train_minutes=train_s / 60, eval_accuracy=acc["accuracy"],
                       eval_stderr=acc["stderr"], eval_n=acc["n"])

    results = {}
    if main_process:
        save(os.path.join(args.out, "model.pt"), policy, enc, step=step, args=asdict(args), init_sha256=init_hash)
        end_eval = eval_row(policy, enc, eval_rows, args, samples=args.pass_k, seed=args.seed)
        logger.log(step, kind="eval", train_minutes=train_s / 60, eval_accuracy=end_eval["greedy"],
                   eval_stderr=end_eval["stderr"], eval_sampled=end_eval["sampled"], final=True)
        history["minutes"].append(train_s / 60)
        history["accuracy"].append(end_eval["greedy"])
        rows_log = [json.loads(l) for l in open(os.path.join(args.out, "metrics.jsonl"))]
        train_rows = [r for r in rows_log if r.get("kind") == "train"]
        mean = lambda k: sum(r[k] for r in train_rows) / max(len(train_rows), 1)
        results = {"algo": "grpo", "init": args.init, "init_sha256": init_hash, "steps": step,
                   "train_minutes": train_s / 60, "start": start_eval, "grpo": end_eval, "history": history,
                   "params_by_role": params_by_role, "peak_mem_mb": peak_memory_mb(device),
                   "sec_per_step": mean("step_s") if train_rows else 0.0,
                   "time_split": {k: mean(k) for k in ("gen_s", "score_s", "adv_s", "update_s")} if train_rows else {},
                   "start_accuracy": start_eval["greedy"], "final_accuracy": end_eval["greedy"]}
    logger.close()
    if ddp:
        cleanup_ddp()
    return results


# ----------------------------------------------------------------------------------------------
# The control and the report
# ----------------------------------------------------------------------------------------------

def run_control(args, minutes: float) -> str:
    """SFT continued from the same start checkpoint, on the same demonstrations, for the same training
    minutes, with sft.py's own settings for continued training. Returns the control's checkpoint."""
    out = os.path.join(args.out, "control")
    run_stage(["sft.py", "--init", args.init, "--data", args.sft_data, "--test-data", args.sft_test_data,
               "--eval-data", args.eval_data, "--n-eval", str(args.n_eval_during),
               "--eval-minutes", str(args.eval_minutes),
               "--max-new-tokens", str(args.max_new_tokens), "--time-budget", f"{minutes:.4f}",
               "--out", out, "--seed", str(args.seed), "--device", args.device, "--threads", str(args.threads)])
    return os.path.join(out, "model.pt")


def control_history(out: str) -> tuple[list, list]:
    """(minutes, held-out accuracy) points that sft.py logged during the control run, if any."""
    path = os.path.join(out, "metrics.jsonl")
    minutes, accuracy = [], []
    if os.path.exists(path):
        for line in open(path):
            r = json.loads(line)
            if r.get("kind") == "eval" and "eval_accuracy" in r:
                minutes.append(r["train_minutes"])
                accuracy.append(r["eval_accuracy"])
    return minutes, accuracy


def format_table(results: dict, args) -> str:
    names = [("SFT start", "start"), ("GRPO", "grpo"), ("more SFT (control)", "control")]
    difficulties = sorted(results["start"]["per_difficulty"], key=str)
    head = ["", "greedy acc", *[f"d={d}" for d in difficulties], "sampled acc", f"pass@{args.pass_k}",
            "skips work", "wrong step", "mean len", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key in names:
        r = results.get(key)
        if not r:
            continue
        minutes = 0.0 if key == "start" else results["train_minutes"]
        cells = [label, f"{100 * r['greedy']:.1f} ± {100 * r['stderr']:.1f}",
                 *[f"{100 * r['per_difficulty'].get(d, float('nan')):.1f}" for d in difficulties],
                 f"{100 * r['sampled']:.1f}", f"{100 * r['pass_at_k']:.1f}", f"{100 * r['skip_work']:.1f}",
                 f"{100 * r['wrong_step']:.1f}", f"{r['mean_length']:.1f}", f"{minutes:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, args) -> None:
    """Held-out accuracy against training minutes: a text sparkline always, a PNG with matplotlib."""
    h = results["history"]
    print(f"GRPO held-out accuracy over {results['train_minutes']:.1f} min: {sparkline(h['accuracy'])} "
          f"({100 * h['accuracy'][0]:.1f}% -> {100 * h['accuracy'][-1]:.1f}%)")
    print(f"GRPO mean training reward per step:       {sparkline(h['reward'])}")
    cm, ca = results.get("control_history", ([], []))
    if ca:
        print(f"control held-out accuracy:                {sparkline(ca)} ({100 * ca[0]:.1f}% -> {100 * ca[-1]:.1f}%)")
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
    if ca:
        ax.plot(cm, [100 * a for a in ca], "s-", label="more SFT (control)")
    if "control" in results:
        ax.plot([results["train_minutes"]], [100 * results["control"]["greedy"]], "s", color="C1")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(args.out, "accuracy.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------
# GRPO vs PPO: the same prompts, start, completions per step, temperature and minutes
# ----------------------------------------------------------------------------------------------

def read_run(run_dir: str) -> tuple[dict, list]:
    """A finished run's summary.json and the eval rows of its metrics.jsonl (train_minutes, eval_accuracy)."""
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    evals = [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r.get("kind") == "eval"]
    return summary, evals


def minutes_to_reach(evals: list, target: float):
    """First training minute at which held-out accuracy reached `target` (None if it never did)."""
    return next((r["train_minutes"] for r in evals if r["eval_accuracy"] >= target - 1e-9), None)


def compare_with_ppo(args) -> dict:
    """Run GRPO (this file) and PPO (ppo.py, verifier reward, as a subprocess) on each seed with the same
    start, prompts, completions per step, temperature and training minutes; tabulate what each costs
    and buys, from the two runs' own summary.json and metrics.jsonl."""
    seeds = [int(s) for s in args.compare_seeds.split(",") if s.strip()]
    root = args.out
    runs = {"grpo": [], "ppo": []}
    for seed in seeds:
        grpo_args = Args(**{**asdict(args), "seed": seed, "out": os.path.join(root, f"seed{seed}", "grpo"),
                            "control": False, "compare_ppo": False})
        results = train(grpo_args)
        with open(os.path.join(grpo_args.out, "summary.json"), "w") as f:
            json.dump(results, f, indent=1)
        ppo_out = os.path.join(root, f"seed{seed}", "ppo")
        run_stage(["ppo.py", "--reward", "verifier", "--init", grpo_args.init, "--data", args.data,
                   "--eval-data", args.eval_data, "--n-eval", str(args.n_eval),
                   "--completions-per-step", str(args.prompts_per_step * args.group_size),
                   "--temperature", str(args.temperature), "--max-new-tokens", str(args.max_new_tokens),
                   "--time-budget", str(args.time_budget), "--max-steps", str(args.max_steps),
                   "--eval-minutes", str(args.eval_minutes), "--n-eval-during", str(args.n_eval_during),
                   "--out", ppo_out, "--seed", str(seed), "--device", args.device])
        runs["grpo"].append(read_run(grpo_args.out))
        runs["ppo"].append(read_run(ppo_out))
    ppo_final = sum(s["final_accuracy"] for s, _ in runs["ppo"]) / len(seeds)
    lines = [f"GRPO vs PPO on {args.data}: start {args.init}, {args.prompts_per_step * args.group_size} completions "
             f"per step, temperature {args.temperature}, {args.time_budget} training minutes, seeds {seeds}",
             "| | held-out acc (mean ± spread) | per seed | min to reach PPO's final acc | s/step | "
             "gen / score / adv / update s | peak mem MB | params in memory (policy/ref/value/reward) |",
             "|---|---|---|---|---|---|---|---|"]
    table = {}
    for algo in ("grpo", "ppo"):
        finals = [s["final_accuracy"] for s, _ in runs[algo]]
        reach = [minutes_to_reach(e, ppo_final) for _, e in runs[algo]]
        mean = lambda xs: sum(xs) / len(xs)
        split = {k: mean([s["time_split"].get(k, 0.0) for s, _ in runs[algo]]) for k in ("gen_s", "score_s", "adv_s", "update_s")}
        roles = runs[algo][0][0]["params_by_role"]
        table[algo] = {"final": finals, "reach_minutes": reach, "sec_per_step": mean([s["sec_per_step"] for s, _ in runs[algo]]),
                       "time_split": split, "peak_mem_mb": mean([s["peak_mem_mb"] for s, _ in runs[algo]]),
                       "params_by_role": roles,
                       "curves": [([r["train_minutes"] for r in e], [r["eval_accuracy"] for r in e]) for _, e in runs[algo]]}
        reached = [f"{m:.1f}" if m is not None else "never" for m in reach]
        lines.append(f"| {algo.upper()} | {100 * mean(finals):.1f} ± {100 * (max(finals) - min(finals)) / 2:.1f} | "
                     f"{' / '.join(f'{100 * a:.1f}' for a in finals)} | {' / '.join(reached)} | "
                     f"{table[algo]['sec_per_step']:.2f} | {' / '.join(f'{split[k]:.2f}' for k in split)} | "
                     f"{table[algo]['peak_mem_mb']:.0f} | "
                     f"{sum(roles.values()) / 1e6:.2f} M ({' / '.join(f'{roles.get(k, 0) / 1e6:.2f}' for k in ('policy', 'reference', 'value', 'reward'))}) |")
    g, p = table["grpo"], table["ppo"]
    lines.append(f"GRPO / PPO: seconds per step {g['sec_per_step'] / p['sec_per_step']:.2f}x, peak memory "
                 f"{g['peak_mem_mb'] / p['peak_mem_mb']:.2f}x, parameters in memory "
                 f"{sum(g['params_by_role'].values()) / sum(p['params_by_role'].values()):.2f}x")
    for algo in ("grpo", "ppo"):
        for seed, (_, accuracy) in zip(seeds, table[algo]["curves"]):
            lines.append(f"{algo.upper():4s} seed {seed} held-out accuracy: {sparkline(accuracy)} "
                         f"({100 * accuracy[0]:.1f}% -> {100 * accuracy[-1]:.1f}%)")
    text = "\n".join(lines)
    print(text)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "comparison.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(root, "comparison.json"), "w") as f:
        json.dump(table, f, indent=1)
    if args.png:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(6, 4))
            for algo, color in (("grpo", "C0"), ("ppo", "C3")):
                for i, (minutes, accuracy) in enumerate(table[algo]["curves"]):
                    ax.plot(minutes, [100 * a for a in accuracy], "o-", color=color, alpha=0.7,
                            label=algo.upper() if i == 0 else None)
            ax.set_xlabel("training minutes")
            ax.set_ylabel("held-out greedy accuracy (%)")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.savefig(os.path.join(root, "grpo_vs_ppo.png"), dpi=120, bbox_inches="tight")
        except ImportError:
            print("(matplotlib is not installed: no PNG)")
    return table


def main(argv=None):
    args = parse_args(Args, argv)
    if args.compare_ppo:
        return compare_with_ppo(args)
    results = train(args)
    if not results:          # a non-zero rank under torchrun
        return results
    if args.control:
        control_ckpt = run_control(args, results["train_minutes"])
        control_model, enc, ckpt = load(control_ckpt, get_device(args.device))
        eval_rows = read_jsonl(args.eval_data, ("prompt", "answer"))[:args.n_eval]
        results["control"] = eval_row(control_model, enc, eval_rows, args, samples=args.pass_k, seed=args.seed)
        results["control_history"] = control_history(os.path.dirname(control_ckpt))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({k: v for k, v in results.items()}, f, indent=1)
    table = format_table(results, args)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    print()
    print(f"Held-out prompts: {results['start']['n']} from {args.eval_data}; "
          f"greedy accuracy ± standard error; sampled at temperature {args.temperature} with {args.pass_k} samples.")
    print(table)
    gain = 100 * (results["grpo"]["greedy"] - results["start"]["greedy"])
    line = f"GRPO vs SFT start: {gain:+.1f} points"
    if "control" in results:
        line += f" | GRPO vs equal-time SFT control: {100 * (results['grpo']['greedy'] - results['control']['greedy']):+.1f} points"
    print(line)
    plot(results, args)
    return results


if __name__ == "__main__":
    cli(main)
