"""Pre-LN vs post-LN: where the normalisation sits decides how gradients reach each layer.

    post-LN (Vaswani et al. 2017):  x_{l+1} = LN(x_l + F_l(x_l))
    pre-LN  (GPT-2, Xiong et al.):  x_{l+1} = x_l + F_l(LN(x_l)),      output = LN(x_L) W

In pre-LN the residual stream is an identity path: dx_L/dx_l = I + sum of branch terms, so every layer
receives the output gradient undiminished and no layer's gradient is singled out. In post-LN every
gradient passes through the LayerNorms of all the blocks above it, which rescale it by roughly 1/||x||,
and the gradient of the parameters near the output is the largest. Xiong et al. 2020 ("On Layer
Normalization in the Transformer Architecture", Thm. 1) bound the last layer's FFN gradient: for post-LN
it is O(d sqrt(ln d)), independent of the depth L, while for pre-LN it is O(d sqrt(ln d / L)), and their
Fig. 3 shows post-LN gradients growing with the layer index while pre-LN's stay flat. Large gradients
near the output are why post-LN needs a learning-rate warmup (Liu et al. 2020 trace the same
instability to the amplified dependence on the residual branches) and pre-LN trains without one.

This file measures both halves: (1) the gradient norm of each block's FFN weights at initialisation,
for depths 6, 12 and 24 under both placements; (2) training at a high learning rate with and without
linear warmup, over several seeds, on the project's synthetic arithmetic text (data/*.jsonl, made by
synth.py when missing). A run "failed" when its loss became NaN/inf (diverged) or when its held-out
loss ended no lower than the bigram entropy of the training tokens,

    H(X_t | X_{t-1}) = -sum_{u,v} p(u, v) ln p(v | u),

the loss of a lookup table of the previous token: a transformer that does not beat it learned nothing
a bigram table could not.

    python experiments/norm_position.py                   # profile + 2 x 2 arms x 3 seeds, a few minutes
    python experiments/norm_position.py --lr 3e-3 --train-steps 400
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model as M  # noqa: E402  (the project root is on sys.path only from the line above)
from lib import cli, rundir, stages, tasks, tokenizer  # noqa: E402  (the project root is on sys.path only from the line above)


@dataclass
class Args:
    data: str = "data/sft_train.jsonl"      # prompt/completion JSONL: the training text
    test_data: str = "data/sft_test.jsonl"  # prompt/completion JSONL: the held-out text
    out: str = "runs/norm_position"         # results.json and results.md
    norm: str = "layernorm"                 # layernorm (as in both papers) | rmsnorm
    ffn: str = "relu"                       # FFN of every model (relu, as the original Transformer)
    n_embd: int = 64                        # model width d
    n_head: int = 4                         # attention heads
    seq_len: int = 32                       # tokens per training row
    batch_size: int = 16                    # rows per step and per gradient measurement
    init: str = "xiong"                     # xiong (the paper's: N(0, 1/fan_in), unit embeddings) | gpt2 (model.py's)
    profile_inits: str = "xiong,gpt2"       # initialisations whose gradient profile is measured
    depths: str = "6,12,24"                 # depths L of the gradient profile at initialisation
    grad_batches: int = 4                   # batches averaged in each gradient profile
    train_depth: int = 6                    # depth of the models trained at a high learning rate
    lr: float = 3e-3                        # the high learning rate (Adam, beta2 0.98 as the original Transformer)
    warmup_steps: int = 50                  # linear warmup length of the "with warmup" arms
    train_steps: int = 150                  # training steps of every arm
    seeds: str = "0,1,2"                    # comma-separated seeds: each trains every arm
    eval_batches: int = 4                   # held-out batches for the final loss
    device: str = "cpu"                     # cpu | cuda | auto
    threads: int = 0                        # torch CPU threads (0 = torch's default)


PLACEMENTS = ("post", "pre")


# ----------------------------------------------------------------------------------------------
# Data: documents = prompt ++ completion ++ EOT, concatenated and cut into rows of seq_len + 1 tokens
# ----------------------------------------------------------------------------------------------

def token_rows(path: str, seq_len: int, enc) -> torch.Tensor:
    """The demonstrations of `path` as one token stream cut into rows (N, seq_len + 1)."""
    stream = []
    for row in tasks.read_demonstrations(path):
        stream += tokenizer.encode(enc, row["prompt"] + row["completion"]) + [enc.eot_token]
    n = len(stream) // (seq_len + 1)
    if n < 1:
        raise cli.UserError(f"{path}: fewer than {seq_len + 1} tokens; lower --seq-len")
    return torch.tensor(stream[:n * (seq_len + 1)]).view(n, seq_len + 1)


def bigram_entropy(rows: torch.Tensor, vocab_size: int) -> float:
    """H(X_t | X_{t-1}) = -sum_{u,v} p(u, v) ln p(v | u) over the (input, target) pairs of the rows: the
    cross-entropy of the best model that sees only the previous token (a bigram table fit to these rows)."""
    previous, target = rows[:, :-1].flatten(), rows[:, 1:].flatten()
    joint = torch.bincount(previous * vocab_size + target, minlength=vocab_size ** 2).double().view(vocab_size, -1)
    p_joint = joint / joint.sum()                                             # p(u, v)
    p_previous = p_joint.sum(1, keepdim=True).expand_as(p_joint)              # p(u)
    seen = p_joint > 0
    return float(-(p_joint[seen] * (p_joint[seen] / p_previous[seen]).log()).sum())


def batch_at(rows: torch.Tensor, step: int, batch_size: int, generator) -> torch.Tensor:
    return rows[torch.randint(len(rows), (batch_size,), generator=generator)]


def lm_loss(model, batch):
    """Next-token cross-entropy on a (B, T + 1) batch."""
    logits = model(batch[:, :-1])                                               # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


INITS = ("xiong", "gpt2")


def xiong_init(model) -> None:
    """The initialisation Xiong et al.'s analysis assumes (and the original Transformer's scale): every
    matrix W ~ N(0, 1/fan_in), token embeddings N(0, 1) so the input has unit variance per coordinate,
    an output matrix of its own (embeddings untied). model.py's GPT-2 init is N(0, 0.02), residual output
    projections N(0, 0.02 / sqrt(2 L)), tied embeddings: a far smaller input and smaller branches."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, 0.0, module.in_features ** -0.5)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, 0.0, 1.0)


def make_model(args: Args, depth: int, placement: str, vocab_size: int, seed: int, device, init: str):
    torch.manual_seed(seed)
    cfg = M.Config(vocab_size=vocab_size, block_size=args.seq_len, n_layer=depth, n_head=args.n_head,
                   n_kv_head=args.n_head, n_embd=args.n_embd, ffn=args.ffn, norm=args.norm, norm_position=placement,
                   tie_embeddings=init == "gpt2")
    model = M.GPT(cfg)
    if init == "xiong":
        xiong_init(model)
    return model.to(device)


# ----------------------------------------------------------------------------------------------
# (1) The gradient profile at initialisation
# ----------------------------------------------------------------------------------------------

def block_grad_norms(model) -> list[float]:
    """||dL/dW_FFN^(l)||_F for each block l: the norm over all of the block's FFN weights (W1, W2[, W3])."""
    return [math.sqrt(sum(float(p.grad.pow(2).sum()) for p in block.ffn.parameters() if p.grad is not None))
            for block in model.blocks]


def gradient_profile(args: Args, depth: int, placement: str, init: str, rows, vocab_size: int, device) -> list[float]:
    """Per-block FFN gradient norms of a freshly initialised model, averaged over grad_batches batches."""
    model = make_model(args, depth, placement, vocab_size, seed=0, device=device, init=init)
    generator = torch.Generator().manual_seed(0)
    totals = [0.0] * depth
    for _ in range(args.grad_batches):
        model.zero_grad(set_to_none=True)
        lm_loss(model, batch_at(rows, 0, args.batch_size, generator).to(device)).backward()
        totals = [t + g for t, g in zip(totals, block_grad_norms(model))]
    return [t / args.grad_batches for t in totals]


# ----------------------------------------------------------------------------------------------
# (2) Training at a high learning rate, with and without warmup
# ----------------------------------------------------------------------------------------------

def warmup_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup: lr * min(1, (step + 1) / warmup_steps); the constant lr when warmup_steps = 0."""
    return lr if warmup_steps <= 0 else lr * min(1.0, (step + 1) / warmup_steps)


def train_arm(args: Args, placement: str, warmup_steps: int, seed: int, rows, test_rows, vocab_size: int,
              device) -> dict:
    """Train one model; stop at the first non-finite loss or gradient (the run diverged)."""
    model = make_model(args, args.train_depth, placement, vocab_size, seed, device, args.init)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-9)
    generator = torch.Generator().manual_seed(seed)
    losses, grad_norms, finite = [], [], True
    for step in range(args.train_steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(step, args.lr, warmup_steps)
        loss = lm_loss(model, batch_at(rows, step, args.batch_size, generator).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if not (math.isfinite(loss.item()) and math.isfinite(float(grad_norm))):
            finite = False                      # cli.check_finite would stop the process; here it is the result
            break
        optimizer.step()
        losses.append(loss.item())
        grad_norms.append(float(grad_norm))
    test_loss = float("nan")
    if finite:
        with torch.no_grad():
            test_generator = torch.Generator().manual_seed(1234)
            test_loss = sum(lm_loss(model, batch_at(test_rows, 0, args.batch_size, test_generator).to(device)).item()
                            for _ in range(args.eval_batches)) / args.eval_batches
        finite = math.isfinite(test_loss)
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    print(f"{placement}-LN warmup {warmup_steps:<4d} seed {seed:<4d} " + (f"held-out loss {test_loss:.4f}" if finite else
          f"diverged at step {len(losses)}"), flush=True)
    return {"placement": placement, "warmup_steps": warmup_steps, "seed": seed, "finite": finite,
            "steps_done": len(losses), "final_train_loss": sum(tail) / len(tail), "test_loss": test_loss,
            "losses": losses, "grad_norms": grad_norms}


def failed(run: dict, entropy: float) -> bool:
    """Diverged (NaN/inf), or a held-out loss no lower than the bigram entropy (no better than a bigram table)."""
    return not run["finite"] or not run["test_loss"] < entropy


# ----------------------------------------------------------------------------------------------
# Options, the report, main
# ----------------------------------------------------------------------------------------------

def parse_ints(text: str, name: str, low: int, high: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise cli.UserError(f"--{name} {text!r}: give comma-separated integers") from None
    if not values or any(not low <= v < high for v in values) or len(set(values)) < len(values):
        raise cli.UserError(f"--{name} {text!r}: give distinct integers in [{low}, {high})")
    return values


def parse_inits(text: str) -> list[str]:
    inits = [name.strip() for name in text.split(",") if name.strip()]
    if not inits or any(name not in INITS for name in inits) or len(set(inits)) < len(inits):
        raise cli.UserError(f"--profile-inits {text!r}: give one or both of {', '.join(INITS)}")
    return inits


def check_args(args: Args) -> None:
    """Every option before anything is read or written: one line, exit 2."""
    cli.check_choices(args, norm=("layernorm", "rmsnorm"), ffn=("swiglu", "geglu", "gelu", "relu", "relu2"))
    parse_ints(args.depths, "depths", 1, 65)
    parse_inits(args.profile_inits)
    cli.check_choices(args, init=INITS)
    parse_ints(args.seeds, "seeds", 0, 2 ** 32)
    cli.require_at_least(args, 1, "n_embd", "n_head", "seq_len", "batch_size", "grad_batches", "train_depth",
                         "train_steps", "eval_batches")
    cli.require_at_least(args, 0, "warmup_steps", "threads")
    cli.check_options(args, positive=("lr",))
    if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 2:
        raise cli.UserError(f"--n-embd {args.n_embd} must split into --n-head {args.n_head} heads of even width")
    cli.get_device(args.device)
    for name in ("data", "test_data", "out"):
        if not getattr(args, name):
            raise cli.UserError(f"--{name.replace('_', '-')}: a path is needed")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise cli.UserError(f"--out {args.out}: exists and is not a folder")


def data_command() -> list[str]:
    """synth.py with its defaults: makes data/*.jsonl when a default input file is missing."""
    return stages.stage_command("synth.py")


def mean(values):
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def profile_key(init: str, placement: str, depth: int) -> str:
    return f"{init}/{placement}/{depth}"


def profile_table(profiles: dict, inits: list[str], depths: list[int]) -> str:
    head = ["init", "placement", "depth L", "per-layer FFN grad norm (input → output)", "first layer", "last layer",
            "max layer", "last / first", "last × sqrt(L)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for init in inits:
        for placement in PLACEMENTS:
            for depth in depths:
                norms = profiles[profile_key(init, placement, depth)]
                cells = [init, f"{placement}-LN", str(depth), rundir.sparkline(norms, 24), f"{norms[0]:.3g}",
                         f"{norms[-1]:.3g}", str(1 + norms.index(max(norms))), f"{norms[-1] / norms[0]:.2f}",
                         f"{norms[-1] * math.sqrt(depth):.3g}"]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_table(runs: list[dict], entropy: float, seeds: list[int], warmup_steps: int) -> str:
    head = ["placement", "warmup", "failed (seeds)", "held-out loss per seed", "mean train loss curve",
            "mean grad-norm curve"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for placement in PLACEMENTS:
        for warmup in (0, warmup_steps):
            mine = [r for r in runs if r["placement"] == placement and r["warmup_steps"] == warmup]
            bad = [str(r["seed"]) for r in mine if failed(r, entropy)]
            losses = " / ".join("NaN" if not r["finite"] else f"{r['test_loss']:.3f}" for r in mine)
            curve = [mean(values) for values in zip(*(r["losses"] for r in mine if r["finite"]))]
            grads = [mean(values) for values in zip(*(r["grad_norms"] for r in mine if r["finite"]))]
            cells = [f"{placement}-LN", f"{warmup} steps" if warmup else "none",
                     f"{len(bad)}/{len(mine)}" + (f" ({', '.join(bad)})" if bad else ""), losses,
                     rundir.sparkline(curve, 30) + (f" {curve[0]:.2f} → {curve[-1]:.2f}" if curve else "all NaN"),
                     rundir.sparkline(grads, 30) + (f" max {max(grads):.3g}" if grads else "")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = cli.parse_args(Args, argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = Args()
    stages.ensure_inputs(*((getattr(args, name), getattr(defaults, name), data_command())    # before anything is written
                           for name in ("data", "test_data")))
    enc = tokenizer.get_tokenizer("bytes")
    rows, test_rows = token_rows(args.data, args.seq_len, enc), token_rows(args.test_data, args.seq_len, enc)
    depths, seeds = parse_ints(args.depths, "depths", 1, 65), parse_ints(args.seeds, "seeds", 0, 2 ** 32)
    device = cli.get_device(args.device)
    rundir.claim_run_dir(args.out)
    t0 = time.time()
    entropy = bigram_entropy(rows, enc.n_vocab)
    inits = parse_inits(args.profile_inits)

    profiles = {profile_key(init, p, L): gradient_profile(args, L, p, init, rows, enc.n_vocab, device)
                for init in inits for p in PLACEMENTS for L in depths}
    runs = [train_arm(args, placement, warmup, seed, rows, test_rows, enc.n_vocab, device)
            for placement in PLACEMENTS for warmup in (0, args.warmup_steps) for seed in seeds]

    table1 = profile_table(profiles, inits, depths)
    table2 = training_table(runs, entropy, seeds, args.warmup_steps)
    head1 = (f"Gradient norm of each block's FFN weights at initialisation ({args.norm}, ffn {args.ffn}, width "
             f"{args.n_embd}; mean of {args.grad_batches} batches of {args.batch_size} x {args.seq_len} tokens of "
             f"{args.data}). Xiong et al. 2020 (their init, 'xiong'): post-LN's last layer large and independent of L, "
             f"pre-LN's shrinking as 1/sqrt(L) (last × sqrt(L) constant).")
    head2 = (f"Training {args.train_depth}-layer models ({args.init} init) at lr {args.lr} (Adam, betas 0.9/0.98) for "
             f"{args.train_steps} steps, no warmup vs {args.warmup_steps} linear warmup steps, seeds {args.seeds}. Failed "
             f"= loss NaN/inf, or held-out loss not below the bigram entropy {entropy:.3f} nats of the training text.")
    with rundir.atomic_write(os.path.join(args.out, "results.json")) as f:
        json.dump({"args": asdict(args), "bigram_entropy": entropy, "profiles": profiles, "runs": runs}, f, indent=1)
    with rundir.atomic_write(os.path.join(args.out, "results.md")) as f:
        f.write(f"{head1}\n\n{table1}\n\n{head2}\n\n{table2}\n")
    print(head1)
    print(table1)
    print()
    print(head2)
    print(table2)
    print(f"{len(runs)} training runs and {len(profiles)} profiles in {time.time() - t0:.0f} s; "
          f"{args.out}/results.json, results.md")
    return {"profiles": profiles, "runs": runs, "bigram_entropy": entropy}


if __name__ == "__main__":
    cli.run(main)
