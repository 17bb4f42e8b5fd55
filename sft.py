"""Supervised fine-tuning (SFT): teach a language model to imitate demonstrations.

A demonstration is a prompt x and a completion y (a worked solution ending in "#### answer"),
followed by the end-of-sequence token. SFT maximises the likelihood of the completion given the
prompt; the prompt's tokens are inputs only, masked out of the loss:

    L(theta) = -1/N * sum_{i in batch} sum_{t in y_i + EOS} log p_theta(y_{i,t} | x_i, y_{i,<t})

N counts the completion tokens (EOS included) of the WHOLE batch, so the gradient is the same
whether the batch goes through at once, in micro-batches (gradient accumulation) or split across
processes (DDP). Ouyang et al. 2022 (InstructGPT, the SFT stage); Wei et al. 2022 (FLAN);
AdamW: Loshchilov & Hutter 2019; warmup + cosine: Loshchilov & Hutter 2017, Goyal et al. 2017.

    python sft.py                                     # ~4 min on 2 CPU cores -> runs/sft/model.pt
    torchrun --nproc_per_node=2 sft.py                # same updates, batch split over 2 processes
    python sft.py --init runs/sft/model.pt --time-budget 5 --out runs/control   # continue training
    python sft.py --resume                            # continue an interrupted run exactly
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import model as M


@dataclass
class Args:
    data: str = "data/sft_train.jsonl"       # prompt/completion JSONL to train on
    test_data: str = "data/sft_test.jsonl"   # prompt/completion JSONL for the eval loss
    eval_data: str = "data/rl_test.jsonl"    # prompt/answer JSONL: held-out greedy accuracy (as grpo.py)
    out: str = "runs/sft"                    # run folder: model.pt, metrics.jsonl, args.json
    init: str = ""                           # start from this checkpoint (fresh optimizer, step 0)
    resume: bool = False                     # continue the run saved in --out exactly where it stopped
    tokenizer: str = "bytes"                 # tiktoken encoding for a model built from scratch
    n_layer: int = 4                         # transformer blocks (from scratch only)
    n_head: int = 4                          # attention heads (from scratch only)
    n_kv_head: int = 4                       # key/value heads, < n_head = grouped-query attention
    n_embd: int = 128                        # model width (from scratch only)
    block_size: int = 256                    # context length (from scratch only)
    ffn: str = "swiglu"                      # swiglu|geglu|gelu|relu|relu2|moe
    norm: str = "rmsnorm"                    # rmsnorm|layernorm
    pos: str = "rope"                        # rope|learned
    dropout: float = 0.0                     # dropout probability (from scratch only)
    batch_size: int = 64                     # sequences per update, over all processes together
    micro_batch: int = 16                    # sequences per forward/backward, length-sorted (0 = whole share)
    lr: float = 2e-3                         # peak learning rate, from scratch and when continuing (--init)
    min_lr_ratio: float = 0.1                # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20                   # linear warmup updates (fresh Adam moments need a few)
    weight_decay: float = 0.1                # AdamW decay on matrices/embeddings, never on norms/biases
    beta1: float = 0.9                       # AdamW beta1
    beta2: float = 0.99                      # AdamW beta2
    grad_clip: float = 1.0                   # clip the global gradient norm to this (0 = off)
    aux_loss_weight: float = 0.01            # weight of the MoE load-balancing loss (ffn=moe only)
    max_steps: int = 0                       # stop after this many updates (0 = no step limit)
    time_budget: float = 5.0                 # minutes of training, eval excluded (0 = no time limit)
    eval_minutes: float = 1.0                # training minutes between evals and checkpoints (0 = off)
    eval_every: int = 0                      # updates between evals and checkpoints (0 = off)
    eval_examples: int = 256                 # test_data examples for the eval loss (0 = all)
    n_eval: int = 500                        # first rows of --eval-data evaluated (0 = all)
    max_new_tokens: int = 128                # generation limit for held-out accuracy (as grpo.py)
    eval_batch: int = 256                    # prompts per generation batch
    log_every: int = 10                      # updates between metric lines
    device: str = "auto"                     # auto|cpu|cuda
    threads: int = 0                         # torch CPU threads per process (0 = torch's default)
    seed: int = 0                            # seeds the model init, batch order and dropout


# ---------------------------------------------------------------------------------------------
# Data: tokens = prompt ++ completion ++ [EOS], and which targets the loss sees
# ---------------------------------------------------------------------------------------------

def encode_example(enc, prompt, completion):
    """-> (tokens, n_prompt): tokens = encode(prompt) + encode(completion) + [EOS]."""
    prompt_ids = M.encode(enc, prompt)
    return prompt_ids + M.encode(enc, completion) + [enc.eot_token], len(prompt_ids)


def make_examples(rows, enc, block_size):
    """Tokenise prompt/completion rows -> (examples, n_skipped).

    An example is (tokens (L,) long tensor, n_prompt). A sequence of L tokens gives L - 1
    (input, target) pairs, so it fits the context when L - 1 <= block_size; longer ones are
    skipped (truncating would cut off the "#### answer" the model must learn to write)."""
    examples, skipped = [], 0
    for row in rows:
        tokens, n_prompt = encode_example(enc, row["prompt"], row["completion"])
        if len(tokens) - 1 > block_size:
            skipped += 1
            continue
        examples.append((torch.tensor(tokens, dtype=torch.long), n_prompt))
    return examples, skipped


def collate(examples, pad_id):
    """Right-pad a list of examples to the longest one -> (inputs, targets, loss_mask), each (B, T).

    inputs = tokens[:, :-1], targets = tokens[:, 1:]; target t is token t+1 of the sequence, so
        loss_mask[b, t] = (t + 1 >= n_prompt_b) and (t + 1 < L_b)
    selects exactly the completion tokens and the EOS (never the prompt, never padding)."""
    tokens = torch.nn.utils.rnn.pad_sequence([ex[0] for ex in examples], batch_first=True,
                                             padding_value=pad_id)  # (B, L_max)
    lengths = torch.tensor([len(ex[0]) for ex in examples])  # (B,)
    n_prompt = torch.tensor([ex[1] for ex in examples])      # (B,)
    target_pos = torch.arange(1, tokens.shape[1])[None, :]   # (1, T): position of each target
    loss_mask = (target_pos >= n_prompt[:, None]) & (target_pos < lengths[:, None])  # (B, T)
    return tokens[:, :-1], tokens[:, 1:], loss_mask


def masked_nll(logits, targets, loss_mask, n_tokens=None):
    """Prompt-masked SFT loss.

        L = -1/N * sum_{b,t} m_{b,t} * log softmax(logits_{b,t})[targets_{b,t}]

    logits (B, T, V), targets (B, T), loss_mask (B, T) bool. N = n_tokens, the completion-token
    count of the WHOLE batch (pass it when this is one micro-batch of many), else loss_mask.sum().
    Only the selected positions enter the graph, so the gradient at a prompt position is exactly 0."""
    if n_tokens is None:
        n_tokens = loss_mask.sum()
    selected = logits[loss_mask]  # (N_micro, V)
    return F.cross_entropy(selected.float(), targets[loss_mask], reduction="sum") / n_tokens


def length_sorted_micro_batches(examples, micro_batch, pad_id):
    """Sort a batch by length and cut it into micro-batches of `micro_batch` sequences, each padded
    only to its own longest (0 = one micro-batch). Demonstrations differ a lot in length (a word
    problem is ~3x a sum), so padding a random batch to its longest wastes most of the compute;
    the gradient is unchanged, because each micro-batch is normalised by the whole batch's count."""
    examples = sorted(examples, key=lambda ex: len(ex[0]))
    size = micro_batch or len(examples)
    return [collate(examples[s:s + size], pad_id) for s in range(0, len(examples), size)]


def batch_indices(n_examples, batch_size, step, seed):
    """Indices of the global batch at `step`: consecutive slices of a fresh permutation per epoch.

    A pure function of (step, seed), so a resumed run sees the same batches as an uninterrupted
    one, and every DDP rank draws the same global batch and keeps its own share of it."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), n_examples)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        indices += perm[offset:offset + batch_size - len(indices)].tolist()
    return indices


# ---------------------------------------------------------------------------------------------
# Optimisation: AdamW with weight-decay groups, warmup + cosine, one accumulated update
# ---------------------------------------------------------------------------------------------

def adamw(model, lr, weight_decay, betas):
    """AdamW (Loshchilov & Hutter 2019) with two groups: decay every matrix and embedding
    (dim >= 2); never decay norm gains and biases (dim < 2), which only scale or shift."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step, progress, peak, warmup_steps, min_ratio):
    """Linear warmup, then cosine decay on the run's progress in [0, 1]:

        lr = peak * min(1, (step + 1) / warmup) * (r + (1 - r) * (1 + cos(pi * progress)) / 2)

    progress = step / max_steps, or elapsed / budget under a wall-clock budget."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    progress = min(max(progress, 0.0), 1.0)
    return peak * warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def allreduce_sum(tensor, world_size):
    """Sum a tensor over all processes (identity for a single process)."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def train_step(model, optimizer, micro_batches, device, grad_clip=1.0, world_size=1,
               aux_loss_weight=0.0, batch_size=None):
    """One optimizer update from this process's share of a batch, as micro-batches.

    Each micro-batch's summed -log p is divided by N, the completion-token count of the whole
    global batch, so accumulating the micro-batch gradients gives the whole-batch gradient. Across
    processes the gradients are then SUMMED (each already carries 1/N_global): the update equals
    one process on the whole batch (what DistributedDataParallel does, minus overlapping the
    communication with the backward pass). Returns (loss, grad_norm, n_tokens)."""
    n_local = sum(int(mask.sum()) for _, _, mask in micro_batches)
    n_tokens = int(allreduce_sum(torch.tensor([float(n_local)]), world_size).item())
    n_tokens = max(n_tokens, 1)
    batch_size = batch_size or sum(len(inputs) for inputs, _, _ in micro_batches)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for inputs, targets, mask in micro_batches:
        inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
        with M.autocast(device):
            logits = model(inputs)  # (b, T, V)
        loss = masked_nll(logits, targets, mask, n_tokens)
        if aux_loss_weight:  # MoE load balancing, weighted by this micro-batch's share of rows
            loss = loss + aux_loss_weight * model.aux_loss * (len(inputs) / batch_size)
        loss.backward()
        loss_sum += loss.item()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # a parameter unused on this rank (an idle MoE expert) still joins the sum
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world_size > 1:  # one flat all-reduce for every gradient plus the loss
        flat = torch.cat([p.grad.reshape(-1) for p in params] + [torch.tensor([loss_sum], device=device)])
        allreduce_sum(flat, world_size)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        loss_sum = float(flat[-1])
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    return loss_sum, float(grad_norm), n_tokens


# ---------------------------------------------------------------------------------------------
# Evaluation: loss on held-out demonstrations (held-out accuracy is model.evaluate, shared by all stages)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def eval_loss(model, examples, pad_id, device, batch_size=64):
    """Mean -log p over every completion token of `examples` (the SFT loss without an update).
    Batches are formed from length-sorted examples, so there is little padding to compute."""
    was_training = model.training
    model.eval()
    examples = sorted(examples, key=lambda ex: len(ex[0]))
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        inputs, targets, mask = collate(examples[start:start + batch_size], pad_id)
        with M.autocast(device):
            logits = model(inputs.to(device))  # (B, T, V)
        total += float(masked_nll(logits, targets.to(device), mask.to(device), n_tokens=1))  # a sum
        count += int(mask.sum())
    model.train(was_training)
    return total / count if count else float("nan")


# ---------------------------------------------------------------------------------------------
# The run: data, model, loop with budgets, evals and atomic checkpoints, DDP
# ---------------------------------------------------------------------------------------------

def fail(message):
    """Bad input: model.cli prints it as one line (exit 2), before anything has been written."""
    raise M.UserError(message)


def line_number(path, row_index):
    """The file line of the row_index-th row (read_jsonl skips blank lines)."""
    with open(path, encoding="utf-8") as f:
        numbers = [n for n, line in enumerate(f, 1) if line.strip()]
    return numbers[row_index]


def load_rows(path, keys, default=None, world=(0, 1)):
    """Read JSONL rows holding string `keys`; a missing default input is built by synth.py."""
    rank, world_size = world
    if default is not None and rank == 0:
        M.ensure_input(path, default, ["synth.py"])
    if world_size > 1:
        dist.barrier()
    rows = M.read_jsonl(path, keys)  # names file:line of a malformed line; empty = error
    for i, row in enumerate(rows):
        for key in keys:
            if not isinstance(row[key], str if key != "answer" else (str, int, float)):
                fail(f"{path}:{line_number(path, i)}: '{key}' must be a string, "
                     f"got {type(row[key]).__name__}")
    return rows


def build_model(args, device):
    """-> (model, enc, checkpoint or None): resumed from --out, initialised from --init, or new."""
    if args.resume or args.init:
        path = os.path.join(args.out, "model.pt") if args.resume else args.init
        if not os.path.exists(path):
            fail(f"{'--resume' if args.resume else '--init'}: checkpoint {path} does not exist")
        return M.load(path, device=device)  # a corrupt file: CheckpointError naming the path
    enc = M.get_tokenizer(args.tokenizer)
    try:
        config = M.Config(vocab_size=enc.n_vocab, block_size=args.block_size, n_layer=args.n_layer,
                          n_head=args.n_head, n_kv_head=args.n_kv_head, n_embd=args.n_embd, ffn=args.ffn,
                          norm=args.norm, pos=args.pos, dropout=args.dropout)
    except ValueError as err:  # an impossible combination of model options
        fail(str(err))
    return M.GPT(config).to(device), enc, None


def checkpoint(args, policy, enc, optimizer, step, train_seconds, results=None):
    """Atomic save (model.save writes a temporary file, then renames it) of everything --resume needs."""
    M.save(os.path.join(args.out, "model.pt"), policy, enc, optimizer=optimizer.state_dict(), step=step,
           train_seconds=train_seconds, rng=torch.get_rng_state(),
           args=asdict(args), results=results or {})


def run(args):
    """Train; returns the final results dict (held-out accuracy, eval loss, steps, minutes)."""
    if args.max_steps <= 0 and args.time_budget <= 0:
        fail("set a budget: --max-steps N or --time-budget MINUTES")
    if args.resume and args.init:
        fail("--resume continues the run in --out; it cannot be combined with --init")
    rank, world_size, is_ddp = M.setup_ddp()
    try:
        return _run(args, rank, world_size)
    finally:
        if is_ddp:
            M.cleanup_ddp()


def _run(args, rank, world_size):
    main_proc = M.is_main(rank)
    if args.batch_size < world_size:
        fail(f"--batch-size {args.batch_size} is smaller than the {world_size} processes")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = M.get_device(args.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    M.seed_everything(args.seed)  # the same init on every rank

    # -- inputs, checked before anything is written --------------------------------------------
    world = (rank, world_size)
    train_rows = load_rows(args.data, ("prompt", "completion"), default="data/sft_train.jsonl", world=world)
    test_rows = load_rows(args.test_data, ("prompt", "completion"), default="data/sft_test.jsonl", world=world)
    heldout_rows = load_rows(args.eval_data, ("prompt", "answer"), default="data/rl_test.jsonl", world=world)
    if args.n_eval > 0:
        heldout_rows = heldout_rows[:args.n_eval]
    if args.eval_examples > 0:
        test_rows = test_rows[:args.eval_examples]
    policy, enc, ckpt = build_model(args, device)
    block = policy.config.block_size
    train_examples, skipped = make_examples(train_rows, enc, block)
    test_examples, test_skipped = make_examples(test_rows, enc, block)
    if main_proc and (skipped or test_skipped):
        print(f"skipped {skipped} of {len(train_rows)} training and {test_skipped} of {len(test_rows)} "
              f"test examples longer than the context ({block} tokens)")
    if not train_examples:
        fail(f"{args.data}: no example fits the context of {block} tokens")
    pad = M.pad_id(enc)

    # -- optimiser and state -------------------------------------------------------------------
    meta = ckpt["meta"] if ckpt is not None else {}
    optimizer = adamw(policy, args.lr, args.weight_decay, (args.beta1, args.beta2))
    step, train_seconds = 0, 0.0
    if args.resume:
        optimizer.load_state_dict(meta["optimizer"])
        step, train_seconds = int(meta["step"]), float(meta["train_seconds"])
        torch.set_rng_state(meta["rng"].cpu())
    if main_proc:
        M.save_args(args.out, args)
        start = f"from {args.init}" if args.init else ("resumed at step %d" % step if args.resume else "from scratch")
        print(f"sft: {policy.num_params() / 1e6:.2f}M params {start}, {len(train_examples)} examples, "
              f"batch {args.batch_size} over {world_size} process(es), peak lr {args.lr:g}, device {device}, "
              f"budget {args.max_steps or '-'} steps / {args.time_budget or '-'} min")
    logger = M.MetricsLogger(args.out, total=args.max_steps or None, enabled=main_proc, append=args.resume,
                             budget_s=None if args.max_steps else 60 * args.time_budget)

    def evaluate():
        """Rank 0: greedy held-out accuracy (model.evaluate, the protocol every stage reports) and the
        eval loss; logged as an "eval" row and saved in an atomic checkpoint. Other ranks wait."""
        results = {}
        if main_proc:
            report = M.evaluate(policy, enc, heldout_rows, args.max_new_tokens, temperature=0.0,
                                batch_size=args.eval_batch)
            policy.train()
            results = {"eval_accuracy": report["accuracy"], "eval_stderr": report["stderr"],
                       "eval_n": report["n"], "per_difficulty": report["per_difficulty"],
                       "styles": report["styles"], "eval_loss": eval_loss(policy, test_examples, pad, device),
                       "steps": step, "train_minutes": train_seconds / 60}
            logger.log(step, kind="eval", train_minutes=train_seconds / 60, eval_accuracy=results["eval_accuracy"],
                       eval_stderr=results["eval_stderr"], eval_loss=results["eval_loss"])
            checkpoint(args, policy, enc, optimizer, step, train_seconds, results)
        if world_size > 1:
            dist.barrier()
        return results

    # -- the loop ------------------------------------------------------------------------------
    policy.train()
    window = {"loss": 0.0, "grad_norm": 0.0, "tokens": 0, "seconds": 0.0, "steps": 0}
    next_eval_s = (math.floor(train_seconds / (60 * args.eval_minutes)) + 1) * 60 * args.eval_minutes \
        if args.eval_minutes > 0 else float("inf")

    def clock():
        """(progress in [0, 1], is an eval due): rank 0's clock decides, so every rank stops and
        evaluates at the same step."""
        shared = torch.tensor([0.0, 0.0])
        if main_proc:
            shared[0] = max(step / args.max_steps if args.max_steps > 0 else 0.0,
                            train_seconds / (60 * args.time_budget) if args.time_budget > 0 else 0.0)
            shared[1] = float((args.eval_every > 0 and step % args.eval_every == 0) or train_seconds >= next_eval_s)
        if world_size > 1:
            dist.broadcast(shared, src=0)
        return float(shared[0]), bool(shared[1])

    try:
        if args.init and (args.eval_minutes > 0 or args.eval_every > 0):
            evaluate()  # the starting point of a continued run: the first point of its curve
        progress, _ = clock()
        while progress < 1.0:
            t0 = time.perf_counter()
            lr = lr_at(step, progress, args.lr, args.warmup_steps, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = batch_indices(len(train_examples), args.batch_size, step, args.seed)
            mine = torch.tensor_split(torch.tensor(indices), world_size)[rank].tolist()  # this rank's share
            micro_batches = length_sorted_micro_batches([train_examples[i] for i in mine], args.micro_batch, pad)
            loss, grad_norm, _ = train_step(policy, optimizer, micro_batches, device, args.grad_clip,
                                            world_size, args.aux_loss_weight if policy.config.ffn == "moe" else 0.0,
                                            args.batch_size)
            step += 1
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            window["loss"] += loss
            window["grad_norm"] += grad_norm
            window["tokens"] += sum(len(train_examples[i][0]) - 1 for i in indices)  # real tokens, all ranks
            window["seconds"] += seconds
            window["steps"] += 1
            if main_proc and (step % args.log_every == 0 or step == 1):
                logger.log(step, kind="train", loss=window["loss"] / window["steps"], lr=lr,
                           grad_norm=window["grad_norm"] / window["steps"],
                           tokens_per_s=window["tokens"] / max(window["seconds"], 1e-9),
                           train_minutes=train_seconds / 60)
                window = dict.fromkeys(window, 0)
            progress, eval_due = clock()
            if eval_due and progress < 1.0:  # the final eval follows the loop
                while next_eval_s <= train_seconds:
                    next_eval_s += 60 * args.eval_minutes
                evaluate()
    except KeyboardInterrupt:
        if main_proc:  # the state of the last finished step: weights and optimizer are untouched
            checkpoint(args, policy, enc, optimizer, step, train_seconds)
            print(f"interrupted after step {step}; saved {args.out}/model.pt, continue with --resume")
        raise SystemExit(130)

    # -- the end: final eval and checkpoint, the report ----------------------------------------
    results = evaluate()
    if main_proc:
        logger.close()
        print(f"held-out accuracy (greedy, {results['eval_n']} prompts of {args.eval_data}): "
              f"{100 * results['eval_accuracy']:.1f}% +/- {100 * results['eval_stderr']:.1f} | "
              f"eval loss {results['eval_loss']:.4f} | {step} steps in {train_seconds / 60:.1f} min "
              f"| {args.out}/model.pt")
        print("  by difficulty: " + "  ".join(f"{d}: {100 * a:.1f}%" for d, a in results["per_difficulty"].items())
              + " | outputs: " + "  ".join(f"{s} {100 * v:.0f}%" for s, v in results["styles"].items()))
    return results


def main(argv=None):
    run(M.parse_args(Args, argv))


if __name__ == "__main__":
    M.cli(main)
