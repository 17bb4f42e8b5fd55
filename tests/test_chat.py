"""Tests of lib/chat.py: the chat command on any checkpoint this project loads.

Oracles: transformers' greedy generate (do_sample=False) on the same model, a tiny random LlamaForCausalLM saved
with a byte-level BPE tokenizer trained here (no download) and the real SmolLM2-135M-Instruct from its GGUF; the
conversation's ids written out with tokenizer.encode_chat over the whole history (each turn's prompt, recorded
where the command calls model.generate); transformers' apply_chat_template on a folder that convert.save_hf
exported from a model trained with a system prompt; and one-line errors for bad input. Tests that need
transformers, tokenizers or the GGUF package skip, saying why.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_chat.py
"""
from __future__ import annotations

import io
import os

import pytest
import torch

import model as M
from lib import chat, checkpoints, cli, convert, tokenizer, tokenizer_files
from helpers import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The capital of France is Paris.", "12+34=46\n#### 46", "user\nassistant\nsystem\n", "Be brief."] * 20


def run_chat(argv, capsys, stdin: str = "", monkeypatch=None):
    """chat.main(argv) as `python model.py chat` runs it (cli.run): (exit status, stdout lines, stderr)."""
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    status = 0
    try:
        cli.run(lambda: chat.main(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


def printed_answer(lines: list[str]) -> str:
    """The answer chat.main printed: the lines between its header and its '[N tokens, ... tokens/s]' line."""
    start = next(i for i, line in enumerate(lines) if line.startswith("chat format")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("[") and "tokens/s" in line)
    return "\n".join(lines[start:end])


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """(folder, transformers' model): a tiny random LlamaForCausalLM saved with a ChatML byte-level BPE tokenizer."""
    transformers = pytest.importorskip("transformers", reason="transformers' generate is the oracle")
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library builds the test tokenizer")
    hf_tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf_tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf_tokenizer.train_from_iterator(CORPUS, trainer)
    folder = tmp_path_factory.mktemp("llama")
    transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer, eos_token="<|im_end|>",
                                         pad_token="<|endoftext|>").save_pretrained(folder)
    config = transformers.LlamaConfig(vocab_size=hf_tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():                     # spread-out logits: greedy never sits on a near-tie
        for p in theirs.parameters():
            p.normal_(0.0, 0.2 if p.dim() >= 2 else 0.05).add_(1.0 if p.dim() == 1 else 0.0)
    theirs.save_pretrained(folder)
    return str(folder), theirs


def transformers_greedy(theirs, prompt: list[int], max_new_tokens: int, stop_ids) -> list[int]:
    out = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
                          pad_token_id=stop_ids[0])
    return out[0, len(prompt):].tolist()


def test_greedy_answer_equals_transformers_generate_on_a_tiny_llama(llama_folder, capsys):
    folder, theirs = llama_folder
    status, lines, err = run_chat(["--checkpoint", folder, "--prompt", "The capital of France", "--max-new-tokens",
                                   "30", "--device", "cpu"], capsys)
    assert status == 0, err
    _, enc, _ = checkpoints.load(folder)
    prompt = tokenizer.encode_prompt(enc, "The capital of France")
    want = transformers_greedy(theirs, prompt, 30, tokenizer.stop_ids(enc))
    assert printed_answer(lines) == tokenizer.decode(enc, want)
    assert lines[-1].startswith(f"[{len(want)} tokens, ") and "tokens/s" in lines[-1]


def test_smollm2_answer_equals_transformers_and_stops_at_the_end_of_its_turn(smollm2, capsys):
    transformers = pytest.importorskip("transformers", reason="transformers' generate is the oracle")
    path, metadata, _ = smollm2
    question = "What is the capital of France?"
    status, lines, err = run_chat(["--checkpoint", path, "--prompt", question, "--max-new-tokens", "32",
                                   "--device", "cpu"], capsys)
    assert status == 0, err
    theirs = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                               torch_dtype=torch.float32).eval()
    enc = tokenizer.set_chat_format(tokenizer.encoding_from_spec(tokenizer_files.tokenizer_spec_from_gguf(metadata)))
    stop = tokenizer.stop_ids(enc)
    want = transformers_greedy(theirs, tokenizer.encode_prompt(enc, question), 32, stop)
    assert want[-1] == enc.encode_single_token("<|im_end|>") and len(want) < 32    # the turn ended by itself
    answer = printed_answer(lines)
    assert answer == tokenizer.decode(enc, want) and "Paris" in answer
    assert "user" not in answer and "<|im_start|>" not in answer                  # no invented next turn
    assert lines[-1].startswith(f"[{len(want)} tokens, ") and "cut" not in lines[-1]


def test_each_turn_renders_the_whole_conversation(llama_folder, capsys, monkeypatch):
    """Two turns on stdin: the second prompt is encode_chat of [system, user 1, the answer printed, user 2]."""
    folder, _ = llama_folder
    prompts, real_generate = [], M.generate

    def recording(model, prompts_, *args, **kwargs):
        prompts.append(list(prompts_[0]))
        return real_generate(model, prompts_, *args, **kwargs)
    monkeypatch.setattr(M, "generate", recording)
    status, lines, err = run_chat(["--checkpoint", folder, "--max-new-tokens", "6", "--system", "Be brief."], capsys,
                                  "Hello there\nAnd 12+34?\n\nnever read\n", monkeypatch)
    assert status == 0, err
    _, enc, _ = checkpoints.load(folder)
    first_answer = lines[lines.index("chat format chatml, system prompt 'Be brief.', context 128 tokens") + 1]
    system, user_1 = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}
    assert prompts == [tokenizer.encode_chat(enc, [system, user_1]),
                       tokenizer.encode_chat(enc, [system, user_1, {"role": "assistant", "content": first_answer},
                                                   {"role": "user", "content": "And 12+34?"}])]


def test_a_conversation_over_the_context_drops_its_oldest_exchange_and_keeps_the_system_prompt():
    enc = tokenizer.set_system_prompt(tokenizer.get_tokenizer("bytes"), "S")
    messages = [{"role": "user", "content": "a" * 20}, {"role": "assistant", "content": "b" * 20},
                {"role": "user", "content": "c" * 10}]
    ids, room = chat.fit_context(enc, messages, block_size=64, max_new_tokens=100)
    # S\n\n + 20 a + 20 b + EOT + 10 c = 54 tokens: no room for half the context (32), so the first exchange goes
    assert messages == [{"role": "user", "content": "c" * 10}]
    assert ids == list(b"S\n\n" + b"c" * 10) and room == 64 - 13
    ids, room = chat.fit_context(enc, messages, block_size=64, max_new_tokens=5)
    assert (len(ids), room) == (13, 5)


def test_an_export_of_a_model_trained_with_a_system_prompt_is_served_and_reloaded_with_it(tmp_path):
    """save_hf writes the chat template of the trained format and system prompt: transformers' apply_chat_template
    gives encode_chat's ids, and the folder loads back here with the same system prompt."""
    transformers = pytest.importorskip("transformers", reason="transformers' apply_chat_template is the oracle")
    enc = tokenizer.set_system_prompt(tokenizer.get_tokenizer("bytes"), "Reply with the final answer after ####.")
    convert.save_hf(str(tmp_path / "hf"), tiny_model(seed=3), enc)
    served = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    messages = [{"role": "user", "content": "12+34="}, {"role": "assistant", "content": "#### 46"},
                {"role": "user", "content": "1+1="}]
    for conversation in (messages[:1], messages):
        ids = served.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        assert list(ids if isinstance(ids, list) else ids["input_ids"]) == tokenizer.encode_chat(enc, conversation)
    _, again, _ = checkpoints.load(str(tmp_path / "hf"))
    assert (again.chat_format, again.system_prompt) == ("none", enc.system_prompt)
    assert tokenizer.encode_chat(again, messages) == tokenizer.encode_chat(enc, messages)


def test_bad_input_is_one_line(tmp_path, capsys):
    model_path = str(tmp_path / "model.pt")
    checkpoints.save(model_path, tiny_model(seed=1), tokenizer.get_tokenizer("bytes"))   # block_size 64
    cases = [([], "chat needs --checkpoint"),
             (["--checkpoint", str(tmp_path / "missing.pt"), "--prompt", "hi"], "missing.pt: no such checkpoint"),
             (["--checkpoint", model_path, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be > 0"),
             (["--checkpoint", model_path, "--prompt", "x" * 64], "the prompt is 64 tokens, the model's context 64"),
             (["--checkpoint", model_path, "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
             (["--checkpoint", model_path, "--prompt", "hi", "--chat-template", "chatml"],
              "this tokenizer has no <|im_start|> token")]
    for argv, message in cases:
        status, _, err = run_chat(argv, capsys)
        assert status == 2 and err.count("\n") == 1 and message in err, (argv, err)
    status, lines, err = run_chat(["--checkpoint", model_path, "--prompt", "x" * 60, "--max-new-tokens", "50"], capsys)
    assert status == 0 and lines[-1].startswith("[4 tokens, ") and lines[-1].endswith("cut at the length limit]")
