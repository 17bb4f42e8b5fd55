"""Supervised fine-tuning (SFT): teach a language model to imitate demonstrations.

A demonstration is a prompt x and a completion y (a worked solution ending in "#### answer"),
followed by the end-of-sequence token. SFT maximises the likelihood of the completion given the
prompt; the prompt's tokens are inputs only, masked out of the loss:

    L(theta) = -1/N * sum_{i in batch} sum_{t in y_i + EOS} log p_theta(y_{i,t} | x_i, y_{i,<t})

N counts the completion tokens (EOS included) of the WHOLE batch, so the gradient is the same
whether the batch goes through at once, in micro-batches (gradient accumulation) or split across
processes (DDP, or FSDP with the weights, gradients and optimizer state sharded too: docs/fsdp.md).
Ouyang et al. 2022 (InstructGPT, the SFT stage); Wei et al. 2022 (FLAN);
AdamW: Loshchilov & Hutter 2019; warmup + cosine: Loshchilov & Hutter 2017, Goyal et al. 2017.

    python sft.py                                     # 1800 steps, ~5 min on 2 CPU cores -> runs/sft/model.pt
    torchrun --nproc_per_node=2 sft.py                # same updates, batch split over 2 processes
    torchrun --nproc_per_node=2 sft.py --fsdp         # the same updates, each process holding half of the model
    python sft.py --init runs/sft/model.pt --max-steps 0 --time-budget 5 --out runs/control  # 5 more minutes
    python sft.py --resume                            # continue an interrupted run exactly, with its arguments
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import math
import os
import time
from dataclasses import asdict, dataclass, field

import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F

import model as M
from lib import checkpoints, cli, distributed, rundir, stages, tasks, tokenizer


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
    lr: float = 2e-3                         # peak learning rate (<= 1), from scratch and when continuing (--init)
    min_lr_ratio: float = 0.1                # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20                   # linear warmup updates (fresh Adam moments need a few)
    weight_decay: float = 0.1                # AdamW decay on matrices/embeddings, never on norms/biases
    beta1: float = 0.9                       # AdamW beta1
    beta2: float = 0.99                      # AdamW beta2
    grad_clip: float = 1.0                   # clip the global gradient norm to this (0 = off)
    aux_loss_weight: float = 0.01            # weight of the MoE load-balancing loss (ffn=moe only)
    max_steps: int = 1800                    # stop after this many updates (0 = no step limit)
    time_budget: float = 0.0                 # training minutes, eval excluded (0 = no limit; both set: first to end)
    eval_minutes: float = 1.0                # training minutes between evals and checkpoints (0 = off)
    eval_every: int = 0                      # updates between evals and checkpoints (0 = off)
    eval_examples: int = 256                 # test_data examples for the eval loss (0 = all)
    n_eval: int = 500                        # first rows of --eval-data evaluated (0 = all)
    max_new_tokens: int = tasks.MAX_NEW_TOKENS   # generation limit for held-out accuracy (every stage's default)
    eval_batch: int = 256                    # prompts per generation batch
    log_every: int = 10                      # updates between metric lines
    chat_template: str = "auto"              # auto|none|chatml|llama3: how prompts are wrapped (auto: from the checkpoint)
    system_prompt: str = ""                  # a system turn before every prompt, kept in the checkpoint ("" = its own)
    lora_rank: int = 0                       # train LoRA adapters of this rank, the base frozen (0 = every weight)
    lora_alpha: float = 16.0                 # LoRA's scale is lora_alpha / lora_rank
    dtype: str = "float32"                   # float32|bfloat16: the weights' precision (bf16 halves their memory)
    grad_checkpoint: bool = False            # recompute each block in the backward pass: less activation memory
    compile_train: bool = False              # torch.compile each block for the training forward (GPT.compile_blocks)
    device: str = "auto"                     # auto|cpu|cuda
    threads: int = 0                         # torch CPU threads per process (0 = torch's default)
    fsdp: bool = False                       # shard weights, gradients, optimizer state over torchrun processes (FSDP2)
    seed: int = 0                            # seeds the model init, batch order and dropout
    keep_state: bool = False                 # keep resume.pt (optimizer and RNG state) once the run has finished


# A pretrained model (--init names a Hugging Face folder, a .gguf file or a checkpoint fine-tuned from one) takes
# these defaults instead of the ones above, which train a 0.8M-parameter model from scratch: an lr 40 times
# smaller, small batches, short evaluations. An option given on the command line still wins.
PRETRAINED_DEFAULTS = {"lr": 5e-5, "batch_size": 8, "micro_batch": 8, "max_steps": 200, "warmup_steps": 10,
                       "eval_minutes": 0.0, "eval_every": 100, "eval_examples": 64, "n_eval": 100, "eval_batch": 50}


def check_args(args):
    """Every option against its rule (cli.OPTION_RULES), before anything is read or written: the first
    that breaks its rule is a UserError naming the flag (one line, exit status 2)."""
    cli.check_options(args, positive=("n_head", "n_kv_head", "n_embd", "block_size", "batch_size", "lr",
                                      "max_new_tokens", "eval_batch", "log_every"),
                      non_negative=("n_layer", "micro_batch", "warmup_steps", "weight_decay", "grad_clip",
                                    "aux_loss_weight", "eval_minutes", "eval_every", "eval_examples", "n_eval",
                                    "threads", "lora_rank"),
                      probability=("min_lr_ratio",), seed=("seed",))
    cli.require_at_most(args, cli.MAX_LR, "lr")   # Adam moves each weight by ~lr a step; 1e308 overflowed its step
    if args.lora_rank and (args.lora_alpha <= 0 or args.fsdp or args.ffn == "moe" and not args.init):
        raise cli.UserError(f"--lora-rank {args.lora_rank}: needs --lora-alpha > 0, and neither --fsdp nor --ffn moe")
    for name in ("dropout", "beta1", "beta2"):  # [0, 1): a probability that is never 1
        value = getattr(args, name)
        if not 0 <= value < 1:
            raise cli.UserError(f"--{name} must be in [0, 1), got {value}")
    cli.check_budget(args)
    cli.check_choices(args, device=("auto", "cpu", "cuda"), ffn=("swiglu", "geglu", "gelu", "relu", "relu2", "moe"),
                      norm=("rmsnorm", "layernorm"), pos=("rope", "learned"),
                      tokenizer=("bytes", *tiktoken.list_encoding_names()),
                      chat_template=("auto", *tokenizer.CHAT_FORMATS), dtype=tuple(cli.DTYPES))
    try:  # the model options together (divisibility, RoPE's even head size), before any input is read
        model_config(args, vocab_size=1)
    except ValueError as err:
        raise cli.UserError(f"--n-embd {args.n_embd} --n-head {args.n_head} --n-kv-head {args.n_kv_head} "
                            f"--pos {args.pos}: {err}") from None
    for name in ("data", "test_data", "eval_data", "out"):
        if not getattr(args, name):
            raise cli.UserError(f"--{name.replace('_', '-')} must name a path")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise cli.UserError(f"--out {args.out}: is a file, not a run folder")
    cli.check_fsdp(args)


# ---------------------------------------------------------------------------------------------
# Data: tokens = prompt ++ completion ++ [EOS], and which targets the loss sees
# ---------------------------------------------------------------------------------------------

def encode_example(enc, prompt, completion):
    """-> (tokens, n_prompt): tokens = prompt (in the model's chat format) + completion + [end of turn].
    For this project's byte-level models the format is plain text and the end is <|endoftext|>; for an
    instruct checkpoint the prompt is wrapped in its user/assistant turns and the loss also teaches it to
    close its turn (<|im_end|>, <|eot_id|>), where generation stops."""
    prompt_ids = tokenizer.encode_prompt(enc, prompt)
    return prompt_ids + tokenizer.encode(enc, completion) + [tokenizer.end_of_turn(enc)], len(prompt_ids)


def make_examples(rows, enc, block_size):
    """Tokenise prompt/completion rows -> (examples, n_skipped).

    An example is (tokens (L,) long tensor, n_prompt). A sequence of L tokens gives L - 1
    (input, target) pairs, so it fits the context when L - 1 <= block_size; longer ones are
    skipped (truncating would cut off the "#### answer" the model must learn to write)."""
    examples, n_skipped = [], 0
    for row in rows:
        tokens, n_prompt = encode_example(enc, row["prompt"], row["completion"])
        if len(tokens) - 1 > block_size:
            n_skipped += 1
            continue
        examples.append((torch.tensor(tokens, dtype=torch.long), n_prompt))
    return examples, n_skipped


def collate(examples, pad_id):
    """Right-pad a list of examples to the longest one -> (inputs, targets, loss_mask), each (B, T).

    inputs = tokens[:, :-1], targets = tokens[:, 1:]; target t is token t+1 of the sequence, so
        loss_mask[b, t] = (t + 1 >= n_prompt_b) and (t + 1 < L_b)
    selects exactly the completion tokens and the EOS (never the prompt, never padding)."""
    tokens = torch.nn.utils.rnn.pad_sequence([example[0] for example in examples], batch_first=True,
                                             padding_value=pad_id)  # (B, L_max)
    lengths = torch.tensor([len(example[0]) for example in examples])  # (B,)
    n_prompt = torch.tensor([example[1] for example in examples])      # (B,)
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
    examples = sorted(examples, key=lambda example: len(example[0]))
    size = micro_batch or len(examples)
    return [collate(examples[start:start + size], pad_id) for start in range(0, len(examples), size)]


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
    """AdamW (Loshchilov & Hutter 2019) with two groups, the project's one weight-decay rule:
    decay every matrix, embeddings included (dim >= 2); never decay norm gains and biases (dim < 2).

    Why: with tied embeddings the embedding IS the output matrix, a matrix like any other (nanoGPT,
    GPT-3 decay it too); gains and biases only scale and shift, and decaying them pulls the function
    toward zero rather than toward small weights."""
    params = [param for param in model.parameters() if param.requires_grad]
    groups = [{"params": [param for param in params if param.dim() >= 2], "weight_decay": weight_decay},
              {"params": [param for param in params if param.dim() < 2], "weight_decay": 0.0}]
    fused = params[0].is_cuda and not hasattr(params[0], "device_mesh")   # one kernel per step on a GPU (not FSDP)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def lr_at(step, progress, peak, warmup_steps, min_ratio):
    """Linear warmup, then cosine decay on the run's progress in [0, 1]:

        lr = peak * min(1, (step + 1) / warmup) * (r + (1 - r) * (1 + cos(pi * progress)) / 2)

    progress = step / max_steps under a step budget, elapsed / budget under a wall-clock budget (the
    larger of the two when both are set: the budget that ends first). The warmup is a factor on the
    cosine, counted in updates whatever the budget, so the first update already moves (peak / warmup)."""
    warmup_factor = min(1.0, (step + 1) / max(1, warmup_steps))
    progress = min(max(progress, 0.0), 1.0)
    return peak * warmup_factor * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def allreduce_sum(tensor, world_size):
    """Sum a tensor over all processes (identity for a single process)."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def train_step(model, optimizer, micro_batches, device, grad_clip=1.0, world_size=1,
               aux_loss_weight=0.0, batch_size=None, where="update", fsdp=False):
    """One optimizer update from this process's share of a batch, as micro-batches.

    Each micro-batch's summed -log p is divided by N, the completion-token count of the whole
    global batch, so accumulating the micro-batch gradients gives the whole-batch gradient. Across
    processes the gradients are then SUMMED (each already carries 1/N_global): the update equals
    one process on the whole batch (what DistributedDataParallel does, minus overlapping the
    communication with the backward pass). A loss or gradient norm that is NaN or infinite stops the
    run (cli.NonFiniteError naming `where`) BEFORE optimizer.step(), so the weights stay finite; an update
    that leaves a weight non-finite or past cli.MAX_WEIGHT stops it right after (cli.check_weights), before
    any checkpoint can hold that weight.

    fsdp (a model from distributed.shard_model(..., sum_gradients=True)): each backward reduce-scatters its
    gradient into this rank's shards, summed over ranks, so there is no all-reduce here. Every forward
    gathers weights from every rank, so all ranks run the same number of micro-batches: a rank with
    fewer runs empty ones (no loss token: a zero gradient). Returns (loss, grad_norm, n_tokens)."""
    n_local = sum(int(mask.sum()) for _, _, mask in micro_batches)
    n_tokens = int(allreduce_sum(torch.tensor([float(n_local)], device=device), world_size).item())
    n_tokens = max(n_tokens, 1)
    batch_size = batch_size or sum(len(inputs) for inputs, _, _ in micro_batches)
    n_real = len(micro_batches)
    if fsdp and world_size > 1:
        n_most = torch.tensor([n_real], device=device)
        dist.all_reduce(n_most, op=dist.ReduceOp.MAX)
        empty = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                 torch.zeros(1, 1, dtype=torch.bool))
        micro_batches = list(micro_batches) + [empty] * (int(n_most) - n_real)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for index, (inputs, targets, mask) in enumerate(micro_batches):
        inputs, targets, mask = inputs.to(device), targets.to(device), mask.to(device)
        with M.autocast(device):
            logits = model(inputs)  # (b, T, V)
        loss = masked_nll(logits, targets, mask, n_tokens)
        if aux_loss_weight and index < n_real:  # MoE load balancing, weighted by this micro-batch's share of rows
            loss = loss + aux_loss_weight * model.aux_loss * (len(inputs) / batch_size)
        loss.backward()
        loss_sum += loss.item()
    params = [param for param in model.parameters() if param.requires_grad]
    for param in params:  # a parameter unused on this rank (an idle MoE expert) still joins the sum
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    if fsdp and world_size > 1:  # the gradients are summed already (reduce-scatter): only the loss is left
        loss_sum = float(allreduce_sum(torch.tensor([loss_sum], device=device), world_size))
    elif world_size > 1:  # one flat all-reduce for every gradient plus the loss
        flat_grads = torch.cat([param.grad.reshape(-1) for param in params]
                               + [torch.tensor([loss_sum], device=device)])
        allreduce_sum(flat_grads, world_size)
        offset = 0
        for param in params:
            param.grad.copy_(flat_grads[offset:offset + param.numel()].view_as(param))
            offset += param.numel()
        loss_sum = float(flat_grads[-1])
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    cli.check_finite(where, loss=loss_sum, grad_norm=grad_norm)  # the same sums on every rank: all stop
    optimizer.step()
    cli.check_weights(where, model)   # FSDP: each rank's shards, the largest all-reduced: all stop together
    return loss_sum, float(grad_norm), n_tokens


# ---------------------------------------------------------------------------------------------
# Evaluation: loss on held-out demonstrations (held-out accuracy is tasks.evaluate, shared by all stages)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def eval_loss(model, examples, pad_id, device, batch_size=64):
    """Mean -log p over every completion token of `examples` (the SFT loss without an update).
    Batches are formed from length-sorted examples, so there is little padding to compute."""
    was_training = model.training
    model.eval()
    examples = sorted(examples, key=lambda example: len(example[0]))
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
# The run: inputs, model, loop with budgets, evals and atomic checkpoints, DDP
# ---------------------------------------------------------------------------------------------

def model_config(args, vocab_size):
    """The Config of a model built from scratch (ValueError for an impossible combination)."""
    return M.Config(vocab_size=vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                    n_kv_head=args.n_kv_head, n_embd=args.n_embd, ffn=args.ffn, norm=args.norm, pos=args.pos,
                    dropout=args.dropout)


def synth_command():
    """The command that makes the default input files (data/*.jsonl): synth.py with its own defaults."""
    return stages.stage_command("synth.py")


def read_inputs(args, rank, world_size):
    """-> (training rows, test rows, held-out prompt rows), every row checked (tasks.read_demonstrations,
    tasks.read_prompts: errors name file:line; GSM8K's {"question", "answer"} rows are accepted). A
    missing DEFAULT input is made by synth.py (rank 0; the others wait); a missing explicit one is an error."""
    defaults = Args()
    if rank == 0:
        inputs = ((args.data, defaults.data), (args.test_data, defaults.test_data), (args.eval_data, defaults.eval_data))
        start = [(args.init, defaults.init)] if args.init and not args.resume else []   # --init has no default to make
        stages.check_named_inputs(*inputs, *start)   # a typo fails now, not after synth.py has run
        for path, default in inputs:
            stages.ensure_input(path, default, synth_command())
    if world_size > 1:
        dist.barrier()
    train_rows = tasks.read_demonstrations(args.data)
    test_rows = tasks.read_demonstrations(args.test_data)
    heldout_rows = tasks.read_prompts(args.eval_data)
    if args.eval_examples > 0:
        test_rows = test_rows[:args.eval_examples]
    return train_rows, test_rows, heldout_rows


def build_model(args, device):
    """-> (model, enc, checkpoint or None): resumed from --out, initialised from --init, or new."""
    if args.resume or args.init:
        path = os.path.join(args.out, "model.pt") if args.resume else args.init
        if not os.path.exists(path):
            raise cli.UserError(f"{'--resume' if args.resume else '--init'}: checkpoint {path} does not exist")
        # a corrupt or hostile file is a CheckpointError naming the path
        model, enc, ckpt = checkpoints.load(path, device=device, dtype=cli.DTYPES[args.dtype], chat_format=args.chat_template)
        if not args.resume:      # a start with adapters is the model they make: merged, then trained as asked
            model.merge_lora()
    else:
        enc = tokenizer.set_chat_format(tokenizer.get_tokenizer(args.tokenizer), args.chat_template)
        model = M.GPT(model_config(args, enc.n_vocab)).to(device=device, dtype=cli.DTYPES[args.dtype])
        ckpt = None
    if args.system_prompt:
        tokenizer.set_system_prompt(enc, args.system_prompt)
    if args.lora_rank and not model.config.lora_rank:      # a resumed LoRA run rebuilt its adapters from model.pt
        model.add_lora(args.lora_rank, args.lora_alpha)
    model.checkpoint_blocks = args.grad_checkpoint
    if args.compile_train:
        model.compile_blocks()
    return model, enc, ckpt


def resume_path(out):
    """The run's resume state beside its model.pt: the optimizer's moments and the RNG states. A finished run
    removes it (unless --keep-state), so that its model.pt is the weights alone (a real model's optimizer
    state is twice its weights)."""
    return os.path.join(out, "resume.pt")


def training_state(out, ckpt):
    """What --resume needs: (meta, optimizer state, step, train_seconds, rng state, rng by rank), from the run's
    model.pt (`ckpt`: step, train_seconds, args) and its resume.pt (the rest), which must be of the same step."""
    path, state_path = os.path.join(out, "model.pt"), resume_path(out)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    if not os.path.isfile(state_path):
        raise cli.UserError(f"{state_path}: missing, so --resume cannot continue {path} (a finished run removes it, "
                            f"a stage other than sft.py never writes one); to train from its weights use --init {path}")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        step, train_seconds = int(meta["step"]), float(meta["train_seconds"])
        if not isinstance(state, dict) or state.get("step") != step:
            raise ValueError(f"it is not the state of {path}'s step {step}")
        return meta, state["optimizer"], step, train_seconds, state["rng"], state.get("rng_by_rank")
    except Exception as err:      # a torn pair of files, a damaged or hostile file: one line
        raise cli.UserError(f"{state_path}: cannot resume from it ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:120] if str(err) else ''})") from None


def resumed_args(args, argv):
    """--resume: the run's own arguments, saved in out/model.pt, with the options given again on this
    command line overriding them (one printed line each; cli.resume_args)."""
    path = os.path.join(args.out, "model.pt")
    if not os.path.exists(path):
        raise cli.UserError(f"--resume: checkpoint {path} does not exist")
    meta = training_state(args.out, checkpoints.load(path)[2])[0]
    saved = meta.get("args")
    if not isinstance(saved, dict):
        raise cli.UserError(f"{path}: holds no saved arguments to resume with")
    for field, default in asdict(Args()).items():  # each saved value has its option's type (an int is a float)
        kind = type(saved.get(field, default))
        if kind is not type(default) and not (kind is int and type(default) is float):
            raise cli.UserError(f"{path}: saved argument {field} = {saved[field]!r} is not a {type(default).__name__}")
    # this folder is where the run continues; --fsdp is how this command runs, never a saved value
    saved = {**saved, "out": args.out, "resume": True, "fsdp": args.fsdp}
    return cli.resume_args(Args, saved, argv)


def rng_states(world_size):
    """Every rank's CPU RNG state, gathered (collective). The ranks' dropout draws differ (each rank's
    share of a batch has its own shapes), so an exact resume restores each rank's own state."""
    states = [torch.get_rng_state()] * world_size
    if world_size > 1:
        dist.all_gather_object(states, torch.get_rng_state())
    return states


def checkpoint(args, policy, enc, optimizer, step, train_seconds, results=None, main_proc=True, world_size=1):
    """Atomic save (checkpoints.save writes a temporary file, then renames it) of everything --resume needs.
    With world_size > 1 every rank calls it (collective): the RNG states of all ranks are gathered, and
    under FSDP the shards of the weights and of the optimizer state too; rank 0 writes the full, unsharded
    file a single process writes (it loads and resumes in one process)."""
    weights, optimizer_state = distributed.full_model(policy), distributed.full_optimizer_state(policy, optimizer)
    rng_by_rank = rng_states(world_size)
    if main_proc:
        checkpoints.save(os.path.join(args.out, "model.pt"), weights, enc, step=step, train_seconds=train_seconds,
                         args=asdict(args), results=results or {})
        with rundir.atomic_write(resume_path(args.out), "wb") as f:     # after model.pt: training_state checks the step
            torch.save({"step": step, "optimizer": optimizer_state, "rng": torch.get_rng_state(),
                        "rng_by_rank": rng_by_rank}, f)


@dataclass
class Setup:
    """What set-up builds and the loop only reads."""
    args: Args
    rank: int
    world_size: int
    main_proc: bool
    device: torch.device
    policy: M.GPT
    enc: object
    optimizer: torch.optim.Optimizer
    logger: rundir.MetricsLogger
    train_examples: list     # (tokens, n_prompt) pairs that fit the context
    test_examples: list      # the same, for the eval loss
    heldout_rows: list       # prompt/answer rows for held-out accuracy
    pad_token: int


def new_window():
    """The sums of one logging window (log_window): reset after each metric line."""
    return {"loss": 0.0, "grad_norm": 0.0, "tokens": 0, "seconds": 0.0, "steps": 0}


@dataclass
class RunState:
    """What the loop changes, passed to every phase (never read from a closure): updates done, training
    seconds (evals excluded), when the next eval is due under --eval-minutes, and the logging window's sums.
    checkpoint() saves step and train_seconds; --resume restores them."""
    step: int = 0
    train_seconds: float = 0.0
    last_step_seconds: float = 0.0
    next_eval_s: float = float("inf")
    window: dict = field(default_factory=new_window)


def run(args):
    """Train; returns the final results dict (held-out accuracy, eval loss, steps, minutes).
    With args.resume, args.init (if any) only records where the run first started."""
    check_args(args)
    rank, world_size, is_ddp = distributed.setup_ddp()
    try:
        return _run(args, rank, world_size)
    finally:
        if is_ddp:
            distributed.cleanup_ddp()


def _run(args, rank, world_size):
    """Set-up, then the loop of phases (schedule -> batch -> update -> log -> clock -> evaluate), then finish."""
    setup, state = set_up(args, rank, world_size)
    try:
        if args.init and not args.resume and (args.eval_minutes > 0 or args.eval_every > 0):
            evaluate_and_save(setup, state)  # the starting point of a continued run: the first point of its curve
        progress, _ = clock(setup, state)
        while progress < 1.0:
            step_start = time.perf_counter()
            # ALGO LOGIC: one AdamW update on this step's batch, at the scheduled learning rate
            lr = schedule(setup.optimizer, state.step, progress, args)
            indices, micro_batches = rank_batch(setup, state.step)
            loss, grad_norm, _ = train_step(setup.policy, setup.optimizer, micro_batches, setup.device,
                                            args.grad_clip, world_size,
                                            args.aux_loss_weight if setup.policy.config.ffn == "moe" else 0.0,
                                            args.batch_size, where=f"step {state.step + 1}", fsdp=args.fsdp)
            # TRY NOT TO MODIFY: count the update, log it, evaluate and checkpoint when due
            state.step += 1
            seconds = time.perf_counter() - step_start
            state.train_seconds += seconds
            state.last_step_seconds = seconds
            log_window(setup, state, lr, loss, grad_norm, indices, seconds)
            progress, eval_due = clock(setup, state)
            if eval_due and progress < 1.0:  # the final eval follows the loop
                while state.next_eval_s <= state.train_seconds:
                    state.next_eval_s += 60 * args.eval_minutes
                evaluate_and_save(setup, state)
    except KeyboardInterrupt:
        save_interrupted(setup, state)
        raise SystemExit(130)
    return finish(setup, state)


def set_up(args, rank, world_size):
    """Everything before the first update, in this order (the model's initial weights are the first draws
    after the seed): device and seed, the inputs (all checked before anything is written), the model (sharded
    under --fsdp), the optimizer, what --resume restores, the run folder and the metrics log.
    -> (Setup, RunState)"""
    main_proc = distributed.is_main(rank)
    if args.batch_size < world_size:
        raise cli.UserError(f"--batch-size {args.batch_size} is smaller than the {world_size} processes")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = cli.get_device(args.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    cli.seed_everything(args.seed)  # the same init on every rank

    # -- inputs, all checked before anything is written ----------------------------------------
    train_rows, test_rows, heldout_rows = read_inputs(args, rank, world_size)
    policy, enc, ckpt = build_model(args, device)
    if args.fsdp:  # each rank keeps 1/world of the weights; gradients summed (the loss divides by the batch's count)
        distributed.shard_model(policy, device, sum_gradients=True)
    block_size = policy.config.block_size
    heldout_rows = tasks.fit_prompts(heldout_rows, enc, block_size, args.max_new_tokens, args.eval_data)
    if args.n_eval > 0:
        heldout_rows = heldout_rows[:args.n_eval]
    train_examples, n_skipped = make_examples(train_rows, enc, block_size)
    test_examples, n_test_skipped = make_examples(test_rows, enc, block_size)
    if main_proc and (n_skipped or n_test_skipped):
        print(f"skipped {n_skipped} of {len(train_rows)} training and {n_test_skipped} of {len(test_rows)} "
              f"test examples longer than the context ({block_size} tokens)")
    if not train_examples:
        raise cli.UserError(f"{args.data}: no example fits the context of {block_size} tokens")

    # -- optimiser and state -------------------------------------------------------------------
    optimizer = adamw(policy, args.lr, args.weight_decay, (args.beta1, args.beta2))
    state = RunState()
    if args.resume:
        state.step, state.train_seconds = restore(args, policy, optimizer, ckpt, rank, world_size)
    if main_proc:
        rundir.save_args(args.out, args)  # claims the folder: a second writer stops here, having written nothing
        start = ("resumed at step %d" % state.step if args.resume else f"from {args.init}" if args.init
                 else "from scratch")
        trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        lora = f" (LoRA rank {policy.config.lora_rank}: {trained / 1e6:.2f}M trained)" if policy.config.lora_rank else ""
        print(f"sft: {policy.num_params() / 1e6:.2f}M params{lora} {start}, {len(train_examples)} examples, "
              f"batch {args.batch_size} over {world_size} process(es), peak lr {args.lr:g}, device {device}, "
              f"budget {args.max_steps or '-'} steps / {args.time_budget or '-'} min")
    logger = rundir.MetricsLogger(args.out, total=args.max_steps or None, enabled=main_proc, append=args.resume,
                                  budget_s=None if args.max_steps else 60 * args.time_budget)
    policy.train()
    if args.eval_minutes > 0:  # the first multiple of eval_minutes after the (resumed) training time
        state.next_eval_s = (math.floor(state.train_seconds / (60 * args.eval_minutes)) + 1) * 60 * args.eval_minutes
    return Setup(args, rank, world_size, main_proc, device, policy, enc, optimizer, logger, train_examples,
                 test_examples, heldout_rows, tokenizer.pad_id(enc)), state


def restore(args, policy, optimizer, ckpt, rank, world_size):
    """--resume: load the optimizer state and this rank's RNG state from the run's checkpoint.
    -> (step, train_seconds) where it stopped."""
    path = resume_path(args.out)
    _, optimizer_state, step, train_seconds, rng_state, rng_by_rank = training_state(args.out, ckpt)
    if isinstance(rng_by_rank, list) and len(rng_by_rank) == world_size:  # saved by as many ranks
        rng_state = rng_by_rank[rank]
    try:
        if args.fsdp:  # rank 0's full state, broadcast: each rank keeps its shards
            distributed.load_full_optimizer_state(policy, optimizer, optimizer_state)
        else:
            optimizer.load_state_dict(optimizer_state)
        torch.set_rng_state(rng_state.cpu())
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise cli.UserError(f"{path}: optimizer or RNG state does not fit ({str(err)[:120]})") from None
    return step, train_seconds


def clock(setup, state):
    """(progress in [0, 1], is an eval due): progress = step / max_steps or train time / time budget,
    the larger when both are set (the budget that ends first). Rank 0's clock decides, so every rank
    stops and evaluates at the same step (a broadcast every rank joins)."""
    args = setup.args
    shared = torch.tensor([0.0, 0.0], dtype=torch.float64, device=setup.device)  # progress exactly step / max_steps
    if setup.main_proc:
        # under a time budget the run ends at the step boundary nearest the budget: a step of a large model may
        # take a minute, and ending after the first step past the budget could overrun it by that minute
        shared[0] = max(state.step / args.max_steps if args.max_steps > 0 else 0.0,
                        (state.train_seconds + state.last_step_seconds / 2) / (60 * args.time_budget)
                        if args.time_budget > 0 else 0.0)
        shared[1] = float((args.eval_every > 0 and state.step % args.eval_every == 0)
                          or state.train_seconds >= state.next_eval_s)
    if setup.world_size > 1:
        dist.broadcast(shared, src=0)
    return float(shared[0]), bool(shared[1])


def schedule(optimizer, step, progress, args):
    """Set the learning rate of update `step` (lr_at: warmup, then cosine on progress) on every group."""
    lr = lr_at(step, progress, args.lr, args.warmup_steps, args.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def rank_batch(setup, step):
    """-> (indices of the global batch at `step`, this rank's share of it as length-sorted micro-batches)."""
    indices = batch_indices(len(setup.train_examples), setup.args.batch_size, step, setup.args.seed)
    my_indices = torch.tensor_split(torch.tensor(indices), setup.world_size)[setup.rank].tolist()  # this rank's share
    return indices, length_sorted_micro_batches([setup.train_examples[i] for i in my_indices], setup.args.micro_batch,
                                                setup.pad_token)


def log_window(setup, state, lr, loss, grad_norm, indices, seconds):
    """Add an update to the window; every log_every updates (and after the first) rank 0 logs the window's
    means as a "train" row and starts a new window."""
    window = state.window
    window["loss"] += loss
    window["grad_norm"] += grad_norm
    window["tokens"] += sum(len(setup.train_examples[i][0]) - 1 for i in indices)  # real tokens, all ranks
    window["seconds"] += seconds
    window["steps"] += 1
    if setup.main_proc and (state.step % setup.args.log_every == 0 or state.step == 1):
        setup.logger.log(state.step, kind="train", loss=window["loss"] / window["steps"], lr=lr,
                         grad_norm=window["grad_norm"] / window["steps"],
                         tokens_per_s=window["tokens"] / max(window["seconds"], 1e-9),
                         train_minutes=state.train_seconds / 60)
        state.window = dict.fromkeys(window, 0)


def evaluate_and_save(setup, state):
    """Rank 0: greedy held-out accuracy (tasks.evaluate, the protocol every stage reports) and the
    eval loss; logged as an "eval" row and saved in an atomic checkpoint. Other ranks wait. Under FSDP
    every rank first gathers the full weights (distributed.gathered), and joins the checkpoint's gather.
    -> the results dict (empty on other ranks)."""
    args, policy = setup.args, setup.policy
    results = {}
    with distributed.gathered(policy):
        if setup.main_proc:
            report = tasks.evaluate(policy, setup.enc, setup.heldout_rows, args.max_new_tokens, temperature=0.0,
                                    batch_size=args.eval_batch)
            policy.train()
            results = {"eval_accuracy": report["accuracy"], "eval_stderr": report["stderr"],
                       "eval_n": report["n"], "per_difficulty": report["per_difficulty"],
                       "styles": report["styles"],
                       "eval_loss": eval_loss(policy, setup.test_examples, setup.pad_token, setup.device),
                       "steps": state.step, "train_minutes": state.train_seconds / 60}
            setup.logger.log(state.step, kind="eval", train_minutes=state.train_seconds / 60,
                             eval_accuracy=results["eval_accuracy"], eval_stderr=results["eval_stderr"],
                             eval_loss=results["eval_loss"])
    checkpoint(args, policy, setup.enc, setup.optimizer, state.step, state.train_seconds, results, setup.main_proc,
               setup.world_size)
    if setup.world_size > 1:
        dist.barrier()
    return results


def save_interrupted(setup, state):
    """Ctrl-C: save the state of the last finished step (its weights and optimizer are untouched), so that
    --resume continues exactly; under FSDP only say where the last eval's checkpoint is."""
    args = setup.args
    if setup.main_proc and not args.fsdp:
        checkpoint(args, setup.policy, setup.enc, setup.optimizer, state.step, state.train_seconds)
        print(f"interrupted after step {state.step}; saved {args.out}/model.pt, continue with --resume")
    elif setup.main_proc:  # gathering the shards needs every rank, and an interrupt stops them at different points
        print(f"interrupted after step {state.step}; under --fsdp {args.out}/model.pt holds the last eval's "
              "checkpoint (--eval-every / --eval-minutes); continue from it with --resume")


def finish(setup, state):
    """The final eval and checkpoint (every rank), then rank 0's report. -> the results dict."""
    args = setup.args
    results = evaluate_and_save(setup, state)
    if setup.main_proc:
        setup.logger.close()
        if not args.keep_state:
            os.remove(resume_path(args.out))
        print(f"held-out accuracy (greedy, {results['eval_n']} prompts of {args.eval_data}): "
              f"{100 * results['eval_accuracy']:.1f}% +/- {100 * results['eval_stderr']:.1f} | "
              f"eval loss {results['eval_loss']:.4f} | {state.step} steps in {state.train_seconds / 60:.1f} min "
              f"| {args.out}/model.pt")
        print("  by difficulty: " + "  ".join(f"{d}: {100 * a:.1f}%" for d, a in results["per_difficulty"].items())
              + " | outputs: " + "  ".join(f"{s} {100 * v:.0f}%" for s, v in results["styles"].items()))
    return results


def main(argv=None):
    """python sft.py [options]. --resume continues with the run's saved arguments (an option given again
    overrides its saved value); run() checks every option before anything is read or written."""
    args = cli.parse_args(Args, argv)
    if args.resume:
        if args.init:
            raise cli.UserError("--resume continues the run in --out; it cannot be combined with --init")
        args = resumed_args(args, argv)
    elif args.init and checkpoints.is_pretrained(args.init):
        args = checkpoints.args_for_pretrained(Args, argv, PRETRAINED_DEFAULTS)
    run(args)


if __name__ == "__main__":
    cli.run(main)
