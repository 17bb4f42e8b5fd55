"""Reward model: a transformer body with a scalar head, trained on preference pairs (Bradley-Terry).

The second stage of RLHF. A person (here: synth.py's verifier) saw two completions y_c, y_r of a
prompt x and preferred y_c. The reward model r(x, y) is the SFT transformer with its LM head
replaced by a scalar head read at the LAST REAL token of prompt + completion + EOS. Bradley and
Terry's model of a pairwise choice makes the preference a logistic function of the reward gap:

    P(y_c > y_r | x) = sigmoid(r(x, y_c) - r(x, y_r))
    L = -log sigmoid(r_c - r_r - m)  +  c * (r_c + r_r)^2

m is an optional margin (Touvron et al. 2023, Llama 2), c an optional centring term that keeps the
rewards near zero mean, since the loss alone only sees differences (Eisenstein et al. 2023).
Bradley & Terry 1952; Christiano et al. 2017; Stiennon et al. 2020; Ouyang et al. 2022 (InstructGPT).
The model only learns what separates the pairs it saw. The held-out accuracy and calibration that judge
it are those of the kinds it was trained on; the other kinds in the test file are probes: pairs that
differ only in length or format (both correct: 50 % = no preference, anything else is a shortcut) and
the kinds it was not trained on (synth.py's default trains the strategy choice, worked solution over a
bare answer or a missing "####", which a 0.84 M model separates; wrong_step, wrong_answer and
off_by_one probe whether it checks arithmetic, which it does not learn in minutes).

    python reward.py                     # 2 epochs, ~35 s on 2 CPU cores -> runs/rm/model.pt, metrics.jsonl
    python reward.py --init scratch      # the same body, randomly initialised (compare the two)
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
from lib import checkpoints, cli, rundir, stages, tasks, tokenizer


@dataclass
class Args:
    data: str = "data/prefs_train.jsonl"     # prompt/chosen/rejected JSONL to train on
    test_data: str = "data/prefs_test.jsonl"  # held-out preference pairs for the metrics
    init: str = "runs/sft/model.pt"          # body initialisation: a checkpoint, or "scratch"
    out: str = "runs/rm"                     # run folder: model.pt, metrics.jsonl, args.json
    n_layer: int = 4                         # transformer blocks (--init scratch only)
    n_head: int = 4                          # attention heads (--init scratch only)
    n_embd: int = 128                        # model width (--init scratch only)
    block_size: int = 256                    # context length (--init scratch only)
    epochs: int = 2                          # passes over the training pairs
    batch_size: int = 32                     # pairs per update (2x sequences per forward)
    lr: float = 1e-3                         # peak learning rate (AdamW)
    warmup_steps: int = 10                   # linear warmup updates, then cosine decay
    min_lr_ratio: float = 0.1                # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0                # AdamW decay on matrices (never norms/biases/head bias)
    grad_clip: float = 1.0                   # clip the global gradient norm to this (0 = off)
    margin: float = 0.0                      # m in -log sigmoid(r_c - r_r - m); a row's "margin" key wins
    center_coef: float = 0.01                # c in + c * (r_c + r_r)^2 (0 = off)
    time_budget: float = 0.0                 # minutes of training, eval excluded (0 = no time limit: --epochs decide)
    max_test: int = 0                        # held-out pairs to evaluate (0 = all)
    n_bins: int = 5                          # calibration bins over confidence [0.5, 1]
    log_every: int = 10                      # updates between metric lines
    device: str = "auto"                     # auto|cpu|cuda
    seed: int = 0                            # seeds the head init and the batch order


# ---------------------------------------------------------------------------------------------
# The model: transformer body + scalar head at the last real token
# ---------------------------------------------------------------------------------------------

def last_token_index(mask):
    """mask (B, T) bool, True at real tokens of RIGHT-padded rows -> (B,) index of each last real token."""
    return mask.long().sum(-1) - 1


class RewardModel(nn.Module):
    """r(x, y) = w . h_L(x ++ y ++ EOS)[last real token] + b, with h_L the body's final normed hidden state.

    The body is a model.GPT (its LM head is unused); the head starts at zero, so every reward starts at 0
    and the first loss is exactly log 2. Rows are right-padded: causal attention means a later pad never
    changes an earlier token's hidden state, so the reward does not depend on padding or batch-mates."""

    def __init__(self, body: M.GPT, enc=None):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.enc = enc   # the tokenizer (not a module): score() encodes text with it

    def forward(self, tokens, mask):
        """tokens, mask (B, T), right-padded -> rewards (B,) read at each row's last real token."""
        hidden = self.body.hidden(tokens)                                         # (B, T, C)
        last = hidden[torch.arange(len(tokens), device=tokens.device), last_token_index(mask)]  # (B, C)
        return self.head(last.float()).squeeze(-1)                                # (B,)

    @torch.no_grad()
    def score(self, prompts, completions, batch_size: int = 64):
        """The scoring API: rewards (N,) for lists of prompt and completion texts (EOS appended)."""
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        sequences = [encode_pair(self.enc, prompt, completion) for prompt, completion in zip(prompts, completions)]
        scores = []
        for start in range(0, len(sequences), batch_size):
            tokens, mask = M.padded_batch(sequences[start:start + batch_size], tokenizer.pad_id(self.enc), "right", device)
            with M.autocast(device):
                scores.append(self(tokens, mask).float())
        self.train(was_training)
        return torch.cat(scores)


def encode_pair(enc, prompt, completion):
    """tokens of prompt ++ completion ++ [end of turn], the sequence a reward is read from (at its end); the
    prompt in the checkpoint's chat format (plain for this project's byte-level models)."""
    return tokenizer.encode_prompt(enc, prompt) + tokenizer.encode(enc, completion) + [tokenizer.end_of_turn(enc)]


def save_reward_model(path, reward_model: RewardModel, **meta):
    """checkpoints.save of the body; the head's weights go in the checkpoint's meta as plain tensors, so any
    file can rebuild the reward model with checkpoints.load and three lines (ppo.py does)."""
    head = {"weight": reward_model.head.weight.detach().cpu(), "bias": reward_model.head.bias.detach().cpu()}
    checkpoints.save(path, reward_model.body, reward_model.enc, kind="reward_model", reward_head=head, **meta)


def load_reward_model(path, device="cpu") -> RewardModel:
    """-> RewardModel (eval mode) from a checkpoint written by save_reward_model."""
    body, enc, ckpt = checkpoints.load(path, device=device)
    reward_model = RewardModel(body, enc).to(device)
    reward_model.head.load_state_dict(checkpoints.reward_head_weights(ckpt, path, body.config.n_embd))
    return reward_model.eval()


# ---------------------------------------------------------------------------------------------
# The math: Bradley-Terry loss, pairwise accuracy, calibration
# ---------------------------------------------------------------------------------------------

def bradley_terry_loss(r_chosen, r_rejected, margin=0.0, center_coef: float = 0.0):
    """L = mean over pairs of  -log sigmoid(r_c - r_r - m) + c * (r_c + r_r)^2.     r_* (B,), margin scalar or (B,)

    d L / d delta = sigmoid(delta - m) - 1 per pair: the push is largest on pairs ranked wrongly.
    Without the centring term the loss is unchanged by adding one constant to every reward.
    -> (loss, stats{accuracy: share of pairs with r_c > r_r, margin: mean r_c - r_r})"""
    delta = r_chosen - r_rejected                                                 # (B,)
    loss = -F.logsigmoid(delta - margin)                                          # (B,)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected).square()
    with torch.no_grad():
        stats = {"accuracy": (delta > 0).to(delta.dtype).mean(), "margin": delta.mean()}
    return loss.mean(), stats


def pairwise_accuracy(deltas):
    """Share of pairs ranked right, delta = r_c - r_r > 0; a tie (delta == 0) counts as half."""
    return float(((deltas > 0).float() + 0.5 * (deltas == 0).float()).mean())


def calibration(deltas, n_bins: int = 5):
    """Reliability table of the Bradley-Terry probabilities on held-out pairs.

    Each pair's predicted winner is the higher-scored completion, with confidence
    q = sigmoid(|delta|) in [0.5, 1]; calibrated means: among pairs with confidence ~q, a share ~q
    has the predicted winner = the chosen one. Bins split [0.5, 1] evenly. Returns (rows, ece) with
    rows [{"lo", "hi", "n", "confidence", "accuracy"}] and the expected calibration error
    ECE = sum_bins n_b / n * |accuracy_b - confidence_b| (Naeini et al. 2015; Guo et al. 2017)."""
    deltas = deltas.double()
    confidence = torch.sigmoid(deltas.abs())                                      # (N,)
    right = (deltas > 0).double() + 0.5 * (deltas == 0).double()                 # (N,)
    table, ece = [], 0.0
    for bin_index in range(n_bins):
        lo, hi = 0.5 + 0.5 * bin_index / n_bins, 0.5 + 0.5 * (bin_index + 1) / n_bins
        inside = (confidence >= lo) & ((confidence < hi) if bin_index < n_bins - 1 else (confidence <= hi))
        count = int(inside.sum())
        mean_confidence = float(confidence[inside].mean()) if count else float("nan")
        accuracy = float(right[inside].mean()) if count else float("nan")
        table.append({"lo": lo, "hi": hi, "n": count, "confidence": mean_confidence, "accuracy": accuracy})
        if count:
            ece += count / len(deltas) * abs(accuracy - mean_confidence)
    return table, ece


def accuracy_by_kind(deltas, kinds):
    """{kind: (pairwise accuracy, number of pairs)} over the held-out pairs of each kind."""
    groups = {}
    for i, kind in enumerate(kinds):
        groups.setdefault(kind, []).append(i)
    return {kind: (pairwise_accuracy(deltas[indices]), len(indices)) for kind, indices in sorted(groups.items())}


# ---------------------------------------------------------------------------------------------
# Data and evaluation
# ---------------------------------------------------------------------------------------------

def make_pairs(rows, enc, block_size, default_margin=0.0):
    """-> (pairs, n_skipped): pair = (chosen tokens, rejected tokens, margin, kind); pairs whose
    longer sequence does not fit the context are skipped (a cut completion loses its answer)."""
    pairs, skipped = [], 0
    for row in rows:
        chosen = encode_pair(enc, row["prompt"], row["chosen"])
        rejected = encode_pair(enc, row["prompt"], row["rejected"])
        if max(len(chosen), len(rejected)) > block_size:
            skipped += 1
            continue
        pairs.append((chosen, rejected, float(row.get("margin", default_margin)), str(row.get("kind", "all"))))
    return pairs, skipped


def pair_rewards(reward_model, pairs, pad, device):
    """One forward over the 2B sequences of B pairs -> (r_chosen (B,), r_rejected (B,))."""
    tokens, mask = M.padded_batch([pair[0] for pair in pairs] + [pair[1] for pair in pairs], pad, "right", device)
    with M.autocast(device):
        rewards = reward_model(tokens, mask).float()                              # (2B,)
    return rewards[:len(pairs)], rewards[len(pairs):]


@torch.no_grad()
def evaluate_pairs(reward_model, pairs, pad, device, n_bins=5, batch_size=64, trained_kinds=None):
    """Held-out metrics: loss, pairwise accuracy, mean margin, calibration, accuracy per kind; and the same
    accuracy and calibration over the pairs whose kind the model was trained on ("trained": the number the
    preference data is judged by; the other kinds are probes, e.g. length_only/format_only, where both
    completions are correct and 50 % means no preference)."""
    was_training = reward_model.training
    reward_model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        r_c, r_r = pair_rewards(reward_model, pairs[start:start + batch_size], pad, device)
        chosen.append(r_c.cpu())
        rejected.append(r_r.cpu())
    reward_model.train(was_training)
    r_c, r_r = torch.cat(chosen), torch.cat(rejected)
    deltas = r_c - r_r
    table, ece = calibration(deltas, n_bins)
    results = {"test_loss": float(-F.logsigmoid(deltas).mean()), "test_accuracy": pairwise_accuracy(deltas),
               "test_margin": float(deltas.mean()), "reward_mean": float(torch.cat([r_c, r_r]).mean()),
               "reward_std": float(torch.cat([r_c, r_r]).std()), "ece": ece, "calibration": table,
               "by_kind": accuracy_by_kind(deltas, [pair[3] for pair in pairs]), "n": len(pairs)}
    trained = torch.tensor([pair[3] in (trained_kinds or ()) for pair in pairs], dtype=torch.bool)
    if trained.any():
        trained_table, trained_ece = calibration(deltas[trained], n_bins)
        results.update(trained_accuracy=pairwise_accuracy(deltas[trained]), trained_ece=trained_ece,
                       trained_loss=float(-F.logsigmoid(deltas[trained]).mean()), trained_n=int(trained.sum()),
                       trained_calibration=trained_table)
    return results


def lr_at(step, progress, peak, warmup_steps, min_ratio):
    """lr = peak * min(1, (step + 1) / warmup) * (r + (1 - r) * (1 + cos(pi * progress)) / 2): sft.py's lr_at,
    the project's one warm-up rule, copied (a concept file imports no other; tests/test_reward.py checks they agree)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    return peak * warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def print_report(results, label="held-out", trained_kinds=()):
    print(f"{label} pairs: {results['n']} | pairwise accuracy {100 * results['test_accuracy']:.1f}% | "
          f"mean margin r_c - r_r {results['test_margin']:+.3f} | loss {results['test_loss']:.4f} | "
          f"ECE {results['ece']:.3f}")
    calibration_table = results["calibration"]
    if "trained_accuracy" in results:
        print(f"{label} pairs of the kinds trained on ({', '.join(trained_kinds)}): {results['trained_n']} | "
              f"pairwise accuracy {100 * results['trained_accuracy']:.1f}% | loss {results['trained_loss']:.4f} | "
              f"ECE {results['trained_ece']:.3f}")
        calibration_table = results["trained_calibration"]
    print("calibration  confidence bin   pairs   mean confidence   observed accuracy"
          + ("   (kinds trained on)" if "trained_accuracy" in results else ""))
    for row in calibration_table:
        shown = f"{row['confidence']:.3f}            {row['accuracy']:.3f}" if row["n"] else "-                -"
        print(f"             [{row['lo']:.2f}, {row['hi']:.2f}]{' ' * 4}{row['n']:5d}   {shown}")
    print("accuracy by pair kind:")
    for kind, (accuracy, count) in results["by_kind"].items():
        note = "trained on" if kind in trained_kinds else "probe, not trained on (both correct: 50% = no preference)" \
            if kind in SHORTCUT_PROBES else "probe, not trained on"
        print(f"  {kind:<16} {100 * accuracy:5.1f}%  ({count} pairs; {note})")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

PAIR_SCHEMA = {"prompt": str, "chosen": str, "rejected": str}
SHORTCUT_PROBES = ("length_only", "format_only")   # synth.py's pairs of two correct completions (shortcut probes)
MAX_MARGIN = 1e6   # a row's margin beyond this is a typo (and inf in float32 beyond 3.4e38)


def read_pairs(path):
    """Preference pairs {"prompt", "chosen", "rejected"} (TRL's format, strings), with an optional number
    "margin" (|m| <= MAX_MARGIN) and an optional "kind" label. tasks.read_jsonl(path, PAIR_SCHEMA) row by row
    (lib/tasks.py's reader and checks) plus the margin's, so every bad row is a UserError naming file:line."""
    rows = []
    for number, row in tasks.jsonl_objects(path):
        where = f"{path}:{number}"
        tasks.check_row(row, PAIR_SCHEMA, where)
        if "margin" in row:
            tasks.check_row(row, {"margin": (int, float)}, where)
            if not abs(row["margin"]) <= MAX_MARGIN:   # nan fails too; no float() of a 400-digit integer
                raise cli.UserError(f"{where}: 'margin' must be a number in [-{MAX_MARGIN:g}, {MAX_MARGIN:g}]")
        rows.append(row)
    if not rows:
        raise cli.UserError(f"{path}: empty, no rows")
    return rows


def synth_command() -> list[str]:
    """The synth.py run that makes the default preference files, Args().data and Args().test_data."""
    return stages.stage_command("synth.py", out_dir=os.path.dirname(Args().data))


def sft_command() -> list[str]:
    """The sft.py run that makes the default body checkpoint, Args().init."""
    return stages.stage_command("sft.py", out=os.path.dirname(Args().init))


def scratch_config(args, vocab_size: int) -> M.Config:
    """The body's Config for --init scratch (a ValueError names the field that is wrong)."""
    return M.Config(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                    n_kv_head=args.n_head, n_embd=args.n_embd)


def check_fits_in_memory(config):
    """A scratch body's float32 weights, gradients and AdamW's two moments (16 bytes a parameter; about
    12 L C^2 + V C parameters) must fit in this machine's memory, or allocating them fails mid-run."""
    n_params = 12 * config.n_layer * config.n_embd ** 2 + config.vocab_size * config.n_embd
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # no sysconf here: nothing to compare with
        return
    if 16 * n_params > memory:
        need, have = 16 * n_params / 2 ** 30, memory / 2 ** 30
        raise cli.UserError(f"--init scratch: a body of about {n_params:.2e} parameters needs {need:.0f} GiB for "
                            f"training; this machine has {have:.0f} GiB")


def check_args(args):
    """Every option, checked before anything is read or written; the first bad one is a UserError naming it.
    The upper limits (a count beyond 1e9, a coefficient beyond 1e6, more than 1000 calibration bins, a scratch
    body larger than this machine's memory) keep every value away from an overflow, a hang or an allocation
    failure in the middle of a run."""
    cli.get_device(args.device)
    cli.require_at_least(args, 1, "epochs", "batch_size", "n_bins", "log_every", "n_head", "n_embd", "block_size")
    cli.require_at_least(args, 0, "n_layer", "warmup_steps", "max_test")
    cli.check_options(args, positive=("lr",), probability=("min_lr_ratio",), seed=("seed",),
                      non_negative=("weight_decay", "grad_clip", "margin", "center_coef", "time_budget"))
    cli.require_at_most(args, cli.MAX_LR, "lr")    # Adam moves each weight by ~lr a step
    cli.require_at_most(args, 10 ** 9, "n_layer", "n_head", "n_embd", "block_size", "epochs", "batch_size", "warmup_steps",
                  "max_test", "log_every")
    cli.require_at_most(args, 1000, "n_bins")
    cli.require_at_most(args, 1e6, "weight_decay", "grad_clip", "margin", "center_coef", "time_budget")
    for name in ("data", "test_data", "init", "out"):
        if not getattr(args, name).strip():
            raise cli.UserError(f"--{name.replace('_', '-')}: the path is empty")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise cli.UserError(f"--out {args.out}: exists and is not a folder")
    if args.init == "scratch":
        try:
            config = scratch_config(args, tokenizer.get_tokenizer("bytes").n_vocab)
        except ValueError as e:
            raise cli.UserError(f"--init scratch: {e}") from None
        check_fits_in_memory(config)


def build(args, device):
    """-> RewardModel: body from the SFT checkpoint (built by sft.py when the default is missing) or new."""
    if args.init == "scratch":
        enc = tokenizer.get_tokenizer("bytes")
        body = M.GPT(scratch_config(args, enc.n_vocab))
    else:
        stages.ensure_input(args.init, Args().init, sft_command())
        body, enc, _ = checkpoints.load(args.init)
        checkpoints.require_settings_for_pretrained(args.init, args, ("lr", "batch_size"))
        bad = cli.non_finite_tensors(body.state_dict())
        if bad:
            raise cli.UserError(f"{args.init}: weights hold NaN or inf (first: {bad[0]})")
    return RewardModel(body, enc).to(device)


def load_inputs(args, device):
    """Every input, read and checked before anything is written: both pair files (read_pairs), the body
    checkpoint, and the pairs that fit its context. A missing DEFAULT input is made by its upstream stage.
    -> (reward_model, train_pairs, test_pairs)"""
    defaults = Args()
    stages.check_named_inputs((args.data, defaults.data), (args.test_data, defaults.test_data),
                              *([] if args.init == "scratch" else [(args.init, defaults.init)]))
    stages.ensure_input(args.data, defaults.data, synth_command())
    train_rows = read_pairs(args.data)
    stages.ensure_input(args.test_data, defaults.test_data, synth_command())
    test_rows = read_pairs(args.test_data)
    if args.max_test > 0:
        test_rows = test_rows[:args.max_test]
    reward_model = build(args, device)
    block = reward_model.body.config.block_size
    train_pairs, skipped = make_pairs(train_rows, reward_model.enc, block, args.margin)
    test_pairs, test_skipped = make_pairs(test_rows, reward_model.enc, block, args.margin)
    if not train_pairs or not test_pairs:
        raise cli.UserError(f"{args.data if not train_pairs else args.test_data}: no pair fits the context ({block})")
    if skipped or test_skipped:
        print(f"skipped {skipped} training and {test_skipped} test pairs longer than the context ({block} tokens)")
    return reward_model, train_pairs, test_pairs


def train(args):
    """Train the reward model; returns the final held-out results dict. A NaN/inf loss or gradient norm stops
    the run before the update, a weight that is NaN, inf or past cli.MAX_WEIGHT right after it
    (cli.NonFiniteError naming the step); model.pt is written only at the end, from checked weights."""
    check_args(args)
    device = cli.get_device(args.device)
    cli.seed_everything(args.seed)
    reward_model, train_pairs, test_pairs = load_inputs(args, device)
    pad = tokenizer.pad_id(reward_model.enc)

    # AdamW (Loshchilov & Hutter 2019): decay matrices only, never norm gains or biases.
    params = [p for p in reward_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(train_pairs) / args.batch_size)
    total = args.epochs * steps_per_epoch
    rundir.save_args(args.out, args)
    logger = rundir.MetricsLogger(args.out, total=total)
    print(f"reward model: {reward_model.body.num_params() / 1e6:.2f}M body params from "
          f"{'scratch' if args.init == 'scratch' else args.init}, {len(train_pairs)} train / {len(test_pairs)} "
          f"test pairs, {args.epochs} epochs x {steps_per_epoch} steps, device {device}")

    def scalars(results):
        return {key: value for key, value in results.items()
                if key not in ("calibration", "trained_calibration", "by_kind")}

    trained_kinds = sorted({pair[3] for pair in train_pairs})
    start = evaluate_pairs(reward_model, test_pairs, pad, device, args.n_bins, trained_kinds=trained_kinds)
    logger.log(0, kind="eval", epoch=0, **scalars(start))
    step, train_seconds, results, out_of_time = 0, 0.0, start, False
    max_norm = args.grad_clip if args.grad_clip > 0 else math.inf    # inf: measure the norm, clip nothing
    reward_model.train()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for batch_start in range(0, len(order), args.batch_size):
            step_started = time.perf_counter()
            progress = max(step / total, train_seconds / (60 * args.time_budget) if args.time_budget else 0.0)
            if progress >= 1.0:
                out_of_time = True
                break
            lr = lr_at(step, progress, args.lr, args.warmup_steps, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = [train_pairs[i] for i in order[batch_start:batch_start + args.batch_size].tolist()]
            r_c, r_r = pair_rewards(reward_model, batch, pad, device)
            margins = torch.tensor([pair[2] for pair in batch], device=device)
            loss, _ = bradley_terry_loss(r_c, r_r, margins, args.center_coef)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            cli.check_finite(f"step {step + 1}", loss=loss.detach(), grad_norm=grad_norm)   # before the weights move
            optimizer.step()
            cli.check_weights(f"step {step + 1}", reward_model)   # NaN, inf or past cli.MAX_WEIGHT: before any save
            step += 1
            train_seconds += time.perf_counter() - step_started
            if step % args.log_every == 0 or step == 1:
                logger.log(step, kind="train", loss=loss.item(), accuracy=pairwise_accuracy((r_c - r_r).detach()),
                           margin=float((r_c - r_r).mean().detach()), grad_norm=float(grad_norm), lr=lr,
                           minutes=train_seconds / 60)
        results = evaluate_pairs(reward_model, test_pairs, pad, device, args.n_bins, trained_kinds=trained_kinds)
        logger.log(step, kind="eval", epoch=epoch, minutes=train_seconds / 60, **scalars(results),
                   by_kind={kind: accuracy for kind, (accuracy, _) in results["by_kind"].items()})
        if out_of_time:
            print(f"time budget of {args.time_budget} min reached in epoch {epoch}")
            break

    results.update(steps=step, minutes=train_seconds / 60, start_accuracy=start["test_accuracy"])
    save_reward_model(os.path.join(args.out, "model.pt"), reward_model, args=asdict(args), results=scalars(results))
    by_kind = {kind: {"accuracy": accuracy, "n": count} for kind, (accuracy, count) in results["by_kind"].items()}
    logger.log(step, kind="final", calibration=results["calibration"], by_kind=by_kind, trained_kinds=trained_kinds,
               trained_calibration=results.get("trained_calibration"), echo=False)
    logger.close()
    print(f"before training: pairwise accuracy {100 * start['test_accuracy']:.1f}% (zero head: every pair a tie)")
    print_report(results, trained_kinds=trained_kinds)
    print(f"{step} steps in {train_seconds / 60:.1f} min | {args.out}/model.pt")
    return results


def main(argv=None):
    return train(cli.parse_args(Args, argv))


if __name__ == "__main__":
    cli.run(main)
