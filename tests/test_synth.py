"""Tests for synth.py: every property is checked against something independent of the generators:
Python's own integer arithmetic on the prompt read back, model.py's verifier, closed forms
(a wrong column k moves the answer by delta * 10^k), brute-force counts and binomial bounds."""
import json
import math
import os
import random
import re
import sys
from collections import Counter

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import model as M
import synth as S

SEEDS = st.integers(0, 2 ** 32 - 1)
FAMILY = st.sampled_from(S.FAMILIES)
DIFFICULTY = st.integers(1, S.MAX_DIFFICULTY)
WORD_OPS = {"buys": "+", "finds": "+", "gets": "+", "gives away": "-", "loses": "-", "sells": "-"}


def solve(prompt: str) -> int:
    """The answer read back from the question text with Python integers (no step writer involved)."""
    m = re.fullmatch(r"(\d+)([-+*])(\d+)=\?\n", prompt)
    if m:
        a, op, b = int(m[1]), m[2], int(m[3])
        return {"+": a + b, "-": a - b, "*": a * b}[op]
    m = re.fullmatch(r"[A-Z][a-z]+ has (\d+) ([a-z]+)\. (.*) How many \2 now\?\n", prompt)
    value = int(m[1])
    for sentence in re.findall(r"(?:She|He) ([^.]*)\.", m[3]):
        if sentence == "doubles them":
            value *= 2
            continue
        verb, n = re.fullmatch(r"([a-z ]+?) (\d+)(?: more)?", sentence).groups()
        value = value + int(n) if WORD_OPS[verb] == "+" else value - int(n)
    return value


def wrong_steps(completion: str) -> list[int]:
    """Indices of the steps whose left side does not evaluate to the right side (model.py's parser)."""
    return [k for k, (lhs, rhs) in enumerate(M.step_lines(completion)) if M.arith(lhs) != int(rhs)]


def small_args(tmp_path, *extra):
    return ["--out-dir", str(tmp_path / "data"), "--n-sft", "120", "--n-sft-test", "20", "--n-rl", "60",
            "--n-test", "40", "--n-prefs", "60", "--n-prefs-test", "30", "--n-diagnostic", "10", *extra]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python synth.py` with every default (it takes about a second), into a temporary folder."""
    out = tmp_path_factory.mktemp("synth") / "data"
    result = S.main(["--out-dir", str(out)])
    return out, result


# -- the families: generators, verifiers, steps ------------------------------------------------

@given(seed=SEEDS, family=FAMILY, d=DIFFICULTY, delta=st.integers(-1000, 1000).filter(bool))
def test_every_example_passes_its_verifier_and_a_perturbed_answer_fails(seed, family, d, delta):
    problem = S.DRAW[family](random.Random(seed), d)
    assert problem.answer == solve(problem.prompt) >= 0
    worked = S.demonstration(problem, "worked", random.Random(seed))
    bare = S.demonstration(problem, "bare", random.Random(seed))
    assert M.completion_style(worked) == "worked" and S.verify(worked, problem.answer)
    assert M.completion_style(bare) == "bare" and bare == f"#### {problem.answer}" and S.verify(bare, problem.answer)
    assert not S.verify(worked, problem.answer + delta) and not M.is_correct(bare, problem.answer + delta)
    perturbed = worked.rpartition("#### ")[0] + f"#### {problem.answer + delta}"
    assert not S.verify(perturbed, problem.answer)


@given(seed=SEEDS, family=FAMILY, d=DIFFICULTY)
def test_noisy_demo_has_exactly_one_wrong_step_carried_through(seed, family, d):
    problem = S.DRAW[family](random.Random(seed), d)
    noisy = S.demonstration(problem, "noisy", random.Random(seed))
    assert M.completion_style(noisy) == "wrong_step" and not S.verify(noisy, problem.answer)
    [k] = wrong_steps(noisy)                                   # exactly one wrong step
    steps = M.step_lines(noisy)
    delta = int(steps[k][1]) - M.arith(steps[k][0])
    assert abs(delta) == 1
    final = int(M.extract_answer(noisy))
    if family == "word":  # carried through: the next step starts from the wrong value, doublings scale it
        if k + 1 < len(steps):
            assert steps[k + 1][0].startswith(steps[k][1])
        doublings = sum(lhs.endswith("*2") for lhs, _ in steps[k + 1:])
        assert final - problem.answer == delta * 2 ** doublings
    else:                 # column algorithms: closed form, a wrong column k moves the answer by delta 10^k
        assert final - problem.answer == delta * 10 ** k


@given(seed=SEEDS, family=FAMILY, d=DIFFICULTY)
def test_steps_are_local_and_short(seed, family, d):
    problem = S.DRAW[family](random.Random(seed), d)
    worked = S.demonstration(problem, "worked", random.Random(seed))
    for lhs, _ in M.step_lines(worked):
        numbers = [int(x) for x in re.findall(r"\d+", lhs)]
        if family in ("add", "sub"):
            assert max(numbers) <= 19                          # digits, a borrowed 1x, a carry
        elif family == "mul":
            assert all(len(p) == 3 for p in re.findall(r"\d+\*\d+", lhs))   # one-digit products only
        elif lhs.endswith("*2"):
            assert numbers[0] <= 20                            # doubling a small number
        else:
            assert numbers[1] <= 9                             # 2-digit +- 1-digit
    if d <= 4:
        assert len(worked) <= 80
    assert len((problem.prompt + worked).encode()) < 256


@pytest.mark.parametrize("family", ["add", "sub", "mul"])
def test_space_size_is_the_number_of_distinct_prompts_at_difficulty_1(family):
    rng = random.Random(0)
    prompts = {S.DRAW[family](rng, 1).prompt for _ in range(3000)}
    assert len(prompts) == S.space_size(family, 1)    # 3000 draws miss one of <= 100 with p < 1e-10


def test_worked_examples_match_the_documented_format():
    add = S.Problem("357+486=?\n", 843, "add", 3, (357, 486))
    sub = S.Problem("357-186=?\n", 171, "sub", 3, (357, 186))
    mul = S.Problem("47*38=?\n", 1786, "mul", 3, (47, 38))
    word = S.Problem("", 14, "word", 2, (12, (("+", 7), ("-", 5))))
    rng = random.Random(0)
    assert S.demonstration(add, "worked", rng) == "7+6=13\n5+8+1=14\n3+4+1=8\n#### 843"
    assert S.demonstration(sub, "worked", rng) == "7-6=1\n15-8=7\n3-1-1=1\n#### 171"
    assert S.demonstration(mul, "worked", rng) == "7*8=56\n7*3+4*8+5=58\n4*3+5=17\n#### 1786"
    assert S.demonstration(word, "worked", rng) == "12+7=19\n19-5=14\n#### 14"


# -- the answer extractor (model.py's, shared by every stage) -----------------------------------

def test_extractor_reads_plain_and_gsm8k_answers():
    gsm8k = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
             "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
    assert M.extract_answer("#### 42") == "42"
    assert M.extract_answer(gsm8k) == "72" and S.verify(gsm8k, "72") and S.verify(gsm8k, 72)
    assert M.extract_answer("so the total is\n#### 1,234") == "1234" and M.is_correct("#### 1,234", 1234)
    assert M.extract_answer("no answer here") is None and not S.verify("no answer here", 0)
    assert not M.is_correct("#### 71", "72")


# -- styles, sizes, splits -----------------------------------------------------------------------

@settings(max_examples=10)
@given(seed=SEEDS, shares=st.lists(st.integers(0, 10), min_size=3, max_size=3).filter(any),
       n=st.integers(50, 300))
def test_style_shares_match_the_requested_ones_and_labels_match_the_verifier(seed, shares, n):
    mix = ",".join(f"{s}={w}" for s, w in zip(S.STYLES, shares))
    args = M.parse_args(S.Args, ["--seed", str(seed), "--mix", mix, "--n-sft", str(n), "--n-rl", "20",
                                 "--n-test", "20", "--n-prefs", "10", "--n-prefs-test", "10", "--n-diagnostic", "2"])
    rows = S.build_dataset(args)["sft_train"]
    assert len(rows) == n
    counts = Counter(r["style"] for r in rows)
    for style, weight in zip(S.STYLES, shares):
        p = weight / sum(shares)
        assert abs(counts[style] / n - p) <= 3 * math.sqrt(p * (1 - p) / n) + 1 / n   # binomial bound
    expected = {"worked": "worked", "bare": "bare", "noisy": "wrong_step"}
    for r in rows:
        assert r["answer"] == str(solve(r["prompt"]))
        assert M.completion_style(r["completion"]) == expected[r["style"]]
        assert S.verify(r["completion"], r["answer"]) == (r["style"] != "noisy")


def test_default_run_sizes_ranges_and_disjoint_splits(default_run):
    out, _ = default_run
    d = S.Args()
    files = {name: M.read_jsonl(str(out / f"{name}.jsonl")) for name in
             ("sft_train", "sft_test", "prefs_train", "prefs_test", "rl_train", "rl_test")}
    sizes = {"sft_train": d.n_sft, "sft_test": d.n_sft_test, "prefs_train": d.n_prefs, "rl_train": d.n_rl,
             "prefs_test": d.n_prefs_test + 2 * d.n_diagnostic, "rl_test": d.n_test}
    assert {name: len(rows) for name, rows in files.items()} == sizes
    prompts = {name: [r["prompt"] for r in rows] for name, rows in files.items()}
    for name, ps in prompts.items():
        assert len(set(ps)) == len(ps), name                  # no repeats inside a split
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not set(prompts[a]) & set(prompts[b]), (a, b)
    ranges = {"sft": S.parse_range(d.sft_difficulty, ""), "rl_train": S.parse_range(d.rl_difficulty, ""),
              "rl_test": S.parse_range(d.test_difficulty, ""), "prefs": S.parse_range(d.pref_difficulty, "")}
    for name, rows in files.items():
        allowed = ranges.get(name, ranges.get(name.split("_")[0]))
        assert {r["difficulty"] for r in rows} == set(allowed), name
    assert all(set(r) == {"prompt", "answer", "family", "difficulty"} for r in files["rl_test"])
    per_d = Counter(r["difficulty"] for r in files["rl_test"])
    assert max(per_d.values()) - min(per_d.values()) <= len(S.FAMILIES)   # held-out spread evenly
    config = json.loads((out / "synth_config.json").read_text())
    assert config["args"]["n_sft"] == d.n_sft and config["counts"]["sft_train"]["rows"] == d.n_sft
    assert config["counts"]["sft_train"]["style"] == dict(Counter(r["style"] for r in files["sft_train"]))


def test_preference_pairs_chosen_correct_rejected_as_labelled(default_run):
    out, _ = default_run
    rows = M.read_jsonl(str(out / "prefs_train.jsonl")) + M.read_jsonl(str(out / "prefs_test.jsonl"))
    assert {r["kind"] for r in rows} == set(S.PREF_KINDS) | set(S.DIAGNOSTIC_KINDS)
    assert not {r["kind"] for r in M.read_jsonl(str(out / "prefs_train.jsonl"))} & set(S.DIAGNOSTIC_KINDS)
    for r in rows:
        chosen, rejected, answer = r["chosen"], r["rejected"], int(r["answer"])
        assert answer == solve(r["prompt"]) and S.verify(chosen, answer) and M.completion_style(chosen) == "worked"
        style = M.completion_style(rejected)
        if r["kind"] == "off_by_one":
            assert style == "worked" and abs(int(M.extract_answer(rejected)) - answer) == 1
        elif r["kind"] == "wrong_step":
            assert style == "wrong_step" and len(wrong_steps(rejected)) == 1 and not S.verify(rejected, answer)
        elif r["kind"] == "bad_format":
            assert style == "no_answer" and str(answer) in rejected.splitlines()[-1]
        elif r["kind"] == "length_only":    # same lines plus one repeated step: longer, equally correct
            assert S.verify(rejected, answer) and len(rejected) > len(chosen)
            extra = Counter(rejected.splitlines()) - Counter(chosen.splitlines())
            assert sum(extra.values()) == 1 and list(extra)[0] in chosen.splitlines()
        else:                               # format_only: only whitespace differs
            assert S.verify(rejected, answer) and rejected != chosen
            assert re.sub(r"\s", "", rejected) == re.sub(r"\s", "", chosen)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    S.main(small_args(tmp_path / "a"))
    S.main(small_args(tmp_path / "b"))
    S.main(small_args(tmp_path / "c", "--seed", "1"))
    read = lambda run: (tmp_path / run / "data" / "sft_train.jsonl").read_bytes()
    assert read("a") == read("b") != read("c")


@pytest.mark.parametrize("bad", [["--mix", "worked=x"], ["--mix", "lazy=1"], ["--sft-difficulty", "0-3"],
                                 ["--rl-difficulty", "4-2"], ["--families", "add,div"],
                                 ["--families", "sub", "--test-difficulty", "1", "--n-test", "56"],
                                 ["--n-sft", "-5"], ["--n-test", "0"], ["--n-diagnostic", "-1"]])
def test_bad_options_raise_one_clear_error_and_write_nothing(tmp_path, bad):
    with pytest.raises(M.UserError, match="--|unused distinct prompts"):
        S.main(small_args(tmp_path, *bad))
    assert not (tmp_path / "data").exists()


@given(n=st.integers(0, 500), capacities=st.lists(st.integers(0, 200), min_size=1, max_size=12))
def test_allocate_is_even_and_capped(n, capacities):
    assume(n <= sum(capacities))
    counts = S.allocate(n, capacities)
    assert sum(counts) == n and all(0 <= c <= cap for c, cap in zip(counts, capacities))
    for c, cap in zip(counts, capacities):      # a cell with room left is never 2 below another cell
        if c < cap:
            assert max(counts) - c <= 1


@given(n=st.integers(0, 1000), weights=st.lists(st.floats(0.01, 10), min_size=1, max_size=6))
def test_exact_counts_sum_to_n_and_round_each_share(n, weights):
    shares = {str(i): w / sum(weights) for i, w in enumerate(weights)}
    counts = S.exact_counts(n, shares)
    assert sum(counts.values()) == n and all(abs(counts[k] - n * p) < 1 for k, p in shares.items())


# -- filtering model data: dedup, distinct-n, rejection sampling --------------------------------

def test_dedup_removes_exact_and_near_duplicates_and_keeps_distinct_items():
    base = "7+6=13\n5+8+1=14\n3+4+1=8\n#### 843"
    near = base.replace("3+4+1=8", "3+4+1=8 ")          # one trailing space: J = 26/31 (brute count)
    distinct = "9*9=81\n#### 81"
    other = "Ann has 12 apples. She buys 7 more."
    texts = [base, base, near, distinct, other, distinct, base]
    assert S.jaccard(S.char_ngrams(base, 3), S.char_ngrams(near, 3)) == 26 / 31
    assert S.dedup(texts, 3, 0.8) == [0, 3, 4]
    assert S.dedup([base, near], 3, 1.0) == [0, 1]           # threshold 1: only exact copies go
    assert S.dedup([base, distinct, other], 3, 0.8) == [0, 1, 2]


@given(texts=st.lists(st.text("ab12+=\n", max_size=12), max_size=12), n=st.integers(1, 4),
       threshold=st.floats(0.3, 1.0))
def test_dedup_keeps_no_near_pair_and_drops_only_near_duplicates(texts, n, threshold):
    kept = S.dedup(texts, n, threshold)
    shingles = [S.char_ngrams(t, n) for t in texts]
    brute_j = lambda i, j: len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j])
    for a in range(len(kept)):
        for b in range(a + 1, len(kept)):
            assert texts[kept[a]] != texts[kept[b]] and brute_j(kept[a], kept[b]) < threshold
    for i in set(range(len(texts))) - set(kept):   # every dropped text has an earlier kept near-twin
        assert any(j < i and (texts[j] == texts[i] or brute_j(i, j) >= threshold) for j in kept)


@given(texts=st.lists(st.text("ab1+=* \n", max_size=15), max_size=8), n=st.integers(1, 4))
def test_distinct_n_equals_a_brute_force_count(texts, n):
    grams = []
    for text in texts:
        tokens = S.tokens_of(text)
        for i in range(len(tokens) - n + 1):
            grams.append(tokens[i:i + n])
    unique = []
    for g in grams:                                # O(N^2) membership, no hashing
        if all(g != u for u in unique):
            unique.append(g)
    assert S.distinct_n(texts, n) == (len(unique) / len(grams) if grams else 0.0)
    assert S.tokens_of("12+7=19\n#### 19") == ["12", "+", "7", "=", "19", "#", "#", "#", "#", "19"]


def test_filter_samples_keeps_verified_unique_worked_completions():
    rows = [{"prompt": "2+3=?\n", "answer": "5", "difficulty": 1, "family": "add"},
            {"prompt": "12+13=?\n", "answer": "25", "difficulty": 2, "family": "add"}]
    good0, good1 = "2+3=5\n#### 5", "2+3=5\n#### 5 "           # exact and near duplicate
    samples = [(0, good0, True), (0, good0, True), (0, good1, True),
               (0, "2+3=6\n#### 5", True),                       # right answer, wrong step: rejected
               (0, "#### 5", True),                             # bare: rejected unless --keep-bare
               (0, "2+3=5\n#### 5", False),                     # truncated: rejected
               (1, "2+3=5\n1+1=2\n#### 25", True), (1, "3+2=5\n1+1=2\n#### 26", True)]
    args = S.Args()
    kept, counts = S.filter_samples(rows, samples, args, random.Random(0))
    assert sorted(r["completion"] for r in kept) == sorted([good0, "2+3=5\n1+1=2\n#### 25"])
    assert counts == {"sampled": 8, "verified": 4, "deduplicated": 2, "kept": 2}
    kept, _ = S.filter_samples(rows, samples, S.Args(keep_bare=True), random.Random(0))
    assert "#### 5" in [r["completion"] for r in kept]


def test_balance_by_difficulty_caps_each_difficulty_at_an_equal_share():
    rows = [{"difficulty": d} for d, n in ((1, 50), (2, 10), (3, 0), (4, 3)) for _ in range(n)]
    counts = Counter(r["difficulty"] for r in S.balance_by_difficulty(rows, random.Random(0)))
    assert counts == {1: 21, 2: 10, 4: 3}                      # cap = ceil(63 / 3)


def tiny_checkpoint(path):
    torch.manual_seed(0)
    policy = M.GPT(M.Config(n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    M.save(str(path), policy, M.get_tokenizer("bytes"))
    return str(path)


def test_batched_greedy_sampling_matches_one_prompt_at_a_time(tmp_path):
    policy, enc, _ = M.load(tiny_checkpoint(tmp_path / "tiny.pt"))
    prompts = ["7+6=?\n", "357+486=?\n", "Ann has 12 apples. She buys 7 more. How many apples now?\n", "9*9=?\n"]
    batched = S.sample_completions(policy, enc, prompts, 2, 0.0, 12, batch_size=8)
    alone = []
    for i, p in enumerate(prompts):                           # one sequence per generate() call, no padding
        alone += [(i, text, done) for _, text, done in S.sample_completions(policy, enc, [p], 2, 0.0, 12, 1)]
    assert [i for i, _, _ in batched] == [0, 0, 1, 1, 2, 2, 3, 3] and batched == alone


def test_from_model_writes_only_verified_rows(tmp_path, monkeypatch):
    data = tmp_path / "data"
    S.main(small_args(tmp_path))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "model_sft.jsonl"
    argv = ["--from-model", ckpt, "--prompts", str(data / "rl_train.jsonl"), "--n-prompts", "6", "--k", "2",
            "--max-new-tokens", "8", "--out", str(out), "--device", "cpu"]
    result = S.main(argv)                                      # a random model: real sampling, batched
    assert result["counts"]["sampled"] == 12
    assert not out.exists() or all(S.verify(r["completion"], r["answer"]) for r in M.read_jsonl(str(out)))

    def oracle(policy, enc, prompts, k, *rest, **kw):          # a model that solves every other prompt
        samples = []
        for i, p in enumerate(prompts):
            a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=\?\n", p).groups()
            problem = S.Problem(p, 0, {"+": "add", "-": "sub", "*": "mul"}[op], 0, (int(a), int(b)))
            text = S.format_completion(*S.worked_steps(problem)) if i % 2 == 0 else "1+1=2\n#### -1"
            samples += [(i, text, True)] * k
        return samples

    monkeypatch.setattr(S, "sample_completions", oracle)
    prompts = tmp_path / "arith.jsonl"
    M.write_jsonl(str(prompts), [r for r in M.read_jsonl(str(data / "rl_train.jsonl")) if r["family"] != "word"])
    result = S.main(argv[:2] + ["--prompts", str(prompts)] + argv[4:])
    kept = M.read_jsonl(str(out))
    assert all(S.verify(r["completion"], r["answer"]) and r["source"] == "model" for r in kept)
    assert result["counts"]["verified"] == 6 and result["counts"]["deduplicated"] == 3   # k copies -> 1


def test_self_train_rounds_train_on_unfiltered_samples(tmp_path):
    data = tmp_path / "data"
    S.main(small_args(tmp_path))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    fake_sft = tmp_path / "fake_sft.py"                       # stands in for sft.py: checks its inputs
    fake_sft.write_text(
        "import argparse, json, os, shutil\n"
        "p = argparse.ArgumentParser(); [p.add_argument(f) for f in ('--init', '--data', '--out', '--max-steps')]\n"
        "a, _ = p.parse_known_args()\n"
        "rows = [json.loads(l) for l in open(a.data)]\n"
        "assert rows and all('prompt' in r and 'completion' in r for r in rows)\n"
        "os.makedirs(a.out, exist_ok=True); shutil.copy(a.init, os.path.join(a.out, 'model.pt'))\n")
    result = S.main(["--from-model", ckpt, "--prompts", str(data / "rl_train.jsonl"), "--n-prompts", "4",
                     "--k", "2", "--max-new-tokens", "6", "--out", str(tmp_path / "o.jsonl"), "--device", "cpu",
                     "--self-train-rounds", "2", "--self-train-dir", str(tmp_path / "self"),
                     "--sft-script", str(fake_sft), "--eval-data", str(data / "rl_test.jsonl"), "--n-eval", "4"])
    table = result["rounds"]
    assert [r["round"] for r in table] == [0, 1, 2]
    for r in (1, 2):                                          # every sample, unfiltered: n_prompts * k rows
        assert len(M.read_jsonl(str(tmp_path / "self" / f"round{r}.jsonl"))) == 8
    assert all(0 <= r["heldout_acc"] <= 1 and 0 <= r["distinct_2"] <= 1 for r in table)
