"""Properties of packing.py, each against an independent reference: brute force (bin-packing OPT,
FFD/BFD by their per-piece definition, padding cost by materialised batches), identities (every
token once, in order; the pretraining stream), and the model itself (a packed row's per-token loss
equals each document's loss alone, through model.GPT). Bad input: every option and each kind of bad
--data file run through `python packing.py` (exit status 2, one line naming it, nothing written)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import model as M
from lib import cli, tokenizer
from badinput import case_name, files_under, make_files, run_script_cases
import packing as P

PAD = -7                                                   # a pad id no document token can equal
METHODS = ["greedy concat", "first-fit decr.", "best-fit decr."]
lengths_st = st.lists(st.integers(1, 120), min_size=1, max_size=40)
T_st = st.integers(1, 48)


def numbered_docs(lengths):
    """Documents whose tokens are all distinct: document d holds offset_d, offset_d + 1, ..."""
    offsets = np.cumsum([0] + list(lengths))
    return [list(range(offsets[d], offsets[d] + L)) for d, L in enumerate(lengths)]


def pieces_by_definition(lengths, T):
    """Documents cut into T-token pieces, by hand: [(doc, start, size)] in document order."""
    return [(d, k * T, min(T, L - k * T)) for d, L in enumerate(lengths) for k in range(math.ceil(L / T))]


def fit_by_definition(lengths, T, rule):
    """FFD / BFD one piece at a time, exactly as the textbook states them: longest piece first (ties in
    document order); first fit = lowest-numbered row with room, best fit = the row with the least room
    that fits (lowest-numbered among equals); none fits -> a new row. Returns {(doc, start): row}."""
    pieces = sorted(pieces_by_definition(lengths, T), key=lambda p: -p[2])    # sorted() is stable
    room, placed = [], {}
    for doc, start, size in pieces:
        fitting = [r for r in range(len(room)) if room[r] >= size]
        if not fitting:
            room.append(T)
            row = len(room) - 1
        else:
            row = fitting[0] if rule == "first" else min(fitting, key=lambda r: (room[r], r))
        room[row] -= size
        placed[(doc, start)] = row
    return placed


def brute_force_opt(sizes, T):
    """The fewest rows of T that hold all sizes: try k = ceil(sum / T), k + 1, ... by exhaustive search."""
    sizes = sorted(sizes, reverse=True)

    def fits(k):
        loads = [0] * k

        def place(i):
            if i == len(sizes):
                return True
            tried = set()
            for b in range(k):
                if loads[b] + sizes[i] <= T and loads[b] not in tried:   # rows with equal load are equivalent
                    tried.add(loads[b])
                    loads[b] += sizes[i]
                    if place(i + 1):
                        return True
                    loads[b] -= sizes[i]
            return False
        return place(0)

    k = math.ceil(sum(sizes) / T)
    while not fits(k):
        k += 1
    return k


# ---------------------------------------------------------------- conservation and layout


@pytest.mark.parametrize("method", METHODS)
@given(lengths=lengths_st, T=T_st)
def test_every_token_appears_exactly_once_in_order(method, lengths, T):
    docs = numbered_docs(lengths)
    batch = P.packed_batch(P.PACKERS[method](lengths, T), docs, PAD)
    tokens, doc_ids = batch.tokens.numpy(), batch.doc_ids.numpy()
    real = tokens[tokens != PAD]
    assert sorted(real.tolist()) == list(range(sum(lengths)))          # each token once, none invented
    for d, doc in enumerate(docs):
        assert sorted(tokens[doc_ids == d].tolist()) == doc             # ... under its own document id
    # in order: inside a row, each token of a document follows the one before it in the document
    same = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] >= 0)
    assert np.all(tokens[:, 1:][same] == tokens[:, :-1][same] + 1)


@pytest.mark.parametrize("method", METHODS)
@given(lengths=lengths_st, T=T_st)
def test_no_row_exceeds_T_and_pieces_do_not_overlap(method, lengths, T):
    p = P.PACKERS[method](lengths, T)
    assert np.all((p.length >= 1) & (p.length <= T)) and np.all(p.col + p.length <= T)
    for r in range(p.n_rows):
        cols = sorted((c, c + n) for c, n, row in zip(p.col, p.length, p.row) if row == r)
        assert sum(e - b for b, e in cols) <= T
        assert all(e1 <= b2 for (_, e1), (b2, _) in zip(cols, cols[1:]))   # disjoint column ranges
    assert set(p.row.tolist()) == set(range(p.n_rows))                    # no empty row


@pytest.mark.parametrize("method", METHODS)
@given(lengths=st.lists(st.integers(1, 200), min_size=1, max_size=12), T=st.integers(1, 40))
def test_split_documents_reassemble_exactly(method, lengths, T):
    docs = numbered_docs(lengths)
    p = P.PACKERS[method](lengths, T)
    batch = P.packed_batch(p, docs, PAD)
    for d, doc in enumerate(docs):
        mine = sorted(np.flatnonzero(p.doc == d), key=lambda i: p.start[i])
        pieces = [batch.tokens[p.row[i], p.col[i]:p.col[i] + p.length[i]].tolist() for i in mine]
        assert [t for piece in pieces for t in piece] == doc               # the pieces, in order, are the doc
        if method != "greedy concat":                                      # FFD/BFD split only what must be
            assert len(pieces) == math.ceil(len(doc) / T)


@given(lengths=lengths_st, T=T_st)
def test_greedy_concat_is_the_pretraining_stream_cut_every_T(lengths, T):
    docs = numbered_docs(lengths)
    p = P.greedy_concat(lengths, T)
    tokens = P.packed_batch(p, docs, PAD).tokens.reshape(-1).tolist()
    assert tokens[:sum(lengths)] == [t for doc in docs for t in doc]       # row-major read = the stream
    assert all(t == PAD for t in tokens[sum(lengths):])                    # padding only at the very end
    assert p.n_rows == math.ceil(sum(lengths) / T)                         # the lower bound exactly
    # the pieces by definition: walk the stream; a piece begins where a document or a row begins
    pieces, stream = [], [(d, j) for d, L in enumerate(lengths) for j in range(L)]
    for i, (d, j) in enumerate(stream):
        if i % T == 0 or j == 0:
            pieces.append([d, j, 0, i // T, i % T])
        pieces[-1][2] += 1
    assert [list(piece) for piece in zip(*(x.tolist() for x in (p.doc, p.start, p.length, p.row, p.col)))] \
        == pieces


# ---------------------------------------------------------------- FFD / BFD


@pytest.mark.parametrize("rule", ["first", "best"])
@given(lengths=lengths_st, T=T_st)
@example(lengths=[8, 8, 14, 15, 8, 15], T=28)           # best fit: rooms 13, 13 and 5 take 2 + 1 copies of 8
@example(lengths=[8, 1, 1, 1, 1, 3, 3, 3, 4, 8, 4, 8], T=10)   # best fit: rows of equal room, in row order
@example(lengths=[1, 5, 3, 3], T=7)                    # best fit: of two rows with room, the later is tighter
def test_fit_decreasing_matches_the_per_piece_definition(rule, lengths, T):
    named = {"first": P.first_fit_decreasing, "best": P.best_fit_decreasing}[rule]
    packings = [P.fit_decreasing(lengths, T, rule), named(lengths, T)]
    if rule == "first":
        packings.append(P.fit_decreasing(lengths, T))                      # the default rule
    for p in packings:
        assert {(d, s): r for d, s, r in zip(p.doc.tolist(), p.start.tolist(), p.row.tolist())} \
            == fit_by_definition(lengths, T, rule)


@pytest.mark.parametrize("method", METHODS)
def test_no_documents_pack_into_no_rows(method):
    p = P.PACKERS[method]([], 8)
    assert (p.T, p.n_rows) == (8, 0)
    assert all(len(x) == 0 and x.dtype == np.int64 for x in (p.doc, p.start, p.length, p.row, p.col))
    batch = P.packed_batch(p, [], PAD)
    for x in (batch.tokens, batch.loss_mask, batch.doc_ids, batch.positions):
        assert x.shape == (0, 8)


@pytest.mark.parametrize("rule", ["first", "best"])
@settings(max_examples=40)
@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=8), T=st.integers(2, 20))
@example(sizes=[4, 4, 3, 3, 3, 3], T=10)                                   # FFD 3 rows, OPT 2
def test_fit_decreasing_within_11_9_opt_plus_6_9_of_brute_force(rule, sizes, T):
    sizes = [min(s, T) for s in sizes]
    rows = P.fit_decreasing(sizes, T, rule).n_rows
    opt = brute_force_opt(sizes, T)
    assert P.lower_bound(sizes, T) <= opt <= rows
    assert 9 * rows <= 11 * opt + 6                                        # rows <= 11/9 OPT + 6/9


def test_ffd_is_suboptimal_on_the_textbook_instance():
    """Sanity of the brute force: FFD is not optimal in general (this instance is why the bound is 11/9)."""
    assert P.first_fit_decreasing([4, 4, 3, 3, 3, 3], 10).n_rows == 3
    assert brute_force_opt([4, 4, 3, 3, 3, 3], 10) == 2


@pytest.mark.parametrize("method", METHODS)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=60), T=st.integers(1, 64))
def test_rows_between_lower_bound_and_twice_it(method, lengths, T):
    p = P.PACKERS[method](lengths, T)
    bound = math.ceil(sum(lengths) / T)
    assert P.lower_bound(lengths, T) == bound
    assert bound <= p.n_rows <= 2 * bound
    if method != "greedy concat":
        # any-fit: the first piece of a later row fit in no earlier row, so two rows hold > T together
        loads = np.bincount(p.row, weights=p.length, minlength=p.n_rows)
        for a in range(p.n_rows):
            for b in range(a + 1, p.n_rows):
                assert loads[a] + loads[b] > T


# ---------------------------------------------------------------- positions, masks, padding


@pytest.mark.parametrize("method", METHODS)
@given(lengths=lengths_st, T=T_st)
def test_positions_restart_and_loss_mask_is_zero_exactly_at_boundaries_and_padding(method, lengths, T):
    docs = numbered_docs(lengths)
    p = P.PACKERS[method](lengths, T)
    b = P.packed_batch(p, docs, PAD)
    tokens, doc_ids, pos, mask = (x.numpy() for x in (b.tokens, b.doc_ids, b.positions, b.loss_mask))
    real = tokens != PAD
    assert np.array_equal(real, doc_ids >= 0) and np.all(doc_ids[~real] == -1)
    # piece starts from the packing itself, independently of the tensors
    starts = np.zeros_like(real)
    starts[p.row, p.col] = True
    assert np.array_equal(mask, real & ~starts)                            # 0 at boundaries and padding only
    assert np.all(pos[starts] == 0) and np.all(pos[real & ~starts] > 0)
    for i in range(len(p.doc)):                                            # 0, 1, 2, ... along each piece
        assert pos[p.row[i], p.col[i]:p.col[i] + p.length[i]].tolist() == list(range(p.length[i]))
    for r in range(p.n_rows):                                              # padding is a suffix of the row
        n_real = int(real[r].sum())
        assert real[r, :n_real].all() and not real[r, n_real:].any()


@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=20),
       batch_size=st.integers(1, 8), window=st.integers(0, 3))
def test_padded_cost_equals_materialised_padded_batches(lengths, batch_size, window):
    if window:                                            # bucketed: sort by length inside each mega-batch
        span = window * batch_size
        seqs = [s for i in range(0, len(lengths), span) for s in sorted(lengths[i:i + span])]
    else:
        seqs = list(lengths)
    batches = [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
    computed = sum(P.padded_batch([[1] * n for n in b], 0).tokens.numel() for b in batches)
    assert P.padded_cost(lengths, batch_size, window) == computed


def test_padded_cost_of_nothing_is_zero_and_efficiency_is_real_over_computed():
    assert P.padded_cost([], 4) == 0 and P.padded_cost([], 4, 2) == 0
    assert P.efficiency(30, 40) == 0.75 and P.efficiency(7, 7) == 1.0 and P.efficiency(1, 1) == 1.0
    assert P.efficiency(0, 0) == 0.0                                      # nothing computed: no division by zero


# ---------------------------------------------------------------- the model: packing is exact


def tiny_gpt(T, pos, seed):
    torch.manual_seed(seed)
    cfg = M.Config(vocab_size=40, block_size=T, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos=pos)
    return M.GPT(cfg).eval()


@settings(max_examples=10)
@given(lengths=st.lists(st.integers(1, 30), min_size=2, max_size=10), T=st.integers(8, 32),
       method=st.sampled_from(METHODS), pos=st.sampled_from(["rope", "learned"]), seed=st.integers(0, 99))
def test_packed_row_loss_equals_each_document_alone(lengths, T, method, pos, seed):
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 39, (n,), generator=gen).tolist() for n in lengths]
    gpt = tiny_gpt(T, pos, seed)
    p = P.PACKERS[method](lengths, T)
    b = P.packed_batch(p, docs, pad_id=39)
    with torch.no_grad():
        packed_nll = P.token_nll(gpt, b)                                          # (R, T)
        for i in range(len(p.doc)):
            piece = torch.tensor(docs[p.doc[i]][p.start[i]:p.start[i] + p.length[i]])[None]   # (1, n)
            alone = F.cross_entropy(gpt(piece)[0, :-1], piece[0, 1:], reduction="none")    # the piece alone
            cols = slice(p.col[i] + 1, p.col[i] + p.length[i])
            torch.testing.assert_close(packed_nll[p.row[i], cols], alone, rtol=1e-5, atol=1e-5)
            assert b.loss_mask[p.row[i], cols].all() and not b.loss_mask[p.row[i], p.col[i]]
        # the masks matter: without doc_ids and positions, a later document would see the earlier ones
        later = b.loss_mask & (b.positions != torch.arange(T))                # not the row's first piece
        if later.any():
            leaky = P.token_nll(gpt, P.Batch(b.tokens, b.loss_mask))
            assert not torch.allclose(leaky[later], packed_nll[later], atol=1e-4)


@settings(max_examples=8)
@given(lengths=st.lists(st.integers(2, 24), min_size=2, max_size=8), seed=st.integers(0, 99))
def test_padded_and_packed_batches_give_the_same_loss_and_gradient(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 39, (n,), generator=gen).tolist() for n in lengths]
    gpt = tiny_gpt(32, "rope", seed)
    grads = []
    for batch in (P.padded_batch(docs, 39), P.packed_batch(P.best_fit_decreasing(lengths, 32), docs, 39)):
        gpt.zero_grad()
        loss = P.masked_loss(gpt, batch)
        loss.backward()
        grads.append((loss.detach(), [q.grad.clone() for q in gpt.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for g_pad, g_pack in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g_pad, g_pack, rtol=1e-4, atol=1e-6)
    # and the loss is the mean over predicted tokens of -log p, computed by hand
    nll = [F.cross_entropy(gpt(torch.tensor(d)[None])[0, :-1], torch.tensor(d[1:]), reduction="sum") for d in docs]
    torch.testing.assert_close(grads[0][0], sum(nll).detach() / sum(n - 1 for n in lengths), rtol=1e-5, atol=1e-6)


def test_one_predicted_token_its_loss_is_that_tokens_nll_and_padded_dtypes_match_packed():
    gpt = tiny_gpt(8, "rope", 0)
    batch = P.padded_batch([[5, 7], [3]], 39)                              # one prediction: 7 after 5
    with torch.no_grad():
        want = F.cross_entropy(gpt(torch.tensor([[5, 7]]))[0, :1], torch.tensor([7]))
        torch.testing.assert_close(P.masked_loss(gpt, batch), want)
    packed = P.packed_batch(P.best_fit_decreasing([2, 1], 8), [[5, 7], [3]], 39)
    assert (batch.tokens.dtype, batch.loss_mask.dtype) == (packed.tokens.dtype, packed.loss_mask.dtype) \
        == (torch.long, torch.bool)


# ---------------------------------------------------------------- errors and the script


def test_bad_lengths_are_one_clear_error():
    with pytest.raises(ValueError, match="packing.py: document 1 has length 0"):
        P.best_fit_decreasing([3, 0, 2], 8)
    with pytest.raises(ValueError, match="row length T"):
        P.greedy_concat([3], 0)
    with pytest.raises(ValueError, match="^packing.py: the packing does not match the documents' lengths$"):
        P.packed_batch(P.greedy_concat([3, 4], 8), [[1, 2, 3], [1, 2]], 0)
    with pytest.raises(ValueError, match="^packing.py: rule must be 'first' or 'best', got 'worst'$"):
        P.fit_decreasing([3], 8, "worst")


def test_main_end_to_end_tiny(tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=?\n", "completion": f"#### {2 * i}"}) + "\n"
                            for i in range(50)))
    out = tmp_path / "run"
    results = P.main(["--n-docs", "300", "--seq-len", "256", "--median-len", "40", "--train-steps", "4",
                      "--batch-size", "8", "--train-seq-len", "64", "--train-median-len", "12", "--n-embd", "32",
                      "--bench-docs", "2000", "--data", str(data), "--out-dir", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert "best-fit decr." in text and "packed / padded" in text and "packing speed" in text
    assert results["max_loss_diff"] < 1e-4                                 # packing did not change training
    assert results["padded"]["real"] == results["packed"]["real"] > 0      # the same real tokens
    assert results["packed"]["computed"] <= results["padded"]["computed"]
    lines, bound = results["sft"]
    assert all(line["rows"] >= bound for line in lines if line["method"] in P.PACKERS)
    assert (out / "metrics.jsonl").exists() and (out / "args.json").exists()
    with pytest.raises(cli.UserError, match="missing.jsonl"):
        P.main(["--data", str(tmp_path / "missing.jsonl"), "--n-docs", "10", "--bench-docs", "0"])


def test_a_training_comparison_whose_weights_pass_the_bound_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """The largest lr allowed (cli.MAX_LR = 1) moves norm gains of 1 by about 1 per Adam step: with the bound
    lowered to 1.5 the first update of the padded run crosses it, and the comparison stops there (one line
    naming the run, the step and the weight; exit 2) instead of printing a table of a diverged model."""
    monkeypatch.setattr(cli, "MAX_WEIGHT", 1.5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli.run(lambda: P.main(["--n-docs", "10", "--bench-docs", "0", "--train-steps", "3", "--batch-size", "4",
                                "--train-seq-len", "32", "--train-median-len", "8", "--n-embd", "32", "--data", "",
                                "--lr", str(cli.MAX_LR), "--out-dir", str(tmp_path / "run"), "--device", "cpu"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("error: padded step 1: weight ") and "past cli.MAX_WEIGHT = 1.5" in err[0], err


def test_demonstration_lengths_read_prompt_completion_and_gsm8k_rows(tmp_path):
    """Byte tokens of prompt + completion + <|endoftext|> = UTF-8 bytes + 1; a GSM8K row's question is the
    prompt and its worked answer the completion (tasks.read_demonstrations)."""
    rows = [{"prompt": "2+2=?\n", "completion": "#### 4"},
            {"question": "Héloïse has 3 apples", "answer": "3\n#### 3"}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    lengths = P.demonstration_lengths(str(data), tokenizer.get_tokenizer("bytes"))
    texts = ["2+2=?\n#### 4", "Héloïse has 3 apples3\n#### 3"]
    assert lengths.tolist() == [len(text.encode("utf-8")) + 1 for text in texts]


@given(median=st.sampled_from([1.0, 48.0, 256.0, 1e6, float(P.MAX_DOC_TOKENS)]),
       sigma=st.sampled_from([0.0, 1.0, 30.0, 300.0]), seed=st.integers(0, 1000))
def test_lognormal_lengths_stay_in_range_and_are_the_rounded_draws_inside_it(median, sigma, seed):
    """However wide the distribution (exp overflows to inf for sigma 300), lengths are in [1, MAX_DOC_TOKENS]
    and are round(exp(N(log median, sigma^2))) wherever that lies in the range."""
    lengths = P.lognormal_lengths(500, median, sigma, np.random.default_rng(seed))
    with np.errstate(over="ignore"):
        draws = np.rint(np.random.default_rng(seed).lognormal(math.log(median), sigma, 500))
    assert lengths.dtype == np.int64 and lengths.min() >= 1 and lengths.max() <= P.MAX_DOC_TOKENS
    inside = (draws >= 1) & (draws <= P.MAX_DOC_TOKENS)
    assert np.array_equal(lengths[inside], draws[inside].astype(np.int64))
    assert np.all(lengths[draws > P.MAX_DOC_TOKENS] == P.MAX_DOC_TOKENS) and np.all(lengths[draws < 1] == 1)


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


GOOD_ROW = b'{"prompt": "1+1=?", "completion": "#### 2"}\n'
# Cheap settings first, so that a case the script wrongly accepted would finish in seconds; each case's own
# options come after them and win.
CHEAP = ["--n-docs", "10", "--bench-docs", "0", "--train-steps", "1", "--batch-size", "2"]
BAD_INPUTS = [   # (argv, what the one line on stderr names: the option, or file:line; files the case's folder holds)
    (["--seq-len", "0"], "--seq-len", {}),
    (["--seq-len", "x"], "--seq-len", {}),
    (["--n-docs", "0"], "--n-docs", {}),
    (["--n-docs", str(10 ** 7 + 1)], "--n-docs", {}),
    (["--median-len", "0"], "--median-len", {}),
    (["--median-len", "nan"], "--median-len", {}),
    (["--median-len", "1e30"], "--median-len", {}),
    (["--sigma", "-1"], "--sigma", {}),
    (["--sigma", "inf"], "--sigma", {}),
    (["--n-docs", "100000", "--sigma", "50"], "--sigma", {}),              # ~1e8 pieces of 2048 tokens
    (["--bench-docs", "1000000", "--sigma", "50"], "--bench-docs", {}),
    (["--batch-size", "0"], "--batch-size", {}),
    (["--batch-size", "100000", "--train-steps", "1000"], "--batch-size", {}),
    (["--bucket-window", "-1"], "--bucket-window", {}),
    (["--train-seq-len", "1"], "--train-seq-len", {}),
    (["--train-median-len", "1"], "--train-median-len", {}),
    (["--train-steps", "0"], "--train-steps", {}),
    (["--n-layer", "-1"], "--n-layer", {}),
    (["--n-embd", "0"], "--n-embd", {}),
    (["--n-head", "0"], "--n-head", {}),
    (["--n-embd", "30"], "--n-embd", {}),                                  # not divisible by 4 heads
    (["--lr", "0"], "--lr", {}),
    (["--lr", "-1"], "--lr", {}),
    (["--lr", "nan"], "--lr", {}),
    (["--lr", "1e308"], "--lr must be <= 1, got 1e+308", {}),           # overflowed inside AdamW: a traceback
    (["--lr", "1e30"], "--lr must be <= 1, got 1e+30", {}),             # trained on to NaN losses, exit 0
    (["--bench-docs", "-1"], "--bench-docs", {}),
    (["--bench-docs", str(10 ** 8)], "--bench-docs", {}),
    (["--out-dir", "file.txt"], "--out-dir", {"file.txt": b"x"}),
    (["--out-dir", "file.txt/run"], "--out-dir", {"file.txt": b"x"}),
    (["--device", "tpu"], "--device", {}),
    (["--device", "cuda:x"], "--device", {}),
    (["--seed", "-1"], "--seed", {}),
    (["--seed", str(2 ** 32)], "--seed", {}),
    (["--data", "missing.jsonl"], "missing.jsonl: no such file", {}),
    (["--data", "empty.jsonl"], "empty.jsonl: empty", {"empty.jsonl": b""}),
    (["--data", "blank.jsonl"], "blank.jsonl: empty", {"blank.jsonl": b"\n  \n"}),
    (["--data", "bad.jsonl"], "bad.jsonl:2", {"bad.jsonl": GOOD_ROW + b'{"prompt": "a",\n'}),
    (["--data", "wrong.jsonl"], "wrong.jsonl:2", {"wrong.jsonl": GOOD_ROW + b'{"prompt": 5, "completion": "b"}\n'}),
    (["--data", "nokey.jsonl"], "nokey.jsonl:1", {"nokey.jsonl": b'{"prompt": "a"}\n'}),
    (["--data", "gsm.jsonl"], "gsm.jsonl:1", {"gsm.jsonl": b'{"question": "q", "answer": 3}\n'}),
    (["--data", "latin.jsonl"], "latin.jsonl:1", {"latin.jsonl": b'{"prompt": "caf\xe9", "completion": "b"}\n'}),
    (["--data", "folder"], "folder: is a directory", {"folder": None}),
    (["--data", "deep.jsonl"], "deep.jsonl:1", {"deep.jsonl": b"[" * 100000 + b"\n"}),
    (["--data", "huge.jsonl"], "huge.jsonl:1",
     {"huge.jsonl": b'{"prompt": "a", "completion": ' + b"1" * 5000 + b"}\n"}),
    (["--data", "array.jsonl"], "array.jsonl:1", {"array.jsonl": b"[1, 2]\n"}),
]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """{case name: (status, stderr, files before, files after)} for every BAD_INPUTS case."""
    cases, before = {}, {}
    for argv, _, files in BAD_INPUTS:
        folder = tmp_path_factory.mktemp("case")
        make_files(folder, files)
        cases[case_name(argv)] = (str(folder), CHEAP + argv)
        before[case_name(argv)] = files_under(folder)
    results = run_script_cases("packing.py", cases)
    return {name: (*results[name], before[name], files_under(cases[name][0])) for name in cases}


@pytest.mark.parametrize("argv, message", [(argv, message) for argv, message, _ in BAD_INPUTS],
                         ids=[case_name(argv) for argv, _, _ in BAD_INPUTS])
def test_every_bad_option_or_data_file_is_one_line_exit_2_and_writes_nothing(bad_input_runs, argv, message):
    status, stderr, before, after = bad_input_runs[case_name(argv)]
    assert status == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    assert message in stderr
    assert after == before                           # no run folder, no args.json, no temp file


@pytest.mark.parametrize("argv", [["--data", "wrong.jsonl"]])
def test_the_case_driver_agrees_with_a_real_process(tmp_path, bad_input_runs, argv):
    """A real `python packing.py` gives the same exit status and stderr as the one-process case driver."""
    make_files(tmp_path, next(files for case, _, files in BAD_INPUTS if case == argv))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "packing.py"), *CHEAP, *argv], capture_output=True,
                            text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert (result.returncode, result.stderr) == bad_input_runs[case_name(argv)][:2]
    assert result.returncode == 2 and "Traceback" not in result.stderr
