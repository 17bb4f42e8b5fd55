"""Sequence packing: variable-length documents in fixed rows of T tokens, without padding or cross-talk.

A padded batch of B documents computes B * max_i L_i token positions to learn from sum_i L_i real
ones. Packing lays several documents side by side in rows of T tokens, so the rows needed approach
the lower bound

    rows >= ceil(sum_i L_i / T),

and a block-diagonal causal mask (doc_ids), positions that restart at 0 and a loss mask that is 0 at
each document's first token make every document see only itself: a packed row gives each document
exactly the logits and loss it gets alone. Packing changes the speed, not the gradient.
First-fit decreasing uses at most 11/9 OPT + 6/9 rows (Johnson et al. 1974; tight constant: Dosa 2007).
Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination" (arXiv:2107.02027);
Ding et al. 2024, "Fewer Truncations Improve Language Modeling" (best-fit packing, arXiv:2404.10830).

    python packing.py     # efficiency table, packed-vs-padded training, packing speed on 2M documents
"""
import signal
if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # Ctrl-C while torch loads: end at once (then cli.run)
import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import model as M
from lib import cli, rundir, tasks, tokenizer


# ----------------------------------------------------------------------------------------------
# A packing: where every piece of every document goes


@dataclass
class Packing:
    """Piece p holds tokens [start[p], start[p] + length[p]) of document doc[p] and sits in row
    row[p] at columns [col[p], col[p] + length[p]). Pieces are sorted by (row, col). A document
    longer than T is split into several pieces (start > 0 marks a continuation), never dropped."""
    T: int               # row length in tokens
    n_rows: int          # rows used
    doc: np.ndarray      # (P,) document index
    start: np.ndarray    # (P,) offset of the piece inside its document
    length: np.ndarray   # (P,) tokens in the piece, 1..T
    row: np.ndarray      # (P,) row of the piece
    col: np.ndarray      # (P,) column where the piece begins in its row


def check_lengths(lengths, T):
    """Document lengths as an int64 array; one clear error for what cannot be packed."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if T < 1:
        raise ValueError(f"packing.py: row length T must be >= 1, got {T}")
    if len(lengths) and lengths.min() < 1:
        bad = int(np.argmin(lengths))
        raise ValueError(f"packing.py: document {bad} has length {lengths[bad]}; lengths must be >= 1")
    return lengths


def split_documents(lengths, T):
    """Cut each document into pieces of at most T tokens: L -> floor(L / T) pieces of T, then the rest.

    n_pieces_i = ceil(L_i / T);  piece k of document i covers tokens [k T, min((k + 1) T, L_i)).
    Returns (doc, start, length), each (P,), in document order.
    """
    lengths = check_lengths(lengths, T)
    n_pieces = -(-lengths // T)                                           # (N,) ceil(L / T)
    doc = np.repeat(np.arange(len(lengths)), n_pieces)                    # (P,)
    first_piece = np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)     # (P,) index of piece 0 of its doc
    start = (np.arange(len(doc)) - first_piece) * T                       # (P,) k * T
    return doc, start, np.minimum(T, lengths[doc] - start)


def _place_in_columns(T, doc, start, length, row, rank):
    """Order pieces by (row, rank) and give each its column: the tokens of the pieces before it in the row."""
    if not len(row):
        return Packing(T, 0, doc, start, length, row, row.copy())
    order = np.lexsort((rank, row))                                       # (P,)
    doc, start, length, row = doc[order], start[order], length[order], row[order]
    end = np.cumsum(length)                                               # (P,) running token count
    row_begin = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])          # first piece of each row
    col = end - length - np.repeat(end[row_begin] - length[row_begin], np.diff(np.r_[row_begin, len(row)]))
    n_rows = int(row.max()) + 1 if len(row) else 0
    return Packing(T, n_rows, doc, start, length, row, col)


def fit_decreasing(lengths, T, rule="first"):
    """First-fit / best-fit decreasing bin packing of documents into rows of T tokens.

    Pieces are taken from the longest down. First fit puts each piece into the lowest-numbered row
    that still has room; best fit into the row with the least room that still fits (the lowest-
    numbered among equals); a piece that fits nowhere opens a new row.

    Fast and exact: pieces of one size s come as a group of k. The row chosen for a copy of s keeps
    being chosen (it stays the first row with room, and gets only tighter) until its room r drops
    below s, so it takes floor(r / s) copies. A group is therefore placed by one numpy pass over the
    rows with room >= s, visited in row order (first fit) or tightest-first (best fit), then new rows
    of floor(T / s) copies each. Cost: O(distinct sizes * rows) in numpy, not O(pieces * rows) in Python.
    """
    if rule not in ("first", "best"):
        raise ValueError(f"packing.py: rule must be 'first' or 'best', got {rule!r}")
    doc, start, size = split_documents(lengths, T)
    order = np.argsort(-size, kind="stable")                 # (P,) longest first, ties in document order
    room = np.zeros(len(size), np.int64)                     # (P,) free tokens of each row; <= one row per piece
    row_of = np.empty(len(size), np.int64)                   # (P,) row chosen for each piece
    n_rows = 0
    group_begin = np.flatnonzero(np.r_[True, np.diff(size[order]) != 0]) if len(size) else []
    for begin, end in zip(group_begin, np.r_[group_begin[1:], len(order)]):
        items = order[begin:end]                             # k pieces, all of size s
        s, k = int(size[items[0]]), len(items)
        rows = np.flatnonzero(room[:n_rows] >= s)            # open rows that fit s, in row order
        if rule == "best" and len(rows) > 1:
            rows = _tightest_first(rows, room[rows], s, k)
        copies = room[rows] // s                             # copies of s each of those rows takes
        short = k - int(copies.sum())
        if short > 0:                                        # open new rows of T // s copies each
            n_new = -(-short // (T // s))
            rows = np.r_[rows, np.arange(n_rows, n_rows + n_new)]
            copies = np.r_[copies, np.full(n_new, T // s)]
            room[n_rows:n_rows + n_new] = T
            n_rows += n_new
        taken = np.cumsum(copies)                            # pieces placed after each row
        used = int(np.searchsorted(taken, k)) + 1            # rows needed to place all k
        copies = copies[:used].copy()
        copies[-1] -= taken[used - 1] - k                    # the last row may take fewer
        row_of[items] = np.repeat(rows[:used], copies)
        room[rows[:used]] -= s * copies
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))                      # placement order inside a row
    return _place_in_columns(T, doc, start, size, row_of, rank)


def _tightest_first(rows, room, s, k):
    """Best fit's visiting order: rows by increasing room, ties by row number. Only the tightest rows
    that together take k copies of s are sorted (a histogram of room finds them in O(rows))."""
    copies_at = np.bincount(room, weights=room // s)         # copies of s the rows with each room take
    enough = np.searchsorted(np.cumsum(copies_at), k)        # rooms up to this one take all k
    rows = rows[room <= enough]
    return rows[np.argsort(room[room <= enough], kind="stable")]


def first_fit_decreasing(lengths, T):
    """FFD: longest piece first, into the first row with room. rows <= 11/9 OPT + 6/9."""
    return fit_decreasing(lengths, T, "first")


def best_fit_decreasing(lengths, T):
    """BFD: longest piece first, into the row it fills most tightly."""
    return fit_decreasing(lengths, T, "best")


def greedy_concat(lengths, T):
    """Pretraining's streaming packing: documents laid end to end in order, cut every T tokens.

    Token i of the stream goes to row i // T, column i % T. A piece begins wherever a document begins
    or a row begins, so a document that crosses a row boundary is split there. rows = ceil(sum L / T):
    only the last row has padding, but most documents end up cut in two.
    """
    lengths = check_lengths(lengths, T)
    doc_end = np.cumsum(lengths)                             # (N,) stream position after each document
    doc_begin = doc_end - lengths
    total = int(doc_end[-1]) if len(lengths) else 0
    begins = np.sort(np.r_[doc_begin, np.arange(0, total, T)])   # (P',) where a document or a row begins
    begins = begins[np.r_[True, begins[1:] != begins[:-1]][:len(begins)]]   # (P,) piece begins, each once
    length = np.diff(np.r_[begins, total])
    doc = np.searchsorted(doc_end, begins, side="right")     # the document containing each begin
    n_rows = -(-total // T)
    return Packing(T, n_rows, doc, begins - doc_begin[doc], length, begins // T, begins % T)


PACKERS = {"greedy concat": greedy_concat, "first-fit decr.": first_fit_decreasing,
           "best-fit decr.": best_fit_decreasing}


# ----------------------------------------------------------------------------------------------
# Baselines: padding


def padded_cost(sizes, batch_size, bucket_window=0):
    """Token positions computed when every batch is padded to its longest sequence:

        computed = sum_b |b| * max_{i in b} L_i

    Batches of batch_size sequences in data order (bucket_window = 0), or length-bucketed: sorted by
    length inside windows of bucket_window batches (a "mega-batch", as in Hugging Face's
    LengthGroupedSampler), so a batch holds similar lengths yet batches still come from all the data.
    """
    sizes = np.asarray(sizes, np.int64)
    if bucket_window:
        window = np.arange(len(sizes)) // (bucket_window * batch_size)      # (P,) mega-batch of each sequence
        sizes = sizes[np.lexsort((sizes, window))]                         # sorted inside each mega-batch
    begins = np.arange(0, len(sizes), batch_size)                           # (n_batches,)
    if not len(begins):
        return 0
    return int((np.maximum.reduceat(sizes, begins) * np.diff(np.r_[begins, len(sizes)])).sum())


def efficiency(real_tokens, computed_tokens):
    """Fraction of computed token positions that hold a real token."""
    return real_tokens / max(computed_tokens, 1)


def lower_bound(lengths, T):
    """No packing uses fewer rows than ceil(sum_i L_i / T)."""
    return -(-int(np.sum(lengths)) // T)


def efficiency_table(lengths, T, batch_size, bucket_window=50):
    """One line per method: rows (sequences, for padding), token positions computed, real-token fraction,
    and documents split. Padding splits only documents longer than T, as the packers do."""
    lengths = check_lengths(lengths, T)
    real = int(lengths.sum())
    doc, _, sizes = split_documents(lengths, T)
    lines = []
    for name, window in (("pad to batch max", 0), ("length-bucketed", bucket_window)):
        computed = padded_cost(sizes, batch_size, window)
        lines.append(dict(method=name, rows=len(sizes), computed=computed, real_fraction=efficiency(real, computed),
                          split=int((lengths > T).sum())))
    for name, pack in PACKERS.items():
        packing = pack(lengths, T)
        computed = packing.n_rows * T
        lines.append(dict(method=name, rows=packing.n_rows, computed=computed, real_fraction=efficiency(real, computed),
                          split=len(np.unique(packing.doc[packing.start > 0]))))
    return lines, lower_bound(lengths, T)


# ----------------------------------------------------------------------------------------------
# The tensors of a training step


@dataclass
class Batch:
    """What one training step feeds the model; every tensor is (R, T)."""
    tokens: torch.Tensor                # token ids, pad_id at padding
    loss_mask: torch.Tensor             # True where token t is predicted from tokens < t of its own document
    doc_ids: torch.Tensor | None = None    # document of each token, -1 at padding; None = one sequence per row
    positions: torch.Tensor | None = None  # 0, 1, 2, ... inside each document; None = 0..T-1

    def to(self, device):
        move = lambda x: None if x is None else x.to(device)
        return Batch(move(self.tokens), move(self.loss_mask), move(self.doc_ids), move(self.positions))


def packed_batch(packing, docs, pad_id):
    """Rows of a packing filled with tokens.  For piece p and j < length[p]:

        tokens[row_p, col_p + j]    = docs[doc_p][start_p + j]
        doc_ids[row_p, col_p + j]   = doc_p         (-1 at padding: pads form a document of their own)
        positions[row_p, col_p + j] = j             (restarts at 0 at every piece)
        loss_mask[row_p, col_p + j] = j > 0         (a piece's first token is never predicted from the
                                                     previous document; padding is never predicted)
    A piece cut from a longer document is a sequence of its own: nothing before it is in its row.
    """
    lengths = np.array([len(d) for d in docs], np.int64)
    if len(packing.doc) and np.any(packing.start + packing.length > lengths[packing.doc]):
        raise ValueError("packing.py: the packing does not match the documents' lengths")
    flat = np.concatenate([np.asarray(d, np.int64) for d in docs]) if docs else np.zeros(0, np.int64)
    doc_begin = np.cumsum(lengths) - lengths                                    # (N,) offset of each doc in flat
    piece = np.repeat(np.arange(len(packing.doc)), packing.length)             # (n,) piece of each placed token
    j = np.arange(len(piece)) - np.repeat(np.cumsum(packing.length) - packing.length, packing.length)  # (n,)
    source = doc_begin[packing.doc[piece]] + packing.start[piece] + j          # (n,) index into flat
    target = packing.row[piece] * packing.T + packing.col[piece] + j           # (n,) index into the R*T grid
    R, T = packing.n_rows, packing.T
    tokens = np.full(R * T, pad_id, np.int64)
    doc_ids = np.full(R * T, -1, np.int64)
    positions = np.zeros(R * T, np.int64)
    tokens[target], doc_ids[target], positions[target] = flat[source], packing.doc[piece], j
    as_rows = lambda x: torch.from_numpy(x).view(R, T)
    return Batch(as_rows(tokens), as_rows(positions > 0), as_rows(doc_ids), as_rows(positions))


def padded_batch(docs, pad_id):
    """The baseline: one document per row, right-padded to the longest (B, max_i L_i). Causal attention
    alone keeps real tokens from seeing the pads after them, so no doc_ids or positions are needed."""
    width = max(len(d) for d in docs)
    tokens = torch.full((len(docs), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(docs), width, dtype=torch.bool)
    for i, d in enumerate(docs):
        tokens[i, :len(d)] = torch.as_tensor(d, dtype=torch.long)
        loss_mask[i, 1:len(d)] = True
    return Batch(tokens, loss_mask)


def token_nll(model, batch):
    """-log p(x_t | x_<t) at every position, (R, T); column 0 has no prediction and holds 0.
    With doc_ids and positions, x_<t means the earlier tokens of the same document only."""
    logits = model(batch.tokens, positions=batch.positions, doc_ids=batch.doc_ids)   # (R, T, V)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), batch.tokens[:, 1:], reduction="none")
    return F.pad(nll, (1, 0))                                                        # (R, T)


def masked_loss(model, batch):
    """Mean next-token loss over the tokens that are predicted:  L = sum m * nll / sum m.
    The same documents give the same sum and the same count padded or packed, so the same loss."""
    m = batch.loss_mask.float()
    return (token_nll(model, batch) * m).sum() / m.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------
# Training: padded against packed on the same documents


def synthetic_documents(n, median, sigma, T, enc, rng):
    """n documents of log-normal length (capped at T tokens, the last one <|endoftext|>): lines of
    arithmetic facts 'a+b=c', so a small model has something to learn."""
    lengths = np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), 2, T).astype(int)
    docs = []
    for length in lengths:
        lines, size = [], 0
        while size < length:
            a, b = rng.integers(0, 100, 2)
            lines.append(f"{a}+{b}={a + b}\n")
            size += len(lines[-1])
        docs.append(tokenizer.encode(enc, "".join(lines))[:length - 1] + [enc.eot_token])
    return docs


def compare_training(docs, args, device, out_dir=None):
    """Train two copies of one model on the same documents, step by step: one on padded batches, one
    on packed rows (best-fit decreasing). Same documents, same loss, so the same gradients: the losses
    agree to fp32 rounding while the packed run computes far fewer token positions.
    Time the steps side by side (alternating) so machine load hits both alike. An update that leaves a weight
    NaN, inf (a NaN loss does) or past cli.MAX_WEIGHT stops the comparison (cli.NonFiniteError naming it)."""
    enc = tokenizer.get_tokenizer("bytes")
    pad = tokenizer.pad_id(enc)
    T, B = args.train_seq_len, args.batch_size
    steps = [docs[i:i + B] for i in range(0, len(docs) - B + 1, B)][:args.train_steps]
    padded = [padded_batch(step, pad).to(device) for step in steps]
    packed = [packed_batch(best_fit_decreasing([len(d) for d in step], T), step, pad).to(device) for step in steps]
    cfg = model_config(args, enc.n_vocab)
    runs = {}
    for name, batches in (("padded", padded), ("packed", packed)):
        torch.manual_seed(args.seed)                                      # identical initial weights
        gpt = M.GPT(cfg).to(device)
        runs[name] = dict(model=gpt, batches=batches, optimizer=torch.optim.AdamW(gpt.parameters(), lr=args.lr),
                          losses=[], seconds=0.0, real=0, computed=0)
    logger = rundir.MetricsLogger(out_dir, total=len(steps), enabled=out_dir is not None)
    warmup = min(2, len(steps) - 1)                                       # steps left out of the timing
    for step in range(len(steps)):
        for name, run in runs.items():
            batch = run["batches"][step]
            rundir.sync(device)
            t0 = time.perf_counter()
            with M.autocast(device):
                loss = masked_loss(run["model"], batch)
            loss.backward()
            run["optimizer"].step()
            run["optimizer"].zero_grad(set_to_none=True)
            run["losses"].append(loss.item())                             # .item() waits for the device
            if step >= warmup:
                run["seconds"] += time.perf_counter() - t0
                run["real"] += sum(len(d) for d in steps[step])
                run["computed"] += batch.tokens.numel()
            cli.check_weights(f"{name} step {step + 1}", run["model"])     # untimed; a NaN loss leaves NaN weights
        if step % max(1, len(steps) // 5) == 0 or step == len(steps) - 1:
            logger.log(step + 1, echo=False, **{f"{name}_loss": run["losses"][-1] for name, run in runs.items()})
    logger.close()
    for run in runs.values():
        run["tokens_per_s"] = run["real"] / max(run["seconds"], 1e-9)
    return runs, cfg


# ----------------------------------------------------------------------------------------------
# main


@dataclass
class Args:
    seq_len: int = 2048           # T of the efficiency table and the speed benchmark: tokens per row
    n_docs: int = 100000          # documents drawn for the log-normal efficiency table
    median_len: float = 256.0     # median document length (tokens) of the log-normal distribution
    sigma: float = 1.0            # log-normal shape: standard deviation of log(length)
    batch_size: int = 32          # documents per padded batch (baselines) and per training step
    bucket_window: int = 50       # length-bucketed baseline: sort by length within windows of this many batches
    data: str = "data/sft_train.jsonl"  # SFT data ({prompt, completion} or GSM8K), tabled if it exists; "" = none
    train_seq_len: int = 256      # T of the training comparison (= the model's block_size)
    train_median_len: float = 48.0  # median length of the training documents (byte tokens)
    train_steps: int = 60         # optimizer steps, each on batch_size documents, padded and packed alike
    n_layer: int = 2              # transformer blocks of the small model
    n_embd: int = 64              # residual width of the small model
    n_head: int = 4               # attention heads of the small model
    lr: float = 1e-3              # AdamW learning rate
    bench_docs: int = 2000000     # documents in the packing-speed benchmark (0 skips it)
    out_dir: str = "runs/packing"  # metrics.jsonl and args.json of the training comparison ("" = none)
    device: str = "auto"          # auto | cpu | cuda
    seed: int = 0                 # random seed


MAX_DOCS = 10 ** 7         # documents one part may draw (--n-docs, --bench-docs, --batch-size x --train-steps)
MAX_PIECES = 5 * 10 ** 7   # pieces of at most T tokens that one table or benchmark may cut its documents into
MAX_DOC_TOKENS = 2 ** 24   # a drawn log-normal length is capped here (a huge --sigma would overflow int64)
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def model_config(args, vocab_size: int) -> M.Config:
    """The small model of the training comparison; sizes that make no model are a UserError naming them."""
    try:
        return M.Config(vocab_size=vocab_size, block_size=args.train_seq_len, n_layer=args.n_layer,
                        n_head=args.n_head, n_kv_head=args.n_head, n_embd=args.n_embd)
    except ValueError as e:
        raise cli.UserError(f"--n-embd {args.n_embd}, --n-head {args.n_head}, --n-layer {args.n_layer}: {e}") from None


def check_args(args) -> None:
    """Validate every option before anything is read or written: the first bad one is a cli.UserError
    naming its flag (one line on stderr, exit status 2)."""
    cli.require_at_least(args, 1, "seq_len", "n_docs", "batch_size", "train_steps", "n_head", "n_embd")
    cli.require_at_least(args, 0, "bucket_window", "bench_docs", "n_layer")      # 0 layers: a bigram model
    cli.require_at_least(args, 2, "train_seq_len")      # a document of one token has nothing to predict
    for name in ("n_docs", "bench_docs"):
        if getattr(args, name) > MAX_DOCS:
            raise cli.UserError(f"--{name.replace('_', '-')} must be <= {MAX_DOCS:,}, got {getattr(args, name):,}")
    if args.batch_size * args.train_steps > MAX_DOCS:
        raise cli.UserError(f"--batch-size x --train-steps (the training documents) must be <= {MAX_DOCS:,}, "
                            f"got {args.batch_size * args.train_steps:,}")
    if not 1 <= args.median_len <= MAX_DOC_TOKENS:
        raise cli.UserError(f"--median-len must be in [1, {MAX_DOC_TOKENS}], got {args.median_len}")
    if not 2 <= args.train_median_len <= MAX_DOC_TOKENS:
        raise cli.UserError(f"--train-median-len must be in [2, {MAX_DOC_TOKENS}], got {args.train_median_len}")
    cli.check_options(args, non_negative=("sigma",), positive=("lr",), seed=("seed",))
    cli.require_at_most(args, cli.MAX_LR, "lr")     # Adam moves each weight by ~lr a step
    model_config(args, tokenizer.get_tokenizer("bytes").n_vocab)
    if args.out_dir:
        rundir.check_run_folder("--out-dir", args.out_dir)
    if not DEVICE.fullmatch(args.device):
        raise cli.UserError(f"--device {args.device}: choose auto, cpu, cuda or cuda:N")
    cli.get_device(args.device)                        # cuda on a machine without it


def lognormal_lengths(n, median, sigma, rng):
    """Document lengths L = round(exp(N(log median, sigma^2))) in [1, MAX_DOC_TOKENS]: a few long
    documents, many short ones."""
    return np.clip(np.rint(rng.lognormal(math.log(median), sigma, n)), 1, MAX_DOC_TOKENS).astype(np.int64)


def check_pieces(lengths, T, what: str) -> None:
    """Refuse, before anything runs, a table or benchmark that would cut its documents into more than
    MAX_PIECES pieces of at most T tokens (sum_i ceil(L_i / T)): it would not fit in memory."""
    pieces = int((-(-lengths // T)).sum())
    if pieces > MAX_PIECES:
        raise cli.UserError(f"{what}: {pieces:,} pieces of at most T = {T} tokens, more than {MAX_PIECES:,}; "
                            "choose fewer or shorter documents, or a longer --seq-len")


def demonstration_lengths(path, enc):
    """Token lengths (prompt + completion + <|endoftext|>) of the demonstrations in `path`
    (tasks.read_demonstrations: {prompt, completion} or GSM8K rows; every problem names file:line)."""
    rows = tasks.read_demonstrations(path)
    return np.array([len(tokenizer.encode(enc, row["prompt"] + row["completion"])) + 1 for row in rows], np.int64)


def print_table(title, lengths, T, batch_size, bucket_window):
    lines, bound = efficiency_table(lengths, T, batch_size, bucket_window)
    print(f"\n{title}: {len(lengths):,} documents, mean {lengths.mean():.0f}, max {lengths.max():,} tokens; "
          f"T = {T}; lower bound ceil(sum / T) = {bound:,} rows")
    print(f"  {'method':<18} {'rows':>10} {'computed tokens':>16} {'real-token fraction':>20} "
          f"{'rows / bound':>13} {'docs split':>11}")
    for line in lines:
        ratio = f"{line['rows'] / bound:.4f}" if line["method"] in PACKERS else "-"
        print(f"  {line['method']:<18} {line['rows']:>10,} {line['computed']:>16,} "
              f"{line['real_fraction']:>20.3f} {ratio:>13} {line['split']:>11,}")
    return lines, bound


def main(argv=None):
    args = cli.parse_args(Args, argv)
    check_args(args)
    cli.seed_everything(args.seed)
    device = cli.get_device(args.device)
    rng = np.random.default_rng(args.seed)
    enc = tokenizer.get_tokenizer("bytes")
    results = {}

    # Every input first (the data file, and every document drawn), so that bad input writes nothing.
    sft_lengths = None
    if args.data and (os.path.exists(args.data) or os.path.normpath(args.data) != os.path.normpath(Args().data)):
        sft_lengths = demonstration_lengths(args.data, enc)
    lengths = lognormal_lengths(args.n_docs, args.median_len, args.sigma, rng)
    check_pieces(lengths, args.seq_len, "--n-docs, --median-len, --sigma")
    docs = synthetic_documents(args.batch_size * args.train_steps, args.train_median_len, args.sigma,
                               args.train_seq_len, enc, rng)
    bench_lengths = lognormal_lengths(args.bench_docs, args.median_len, args.sigma, rng)
    check_pieces(bench_lengths, args.seq_len, "--bench-docs, --median-len, --sigma")

    # 1. Efficiency: the rows each method needs for the same documents.
    results["lognormal"] = print_table(f"log-normal lengths (median {args.median_len:g}, sigma {args.sigma:g})",
                                       lengths, args.seq_len, args.batch_size, args.bucket_window)
    if sft_lengths is not None:
        results["sft"] = print_table(f"{args.data} (prompt + completion + <|endoftext|>, byte tokens)",
                                     sft_lengths, args.train_seq_len, args.batch_size, args.bucket_window)
    elif args.data:
        print(f"\n({args.data} not found: run `python synth.py` to table the project's own data too)")

    # 2. Training: padded vs packed, same model, same documents, same steps.
    if args.out_dir:
        rundir.save_args(args.out_dir, args)
    runs, cfg = compare_training(docs, args, device, args.out_dir or None)
    padded_run, packed_run = runs["padded"], runs["packed"]
    print(f"\ntraining on {device}: the same {cfg.n_layer}-layer, width-{cfg.n_embd} model, "
          f"{len(padded_run['losses'])} AdamW steps of the same {args.batch_size} documents each "
          f"({sum(len(d) for d in docs):,} real tokens), T = {args.train_seq_len}")
    print(f"  {'batches':<8} {'computed tokens':>16} {'real-token fraction':>20} {'real tokens/s':>14} "
          f"{'first loss':>11} {'final loss':>11}")
    for name, run in runs.items():
        print(f"  {name:<8} {run['computed']:>16,} {run['real'] / run['computed']:>20.3f} "
              f"{run['tokens_per_s']:>14,.0f} {run['losses'][0]:>11.5f} {run['losses'][-1]:>11.5f}")
    speedup = packed_run["tokens_per_s"] / padded_run["tokens_per_s"]
    max_diff = max(abs(a - b) for a, b in zip(padded_run["losses"], packed_run["losses"]))
    print(f"  packed / padded: {speedup:.2f}x the real tokens per second; "
          f"largest |loss difference| over all {len(padded_run['losses'])} steps: {max_diff:.2e}")
    results.update(speedup=speedup, max_loss_diff=max_diff, padded=padded_run, packed=packed_run)

    # 3. Speed: pack a large dataset.
    if args.bench_docs:
        print(f"\npacking speed: {args.bench_docs:,} log-normal documents ({bench_lengths.sum() / 1e6:,.0f} M tokens), "
              f"T = {args.seq_len}")
        results["bench"] = {}
        for name, pack_fn in PACKERS.items():
            t0 = time.perf_counter()
            packing = pack_fn(bench_lengths, args.seq_len)
            seconds = time.perf_counter() - t0
            results["bench"][name] = seconds
            print(f"  {name:<16} {seconds:6.2f} s  ({args.bench_docs / seconds / 1e6:.2f} M documents/s), "
                  f"{packing.n_rows:,} rows, real-token fraction "
                  f"{bench_lengths.sum() / (packing.n_rows * args.seq_len):.4f}")
    return results


if __name__ == "__main__":
    cli.run(main)
