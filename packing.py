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
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import model


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
    group_begin = np.flatnonzero(np.r_[True, np.diff(size[order]) != 0])
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
    begins = begins[np.r_[True, begins[1:] != begins[:-1]]]      # (P,) piece begins, each once
    length = np.diff(np.r_[begins, total])
    doc = np.searchsorted(doc_end, begins, side="right")     # the document containing each begin
    n_rows = -(-total // T)
    return Packing(T, n_rows, doc, begins - doc_begin[doc], length, begins // T, begins % T)


PACKERS = {"greedy concat": greedy_concat, "first-fit decr.": first_fit_decreasing,
           "best-fit decr.": best_fit_decreasing}


# ----------------------------------------------------------------------------------------------
# Baselines: padding


def padded_batches(lengths, batch_size, T, bucketed=False):
    """Batches of piece indices for padding: documents split to <= T tokens (as packing does), then B
    at a time in data order, or (bucketed) sorted by length first so a batch holds similar lengths.
    Returns (sizes (P,), batches: list of index arrays); each batch is padded to its own maximum."""
    _, _, sizes = split_documents(lengths, T)
    order = np.argsort(sizes, kind="stable") if bucketed else np.arange(len(sizes))
    return sizes, [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded_cost(sizes, batch_size, bucketed=False):
    """Token positions computed by padding to the batch max: sum_b |b| * max_{i in b} L_i."""
    sizes = np.sort(sizes, kind="stable") if bucketed else np.asarray(sizes)
    begins = np.arange(0, len(sizes), batch_size)
    if not len(begins):
        return 0
    return int((np.maximum.reduceat(sizes, begins) * np.diff(np.r_[begins, len(sizes)])).sum())


def efficiency(real_tokens, computed_tokens):
    """Fraction of computed token positions that hold a real token."""
    return real_tokens / max(computed_tokens, 1)


def lower_bound(lengths, T):
    """No packing uses fewer rows than ceil(sum_i L_i / T)."""
    return -(-int(np.sum(lengths)) // T)


def efficiency_table(lengths, T, batch_size):
    """One line per method: rows (sequences for padding), computed positions, real-token fraction."""
    lengths = check_lengths(lengths, T)
    real = int(lengths.sum())
    lines = []
    _, _, sizes = split_documents(lengths, T)
    for name, bucketed in (("pad to batch max", False), ("length-bucketed", True)):
        computed = padded_cost(sizes, batch_size, bucketed)
        lines.append(dict(method=name, rows=len(sizes), computed=computed, real_fraction=efficiency(real, computed)))
    for name, pack in PACKERS.items():
        packing = pack(lengths, T)
        computed = packing.n_rows * T
        lines.append(dict(method=name, rows=packing.n_rows, computed=computed, real_fraction=efficiency(real, computed)))
    return lines, lower_bound(lengths, T)
