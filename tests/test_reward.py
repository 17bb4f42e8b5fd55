"""reward.py: the Bradley-Terry loss against its closed form, padding invariance of the last-token
score, learning a separable preference (and not learning random labels), calibration and per-kind
accuracy against brute force, and the checkpoint round trip."""
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import model as M
import reward as R

finite = st.floats(-20, 20, allow_nan=False)


def tiny_rm(seed=0, n_layer=1, head_scale=1.0):
    torch.manual_seed(seed)
    enc = M.get_tokenizer("bytes")
    body = M.GPT(M.Config(vocab_size=enc.n_vocab, block_size=64, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=32))
    rm = R.RewardModel(body, enc)
    with torch.no_grad():   # a non-zero head, so scores differ between sequences
        rm.head.weight.normal_(0, head_scale)
        rm.head.bias.fill_(0.1)
    return rm.eval()


RM = tiny_rm()


# ---- the loss -------------------------------------------------------------------------------

@given(pairs=st.lists(st.tuples(finite, finite), min_size=1, max_size=16), margin=st.floats(0, 3))
def test_loss_equals_minus_log_sigmoid_of_the_gap(pairs, margin):
    r_c = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    r_r = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    # -log sigmoid(x) = log(1 + exp(-x)) = logaddexp(0, -x), computed by numpy
    expected = np.mean([np.logaddexp(0.0, -(c - r - margin)) for c, r in pairs])
    assert float(R.bradley_terry_loss(r_c, r_r, margin)[0]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(pairs=st.lists(st.tuples(finite, finite), min_size=1, max_size=16), shift=finite)
def test_loss_is_invariant_to_adding_a_constant_to_both_rewards(pairs, shift):
    r_c = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    r_r = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    assert float(R.bradley_terry_loss(r_c + shift, r_r + shift)[0]) == pytest.approx(
        float(R.bradley_terry_loss(r_c, r_r)[0]), rel=1e-7, abs=1e-9)


@given(pairs=st.lists(st.tuples(finite, finite), min_size=1, max_size=16), margin=st.floats(0, 3),
       center=st.floats(0, 0.5))
def test_gradient_is_sigmoid_of_delta_minus_one_plus_the_centring_term(pairs, margin, center):
    r_c = torch.tensor([p[0] for p in pairs], dtype=torch.float64, requires_grad=True)
    r_r = torch.tensor([p[1] for p in pairs], dtype=torch.float64, requires_grad=True)
    R.bradley_terry_loss(r_c, r_r, margin, center)[0].backward()
    B = len(pairs)
    for i, (c, r) in enumerate(pairs):
        sig = 1 / (1 + math.exp(-(c - r - margin)))
        # dL/d delta = sigmoid(delta - m) - 1, and d/dr of c (r_c + r_r)^2 = 2 c (r_c + r_r); mean -> / B
        assert float(r_c.grad[i]) == pytest.approx((sig - 1 + 2 * center * (c + r)) / B, abs=1e-9)
        assert float(r_r.grad[i]) == pytest.approx((1 - sig + 2 * center * (c + r)) / B, abs=1e-9)


def test_zero_head_starts_every_pair_as_a_tie_with_loss_log_2():
    rm = R.RewardModel(tiny_rm().body, M.get_tokenizer("bytes"))
    pairs, _ = R.make_pairs([{"prompt": "1+1=?\n", "chosen": "#### 2", "rejected": "#### 3"}] * 3, rm.enc, 64)
    with torch.no_grad():
        r_c, r_r = R.pair_rewards(rm, pairs, M.BYTE_PAD_ID, "cpu")
    assert float(R.bradley_terry_loss(r_c, r_r)[0]) == pytest.approx(math.log(2), rel=1e-7)
    assert R.pairwise_accuracy(r_c - r_r) == 0.5


# ---- the score: last real token, padding and batch invariant --------------------------------

seqs = st.lists(st.integers(0, 255), min_size=1, max_size=20)


@given(seq=seqs, others=st.lists(seqs, min_size=0, max_size=5), extra_pad=st.integers(1, 10))
def test_score_ignores_padding_after_the_sequence_and_its_batch_mates(seq, others, extra_pad):
    with torch.no_grad():
        alone = RM(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.bool))
        padded = RM(torch.tensor([seq + [M.BYTE_PAD_ID] * extra_pad]),
                    torch.tensor([[True] * len(seq) + [False] * extra_pad]))
        tokens, mask = M.padded_batch(others + [seq], M.BYTE_PAD_ID, "right")
        in_batch = RM(tokens, mask)[-1]
    assert torch.allclose(padded, alone, atol=1e-5, rtol=0)
    assert torch.allclose(in_batch, alone[0], atol=1e-5, rtol=0)


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5))
def test_score_is_the_head_applied_to_the_hidden_state_of_the_last_real_token(lengths):
    """Reference: the body's hidden state of each sequence alone, at index len - 1 (not the first pad)."""
    rng = random.Random(sum(lengths))
    batch = [[rng.randrange(256) for _ in range(n)] for n in lengths]
    tokens, mask = M.padded_batch(batch, M.BYTE_PAD_ID, "right")
    with torch.no_grad():
        got = RM(tokens, mask)
        for i, s in enumerate(batch):
            h = RM.body.hidden(torch.tensor([s]))[0, len(s) - 1]                     # (C,)
            assert float(got[i]) == pytest.approx(float(h @ RM.head.weight[0] + RM.head.bias[0]), abs=1e-5)


# ---- metrics against brute force -------------------------------------------------------------

@given(deltas=st.lists(st.floats(-8, 8), min_size=1, max_size=60), n_bins=st.integers(1, 6))
def test_calibration_matches_a_brute_force_loop(deltas, n_bins):
    rows, ece = R.calibration(torch.tensor(deltas, dtype=torch.float64), n_bins)
    bins = [[] for _ in range(n_bins)]
    for d in deltas:
        q = 1 / (1 + math.exp(-abs(d)))
        b = min(int((q - 0.5) / 0.5 * n_bins), n_bins - 1)   # [0.5, 1] in n_bins equal slices
        bins[b].append((q, 1.0 if d > 0 else 0.5 if d == 0 else 0.0))
    expected_ece = sum(len(v) / len(deltas) * abs(np.mean([a for _, a in v]) - np.mean([q for q, _ in v]))
                       for v in bins if v)
    assert [r["n"] for r in rows] == [len(v) for v in bins]
    assert ece == pytest.approx(expected_ece, abs=1e-9)
    for r, v in zip(rows, bins):
        if v:
            assert r["lo"] - 1e-12 <= r["confidence"] <= r["hi"] + 1e-12


@given(data=st.lists(st.tuples(st.floats(-5, 5), st.sampled_from(["a", "b", "c"])), min_size=1, max_size=40))
def test_accuracy_by_kind_matches_brute_force(data):
    deltas = torch.tensor([d for d, _ in data], dtype=torch.float64)
    got = R.accuracy_by_kind(deltas, [k for _, k in data])
    for kind in {k for _, k in data}:
        ds = [d for d, k in data if k == kind]
        expected = sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in ds) / len(ds)
        assert got[kind] == (pytest.approx(expected), len(ds))


# ---- training: separable preferences are learned, random labels are not ----------------------

def marker_rows(n, seed, random_labels=False):
    """chosen = rejected with a '!' inserted at a random place; lengths vary, so length does not separate."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        base = "".join(rng.choice("0123456789+=\n") for _ in range(rng.randint(3, 10)))
        k = rng.randint(0, len(base))
        chosen, rejected = base[:k] + "!" + base[k:], base
        if random_labels and rng.random() < 0.5:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": f"{rng.randint(10, 99)}+{rng.randint(10, 99)}=?\n", "chosen": chosen,
                     "rejected": rejected, "kind": "marker"})
    return rows


def train_tiny(tmp_path, random_labels):
    M.write_jsonl(tmp_path / "train.jsonl", marker_rows(256, 0, random_labels))
    M.write_jsonl(tmp_path / "test.jsonl", marker_rows(200, 1, random_labels))
    args = R.Args(data=str(tmp_path / "train.jsonl"), test_data=str(tmp_path / "test.jsonl"), init="scratch",
                  out=str(tmp_path / "rm"), n_layer=1, n_head=2, n_embd=32, block_size=64, epochs=3,
                  batch_size=16, lr=3e-3, warmup_steps=5, time_budget=0, log_every=1000, device="cpu")
    return R.train(args), args


def test_separable_preference_reaches_near_perfect_heldout_accuracy(tmp_path):
    results, args = train_tiny(tmp_path, random_labels=False)
    assert results["start_accuracy"] == 0.5
    assert results["test_accuracy"] >= 0.95
    assert results["test_margin"] > 1.0
    rows = [__import__("json").loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows if r.get("kind") == "eval"] == [0, 1, 2, 3]   # eval each epoch


def test_random_labels_stay_near_chance(tmp_path):
    results, _ = train_tiny(tmp_path, random_labels=True)
    # 200 held-out pairs: chance has standard deviation 0.035; 0.5 +/- 0.15 is > 4 sigma
    assert 0.35 <= results["test_accuracy"] <= 0.65


# ---- checkpoint round trip and errors ---------------------------------------------------------

def test_checkpoint_round_trip_preserves_scores_exactly(tmp_path):
    rm = tiny_rm(seed=3)
    prompts = ["12+30=?\n", "7+5=?\n", "100+1=?\n"]
    completions = ["2+0=2\n1+3=4\n#### 42", "#### 12", "no answer"]
    before = rm.score(prompts, completions)
    R.save_reward_model(str(tmp_path / "rm.pt"), rm)
    loaded = R.load_reward_model(str(tmp_path / "rm.pt"))
    assert torch.equal(loaded.score(prompts, completions), before)
    assert torch.equal(loaded.head.weight, rm.head.weight)


def test_a_policy_checkpoint_is_not_a_reward_model(tmp_path):
    M.save(str(tmp_path / "policy.pt"), tiny_rm().body, M.get_tokenizer("bytes"))
    with pytest.raises(M.UserError, match="policy.pt"):
        R.load_reward_model(str(tmp_path / "policy.pt"))


def test_a_missing_explicit_input_is_an_error_naming_it(tmp_path):
    args = R.Args(data=str(tmp_path / "nope.jsonl"), init="scratch", out=str(tmp_path / "rm"), device="cpu")
    with pytest.raises(M.UserError, match="nope.jsonl"):
        R.train(args)
    assert not (tmp_path / "rm").exists()   # nothing half-written
