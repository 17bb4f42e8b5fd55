"""reward.py: the Bradley-Terry loss against its closed form, padding invariance of the last-token
score, learning a separable preference (and not learning random labels), calibration and per-kind
accuracy against brute force, and the checkpoint round trip."""
import dataclasses
import hashlib
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import model as M
from lib import checkpoints, cli, stages, tasks, tokenizer
from badinput import (bad_jsonl_cases, check_one_line_error, file_case, hostile_checkpoint,
                      nan_weights_checkpoint, option_case, run_case, run_in_process, run_script, truncated_checkpoint,
                      write_bad_input)
import reward as R
import sft

finite = st.floats(-20, 20, allow_nan=False)


def tiny_rm(seed=0, n_layer=1, head_scale=1.0):
    torch.manual_seed(seed)
    enc = tokenizer.get_tokenizer("bytes")
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


@given(pairs=st.lists(st.tuples(finite, finite, st.booleans()), min_size=1, max_size=16), margin=st.floats(0, 3))
def test_bradley_terry_loss_agrees_with_losses_in_loss_gradient_and_stats(pairs, margin):
    """reward.bradley_terry_loss (no centring term) and losses.bradley_terry_loss are two accepted copies."""
    losses = pytest.importorskip("losses")
    pairs = [(c, c if tie else r) for c, r, tie in pairs]           # exact ties included
    chosen = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    rejected = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    ours_c, theirs_c = chosen.clone().requires_grad_(True), chosen.clone().requires_grad_(True)
    ours, our_stats = R.bradley_terry_loss(ours_c, rejected, margin)
    theirs, their_stats = losses.bradley_terry_loss(theirs_c, rejected, margin)
    ours.backward()
    theirs.backward()
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-12, abs=1e-12)
    assert torch.allclose(ours_c.grad, theirs_c.grad, rtol=1e-12, atol=1e-15)
    assert set(our_stats) == set(their_stats) == {"accuracy", "margin"}
    for name in our_stats:
        assert float(our_stats[name]) == pytest.approx(float(their_stats[name]), rel=1e-12, abs=1e-12)


def test_zero_head_starts_every_pair_as_a_tie_with_loss_log_2():
    rm = R.RewardModel(tiny_rm().body, tokenizer.get_tokenizer("bytes"))
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


@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=7), batch_size=st.integers(1, 4))
def test_score_of_texts_is_the_forward_of_each_encoded_pair_alone(lengths, batch_size):
    """The text API, in batches of any size (and the default), against one forward per sequence."""
    rng = random.Random(sum(lengths) + batch_size)
    prompts = [f"{rng.randrange(100)}+{rng.randrange(100)}=?\n" for _ in lengths]
    completions = ["".join(rng.choice("0123456789 #\n") for _ in range(n)) for n in lengths]
    with torch.no_grad():
        alone = [RM(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.bool))[0]
                 for seq in (R.encode_pair(RM.enc, p, c) for p, c in zip(prompts, completions))]
    for got in (RM.score(prompts, completions, batch_size=batch_size), RM.score(prompts, completions)):
        assert got.shape == (len(lengths),)
        torch.testing.assert_close(got, torch.stack(alone), atol=1e-5, rtol=0)


# ---- metrics against brute force -------------------------------------------------------------

@given(deltas=st.lists(st.floats(-8, 8), min_size=1, max_size=60), n_bins=st.integers(1, 6))
@example(deltas=[math.log(3), -math.log(3), 0.5108256237659907, 1.9459101490553132, 40.0, -40.0, 0.0], n_bins=4)
def test_calibration_matches_a_brute_force_loop(deltas, n_bins):
    """The example puts confidences exactly on the bin edges 0.625, 0.75 and 0.875 (each belongs to the bin
    above it) and at 1.0 (sigmoid(40) in float64: the last bin includes its upper edge)."""
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


def test_calibration_has_five_bins_by_default():
    rows, _ = R.calibration(torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64))
    assert [(r["lo"], r["hi"]) for r in rows] == [(0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0)]


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
    tasks.write_jsonl(tmp_path / "train.jsonl", marker_rows(256, 0, random_labels))
    tasks.write_jsonl(tmp_path / "test.jsonl", marker_rows(200, 1, random_labels))
    args = R.Args(data=str(tmp_path / "train.jsonl"), test_data=str(tmp_path / "test.jsonl"), init="scratch",
                  out=str(tmp_path / "rm"), n_layer=1, n_head=2, n_embd=32, block_size=64, epochs=3,
                  batch_size=16, lr=3e-3, warmup_steps=5, time_budget=0, log_every=1000, device="cpu")
    return R.train(args), args


def test_separable_preference_reaches_near_perfect_heldout_accuracy(tmp_path):
    results, args = train_tiny(tmp_path, random_labels=False)
    assert results["start_accuracy"] == 0.5
    # over 8 seeds (train/test rows and the run's seed varied together): accuracy 1.0 in every run; margin
    # 3.83-4.47, mean 4.26, std 0.21, so 1.0 is mean - 16 std (the untrained head scores 0.5 and margin ~0)
    assert results["test_accuracy"] >= 0.95
    assert results["test_margin"] > 1.0
    rows = [__import__("json").loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows if r.get("kind") == "eval"] == [0, 1, 2, 3]   # eval each epoch


def test_random_labels_stay_near_chance(tmp_path):
    results, _ = train_tiny(tmp_path, random_labels=True)
    # 200 held-out pairs: chance has standard deviation 0.035; 0.5 +/- 0.15 is > 4 sigma. Measured over 8 seeds
    # (rows and run seed varied together): 0.425-0.525, mean 0.48, std 0.04; both bounds >= 3.3 std away
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
    checkpoints.save(str(tmp_path / "policy.pt"), tiny_rm().body, tokenizer.get_tokenizer("bytes"))
    with pytest.raises(cli.UserError, match="policy.pt"):
        R.load_reward_model(str(tmp_path / "policy.pt"))


def test_a_missing_explicit_input_is_an_error_naming_it(tmp_path):
    args = R.Args(data=str(tmp_path / "nope.jsonl"), init="scratch", out=str(tmp_path / "rm"), device="cpu")
    with pytest.raises(cli.UserError, match="nope.jsonl"):
        R.train(args)
    assert not (tmp_path / "rm").exists()   # nothing half-written


# ---- a non-finite loss or gradient stops the run before the update ---------------------------------

ENC = tokenizer.get_tokenizer("bytes")


def write_inputs(folder):
    """A tiny SFT-like body checkpoint and small train/test pair files (the marker task)."""
    checkpoints.save(str(folder / "policy.pt"), tiny_rm(seed=7).body, ENC)
    tasks.write_jsonl(folder / "train.jsonl", marker_rows(32, 0))
    tasks.write_jsonl(folder / "test.jsonl", marker_rows(16, 1))


def small_args(folder, **overrides):
    args = dict(data=str(folder / "train.jsonl"), test_data=str(folder / "test.jsonl"), init=str(folder / "policy.pt"),
                out=str(folder / "rm"), epochs=1, batch_size=8, time_budget=0, log_every=1000, device="cpu")
    return R.Args(**(args | overrides))


def cli_argv(args):
    """The command line of an R.Args: every field as its flag (stages.stage_command) minus the script."""
    return stages.stage_command("x.py", **asdict(args))[1:]


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_the_run_at_its_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys, poison):
    write_inputs(tmp_path)
    (tmp_path / "rm").mkdir()
    R.save_reward_model(str(tmp_path / "rm" / "model.pt"), tiny_rm(seed=3))   # the last good checkpoint
    before = digest(tmp_path / "rm" / "model.pt")
    finite_loss = R.bradley_terry_loss
    calls = []

    def poisoned_loss(r_chosen, r_rejected, *rest):
        calls.append(1)
        loss, stats = finite_loss(r_chosen, r_rejected, *rest)
        if len(calls) < 3:                           # steps 1 and 2 are fine, step 3 is not
            return loss, stats
        if poison == "loss":
            return loss * math.inf, stats
        # a finite loss whose gradient is NaN: d sqrt(x)/dx = inf at x = 0, times the outer 0
        return loss + 0.0 * (r_chosen - r_chosen.detach()).sqrt().sum(), stats
    monkeypatch.setattr(R, "bradley_terry_loss", poisoned_loss)
    with pytest.raises(SystemExit) as stopped:
        cli.run(lambda: R.main(cli_argv(small_args(tmp_path))))
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: step 3: " + ("loss is inf" if poison == "loss" else "grad_norm is nan")), err
    assert digest(tmp_path / "rm" / "model.pt") == before
    assert not cli.non_finite_tensors(R.load_reward_model(str(tmp_path / "rm" / "model.pt")).state_dict())


def test_an_update_that_takes_a_weight_past_the_bound_stops_the_run_and_keeps_the_last_good_checkpoint(
        tmp_path, capsys):
    """--lr 1 (cli.MAX_LR) and --weight-decay 1e6 (its own bound) with no warmup: AdamW multiplies every matrix
    by 1 - 1e6 at the first update, while the loss and gradient are finite. The run stops at that update with
    one line naming the weight (cli.check_weights), exit 2; the folder's last good model.pt is untouched."""
    write_inputs(tmp_path)
    (tmp_path / "rm").mkdir()
    R.save_reward_model(str(tmp_path / "rm" / "model.pt"), tiny_rm(seed=3))   # the last good checkpoint
    before = digest(tmp_path / "rm" / "model.pt")
    args = small_args(tmp_path, lr=cli.MAX_LR, weight_decay=1e6, warmup_steps=0)
    with pytest.raises(SystemExit) as stopped:
        cli.run(lambda: R.main(cli_argv(args)))
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith("error: step 1: weight ") and "past cli.MAX_WEIGHT" in err[0], err
    assert digest(tmp_path / "rm" / "model.pt") == before


@pytest.mark.parametrize("lr", ["1e308", "1e30", "1.5"])
def test_an_lr_past_max_lr_is_one_line_naming_it_before_anything_is_written(tmp_path, capsys, lr):
    write_inputs(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        cli.run(lambda: R.main(cli_argv(small_args(tmp_path)) + ["--lr", lr]))
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and err == [f"error: --lr must be <= {cli.MAX_LR:g}, got {float(lr)}"], err
    assert not (tmp_path / "rm").exists()


@given(peak=st.floats(1e-5, 1e-1), warmup=st.integers(0, 50), ratio=st.floats(0, 1), step=st.integers(0, 300),
       progress=st.floats(0, 2))
def test_lr_schedule_closed_form_and_the_same_as_sft(peak, warmup, ratio, step, progress):
    """Warmup linear in (step + 1) / warmup; cosine from the peak (progress 0) to peak * ratio (progress >= 1),
    their mean at 1/2: the schedule sft.py documents, and its values."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    assert math.isclose(R.lr_at(step, 0.0, peak, warmup, ratio), peak * warm)
    assert math.isclose(R.lr_at(step, 0.5, peak, warmup, ratio), peak * warm * (1 + ratio) / 2)
    assert math.isclose(R.lr_at(step, 1.0, peak, warmup, ratio), peak * warm * ratio, abs_tol=1e-15)
    assert R.lr_at(step, 2.0, peak, warmup, ratio) == R.lr_at(step, 1.0, peak, warmup, ratio)
    assert math.isclose(R.lr_at(step, progress, peak, warmup, ratio), sft.lr_at(step, progress, peak, warmup, ratio),
                        rel_tol=1e-12, abs_tol=1e-18)


# ---- inputs and the upstream commands ----------------------------------------------------------------

def test_pairs_are_read_with_their_margins_and_kinds(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d",
                                                              "margin": 2, "kind": "x"}]
    tasks.write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert R.read_pairs(str(tmp_path / "pairs.jsonl")) == rows
    pairs, skipped = R.make_pairs(rows, ENC, 64, default_margin=0.5)
    assert [(p[2], p[3]) for p in pairs] == [(0.5, "all"), (2.0, "x")] and skipped == 0
    assert [p[2] for p in R.make_pairs(rows, ENC, 64)[0]] == [0.0, 2.0]           # no margin given: 0


def test_a_pair_is_kept_when_its_longer_sequence_fills_the_context_and_skipped_and_counted_past_it():
    """The reward is read at the last of a sequence's L tokens (no shift as in SFT): L <= block_size fits."""
    fits = {"prompt": "p", "chosen": "abc", "rejected": "a"}
    size = len(R.encode_pair(ENC, "p", "abc"))
    too_long = {"prompt": "p", "chosen": "a", "rejected": "abcd"}
    pairs, skipped = R.make_pairs([too_long, fits, too_long, fits], ENC, size)
    assert len(pairs) == 2 and skipped == 2
    assert pairs[0][0] == R.encode_pair(ENC, "p", "abc") and len(pairs[0][0]) == size


def test_each_upstream_command_parses_with_its_targets_parser_and_makes_the_default_path():
    synth, sft = pytest.importorskip("synth"), pytest.importorskip("sft")
    defaults = R.Args()
    for command, target in ((R.synth_command(), synth), (R.sft_command(), sft)):
        assert command[0] == os.path.basename(target.__file__)
        cli.parse_args(target.Args, command[1:])              # the target's own parser accepts it
    out_dir = cli.parse_args(synth.Args, R.synth_command()[1:]).out_dir
    assert os.path.join(out_dir, "prefs_train.jsonl") == defaults.data
    assert os.path.join(out_dir, "prefs_test.jsonl") == defaults.test_data
    assert os.path.join(cli.parse_args(sft.Args, R.sft_command()[1:]).out, "model.pt") == defaults.init


def test_a_missing_default_input_runs_the_command_its_builder_makes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                              # no data/, no runs/: every default is missing
    ran = []

    def run_stage(command, echo=True):
        ran.append(command)
        raise cli.UserError("stop here")
    monkeypatch.setattr(stages, "run_stage", run_stage)
    with pytest.raises(cli.UserError, match="stop here"):
        R.train(R.Args(device="cpu"))
    assert ran == [R.synth_command()]
    write_inputs(tmp_path)
    ran.clear()
    with pytest.raises(cli.UserError, match="stop here"):
        R.train(R.Args(device="cpu", data="train.jsonl", test_data="test.jsonl"))
    assert ran == [R.sft_command()]
    assert not os.path.exists(R.Args().out)


# ---- every option is checked before anything is read or written ----------------------------------------

#: values each option must refuse (the parser already refuses nan/inf text; these reach check_args directly)
BAD_OPTIONS = {
    "data": [""], "test_data": [""], "init": [""], "out": [""], "n_layer": [-1, 10 ** 10], "n_head": [0, -2],
    "n_embd": [0, 10 ** 10], "block_size": [0, -1], "epochs": [0, -1, 10 ** 400], "batch_size": [0, 10 ** 10],
    "lr": [0.0, -1e-3, math.nan, 2.0, 1e39], "warmup_steps": [-1, 10 ** 400], "min_lr_ratio": [-0.1, 1.5, math.nan],
    "weight_decay": [-0.1, math.nan, 1e300], "grad_clip": [-1.0, 1e300], "margin": [-1.0, math.nan, 1e300],
    "center_coef": [-0.01, 1e300], "time_budget": [-1.0, math.nan, 1e308], "max_test": [-1], "n_bins": [0, 10 ** 6],
    "log_every": [0, -10], "device": ["tpu", "", "cuda:abc", "cuda:99"], "seed": [-1, 2 ** 32],
}


def test_every_option_has_bad_values_in_the_table():
    """A new option must come with the values it refuses: every field but the booleans is listed."""
    assert {f.name for f in dataclasses.fields(R.Args) if f.type not in (bool, "bool")} == set(BAD_OPTIONS)


@pytest.mark.parametrize("name,value", [(name, value) for name, values in BAD_OPTIONS.items() for value in values])
def test_each_bad_option_is_refused_by_name_before_any_input_is_read(tmp_path, name, value):
    missing = str(tmp_path / "missing")    # inputs that do not exist: the option must be refused first
    args = dataclasses.replace(R.Args(data=missing, test_data=missing, init="scratch", out=str(tmp_path / "rm"),
                                      device="cpu"), **{name: value})
    with pytest.raises(cli.UserError, match="--" + name.replace("_", "-")):
        R.train(args)
    assert os.listdir(tmp_path) == []


def test_a_scratch_body_that_cannot_be_built_is_refused_by_its_option():
    R.check_args(R.Args(device="cpu"))
    with pytest.raises(cli.UserError, match="--init scratch: n_embd=30 must be divisible by n_head=4"):
        R.check_args(R.Args(device="cpu", init="scratch", n_embd=30, n_head=4))
    # 12 L C^2 = 12 * 1e6 * 1e8 = 1.2e15 parameters: no machine has the 17 PiB to train it
    with pytest.raises(cli.UserError, match="--init scratch: a body of about 1.20e\\+15 parameters"):
        R.check_args(R.Args(device="cpu", init="scratch", n_layer=10 ** 6, n_embd=10 ** 4, n_head=4))


# ---- the bad-input table: `python reward.py` on each kind of bad input -----------------------------------
# Each case runs either as a real `python reward.py` subprocess ("cli": the kinds issue 18 lists) or through
# cli.run(reward.main) in this process ("in-process": the same assertions without ~1.5 s of torch import).
# Either way: exit status 2, exactly one line on stderr naming the file:line or the option, no traceback, and
# no file written in the case's folder (the working directory, which also holds --out).

PAIR_ROW = b'{"prompt": "1+1=?\\n", "chosen": "#### 2", "rejected": "#### 3"}\n'


CHECKPOINTS = {"missing": lambda source, path: None, "directory": lambda source, path: os.mkdir(path),
               "truncated": truncated_checkpoint, "hostile": hostile_checkpoint, "NaN weights": nan_weights_checkpoint,
               "not a checkpoint": lambda source, path: open(path, "wb").write(PAIR_ROW)}


def checkpoint_case(flag, source, kind):
    def make(folder, inputs):
        path = str(folder / "bad.pt")
        CHECKPOINTS[kind](str(inputs / source), path)
        return [flag, path], path
    return make


def reward_cases():
    """[(case id, "cli" | "in-process", make(case folder, valid inputs) -> (extra argv, text the error names))]"""
    cases = []
    jsonl = bad_jsonl_cases(PAIR_ROW, b'{"prompt": "1+1=?\\n", "chosen": "#### 2"}\n',
                            b'{"prompt": "1+1=?\\n", "chosen": 2, "rejected": "#### 3"}\n')
    for kind, (content, where) in jsonl.items():
        cases.append((f"--data {kind}", "cli", file_case("--data", "bad.jsonl", content, where)))
        cases.append((f"--test-data {kind}", "in-process", file_case("--test-data", "bad.jsonl", content, where)))
    margins = {"a string": b'"1"', "NaN": b"NaN", "Infinity": b"Infinity", "a 400-digit integer": b"9" * 400,
               "1e300": b"1e300", "true": b"true"}
    for kind, margin in margins.items():
        row = b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": ' + margin + b"}\n"
        cases.append((f"--data margin {kind}", "in-process", file_case("--data", "bad.jsonl", PAIR_ROW + row, ":2")))
    long_pair = b'{"prompt": "' + b"x" * 100 + b'", "chosen": "a", "rejected": "b"}\n'
    cases.append(("--data every pair longer than the context", "in-process",
                  file_case("--data", "long.jsonl", long_pair)))
    for kind in CHECKPOINTS:
        via = "cli" if kind in ("truncated", "hostile") else "in-process"
        cases.append((f"--init {kind}", via, checkpoint_case("--init", "policy.pt", kind)))
    cli_options = [["--lr", "nan"], ["--lr", "-1"], ["--seed", "-1"], ["--epochs", "0"], ["--batch-size", "0"],
                   ["--time-budget", "nan"], ["--log-every", "0"], ["--n-head", "0"]]
    other_options = [["--lr", "1e39"], ["--n-layer", "-1"], ["--min-lr-ratio", "2"], ["--weight-decay", "-1"],
                     ["--margin", "1e300"], ["--device", "tpu"], ["--max-test", "-1"], ["--n-bins", "0"],
                     ["--epochs", "9" * 5000], ["--init", ""]]
    for via, options in (("cli", cli_options), ("in-process", other_options)):
        for argv in options:
            cases.append((" ".join(argv)[:40], via, option_case(argv, argv[0])))
    cases.append(("--init scratch --n-embd 30", "in-process",
                  option_case(["--init", "scratch", "--n-embd", "30", "--n-head", "4"], "--init scratch")))
    cases.append(("--out is a file", "in-process",
                  lambda folder, inputs: (["--out", write_bad_input(folder, "taken", b"a file\n")], "--out")))
    return cases


REWARD_CASES = reward_cases()


def reward_base_argv(inputs, folder):
    """Every input explicit and tiny, so no upstream stage is ever built; --out inside the case's folder."""
    return ["--data", str(inputs / "train.jsonl"), "--test-data", str(inputs / "test.jsonl"),
            "--init", str(inputs / "policy.pt"), "--out", str(folder / "rm"), "--epochs", "1", "--batch-size", "8",
            "--time-budget", "0", "--log-every", "1000", "--device", "cpu"]


@pytest.fixture(scope="module")
def reward_valid_inputs(tmp_path_factory):
    inputs = tmp_path_factory.mktemp("valid_inputs")
    write_inputs(inputs)
    return inputs


@pytest.fixture(scope="module")
def reward_cli_runs(reward_valid_inputs, tmp_path_factory):
    """The "cli" cases, each a `python reward.py` in its own folder, a few at a time."""
    root = tmp_path_factory.mktemp("reward_cli_cases")
    cli_cases = [(number, case_id, make) for number, (case_id, via, make) in enumerate(REWARD_CASES) if via == "cli"]

    def run(case):
        number, case_id, make = case
        folder = root / f"case{number}"
        folder.mkdir()
        return case_id, run_case(make, folder, reward_valid_inputs, reward_base_argv, run_script(R.__file__))
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return dict(pool.map(run, cli_cases))


@pytest.mark.parametrize("case_id", [case_id for case_id, via, _ in REWARD_CASES if via == "cli"])
def test_python_reward_py_on_bad_input_is_one_line_exit_2_and_writes_nothing(reward_cli_runs, case_id):
    check_one_line_error(*reward_cli_runs[case_id])


@pytest.mark.parametrize("case_id,make", [(case_id, make) for case_id, via, make in REWARD_CASES
                                          if via == "in-process"])
def test_reward_main_on_bad_input_is_one_line_exit_2_and_writes_nothing(reward_valid_inputs, tmp_path, monkeypatch,
                                                                       capsys, case_id, make):
    check_one_line_error(*run_case(make, tmp_path, reward_valid_inputs, reward_base_argv,
                                   run_in_process(R.main, monkeypatch, capsys)))


def test_the_bad_input_table_passes_on_valid_input(reward_valid_inputs, tmp_path, monkeypatch):
    """The table's base command line is itself good: with no bad input it trains and exits 0, so every
    failure above is the bad input's."""
    monkeypatch.chdir(tmp_path)
    results = R.main(reward_base_argv(reward_valid_inputs, tmp_path))
    assert results["steps"] == 4 and (tmp_path / "rm" / "model.pt").exists()
