"""RLHF with PPO: a policy, a frozen reference, a reward model, a value model, and GAE.

The third stage of RLHF as InstructGPT did it. The policy pi (from the SFT checkpoint) samples a
completion y = (y_1..y_T) for a prompt x; each token is an action. The reward of token t is a KL
penalty that keeps pi near the frozen reference pi_ref, plus the reward model's score R(x, y) on
the last token (Ziegler et al. 2019):

    r_t     = -beta * (log pi(y_t | s_t) - log pi_ref(y_t | s_t))  +  [t = T] * R(x, y)
    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   A_t = sum_l (gamma lam)^l delta_{t+l}     (GAE)
    rho_t   = pi(y_t | s_t) / pi_old(y_t | s_t)
    L       = -E_t[min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)]              (clipped surrogate)
              + c_v * 1/2 E_t[max((V - R_t)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R_t)^2)]
              - c_H * E_t[H(pi(. | s_t))]

Schulman et al. 2017 (PPO) and 2016 (GAE); Ziegler et al. 2019 (KL-shaped reward, adaptive beta);
Stiennon et al. 2020; Ouyang et al. 2022 (InstructGPT); Huang et al. 2024 (the N+ implementation
details of RLHF with PPO). The value model is a copy of the REWARD model (body and head), the usual
choice: it starts out already reading "how good is this text". With --reward verifier (1 if the
final answer is correct by tasks.is_correct, else 0, on the last token: grpo.py's reward) there is
no reward model; the value body then starts from the SFT checkpoint with a zero head.

The run ends with one table: the start, PPO, and the equal-time control (sft.py continued from the
same start for the same training minutes, as grpo.py does), each evaluated by tasks.evaluate: greedy
accuracy and style shares, and pass_k samples per prompt scored by BOTH the verifier (gold) and the
reward model (proxy), side by side, with the KL to the start. Every eval also logs, in metrics.jsonl,
the KL(pi || pi_init) of one sample per held-out prompt and its proxy and gold rewards: the axes of
reward-model overoptimization (Gao, Schulman & Hilton 2022; experiments/overoptimization.py).

    python ppo.py                         # 40 steps + the equal-time control: ~3 min on 2 CPU cores -> runs/ppo/
    python ppo.py --reward verifier       # the verifiable reward grpo.py uses, for the GRPO-vs-PPO comparison
    python ppo.py --beta 0.0              # no KL penalty: the RM score rises; watch the verifier's accuracy
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
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

import model as M
from lib import checkpoints, cli, rundir, stages, tasks, tokenizer


@dataclass
class Args:
    init: str = "runs/sft/model.pt"          # policy and reference start here
    reward: str = "rm"                       # rm (learned reward model) | verifier (1 if the answer is correct)
    reward_model: str = "runs/rm/model.pt"   # reward model checkpoint for --reward rm (from reward.py)
    data: str = "data/rl_train.jsonl"        # prompt/answer JSONL of training prompts (GSM8K question/answer too)
    eval_data: str = "data/rl_test.jsonl"    # prompt/answer JSONL of held-out prompts (GSM8K question/answer too)
    out: str = "runs/ppo"                    # run folder: model.pt, metrics.jsonl, summary.json, args.json
    n_eval: int = 500                        # held-out prompts in the first and last greedy eval
    n_eval_during: int = 200                 # held-out prompts in the periodic greedy evals
    eval_minutes: float = 1.0                # minutes of training between periodic evals
    completions_per_step: int = 32           # completions sampled per step (one per prompt)
    temperature: float = 1.0                 # sampling temperature (the ratio uses the same one)
    top_k: int = 0                           # sampling top-k (0 = off; the ratio uses the same one)
    max_new_tokens: int = tasks.MAX_NEW_TOKENS   # generation limit in rollouts and in held-out evals
    time_budget: float = 0.0                 # minutes of training, evals excluded (0 = no time limit)
    max_steps: int = 40                      # stop after this many steps (0 = no step limit; ~1 min on 2 CPU cores)
    update_epochs: int = 4                   # passes over each rollout batch
    n_minibatches: int = 4                   # gradient updates per epoch (shuffled minibatches of the rollout)
    lr: float = 3e-5                         # policy learning rate (AdamW, constant)
    value_lr: float = 1e-4                   # value model learning rate
    eps_low: float = 0.2                     # clip range below 1: the ratio is clipped at 1 - eps_low
    eps_high: float = 0.2                    # clip range above 1 (= eps_low: plain PPO; 0.28 = clip-higher, DAPO)
    value_clip: float = 0.2                  # eps_v: clip the value change per rollout
    vf_coef: float = 0.1                     # c_v: weight of the value loss
    ent_coef: float = 0.0                    # c_H: weight of the entropy bonus
    beta: float = 0.05                       # KL penalty coefficient (initial beta if kl_target > 0)
    kl_target: float = 0.0                   # adaptive controller's target KL per completion (0 = fixed beta)
    kl_horizon: int = 10000                  # adaptive controller's horizon (Ziegler et al.)
    gamma: float = 1.0                       # discount over completion tokens
    lam: float = 0.95                        # GAE lambda
    whiten_advantages: bool = True           # normalise advantages to mean 0, std 1 over the batch
    early_stop_kl: float = 0.05              # stop the epochs of a step once approx KL(old||new) exceeds this
    grad_clip: float = 1.0                   # clip each model's gradient norm to this (0 = off)
    missing_eos_penalty: float = 1.0         # subtracted from the RM score of a completion cut at the limit
    chat_template: str = "auto"              # auto|none|chatml|llama3: how prompts are wrapped (auto: from the checkpoint)
    pass_k: int = 4                          # samples per held-out prompt in the table (sampled accuracy, RM score)
    control: bool = True                     # run the equal-time SFT control (sft.py) and add it to the table
    sft_data: str = "data/sft_train.jsonl"   # demonstrations the control continues SFT on
    sft_test_data: str = "data/sft_test.jsonl"  # demonstrations for the control's eval loss
    threads: int = 0                         # torch CPU threads, passed on to the control too (0 = torch's default)
    device: str = "auto"                     # auto|cpu|cuda
    seed: int = 0                            # seeds prompt order and sampling


# ---------------------------------------------------------------------------------------------
# The math: KL-shaped rewards, GAE, whitening, the clipped losses, the adaptive KL controller
# ---------------------------------------------------------------------------------------------

def masked_mean(x, mask):
    """sum(x * m) / max(sum(m), 1): the mean over real tokens only (0 when there are none). Padded entries
    are replaced by 0, not multiplied by it, so an inf or NaN under the mask never reaches the result."""
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def kl_shaped_rewards(score, logprobs, ref_logprobs, mask, beta):
    """Per-token rewards (Ziegler et al. 2019; InstructGPT):

        r_t = -beta * (log pi(y_t) - log pi_ref(y_t))  +  [t = T] * score

    so sum_t r_t = score - beta * sum_t log(pi / pi_ref), a k1 estimate of beta * KL(pi || pi_ref).
    score (B,), logprobs, ref_logprobs, mask (B, N) with mask a prefix of ones per row -> rewards (B, N)."""
    rewards = -beta * (logprobs - ref_logprobs) * mask                        # (B, N)
    last = mask.sum(-1).long().clamp(min=1) - 1                               # (B,) index of the last token
    return rewards.index_put((torch.arange(len(score), device=score.device), last), score, accumulate=True)


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized Advantage Estimation (Schulman et al. 2016).

    delta_t = r_t + gamma * V_{t+1} - V_t            (V_{T+1} = 0: the completion ends the episode)
    A_t     = sum_{l>=0} (gamma * lam)^l * delta_{t+l}      computed backwards:
    A_t     = delta_t + gamma * lam * A_{t+1}
    returns R_t = A_t + V_t, the value target. lam = 0: the one-step TD error; lam = 1: the discounted
    return minus V_t. rewards, values, mask (B, N), mask a prefix of ones (right padding): padded
    positions get A = 0 and contribute nothing to earlier ones. -> (advantages, returns), each (B, N)."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])                              # (B,)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask


def whiten(x, mask, eps: float = 1e-8):
    """(x - mean) / std over the real tokens of the batch (padding stays 0)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean).square(), mask)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))


def policy_loss(logprobs, old_logprobs, advantages, mask, eps_low: float, eps_high: float,
                max_log_ratio: float = 20.0):
    """Clipped surrogate (Schulman et al. 2017), per token, averaged over real tokens:

        rho = exp(log pi - log pi_old),  L = -mean(min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A))

    Outside the clip region in the direction A pushes (rho > 1 + eps_high with A > 0, rho < 1 - eps_low
    with A < 0) the min picks the constant clipped term: the gradient is 0 there. |log rho| is clamped
    to max_log_ratio so exp cannot overflow (a token that far off policy gets no gradient either).
    logprobs, old_logprobs, advantages, mask (B, N) -> (loss, stats) with stats
        clipfrac   share of real tokens where the clip binds (the condition above; 0 with no real token)
        approx_kl  mean((rho - 1) - log rho), the k3 estimate of KL(pi_old || pi) on the sampled tokens
        ratio_mean mean rho (1 at the first update after a rollout)"""
    log_ratio = (logprobs - old_logprobs).clamp(-max_log_ratio, max_log_ratio)   # (B, N)
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    with torch.no_grad():
        binds = ((ratio > 1 + eps_high) & (advantages > 0)) | ((ratio < 1 - eps_low) & (advantages < 0))
        stats = {"clipfrac": masked_mean(binds.to(ratio.dtype), mask),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
                 "ratio_mean": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values, old_values, returns, mask, value_clip: float):
    """Clipped value loss (the PPO2 baselines' form):

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v),  L_V = 1/2 mean(max((V - R)^2, (V_clip - R)^2))

    values, old_values, returns, mask (B, N) -> (loss, stats{vf_clipfrac: share of real tokens where the
    clipped term is the larger one})."""
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    unclipped_error, clipped_error = (values - returns).square(), (clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)}
    return loss, stats


def entropy(logp):
    """H = -sum_v p_v log p_v of each row of log-probs (..., V) -> (...). Tokens outside the kept set
    (log p = -inf after top-k) add 0, with a zero gradient (0 * log 0 := 0, never 0 * inf = NaN)."""
    kept = logp.isfinite()
    probs = torch.where(kept, logp.exp(), torch.zeros_like(logp))
    return -(probs * torch.where(kept, logp, torch.zeros_like(logp))).sum(-1)


def adaptive_beta(beta: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019): a proportional controller on log beta.

    e = clip(KL / KL_target - 1, -0.2, 0.2),  beta <- beta * (1 + e * n / horizon)
    KL is the batch's mean per-completion KL, n the completions in the batch: beta grows when the
    policy drifts past the target and shrinks when it stays closer."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over real tokens: 1 = the critic predicts the returns, <= 0 = useless."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)).square(), mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)).square(), mask)
    return float(1 - var_residual / var_returns) if var_returns > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Models: the reward / value model = a GPT body + a scalar head (the same few lines as reward.py)
# ---------------------------------------------------------------------------------------------

class ScalarHead(nn.Module):
    """A model.GPT body and a linear head to one number per position, (B, T) -> (B, T): the reward
    model (read at the last real token) and the value model V(s_t) (read before each response token)."""

    def __init__(self, body: M.GPT, head: dict | None = None):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if head is not None:
            self.head.load_state_dict(head)

    def forward(self, tokens, positions=None, doc_ids=None):
        return self.head(self.body.hidden(tokens, positions, doc_ids).float()).squeeze(-1)   # (B, T)


def load_reward_model(path, device):
    """reward.py's checkpoint: a model.GPT body + the head weights saved in its meta -> (ScalarHead, enc)."""
    body, enc, ckpt = checkpoints.load(path, device=device)
    head = checkpoints.reward_head_weights(ckpt, path, body.config.n_embd)
    return ScalarHead(body, head).to(device), enc


def build_models(args, device):
    """-> (models {"policy", "reference", "value", "reward"}, enc). The reference and the reward model are
    frozen; the value model is a trainable copy of the reward model (or of the SFT body with --reward verifier).
    Checkpoints whose weights or reward head hold NaN or inf are refused by checkpoints.load and
    reward_head_weights, before anything is written."""
    policy, enc, _ = checkpoints.load(args.init, device=device, chat_format=args.chat_template)
    checkpoints.require_settings_for_pretrained(args.init, args, ("lr", "max_steps"))
    reference = copy.deepcopy(policy).requires_grad_(False)
    reward_model = None
    if args.reward == "rm":
        reward_model, reward_enc = load_reward_model(args.reward_model, device)
        if reward_enc.name != enc.name:
            raise cli.UserError(f"{args.reward_model}: tokenizer {reward_enc.name!r} differs from the policy's "
                                f"{enc.name!r}")
        reward_model.requires_grad_(False)
        value = copy.deepcopy(reward_model).requires_grad_(True)
    else:
        value = ScalarHead(copy.deepcopy(policy)).to(device)
    for module in (policy, reference, value) + ((reward_model,) if reward_model is not None else ()):
        module.eval()   # no dropout anywhere: the ratio compares the very function that sampled the tokens
    return {"policy": policy, "reference": reference, "value": value, "reward": reward_model}, enc


def context_length(models) -> int:
    """The longest prompt + completion every model can read: the smallest block_size among them."""
    bodies = [module.body if isinstance(module, ScalarHead) else module for module in models.values() if module]
    return min(body.config.block_size for body in bodies)


def params_by_role(models):
    """{role: sum of p.numel() over the module's parameters} (tied weights once; 0 for a role not held)."""
    return {role: (sum(p.numel() for p in module.parameters()) if module is not None else 0)
            for role, module in models.items()}


# ---------------------------------------------------------------------------------------------
# Rollouts: sample, lay out prompt + completion, score, log-probs of policy and reference
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    tokens: torch.Tensor      # (B, P + N) left-padded prompt ++ right-padded completion
    positions: torch.Tensor   # (B, P + N) positions from each row's first real token
    doc_ids: torch.Tensor     # (B, P + N) 0 at pads, 1 at real tokens (pads never attend to them)
    n_prompt: int             # P: the completion starts at column P for every row
    mask: torch.Tensor        # (B, N) float, 1 at completion tokens (a prefix of each row)
    finished: torch.Tensor    # (B,) bool, True if the completion ended with EOS (False = cut at the limit)
    texts: list               # decoded completions (EOS dropped), what the verifier reads


def make_batch(prompts, completions, finished, enc, device):
    """Token lists -> Batch. prompts, completions: list[list[int]] (a completion includes its EOS)."""
    pad = tokenizer.pad_id(enc)
    prompt_tokens, prompt_mask = M.padded_batch(prompts, pad, "left", device)           # (B, P)
    completion_tokens, completion_mask = M.padded_batch(completions, pad, "right", device)  # (B, N)
    tokens = torch.cat([prompt_tokens, completion_tokens], 1)
    positions, doc_ids = M.left_pad_inputs(torch.cat([prompt_mask, completion_mask], 1))
    texts = [tokenizer.decode(enc, c) for c in completions]
    return Batch(tokens, positions, doc_ids, prompt_tokens.shape[1], completion_mask.float(),
                 torch.as_tensor(finished, dtype=torch.bool, device=device), texts)


@torch.no_grad()
def rollout(policy, enc, rows, args, generator, device):
    """Sample one completion per prompt with the KV-cache sampler -> (Batch, sampling log-probs (B, N))."""
    prompts = [tokenizer.encode_prompt(enc, row["prompt"]) for row in rows]
    gen = M.generate(policy, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     stop_ids=tokenizer.stop_ids(enc), pad_id=tokenizer.pad_id(enc), generator=generator)
    completions = [gen.tokens[i, :length].tolist() for i, length in enumerate(gen.lengths.tolist())]
    batch = make_batch(prompts, completions, gen.finished, enc, device)
    return batch, gen.logprobs[:, :batch.mask.shape[1]] * batch.mask


@torch.no_grad()
def response_logprobs(model, batch, temperature, top_k=0):
    """log pi(y_t | s_t) of the completion tokens (B, N) with model.token_logprobs, the same sampling
    transform (temperature, top-k) the sampler used; 0 at padding."""
    with M.autocast(batch.tokens.device):
        logp = M.token_logprobs(model, batch.tokens, temperature, top_k, positions=batch.positions,
                                doc_ids=batch.doc_ids)                              # (B, P + N - 1)
    return logp[:, batch.n_prompt - 1:].float() * batch.mask                        # (B, N)


@torch.no_grad()
def response_values(value_model, batch):
    """V(s_t) for each completion token t: the head read at the token BEFORE it (B, N)."""
    with M.autocast(batch.tokens.device):
        values = value_model(batch.tokens, batch.positions, batch.doc_ids)          # (B, P + N)
    return values[:, batch.n_prompt - 1:-1].float() * batch.mask


def verifier_scores(texts, answers):
    """1.0 where tasks.is_correct(completion, answer) else 0.0: grpo.py's reward, on the completion only."""
    return torch.tensor([float(tasks.is_correct(t, a)) for t, a in zip(texts, answers)])


@torch.no_grad()
def scores(batch, answers, reward_model, missing_eos_penalty=0.0):
    """R(x, y) per completion (B,): the verifier on the decoded completion, or the reward model read at the
    last real token of prompt ++ completion (minus a penalty when the completion was cut at the limit)."""
    if reward_model is None:
        return verifier_scores(batch.texts, answers).to(batch.tokens.device)
    with M.autocast(batch.tokens.device):
        per_position = reward_model(batch.tokens, batch.positions, batch.doc_ids).float()   # (B, P + N)
    last = batch.n_prompt + batch.mask.sum(-1).long() - 1                                   # (B,)
    score = per_position[torch.arange(len(last), device=last.device), last]
    return score - missing_eos_penalty * (~batch.finished).float()


# ---------------------------------------------------------------------------------------------
# One PPO step: rollout, rewards, advantages, epochs of clipped updates
# ---------------------------------------------------------------------------------------------

def ppo_update(models, optimizer, batch, old_logprobs, old_values, advantages, returns, args, generator, step=0):
    """Epochs over shuffled minibatches of the rollout; early stop once approx KL passes the threshold.
    Before each optimizer.step() the loss and both gradient norms must be finite (cli.check_finite), and
    after each one every weight finite and within cli.MAX_WEIGHT (cli.check_weights): a NaN or a diverging
    weight stops the run, naming the step, before it reaches a checkpoint.
    -> dict of means over the minibatch updates done (losses, entropy, clipfrac, approx_kl, grad norms)."""
    policy, value_model = models["policy"], models["value"]
    device = batch.tokens.device
    B, P = len(batch.tokens), batch.n_prompt
    minibatch_size = -(-B // args.n_minibatches)                                             # ceil(B / n)
    max_norm = args.grad_clip if args.grad_clip > 0 else math.inf    # inf: measure the norm, clip nothing
    history = {name: [] for name in ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl", "ratio_mean",
                                     "vf_clipfrac", "grad_norm", "value_grad_norm")}
    first_ratio, epochs_done, early_stop = None, 0, 0.0
    for epoch in range(args.update_epochs):
        order = torch.randperm(B, generator=generator).tolist()
        for start in range(0, B, minibatch_size):
            indices = torch.tensor(order[start:start + minibatch_size], device=device)
            tokens, positions, doc_ids = batch.tokens[indices], batch.positions[indices], batch.doc_ids[indices]
            mask = batch.mask[indices]                                                      # (b, N)
            with M.autocast(device):
                logits = policy(tokens, positions, doc_ids)[:, P - 1:-1]                    # (b, N, V)
                values = value_model(tokens, positions, doc_ids)[:, P - 1:-1].float()       # (b, N)
            logp_all = M.sampling_logprobs(logits, args.temperature, args.top_k)           # (b, N, V)
            logprobs = logp_all.gather(-1, tokens[:, P:, None]).squeeze(-1) * mask          # (b, N)
            # ALGO LOGIC: the clipped surrogate, the clipped value loss, the entropy bonus
            surrogate, policy_stats = policy_loss(logprobs, old_logprobs[indices], advantages[indices], mask,
                                                  args.eps_low, args.eps_high)
            critic_loss, value_stats = value_loss(values, old_values[indices], returns[indices], mask, args.value_clip)
            mean_entropy = masked_mean(entropy(logp_all), mask)
            loss = surrogate + args.vf_coef * critic_loss - args.ent_coef * mean_entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
            value_grad_norm = torch.nn.utils.clip_grad_norm_(value_model.parameters(), max_norm)
            where = f"step {step}, epoch {epoch + 1}, minibatch {start // minibatch_size + 1}"
            cli.check_finite(where, loss=loss.detach(), grad_norm=grad_norm, value_grad_norm=value_grad_norm)
            optimizer.step()
            cli.check_weights(where, policy, value_model)    # NaN, inf or past cli.MAX_WEIGHT: stop before a save
            # TRY NOT TO MODIFY: log what practitioners read
            if first_ratio is None:   # before any update: ratio == 1 up to float error
                first_ratio = float(policy_stats["ratio_mean"])
            for name, value in (("policy_loss", surrogate), ("value_loss", critic_loss), ("entropy", mean_entropy),
                                ("grad_norm", grad_norm), ("value_grad_norm", value_grad_norm),
                                *policy_stats.items(), *value_stats.items()):
                history[name].append(float(value.detach()))
            if float(policy_stats["approx_kl"]) > args.early_stop_kl:
                early_stop = 1.0
                break
        epochs_done = epoch + 1
        if early_stop:
            break
    return ({name: sum(values) / len(values) for name, values in history.items()}
            | {"first_ratio": first_ratio, "early_stop": early_stop, "epochs_done": epochs_done})


def ppo_step(models, optimizer, enc, rows, args, beta, generators, device, step=0):
    """Rollout -> rewards -> GAE -> update. Returns the metrics of the step's "train" row in metrics.jsonl."""
    policy, reference, value_model, reward_model = (models[role] for role in ("policy", "reference", "value", "reward"))
    answers = [row["answer"] for row in rows]
    started = time.perf_counter()
    batch, sample_logprobs = rollout(policy, enc, rows, args, generators["sample"], device)        # generation
    rundir.sync(device)
    generated = time.perf_counter()
    with torch.no_grad():                                                                          # scoring
        score = scores(batch, answers, reward_model, args.missing_eos_penalty)
        old_logprobs = response_logprobs(policy, batch, args.temperature, args.top_k)  # the first ratio is 1
        ref_logprobs = response_logprobs(reference, batch, args.temperature, args.top_k)
    rundir.sync(device)
    scored = time.perf_counter()
    with torch.no_grad():                                                                          # advantages
        old_values = response_values(value_model, batch)
        rewards = kl_shaped_rewards(score, old_logprobs, ref_logprobs, batch.mask, beta)
        advantages, returns = gae(rewards, old_values, batch.mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = whiten(advantages, batch.mask)
    rundir.sync(device)
    estimated = time.perf_counter()
    stats = ppo_update(models, optimizer, batch, old_logprobs, old_values, advantages, returns, args,
                       generators["shuffle"], step)                                        # update (eval mode)
    rundir.sync(device)
    updated = time.perf_counter()
    mask = batch.mask
    log_ratio = ref_logprobs - old_logprobs                                                       # (B, N)
    kl_k3 = masked_mean(log_ratio.exp() - 1 - log_ratio, mask)         # KL(pi || pi_ref), k3, per token
    kl_seq = float(((old_logprobs - ref_logprobs) * mask).sum(-1).mean())   # k1 per completion (controller)
    n_tokens = int(mask.sum())
    times = {"gen_s": generated - started, "score_s": scored - generated, "adv_s": estimated - scored,
             "update_s": updated - estimated, "step_s": updated - started}
    return times | {
        "completions": len(rows), "tokens_per_s": n_tokens / times["step_s"],
        "reward_mean": float(score.mean()),
        "accuracy": float(verifier_scores(batch.texts, answers).mean()),
        "kl": float(kl_k3), "kl_seq": kl_seq, "entropy": stats["entropy"], "clipfrac": stats["clipfrac"],
        "approx_kl": stats["approx_kl"], "ratio_mean": stats["ratio_mean"], "policy_loss": stats["policy_loss"],
        "value_loss": stats["value_loss"], "vf_clipfrac": stats["vf_clipfrac"], "grad_norm": stats["grad_norm"],
        "value_grad_norm": stats["value_grad_norm"],
        "explained_variance": explained_variance(old_values, returns, mask),
        "response_length": float(mask.sum(-1).mean()), "truncated": float((~batch.finished).float().mean()),
        "first_ratio": stats["first_ratio"],
        "sampler_logprob_gap": float(((sample_logprobs - old_logprobs).abs() * mask).max()),
        "early_stop": stats["early_stop"], "epochs_done": stats["epochs_done"], "beta": beta}


# ---------------------------------------------------------------------------------------------
# Evaluation: the proxy (reward model) and the gold (verifier) side by side, and the distance moved
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def reward_of_texts(reward_model, enc, prompts, completions, batch_size: int = 256):
    """R(x, y) (N,) for texts, read as reward.py trains it: prompt (chat format) ++ completion ++ end of turn,
    right-padded, the head read at the last real token (causal: later pads change nothing)."""
    device = reward_model.head.weight.device
    sequences = [tokenizer.encode_prompt(enc, prompt) + tokenizer.encode(enc, completion) + [tokenizer.end_of_turn(enc)]
                 for prompt, completion in zip(prompts, completions)]
    rewards = []
    for start in range(0, len(sequences), batch_size):
        tokens, mask = M.padded_batch(sequences[start:start + batch_size], tokenizer.pad_id(enc), "right", device)
        with M.autocast(device):
            per_position = reward_model(tokens).float()                                 # (b, T)
        rewards.append(per_position[torch.arange(len(tokens), device=device), mask.sum(-1) - 1])
    return torch.cat(rewards).cpu()


@torch.no_grad()
def drift(policy, reference, reward_model, enc, rows, args, seed: int) -> dict:
    """Where the policy stands on Gao, Schulman & Hilton (2022)'s axes, from ONE sample y ~ pi per prompt:

        kl    = E_y[ sum_t log pi(y_t | s_t) - log pi_init(y_t | s_t) ]   KL(pi || pi_init) per completion
                (the k1 estimator summed over the completion: unbiased for the sequence KL; pi_init = the frozen
                reference, i.e. the start checkpoint)
        proxy = E_y[ R_rm(x, y) ]      the learned reward model (None with --reward verifier)
        gold  = E_y[ verifier(x, y) ]  1 if the final answer is right (tasks.is_correct)

    under the sampling transform PPO trains with (temperature, top-k)."""
    device = next(policy.parameters()).device
    batch, _ = rollout(policy, enc, rows, args, torch.Generator(device).manual_seed(seed), device)
    logprobs = response_logprobs(policy, batch, args.temperature, args.top_k)               # (B, N)
    ref_logprobs = response_logprobs(reference, batch, args.temperature, args.top_k)        # (B, N)
    kl = ((logprobs - ref_logprobs) * batch.mask).sum(-1)                                   # (B,)
    answers = [row["answer"] for row in rows]
    proxy = scores(batch, answers, reward_model) if reward_model is not None else None
    return {"kl": float(kl.mean()), "kl_stderr": float(kl.std() / math.sqrt(len(kl))) if len(kl) > 1 else 0.0,
            "proxy": float(proxy.mean()) if proxy is not None else None,
            "gold": float(verifier_scores(batch.texts, answers).mean()),
            "truncated": float((~batch.finished).float().mean()), "n": len(rows)}


def eval_row(policy, reference, reward_model, enc, rows, drift_rows, args, seed: int) -> dict:
    """One row of the final table, every number from the one shared evaluation (tasks.evaluate):
    greedy accuracy (with stderr, per difficulty) and style shares; `pass_k` samples per prompt at the
    training temperature: their verifier accuracy, pass@k and, beside it, their mean reward-model score;
    and the KL to the start (drift, on drift_rows)."""
    device = next(policy.parameters()).device
    greedy = tasks.evaluate(policy, enc, rows, args.max_new_tokens)
    sampled = tasks.evaluate(policy, enc, rows, args.max_new_tokens, temperature=args.temperature, samples=args.pass_k,
                             generator=torch.Generator(device).manual_seed(seed))
    prompts = [row["prompt"] for row in rows for _ in range(args.pass_k)]
    rm_score = (float(reward_of_texts(reward_model, enc, prompts, sampled["completions"]).mean())
                if reward_model is not None else None)
    moved = drift(policy, reference, reward_model, enc, drift_rows, args, seed)
    return {"greedy": greedy["accuracy"], "stderr": greedy["stderr"], "n": greedy["n"],
            "per_difficulty": greedy["per_difficulty"], "styles": greedy["styles"],
            "mean_length": greedy["mean_length"], "sampled": sampled["accuracy"],
            "sampled_stderr": sampled["stderr"], "pass_at_k": sampled["pass_at_k"], "rm_score": rm_score,
            "kl": moved["kl"], "drift": moved, "examples": greedy["completions"][:3]}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def synth_command() -> list[str]:
    """The synth.py run that makes the default prompt files, Args().data and Args().eval_data."""
    return stages.stage_command("synth.py", out_dir=os.path.dirname(Args().data))


def sft_command() -> list[str]:
    """The sft.py run that makes the default policy checkpoint, Args().init."""
    return stages.stage_command("sft.py", out=os.path.dirname(Args().init))


def reward_command() -> list[str]:
    """The reward.py run that makes the default reward model, Args().reward_model."""
    return stages.stage_command("reward.py", out=os.path.dirname(Args().reward_model))


def check_args(args):
    """Every option, checked before anything is read or written; the first bad one is a UserError naming it.
    The upper limits (a count beyond 1e9, a coefficient beyond 1e6) and the lowest temperature, 1e-3, keep
    every value away from a float overflow inside torch, which would be a traceback in the middle of a run."""
    cli.check_choices(args, reward=("rm", "verifier"), chat_template=("auto", *tokenizer.CHAT_FORMATS))
    cli.get_device(args.device)
    cli.check_budget(args)
    cli.require_at_least(args, 1, "completions_per_step", "n_minibatches", "update_epochs", "max_new_tokens",
                         "n_eval", "n_eval_during", "kl_horizon", "pass_k")
    cli.require_at_least(args, 0, "top_k", "threads")
    cli.require_at_least(args, 1e-3, "temperature")     # PPO samples: the ratio needs a distribution, not an argmax
    cli.check_options(args, positive=("lr", "value_lr", "eval_minutes"),
                      non_negative=("eps_high", "value_clip", "vf_coef", "ent_coef", "beta", "kl_target",
                                    "early_stop_kl", "grad_clip", "missing_eos_penalty"),
                      probability=("eps_low", "gamma", "lam"), seed=("seed",))
    cli.require_at_most(args, cli.MAX_LR, "lr", "value_lr")   # Adam moves each weight by ~lr a step
    cli.require_at_most(args, 10 ** 9, "completions_per_step", "n_minibatches", "update_epochs", "max_new_tokens",
                  "n_eval", "n_eval_during", "kl_horizon", "top_k", "max_steps", "pass_k")
    cli.require_at_most(args, 1024, "threads")
    cli.require_at_most(args, 1e6, "eval_minutes", "temperature", "time_budget", "eps_high", "value_clip", "vf_coef",
                  "ent_coef", "beta", "kl_target", "early_stop_kl", "grad_clip", "missing_eos_penalty")
    if args.n_minibatches > args.completions_per_step:
        raise cli.UserError(f"--n-minibatches {args.n_minibatches}: a minibatch needs a completion; use at most "
                            f"--completions-per-step ({args.completions_per_step})")
    if args.kl_target > 0 and args.beta == 0:
        raise cli.UserError("--kl-target needs --beta > 0: the controller multiplies beta, and 0 stays 0")
    for name in (("init", "data", "eval_data", "out") + (("reward_model",) if args.reward == "rm" else ())
                 + (("sft_data", "sft_test_data") if args.control else ())):
        if not getattr(args, name).strip():
            raise cli.UserError(f"--{name.replace('_', '-')}: the path is empty")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise cli.UserError(f"--out {args.out}: exists and is not a folder")


def drop_empty_prompts(rows, path):
    """The rows whose prompt has text: the sampler needs at least one token to condition on. The others are
    skipped and counted in one printed line; none left is a UserError naming the file."""
    kept = [row for row in rows if row["prompt"]]
    if len(kept) < len(rows):
        print(f"{path}: skipped {len(rows) - len(kept)} of {len(rows)} prompts that are empty", flush=True)
    if not kept:
        raise cli.UserError(f"{path}: every prompt is empty")
    return kept


def load_inputs(args, device):
    """Every input, read and checked before anything is written: the prompt files (tasks.read_prompts: GSM8K's
    question/answer rows work unchanged), the checkpoints, and the prompts that leave room for the completion
    in every model's context (tasks.fit_prompts), and with --control the control's demonstrations
    (tasks.read_demonstrations). A missing DEFAULT input is made by its upstream stage first.
    -> (models, enc, train_rows, eval_rows)"""
    defaults = Args()
    named = [(args.data, defaults.data), (args.eval_data, defaults.eval_data), (args.init, defaults.init)]
    if args.reward == "rm":
        named.append((args.reward_model, defaults.reward_model))
    if args.control:
        named += [(args.sft_data, defaults.sft_data), (args.sft_test_data, defaults.sft_test_data)]
    stages.check_named_inputs(*named)                # a typo fails now, not after the missing defaults are made
    stages.ensure_input(args.data, defaults.data, synth_command())
    train_rows = tasks.read_prompts(args.data)
    stages.ensure_input(args.eval_data, defaults.eval_data, synth_command())
    eval_rows = tasks.read_prompts(args.eval_data)
    stages.ensure_input(args.init, defaults.init, sft_command())
    if args.reward == "rm":
        stages.ensure_input(args.reward_model, defaults.reward_model, reward_command())
    if args.control:   # the control's demonstrations, checked now: a bad file must not cost the PPO run
        stages.ensure_input(args.sft_data, defaults.sft_data, synth_command())
        tasks.read_demonstrations(args.sft_data)
        stages.ensure_input(args.sft_test_data, defaults.sft_test_data, synth_command())
        tasks.read_demonstrations(args.sft_test_data)
    models, enc = build_models(args, device)
    context = context_length(models)
    train_rows = tasks.fit_prompts(drop_empty_prompts(train_rows, args.data), enc, context, args.max_new_tokens, args.data)
    eval_rows = tasks.fit_prompts(drop_empty_prompts(eval_rows, args.eval_data), enc, context, args.max_new_tokens,
                                  args.eval_data)[:args.n_eval]
    return models, enc, train_rows, eval_rows


@dataclass
class Setup:
    """What set_up() builds once for the whole run: the models, the optimizer, the log, the random streams."""
    device: torch.device
    models: dict              # {"policy", "reference", "value", "reward"} (build_models)
    enc: object               # the policy's tokenizer
    train_rows: list          # training prompts that fit every model's context
    eval_rows: list           # held-out prompts of the first and last (full) evals
    drift_rows: list          # eval_rows[:n_eval_during]: the same prompts and sampling seed at every eval
    optimizer: torch.optim.Optimizer
    logger: rundir.MetricsLogger
    generators: dict          # "sample": rollouts, "shuffle": minibatch order
    prompt_order: random.Random   # shuffles the training prompts, one pass at a time
    roles: dict               # params_by_role(models)


@dataclass
class RunState:
    """What the training loop changes from step to step, passed to each phase (never read from a closure)."""
    beta: float                                   # KL coefficient (moved by the adaptive controller)
    next_eval: float                              # training seconds at which the next periodic eval is due
    step: int = 0
    train_seconds: float = 0.0                    # training time, evals excluded
    pool: list = field(default_factory=list)      # indices of the prompts still to visit in this pass
    history: list = field(default_factory=list)   # the "train" rows of metrics.jsonl


def set_up(args) -> Setup:
    """Check the options, read every input, build the models and the optimizer, start the log; print the header."""
    check_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = cli.get_device(args.device)
    cli.seed_everything(args.seed)
    models, enc, train_rows, eval_rows = load_inputs(args, device)
    policy, value_model = models["policy"], models["value"]
    if policy.config.dropout or value_model.body.config.dropout:   # all models stay in eval mode
        print("note: dropout is off for the whole run (eval mode), so old and new log-probs use one function")
    optimizer = torch.optim.AdamW([{"params": list(policy.parameters()), "lr": args.lr},
                                   {"params": list(value_model.parameters()), "lr": args.value_lr}],
                                  betas=(0.9, 0.95), weight_decay=0.0)
    roles = params_by_role(models)
    rundir.save_args(args.out, args)
    logger = rundir.MetricsLogger(args.out, total=args.max_steps or None,
                                  budget_s=None if args.max_steps else 60 * args.time_budget)
    generators = {"sample": torch.Generator(device).manual_seed(args.seed),
                  "shuffle": torch.Generator().manual_seed(args.seed + 1)}
    prompt_order = random.Random(args.seed)
    params = ", ".join(f"{role} {count / 1e6:.2f}M" for role, count in roles.items())
    print(f"ppo: reward {args.reward}, {len(train_rows)} training prompts, {args.completions_per_step} completions "
          f"per step, params {params}, device {device}")
    return Setup(device, models, enc, train_rows, eval_rows, eval_rows[:args.n_eval_during], optimizer, logger,
                 generators, prompt_order, roles)


def budget_spent(state: RunState, args) -> bool:
    """The step limit or the time budget (training seconds, evals excluded) is reached."""
    return bool(args.max_steps and state.step >= args.max_steps) or bool(
        args.time_budget and state.train_seconds >= 60 * args.time_budget)


def next_prompts(train_rows, pool, prompt_order, n):
    """The next n training prompts, from a fresh shuffle of all of them each pass -> (rows, the pool left)."""
    if len(pool) < n:
        order = list(range(len(train_rows)))
        prompt_order.shuffle(order)
        pool = pool + order
    return [train_rows[i] for i in pool[:n]], pool[n:]


def evaluate_and_log(setup: Setup, args, step, train_seconds, full: bool):
    """Greedy held-out accuracy, and where the policy stands: KL to the start, proxy and gold reward of
    its samples (drift), logged as an "eval" row. The first and last evals are whole table rows (eval_row),
    returned; the periodic ones return None."""
    policy, reference, reward_model = setup.models["policy"], setup.models["reference"], setup.models["reward"]
    if full:
        row = eval_row(policy, reference, reward_model, setup.enc, setup.eval_rows, setup.drift_rows, args, args.seed)
        greedy = {"accuracy": row["greedy"], "stderr": row["stderr"], "n": row["n"], "styles": row["styles"]}
    else:
        row = None
        greedy = tasks.evaluate(policy, setup.enc, setup.drift_rows, max_new_tokens=args.max_new_tokens)
    moved = row["drift"] if full else drift(policy, reference, reward_model, setup.enc, setup.drift_rows, args,
                                           args.seed)
    setup.logger.log(step, kind="eval", train_minutes=train_seconds / 60, eval_accuracy=greedy["accuracy"],
                     eval_stderr=greedy["stderr"], eval_n=greedy["n"], eval_styles=greedy["styles"],
                     eval_kl=moved["kl"], eval_kl_stderr=moved["kl_stderr"], eval_proxy=moved["proxy"],
                     eval_gold=moved["gold"], eval_truncated=moved["truncated"], eval_drift_n=moved["n"])
    return row


def train(args):
    """Run PPO; returns summary.json's dict. Set-up, the first eval, then per step: the next prompts, one
    PPO step (ppo_step), the KL controller, the log and a periodic eval; the last eval, then finish()."""
    setup = set_up(args)
    start_row = evaluate_and_log(setup, args, 0, 0.0, full=True)
    state = RunState(beta=args.beta, next_eval=60 * args.eval_minutes)
    while not budget_spent(state, args):
        rows, state.pool = next_prompts(setup.train_rows, state.pool, setup.prompt_order, args.completions_per_step)
        # ALGO LOGIC: rollout -> rewards -> GAE -> clipped updates, then the adaptive KL controller
        metrics = ppo_step(setup.models, setup.optimizer, setup.enc, rows, args, state.beta, setup.generators,
                           setup.device, step=state.step + 1)
        state.step += 1
        state.train_seconds += metrics["step_s"]
        if args.kl_target > 0:
            state.beta = adaptive_beta(state.beta, metrics["kl_seq"], args.kl_target, args.kl_horizon, len(rows))
        # TRY NOT TO MODIFY: log the step; evaluate every eval_minutes of training
        metrics.update(train_minutes=state.train_seconds / 60, peak_mem_mb=rundir.peak_memory_mb(setup.device))
        state.history.append(metrics)
        setup.logger.log(state.step, kind="train", **metrics)
        if state.train_seconds >= state.next_eval and not budget_spent(state, args):   # the final eval follows anyway
            evaluate_and_log(setup, args, state.step, state.train_seconds, full=False)
            state.next_eval += 60 * args.eval_minutes
    final_row = evaluate_and_log(setup, args, state.step, state.train_seconds, full=True)
    return finish(setup, state, start_row, final_row, args)


def mean_of(key, metrics_rows):
    """The mean of one metric over metrics rows (0 for none)."""
    return sum(row[key] for row in metrics_rows) / max(len(metrics_rows), 1)


def finish(setup: Setup, state: RunState, start_row, final_row, args):
    """Save the policy and summary.json, close the log, print the run's report -> summary."""
    start_eval = {"accuracy": start_row["greedy"], "stderr": start_row["stderr"]}
    final_eval = {"accuracy": final_row["greedy"], "stderr": final_row["stderr"]}

    checkpoints.save(os.path.join(args.out, "model.pt"), setup.models["policy"], setup.enc, args=asdict(args),
                     step=state.step,
                     results={"start_accuracy": start_eval["accuracy"], "final_accuracy": final_eval["accuracy"]})

    history = state.history
    summary = {"algo": "ppo", "reward": args.reward, "params_by_role": setup.roles,
               "peak_mem_mb": rundir.peak_memory_mb(setup.device), "sec_per_step": mean_of("step_s", history),
               "time_split": {key: mean_of(key, history) for key in ("gen_s", "score_s", "adv_s", "update_s")},
               "final_accuracy": final_eval["accuracy"], "start_accuracy": start_eval["accuracy"],
               "final_stderr": final_eval["stderr"], "start_stderr": start_eval["stderr"],
               "train_minutes": state.train_seconds / 60, "steps": state.step, "n_eval": len(setup.eval_rows),
               "start": start_row, "ppo": final_row}
    with rundir.atomic_write(os.path.join(args.out, "summary.json")) as f:
        json.dump(summary, f, indent=2)
    setup.logger.close()

    last = history[-5:]
    print(f"\nppo ({args.reward} reward): {state.step} steps in {state.train_seconds / 60:.1f} min, "
          f"{summary['sec_per_step']:.2f} s/step (gen " + " | ".join(
              f"{key[:-2]} {seconds:.2f}" for key, seconds in summary["time_split"].items()).removeprefix("gen ") + ")")
    if history:
        print(f"{'':28}{'first step':>12}{'last 5 steps':>14}")
        for key, name in (("reward_mean", "reward (rollouts)"), ("accuracy", "rollout accuracy"),
                          ("kl", "KL(pi || ref), k3/token"), ("response_length", "response length")):
            print(f"{name:<28}{history[0][key]:>12.3f}{mean_of(key, last):>14.3f}")
    print(f"held-out accuracy (greedy, {len(setup.eval_rows)} prompts): "
          f"{100 * start_eval['accuracy']:.1f}% +/- {100 * start_eval['stderr']:.1f} before -> "
          f"{100 * final_eval['accuracy']:.1f}% +/- {100 * final_eval['stderr']:.1f} after")
    print(f"peak memory {summary['peak_mem_mb']:.0f} MB | {args.out}/model.pt, metrics.jsonl, summary.json")
    return summary


# ---------------------------------------------------------------------------------------------
# The control and the report
# ---------------------------------------------------------------------------------------------

def control_command(args, minutes: float) -> list[str]:
    """The equal-time control: SFT (sft.py) continued from the same start checkpoint on the demonstrations,
    for the same training minutes PPO took, with sft.py's own settings otherwise."""
    return stages.stage_command("sft.py", init=args.init, data=args.sft_data, test_data=args.sft_test_data,
                                eval_data=args.eval_data, n_eval=args.n_eval_during, eval_minutes=args.eval_minutes,
                                max_new_tokens=args.max_new_tokens, time_budget=f"{minutes:.4f}", max_steps=0,
                                out=os.path.join(args.out, "control"), seed=args.seed, device=args.device,
                                threads=args.threads)


def run_control(args, summary) -> dict:
    """Run the control, then evaluate its checkpoint exactly as the start and PPO rows were (eval_row), with
    the same reference (the start) for its KL and the same reward model for its score."""
    stages.run_stage(control_command(args, summary["train_minutes"]))
    device = cli.get_device(args.device)
    control, enc, _ = checkpoints.load(os.path.join(args.out, "control", "model.pt"), device=device,
                                       chat_format=args.chat_template)
    reference, _, _ = checkpoints.load(args.init, device=device, chat_format=args.chat_template)
    reward_model = load_reward_model(args.reward_model, device)[0] if args.reward == "rm" else None
    for module in (control, reference) + ((reward_model,) if reward_model is not None else ()):
        module.eval()
    eval_rows = tasks.fit_prompts(drop_empty_prompts(tasks.read_prompts(args.eval_data), args.eval_data), enc,
                                  control.config.block_size, args.max_new_tokens, args.eval_data)[:args.n_eval]
    return eval_row(control, reference, reward_model, enc, eval_rows, eval_rows[:args.n_eval_during], args, args.seed)


def format_table(summary, args) -> str:
    """start | PPO | control: greedy accuracy (per difficulty), then the sampled completions' verifier accuracy
    beside their reward-model score, pass@k, KL to the start, and the greedy outputs' style shares."""
    rows = [(label, summary[key]) for label, key in (("start", "start"), ("PPO", "ppo"), ("more SFT (control)",
                                                                                     "control")) if key in summary]
    difficulties = list(summary["start"]["per_difficulty"])
    head = ["", "greedy acc", *[f"d={d}" for d in difficulties], "sampled acc (verifier)", "RM score (sampled)",
            f"pass@{args.pass_k}", "KL to start", "worked", "skips work", "wrong step", "no answer", "mean len",
            "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows:
        minutes = 0.0 if row is summary["start"] else summary["train_minutes"]
        styles = row["styles"]
        cells = [label, f"{100 * row['greedy']:.1f} ± {100 * row['stderr']:.1f}",
                 *[f"{100 * row['per_difficulty'].get(d, float('nan')):.1f}" for d in difficulties],
                 f"{100 * row['sampled']:.1f}", "-" if row["rm_score"] is None else f"{row['rm_score']:+.2f}",
                 f"{100 * row['pass_at_k']:.1f}", f"{row['kl']:.2f}",
                 *[f"{100 * styles[name]:.1f}" for name in ("worked", "bare", "wrong_step", "no_answer")],
                 f"{row['mean_length']:.1f}", f"{minutes:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curves(out: str) -> dict:
    """The eval rows of a run's metrics.jsonl as lists: minutes, greedy accuracy, KL to start, proxy, gold."""
    evals = [row for row in tasks.read_jsonl(os.path.join(out, "metrics.jsonl")) if row.get("kind") == "eval"]
    return {key: [row.get(field) for row in evals] for key, field in
            (("minutes", "train_minutes"), ("accuracy", "eval_accuracy"), ("kl", "eval_kl"), ("proxy", "eval_proxy"),
             ("gold", "eval_gold"))}


def main(argv=None):
    args = cli.parse_args(Args, argv)
    summary = train(args)
    if args.control:
        summary["control"] = run_control(args, summary)
        with rundir.atomic_write(os.path.join(args.out, "summary.json")) as f:
            json.dump(summary, f, indent=2)
    table = format_table(summary, args)
    with rundir.atomic_write(os.path.join(args.out, "results.md")) as f:
        f.write(table + "\n")
    print(f"\nHeld-out prompts: {summary['start']['n']} from {args.eval_data}; greedy accuracy ± standard error; "
          f"{args.pass_k} samples per prompt at temperature {args.temperature}, scored by the verifier and by "
          f"the reward model ({args.reward_model if args.reward == 'rm' else 'none: --reward verifier'}); KL to "
          f"start from {summary['start']['drift']['n']} samples; style shares of the greedy outputs.")
    print(table)
    line = f"PPO vs start: {100 * (summary['ppo']['greedy'] - summary['start']['greedy']):+.1f} points"
    if "control" in summary:
        line += f" | PPO vs equal-time SFT control: {100 * (summary['ppo']['greedy'] - summary['control']['greedy']):+.1f}"
    print(line + " (greedy accuracy)")
    history = curves(args.out)
    print(f"during PPO ({len(history['minutes'])} evals; the first and last greedy ones on {summary['start']['n']} "
          f"held-out prompts, the others and every KL, proxy and gold on {summary['start']['drift']['n']}):")
    print(f"  greedy accuracy      {rundir.sparkline(history['accuracy'])}  "
          f"({100 * history['accuracy'][0]:.1f}% -> {100 * history['accuracy'][-1]:.1f}%)")
    print(f"  KL(pi || start)      {rundir.sparkline(history['kl'])}  ({history['kl'][0]:.2f} -> {history['kl'][-1]:.2f})")
    if args.reward == "rm":
        print(f"  RM score (proxy)     {rundir.sparkline(history['proxy'])}  "
              f"({history['proxy'][0]:+.2f} -> {history['proxy'][-1]:+.2f})")
    print(f"  verifier acc (gold)  {rundir.sparkline(history['gold'])}  "
          f"({100 * history['gold'][0]:.1f}% -> {100 * history['gold'][-1]:.1f}%)")
    return summary


if __name__ == "__main__":
    cli.run(main)
