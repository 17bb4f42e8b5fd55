"""Tests for synth.py: every property is checked against something independent of the generators:
Python's own integer arithmetic on the prompt read back, model.py's verifier, closed forms
(a wrong column k moves the answer by delta * 10^k), brute-force counts and binomial bounds."""
import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import model as M
from lib import checkpoints, cli, interpreter, rundir, tasks, tokenizer
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
    return [k for k, (lhs, rhs) in enumerate(tasks.step_lines(completion)) if tasks.arith(lhs) != int(rhs)]


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
    assert tasks.completion_style(worked) == "worked" and S.verify(worked, problem.answer)
    assert tasks.completion_style(bare) == "bare" and bare == f"#### {problem.answer}" and S.verify(bare, problem.answer)
    assert not S.verify(worked, problem.answer + delta) and not tasks.is_correct(bare, problem.answer + delta)
    perturbed = worked.rpartition("#### ")[0] + f"#### {problem.answer + delta}"
    assert not S.verify(perturbed, problem.answer)


@given(seed=SEEDS, family=FAMILY, d=DIFFICULTY)
def test_noisy_demo_has_exactly_one_wrong_step_carried_through(seed, family, d):
    problem = S.DRAW[family](random.Random(seed), d)
    noisy = S.demonstration(problem, "noisy", random.Random(seed))
    assert tasks.completion_style(noisy) == "wrong_step" and not S.verify(noisy, problem.answer)
    [k] = wrong_steps(noisy)                                   # exactly one wrong step
    steps = tasks.step_lines(noisy)
    delta = int(steps[k][1]) - tasks.arith(steps[k][0])
    assert abs(delta) == 1
    final = int(tasks.extract_answer(noisy))
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
    for lhs, _ in tasks.step_lines(worked):
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
    assert tasks.extract_answer("#### 42") == "42"
    assert tasks.extract_answer(gsm8k) == "72" and S.verify(gsm8k, "72") and S.verify(gsm8k, 72)
    assert tasks.extract_answer("so the total is\n#### 1,234") == "1234" and tasks.is_correct("#### 1,234", 1234)
    assert tasks.extract_answer("no answer here") is None and not S.verify("no answer here", 0)
    assert not tasks.is_correct("#### 71", "72")


# -- styles, sizes, splits -----------------------------------------------------------------------

@settings(max_examples=10)
@given(seed=SEEDS, shares=st.lists(st.integers(0, 10), min_size=3, max_size=3).filter(any),
       n=st.integers(50, 300))
def test_style_shares_match_the_requested_ones_and_labels_match_the_verifier(seed, shares, n):
    mix = ",".join(f"{s}={w}" for s, w in zip(S.STYLES, shares))
    args = cli.parse_args(S.Args, ["--seed", str(seed), "--mix", mix, "--n-sft", str(n), "--n-rl", "20",
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
        assert tasks.completion_style(r["completion"]) == expected[r["style"]]
        assert S.verify(r["completion"], r["answer"]) == (r["style"] != "noisy")


def test_default_run_sizes_ranges_and_disjoint_splits(default_run):
    out, _ = default_run
    d = S.Args()
    files = {name: tasks.read_jsonl(str(out / f"{name}.jsonl")) for name in
             ("sft_train", "sft_test", "prefs_train", "prefs_test", "rl_train", "rl_test")}
    untrained = [kind for kind in S.PREF_KINDS if kind not in S.parse_mix(d.pref_mix, S.PREF_KINDS, "")]
    sizes = {"sft_train": d.n_sft, "sft_test": d.n_sft_test, "prefs_train": d.n_prefs, "rl_train": d.n_rl,
             "prefs_test": d.n_prefs_test + (2 + len(untrained)) * d.n_diagnostic, "rl_test": d.n_test}
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
    rows = tasks.read_jsonl(str(out / "prefs_train.jsonl")) + tasks.read_jsonl(str(out / "prefs_test.jsonl"))
    assert {r["kind"] for r in rows} == set(S.PREF_KINDS) | set(S.DIAGNOSTIC_KINDS)
    assert not {r["kind"] for r in tasks.read_jsonl(str(out / "prefs_train.jsonl"))} & set(S.DIAGNOSTIC_KINDS)
    for r in rows:
        chosen, rejected, answer = r["chosen"], r["rejected"], int(r["answer"])
        assert answer == solve(r["prompt"]) and S.verify(chosen, answer) and tasks.completion_style(chosen) == "worked"
        style = tasks.completion_style(rejected)
        if r["kind"] == "bare":             # the right answer, no work: the strategy is what is rejected
            assert style == "bare" and S.verify(rejected, answer) and rejected == f"#### {answer}"
        elif r["kind"] == "bare_wrong":     # a wrong answer of the same length, no work
            assert style == "bare" and not tasks.is_correct(rejected, answer)
            assert len(tasks.extract_answer(rejected)) == len(str(answer))
        elif r["kind"] == "wrong_answer":   # every step right, the final answer wrong (same length)
            assert style == "worked" and not tasks.is_correct(rejected, answer)
            assert rejected.splitlines()[:-1] == chosen.splitlines()[:-1]
            assert len(tasks.extract_answer(rejected)) == len(str(answer))
        elif r["kind"] == "off_by_one":
            assert style == "worked" and abs(int(tasks.extract_answer(rejected)) - answer) == 1
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
    with pytest.raises(cli.UserError, match="--|unused distinct prompts"):
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
    checkpoints.save(str(path), policy, tokenizer.get_tokenizer("bytes"))
    return str(path)


def test_batched_greedy_sampling_matches_one_prompt_at_a_time(tmp_path):
    policy, enc, _ = checkpoints.load(tiny_checkpoint(tmp_path / "tiny.pt"))
    prompts = ["7+6=?\n", "357+486=?\n", "Ann has 12 apples. She buys 7 more. How many apples now?\n", "9*9=?\n"]
    batched, n_batched = S.sample_completions(policy, enc, prompts, 2, 0.0, 12, batch_size=8)
    alone, n_alone = [], 0
    for i, p in enumerate(prompts):                           # one sequence per generate() call, no padding
        samples, n = S.sample_completions(policy, enc, [p], 2, 0.0, 12, 1)
        alone += [(i, text, done) for _, text, done in samples]
        n_alone += n
    assert [i for i, _, _ in batched] == [0, 0, 1, 1, 2, 2, 3, 3] and batched == alone
    assert n_batched == n_alone and 8 <= n_batched <= 8 * 12     # 1 to 12 new tokens per completion


def test_from_model_writes_only_verified_rows(tmp_path, monkeypatch):
    data = tmp_path / "data"
    S.main(small_args(tmp_path))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "model_sft.jsonl"
    argv = ["--from-model", ckpt, "--prompts", str(data / "rl_train.jsonl"), "--n-prompts", "6", "--k", "2",
            "--max-new-tokens", "8", "--out", str(out), "--device", "cpu"]
    result = S.main(argv)                                      # a random model: real sampling, batched
    assert result["counts"]["sampled"] == 12 and 12 <= result["sampled_tokens"] <= 12 * 8
    assert not out.exists() or all(S.verify(r["completion"], r["answer"]) for r in tasks.read_jsonl(str(out)))

    def oracle(policy, enc, prompts, k, *rest, **kw):          # a model that solves every other prompt
        samples = []
        for i, p in enumerate(prompts):
            a, op, b = re.fullmatch(r"(\d+)([-+*])(\d+)=\?\n", p).groups()
            problem = S.Problem(p, 0, {"+": "add", "-": "sub", "*": "mul"}[op], 0, (int(a), int(b)))
            text = S.format_completion(*S.worked_steps(problem)) if i % 2 == 0 else "1+1=2\n#### -1"
            samples += [(i, text, True)] * k
        return samples, sum(len(text) for _, text, _ in samples)

    monkeypatch.setattr(S, "sample_completions", oracle)
    prompts = tmp_path / "arith.jsonl"
    tasks.write_jsonl(str(prompts), [r for r in tasks.read_jsonl(str(data / "rl_train.jsonl")) if r["family"] != "word"])
    result = S.main(argv[:2] + ["--prompts", str(prompts)] + argv[4:])
    kept = tasks.read_jsonl(str(out))
    assert all(S.verify(r["completion"], r["answer"]) and r["source"] == "model" for r in kept)
    assert result["counts"]["verified"] == 6 and result["counts"]["deduplicated"] == 3   # k copies -> 1
    assert not (tmp_path / ".lock").exists() and not (data / ".lock").exists()   # no lock file left behind


def test_defaults_come_from_model_py():
    assert S.Args().max_new_tokens == tasks.MAX_NEW_TOKENS
    assert S.dataset_command("data") == ["synth.py", "--out-dir", "data"]
    assert cli.parse_args(S.Args, S.dataset_command(os.path.dirname(S.Args().prompts))[1:]) == S.Args()


def test_no_filter_writes_every_sample_and_a_summary_that_matches_the_file(tmp_path):
    data = tmp_path / "data"
    S.main(small_args(tmp_path))
    out = tmp_path / "samples" / "all.jsonl"
    summary = S.main(["--from-model", tiny_checkpoint(tmp_path / "tiny.pt"), "--prompts", str(data / "rl_train.jsonl"),
                      "--n-prompts", "5", "--k", "3", "--max-new-tokens", "8", "--out", str(out), "--no-filter",
                      "--device", "cpu"])
    rows = tasks.read_jsonl(str(out))
    prompts = {r["prompt"]: r["answer"] for r in tasks.read_jsonl(str(data / "rl_train.jsonl"))}
    assert len(rows) == 15 and all(c == 3 for c in Counter(r["prompt"] for r in rows).values())
    assert all(prompts[r["prompt"]] == r["answer"] and r["source"] == "model_unfiltered" for r in rows)
    assert not all(S.verify(r["completion"], r["answer"]) for r in rows)     # a random model: unverified rows kept
    on_disk = json.loads((tmp_path / "samples" / "all.summary.json").read_text())
    assert on_disk["counts"] == summary["counts"] and summary["counts"]["written"] == 15
    texts = [r["completion"] for r in rows]
    for n in (1, 2, 3):                                     # the summary describes exactly the file beside it
        assert on_disk["distinct_n"]["samples"][n - 1] == on_disk["distinct_n"]["written"][n - 1] == S.distinct_n(texts, n)
    assert on_disk["sampled_pass"] == sum(r["finished"] and S.verify(r["completion"], r["answer"]) for r in rows) / 15


def test_from_model_reads_gsm8k_rows_and_skips_prompts_longer_than_the_context(tmp_path, capsys):
    prompts = tmp_path / "gsm8k.jsonl"
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 1,072"
    tasks.write_jsonl(str(prompts), [{"question": f"Natalia sold clips to {n} friends. How many?\n", "answer": solution}
                                     for n in range(3)] + [{"question": "x" * 400, "answer": "#### 5"}])
    out = tmp_path / "out.jsonl"
    S.main(["--from-model", tiny_checkpoint(tmp_path / "tiny.pt"), "--prompts", str(prompts), "--k", "2",
            "--max-new-tokens", "8", "--out", str(out), "--no-filter", "--device", "cpu"])
    assert f"{prompts}: skipped 1 of 4 prompts longer than the context" in capsys.readouterr().out
    rows = tasks.read_jsonl(str(out))
    assert len(rows) == 6 and {r["answer"] for r in rows} == {"1072"}       # the number after the last ####
    assert {r["prompt"] for r in rows} == {f"Natalia sold clips to {n} friends. How many?\n" for n in range(3)}


# -- bad input: one line, exit 2, no traceback, no file written ---------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good and bad inputs for --from-model, in a folder of their own (the tests write elsewhere)."""
    folder = tmp_path_factory.mktemp("inputs")
    ckpt = tiny_checkpoint(folder / "tiny.pt")
    blob = open(ckpt, "rb").read()
    (folder / "truncated.pt").write_bytes(blob[:len(blob) // 2])
    (folder / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (folder / "ckpt_dir").mkdir()
    torch.save({"config": {"n_layer": 48, "n_embd": 8192}, "model": {}}, folder / "hostile.pt")
    lines = {"good": '{"prompt": "2+3=?\\n", "answer": "5", "difficulty": 1}\n',
             "empty": "", "not_json": '{"prompt": "2+3=?\\n", "answer": "5"}\n{"prompt": oops}\n',
             "missing_key": '{"prompt": "2+3=?\\n"}\n', "wrong_type": '{"prompt": 5, "answer": "5"}\n',
             "bad_difficulty": '{"prompt": "2+3=?\\n", "answer": "5", "difficulty": "hard"}\n',
             "no_final_answer": '{"question": "How many?", "answer": "they had some\\n#### "}\n',
             "deep": "[" * 100000 + "\n", "huge": '{"prompt": "1+1=?\\n", "answer": ' + "9" * 5000 + "}\n",
             "over_long": json.dumps({"prompt": "1+" * 200 + "1=?\n", "answer": "201"}) + "\n"}
    for name, text in lines.items():
        (folder / f"{name}.jsonl").write_text(text)
    (folder / "non_utf8.jsonl").write_bytes(b'{"prompt": "\xff\xfe", "answer": "1"}\n')
    (folder / "prompts_dir.jsonl").mkdir()
    (folder / "a_file").write_text("")
    return folder


OPTION_CASES = [  # (extra argv, the option the error names)
    (["--seed", "-1"], "--seed"), (["--seed", str(2 ** 32)], "--seed"), (["--seed", "x"], "--seed"),
    (["--n-sft", "-5"], "--n-sft"), (["--n-test", "0"], "--n-test"), (["--n-diagnostic", "-1"], "--n-diagnostic"),
    (["--n-examples", "-1"], "--n-examples"), (["--k", "0"], "--k"), (["--n-prompts", "0"], "--n-prompts"),
    (["--batch-size", "0"], "--batch-size"), (["--ngram", "0"], "--ngram"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"), (["--temperature", "nan"], "--temperature"),
    (["--temperature", "1e-300"], "--temperature"), (["--jaccard", "1.5"], "--jaccard"), (["--jaccard", "nan"], "--jaccard"),
    (["--threads", "-1"], "--threads"),
    (["--mix", "worked=x"], "--mix"), (["--mix", "lazy=1"], "--mix"), (["--mix", "worked=0"], "--mix"),
    (["--test-mix", ""], "--test-mix"), (["--pref-mix", "off_by_one=-1"], "--pref-mix"),
    (["--sft-difficulty", "0-3"], "--sft-difficulty"), (["--rl-difficulty", "4-2"], "--rl-difficulty"),
    (["--test-difficulty", "7"], "--test-difficulty"), (["--pref-difficulty", "x"], "--pref-difficulty"),
    (["--families", "add,div"], "--families"), (["--families", ""], "--families"), (["--device", "tpu"], "--device"),
    (["--families", "sub", "--test-difficulty", "1", "--n-test", "56"], "--n-test"), (["--no-such-option"], "--no-such"),
]


def run_cli(argv, capsys):
    """`python synth.py ARGV` in this process: cli.run turns a UserError into one line and exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: S.main(argv))
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code, err, names):
    assert code == 2 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and names in err, err


@pytest.mark.parametrize("bad, names", OPTION_CASES, ids=[" ".join(c[0]) or "empty" for c in OPTION_CASES])
def test_a_bad_option_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, bad, names):
    code, err = run_cli(small_args(tmp_path, *bad), capsys)
    assert_one_line_error(code, err, names)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, names", OPTION_CASES[:17], ids=[" ".join(c[0]) for c in OPTION_CASES[:17]])
def test_a_bad_option_with_from_model_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, inputs, bad, names):
    argv = ["--from-model", str(inputs / "tiny.pt"), "--prompts", str(inputs / "good.jsonl"), "--device", "cpu",
            "--out", str(tmp_path / "out" / "model.jsonl"), *bad]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, names)
    assert list(tmp_path.iterdir()) == []


INPUT_CASES = [  # (--from-model file, --prompts file, what the error names: the file, and its line when it has one)
    ("missing.pt", "good.jsonl", "missing.pt"), ("truncated.pt", "good.jsonl", "truncated.pt"),
    ("garbage.pt", "good.jsonl", "garbage.pt"), ("ckpt_dir", "good.jsonl", "ckpt_dir"),
    ("hostile.pt", "good.jsonl", "hostile.pt"),
    ("tiny.pt", "missing.jsonl", "missing.jsonl"), ("tiny.pt", "empty.jsonl", "empty.jsonl"),
    ("tiny.pt", "not_json.jsonl", "not_json.jsonl:2"), ("tiny.pt", "missing_key.jsonl", "missing_key.jsonl:1"),
    ("tiny.pt", "wrong_type.jsonl", "wrong_type.jsonl:1"), ("tiny.pt", "bad_difficulty.jsonl", "bad_difficulty.jsonl:1"),
    ("tiny.pt", "no_final_answer.jsonl", "no_final_answer.jsonl:1"), ("tiny.pt", "non_utf8.jsonl", "non_utf8.jsonl:1"),
    ("tiny.pt", "deep.jsonl", "deep.jsonl:1"), ("tiny.pt", "huge.jsonl", "huge.jsonl:1"),
    ("tiny.pt", "prompts_dir.jsonl", "prompts_dir.jsonl"), ("tiny.pt", "over_long.jsonl", "over_long.jsonl"),
]


@pytest.mark.parametrize("ckpt, prompts, names", INPUT_CASES, ids=[f"{c[0]}-{c[1]}" for c in INPUT_CASES])
def test_a_bad_input_file_is_one_line_naming_it_exit_2_and_writes_nothing(tmp_path, capsys, inputs, ckpt, prompts, names):
    argv = ["--from-model", str(inputs / ckpt), "--prompts", str(inputs / prompts), "--max-new-tokens", "16",
            "--device", "cpu", "--out", str(tmp_path / "out" / "model.jsonl")]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, str(inputs / names))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("outputs, names", [
    (["--out-dir", "{inputs}/a_file"], "--out-dir"), (["--out-dir", "{inputs}/a_file/data"], "--out-dir"),
    (["--from-model", "{inputs}/tiny.pt", "--out", "{inputs}/ckpt_dir"], "--out"),
    (["--from-model", "{inputs}/tiny.pt", "--out", "{inputs}/a_file/x.jsonl"], "--out"),
    (["--from-model", "{inputs}/tiny.pt", "--out", "{tmp}/x.jsonl", "--summary", "{tmp}/x.jsonl"], "--summary"),
    (["--from-model", "{inputs}/tiny.pt", "--out", "{tmp}/x.jsonl", "--summary", "{inputs}/ckpt_dir"], "--summary"),
    (["--from-model", "{inputs}/tiny.pt", "--prompts", ""], "--prompts")])
def test_an_output_path_that_cannot_be_written_is_refused_before_anything_is_read(tmp_path, capsys, inputs, outputs,
                                                                                   names):
    argv = [a.format(inputs=inputs, tmp=tmp_path) for a in outputs]
    code, err = run_cli(small_args(tmp_path)[2:] + argv, capsys)    # no --out-dir of small_args: the case's own
    assert_one_line_error(code, err, names)
    assert list(tmp_path.iterdir()) == []


def test_an_out_dir_holding_a_folder_where_a_data_file_goes_is_refused(tmp_path, capsys):
    (tmp_path / "data" / "rl_test.jsonl").mkdir(parents=True)
    code, err = run_cli(small_args(tmp_path), capsys)
    assert_one_line_error(code, err, "--out-dir")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["rl_test.jsonl"]


# -- one writer per folder, and a set of files written whole or not at all -----------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD_FOLDER = "import sys; from lib import rundir; rundir.claim_run_dir(sys.argv[1], lock_file=False); print('claimed', flush=True); sys.stdin.read()"


def files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def test_a_second_writer_on_a_claimed_folder_is_refused_and_writes_nothing(tmp_path, capsys, inputs):
    data = tmp_path / "data"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOLDER, str(data)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "claimed"          # process 1 holds the folder
        before = files_of(data)
        second = subprocess.run([sys.executable, "synth.py", *small_args(tmp_path)], cwd=ROOT, capture_output=True,
                                text=True, timeout=300)               # process 2: `python synth.py` on it
        assert_one_line_error(second.returncode, second.stderr, f"{data}: another process is writing")
        code, err = run_cli(["--from-model", str(inputs / "tiny.pt"), "--prompts", str(inputs / "good.jsonl"),
                             "--device", "cpu", "--out", str(data / "model.jsonl")], capsys)   # and this one
        assert_one_line_error(code, err, f"{data}: another process is writing")
        assert files_of(data) == before == {}                         # and the holder left no lock file
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


KILLED_MIDWAY = """
import os, signal, sys
import synth as S
from lib import rundir
argv = sys.argv[1:]
S.main(argv)                                          # the previous set (seed 0)
opened, real = [], rundir.atomic_write
def dying(path, mode="w"):                            # killed after 3 files are complete under their temporary
    opened.append(path)                               # names, while the 4th is begun
    if len(opened) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, mode)
rundir.atomic_write = dying
S.main(argv + ["--seed", "1"])
"""


def test_a_run_killed_while_writing_leaves_the_previous_set_whole(tmp_path):
    folder = tmp_path / "run" / "data"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_MIDWAY, *small_args(tmp_path / "run")], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert killed.wait(timeout=300) == -9, killed.stderr.read()
    S.main(small_args(tmp_path / "ref"))                              # the seed-0 set, written on its own
    reference, left = files_of(tmp_path / "ref" / "data"), files_of(folder)
    temps = [name for name in left if name.endswith(".tmp")]
    assert len(temps) == 3 and all(name.endswith(f".{killed.pid}.tmp") for name in temps)   # 3 complete, unrenamed
    for name in (f"{n}.jsonl" for n in S.DATA_FILES):
        assert left[name] == reference[name], name                    # every data file is still seed 0's
    assert json.loads(left["synth_config.json"])["args"]["seed"] == 0
    S.main(small_args(tmp_path / "run", "--seed", "1"))               # the next writer: a whole seed-1 set
    after = files_of(folder)
    assert not [name for name in after if name.endswith(".tmp")]      # the dead writer's temporary files are gone
    assert all(after[f"{n}.jsonl"] != reference[f"{n}.jsonl"] for n in S.DATA_FILES)


def test_a_run_failing_while_writing_leaves_the_previous_set_whole_and_no_temporary_file(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    S.main(small_args(tmp_path))
    before = files_of(folder)
    opened, real = [], rundir.atomic_write

    def disk_full(path, mode="w"):
        opened.append(path)
        if len(opened) == 5:
            raise OSError(28, "No space left on device", path)
        return real(path, mode)

    monkeypatch.setattr(rundir, "atomic_write", disk_full)
    with pytest.raises(cli.UserError, match="No space left on device"):
        S.main(small_args(tmp_path, "--seed", "1"))
    assert len(opened) == 5 and files_of(folder) == before            # 4 files written, none renamed into place


# -- Countdown: the solver and the files (the expression verifier's tests: tests/test_tasks.py) --------

from itertools import combinations, combinations_with_replacement, product  # noqa: E402

def reachable(numbers) -> set:
    """An independent brute force (the classic search, not synth's subset DP): pick any two values, replace
    them by a + b, a * b, a - b (a > b) or a / b (b divides a), recurse; every value seen on the way."""
    seen = set()

    def search(values):
        seen.update(values)
        for i, j in product(range(len(values)), repeat=2):
            if i == j:
                continue
            a, b = values[i], values[j]
            rest = [v for k, v in enumerate(values) if k not in (i, j)]
            for result in (a + b, a * b, a - b if a > b else None, a // b if a % b == 0 else None):
                if result is not None:
                    search(rest + [result])

    search(list(numbers))
    return seen


def fewest_numbers(numbers, target) -> int:
    """The size of the smallest sub-multiset whose brute-force reach holds the target."""
    return min(len(subset) for r in range(1, len(numbers) + 1) for subset in
               set(combinations(numbers, r))
               if target in reachable(subset))


@settings(max_examples=15)
@given(numbers=st.lists(st.integers(1, 9), min_size=2, max_size=4).map(lambda v: tuple(sorted(v))))
def test_the_solver_reaches_exactly_what_brute_force_reaches_and_every_answer_verifies(numbers):
    solutions = S.countdown_solutions(numbers)
    assert set(solutions) == reachable(numbers)
    for target in S.countdown_targets(numbers):
        assert 1 <= target <= S.COUNTDOWN_MAX_TARGET and target not in numbers
        lines, expression = S.countdown_steps(numbers, target)
        completion = S.format_completion(lines, expression)
        assert tasks.expression_hits_target(completion, list(numbers), target)
        assert tasks.completion_style(completion) == "worked" and S.verify(completion, target, list(numbers))
        assert len(lines) + 1 == fewest_numbers(numbers, target)  # the demonstration uses the fewest numbers


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_countdown_space_size_is_the_number_of_distinct_solvable_prompts(d):
    prompts = 0
    if 2 <= d <= 4:
        for numbers in combinations_with_replacement(range(1, 10), d):
            targets = {t for t in reachable(numbers) if 1 <= t <= 99 and t not in numbers}
            prompts += len(targets) if len(targets) >= 2 else 0     # one-target sets are not drawn
    assert S.countdown_space_size(d) == prompts


def countdown_argv(tmp_path, *extra):
    return ["--families", "countdown", "--out-dir", str(tmp_path / "data"), "--n-sft", "90", "--n-sft-test", "12",
            "--n-rl", "30", "--n-test", "20", "--sft-difficulty", "2-3", "--rl-difficulty", "3",
            "--test-difficulty", "2-3", "--mix", "worked=1,bare=1,noisy=1", "--n-examples", "0", *extra]


def test_countdown_rows_are_solvable_labelled_and_in_their_own_files(tmp_path):
    S.main(small_args(tmp_path, "--n-examples", "0"))             # the headline task's set, in the same folder
    before = files_of(tmp_path / "data")
    S.main(countdown_argv(tmp_path))
    after = files_of(tmp_path / "data")
    assert all(after[name] == blob for name, blob in before.items())   # the headline files are untouched
    names = {"sft_train": 90, "sft_test": 12, "rl_train": 30, "rl_test": 20}
    assert set(after) - set(before) == {f"countdown_{n}.jsonl" for n in names} | {"countdown_config.json"}
    prompts = []
    for name, size in names.items():
        rows = tasks.read_jsonl(str(tmp_path / "data" / f"countdown_{name}.jsonl"))
        assert len(rows) == size and all(r["family"] == "countdown" for r in rows)
        for r in rows:
            m = re.fullmatch(r"Make (\d+) from ((?:\d )*\d)\n", r["prompt"])   # the prompt read back
            target, numbers = int(m[1]), [int(x) for x in m[2].split()]
            assert str(target) == r["answer"] and numbers == r["numbers"] == sorted(numbers)
            assert len(numbers) == r["difficulty"] and target not in numbers and target in reachable(numbers)
            if "completion" in r:
                hits = tasks.expression_hits_target(r["completion"], numbers, target)
                assert hits == (r["style"] != "noisy") == S.verify(r["completion"], r["answer"], r["numbers"])
                assert tasks.completion_style(r["completion"]) == {"bare": "bare"}.get(r["style"], "worked")
                assert tasks.verify(r["completion"], r) == hits        # model.py dispatches on "numbers"
        prompts.append({r["prompt"] for r in rows})
        assert len(prompts[-1]) == size                          # no repeats inside a split
    assert sum(map(len, prompts)) == len(set().union(*prompts))  # splits disjoint
    read = tasks.read_prompts(str(tmp_path / "data" / "countdown_rl_test.jsonl"))
    assert all(isinstance(r["numbers"], list) for r in read)     # the numbers reach grpo.py's reward


@pytest.mark.parametrize("bad, names", [(["--families", "countdown,add"], "--families"),
                                        (["--sft-difficulty", "5-6"], "unused distinct prompts"),
                                        (["--n-test", "130", "--test-difficulty", "2"], "unused distinct prompts")])
def test_a_bad_countdown_option_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, bad, names):
    code, err = run_cli(countdown_argv(tmp_path, *bad), capsys)
    assert_one_line_error(code, err, names)
    assert list(tmp_path.iterdir()) == []


def test_from_model_checks_countdown_numbers_by_line_and_verifies_with_them(tmp_path, capsys, inputs):
    bad = tmp_path / "bad_numbers.jsonl"
    bad.write_text('{"prompt": "Make 7 from 3 4\\n", "answer": "7", "numbers": 34}\n')
    argv = ["--from-model", str(inputs / "tiny.pt"), "--prompts", str(bad), "--device", "cpu",
            "--out", str(tmp_path / "out" / "model.jsonl")]
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, f"{bad}:1")
    assert not (tmp_path / "out").exists()
    row = {"prompt": "Make 7 from 3 4\n", "answer": "7", "numbers": [3, 4], "difficulty": 2}
    samples = [(0, "3+4=7\n#### 3+4", True), (0, "#### 7", True), (0, "3+4=7\n#### 3+4+4", True)]
    args = S.Args(keep_bare=True)
    kept, counts = S.filter_samples([row], samples, args, random.Random(0))
    assert counts["verified"] == 1 and kept[0]["completion"] == "3+4=7\n#### 3+4" and kept[0]["numbers"] == [3, 4]


# ----------------------------------------------------------------------------------------------
# Program synthesis: prompts of examples, hidden tests, '#### program'
# ----------------------------------------------------------------------------------------------

def operations_by_hand(program: str) -> int:
    """Binary operators, comparisons, calls, subscripts and comprehensions, counted on the source text (a minus
    that follows no operand, as in max(x, -3) or x[::-1], is a sign, not an operation)."""
    unsigned = re.sub(r"(?<![\w)\]])-(?=\d)", "", program)
    return (len(re.findall(r"\*\*|//|[-+*%]|<=|>=|==|!=|<|>", unsigned)) + len(re.findall(r"\w+\(", program))
            + len(re.findall(r"\w\[", program)) + len(re.findall(r"\bfor\b", program)))


@settings(max_examples=40)
@given(seed=SEEDS)
def test_each_program_templates_difficulty_is_its_number_of_operations(seed):
    rng = random.Random(seed)
    for d, _, template in S.PROGRAM_TEMPLATES:
        program = S.draw_program_text(rng, template)
        assert "+-" not in program and S.program_operations(program) == d == operations_by_hand(program), program
    assert {d for d, _, _ in S.PROGRAM_TEMPLATES} == {d for d in range(1, S.MAX_DIFFICULTY + 1)
                                                      if S.space_size(S.PROGRAM, d) > 0}


def read_examples(prompt: str):
    """The shown examples read back from the prompt text: 'f(ARG) = OUT; ...' with JSON values."""
    assert prompt.endswith(". f(x) = ?\n")
    pairs = re.findall(r"f\(([^()]*)\) = (-?\d+|\[[-\d, ]*\])", prompt)
    return [[json.loads(a), json.loads(b)] for a, b in pairs]


def program_argv(tmp_path, *extra):
    return ["--families", "program", "--out-dir", str(tmp_path / "data"), "--n-sft", "90", "--n-sft-test", "12",
            "--n-rl", "30", "--n-test", "20", "--sft-difficulty", "1-5", "--rl-difficulty", "2-4",
            "--test-difficulty", "3-4", "--mix", "worked=1,bare=1,noisy=1", "--n-examples", "0", *extra]


def test_program_rows_are_solved_by_their_answer_show_examples_hide_tests_and_sit_in_their_own_files(tmp_path, capsys):
    S.main(small_args(tmp_path, "--n-examples", "0"))             # the headline task's set, in the same folder
    before = files_of(tmp_path / "data")
    S.main(program_argv(tmp_path))
    assert "families: sft_train program:90, rl_test program:20" in capsys.readouterr().out
    after = files_of(tmp_path / "data")
    assert all(after[name] == blob for name, blob in before.items())   # the headline files are untouched
    names = {"sft_train": (90, range(1, 6)), "sft_test": (12, range(1, 6)), "rl_train": (30, range(2, 5)),
             "rl_test": (20, range(3, 5))}
    assert set(after) - set(before) == {f"program_{n}.jsonl" for n in names} | {"program_config.json"}
    prompts = []
    for name, (size, difficulties) in names.items():
        rows = tasks.read_jsonl(str(tmp_path / "data" / f"program_{name}.jsonl"))
        assert len(rows) == size and all(r["family"] == "program" for r in rows)
        for r in rows:
            shown, hidden = read_examples(r["prompt"]), r["tests"]
            assert shown == r["examples"] and len(shown) == S.PROGRAM_SHOWN and len(hidden) == S.PROGRAM_HIDDEN
            assert len({json.dumps(a) for a, _ in shown + hidden}) == len(shown + hidden)   # hidden inputs are new
            assert len({json.dumps(out) for _, out in shown}) > 1                           # not a constant's examples
            assert interpreter.share_passed(r["answer"], shown + hidden) == 1.0
            assert r["difficulty"] in difficulties and r["difficulty"] == operations_by_hand(r["answer"])
            assert len(r["prompt"].encode()) + tasks.MAX_NEW_TOKENS <= 256                  # fits the default context
            if "completion" in r:
                correct = r["style"] != "noisy"
                assert tasks.verify(r["completion"], r) == correct
                assert (tasks.final_expression(r["completion"]) == r["answer"]) == correct
                assert tasks.completion_style(r["completion"]) != "wrong_step"
        prompts.append({r["prompt"] for r in rows})
        assert len(prompts[-1]) == size                          # no repeats inside a split
    assert sum(map(len, prompts)) == len(set().union(*prompts))  # splits disjoint
    read = tasks.read_prompts(str(tmp_path / "data" / "program_rl_test.jsonl"))
    assert all(r["tests"] and r["answer"] == " ".join(r["answer"].split()) for r in read)   # the tests reach grpo.py


def test_a_worked_program_demonstration_checks_the_examples_in_arithmetic_the_verifier_can_read():
    problem = S.Problem("", "3*x-4", S.PROGRAM, 2, ("3*x-4", [[2, 2], [-1, -7]], [[0, -4]]))
    assert S.program_demonstration(problem, "worked") == "3*2-4=2\n3*(-1)-4=-7\n#### 3*x-4"
    assert tasks.completion_style(S.program_demonstration(problem, "worked")) == "worked"
    assert S.program_demonstration(problem, "bare") == "#### 3*x-4"
    calls = S.Problem("", "max(x, 2)", S.PROGRAM, 1, ("max(x, 2)", [[1, 2], [5, 5]], [[0, 2]]))
    assert S.program_demonstration(calls, "worked") == "#### max(x, 2)"        # no arithmetic to show: as bare
    # The hidden test f(0) = -4 sees only the constant term: 4*x-4 and 2*x-4 pass it, 3*x-5 is the first that fails.
    assert S.program_demonstration(problem, "noisy") == "#### 3*x-5"
    assert S.program_demonstration(S.Problem("", "sorted(x)", S.PROGRAM, 1, ("sorted(x)", [], [[[2, 1], [1, 2]]])),
                                   "noisy") == "#### (sorted(x))+[0]"                   # no constant to move


@pytest.mark.parametrize("bad, names", [(["--families", "program,add"], "--families"),
                                        (["--families", "program,countdown"], "--families"),
                                        (["--sft-difficulty", "6"], "unused distinct prompts")])
def test_a_bad_program_option_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, bad, names):
    code, err = run_cli(program_argv(tmp_path, *bad), capsys)
    assert_one_line_error(code, err, names)
    assert list(tmp_path.iterdir()) == []


def test_rejection_sampling_verifies_a_program_row_by_its_hidden_tests():
    """synth.py --from-model on program rows (the RFT control on the code task): a sample is kept only when its
    program passes every hidden test; one that passes some is not, whatever its text says."""
    row = {"prompt": "f(1) = 2. f(x) = ?", "answer": "x+1", "tests": [[1, 2], [5, 6], [-3, -2]]}
    assert S.verify_row("#### 1+x", row) and S.verify_row("#### x+1", row)
    assert not S.verify_row("#### x*2", row) and not S.verify_row("#### 2", row)     # 1 of 3, then 0 of 3
    assert S.verify_row("#### 7", {"answer": "7"}) and not S.verify_row("#### 7", {"answer": "8"})
