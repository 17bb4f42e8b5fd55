"""Mutation testing of the math: would the tests notice if the math were wrong?

A mutation tool changes the code one small edit at a time (an operator, a constant, a dropped argument, a
swapped key) and runs the file's own tests against each change (a "mutant"). A mutant the tests fail on is
killed; one they pass on survived: either the tests miss a behaviour, or the edit changes nothing (an
equivalent mutant, listed with its reason in EQUIVALENT below and in docs/testing.md).

    score = killed / (killed + survived),   a timeout counts as killed, a mutant no test reaches as survived

This script runs mutmut 3 (a development-only tool, not in requirements.txt) the way issue 24 measured it,
per target, in a temporary copy of the tree (the project is never modified in place), with a setup.cfg of

    [mutmut]
    source_paths = <all top-level .py files> and lib
    only_mutate = <target>.py                         (a target is a top-level file or lib/<module>)
    pytest_add_cli_args_test_selection = tests/test_<file name>.py

and `OMP_NUM_THREADS=1 mutmut run --max-children N "<target>.x_<function>__mutmut_*" ...` over the target's
math functions (TARGETS). It prints killed / survived / score per file and the diff of every surviving mutant.

mutmut 3 does not mutate decorated functions (only @staticmethod/@classmethod ones): `_Optimizer.step`
(@torch.no_grad()), `ChunkedCrossEntropy.backward` (@once_differentiable) and `model.generate`
(@torch.no_grad()) would be skipped. In the copy, UNDECORATE moves such a decorator below the function
(`generate = torch.no_grad()(generate)`), which computes the same thing and lets mutmut reach the body. HAND
adds hand-written mutations of those functions, each run against named tests (--hand).

    /work/venv/bin/pip install mutmut                   # once (3.8.1 measured docs/testing.md)
    python tools/mutation.py grpo ppo                   # the math functions of grpo.py and ppo.py
    python tools/mutation.py model --functions sample   # some functions only
    python tools/mutation.py lib/tasks lib/formats      # lib modules: the verifiers, the file formats
    python tools/mutation.py --hand                     # the hand mutations only
    python tools/mutation.py losses optim --max-children 2 --json out.json
"""
import argparse
import ast
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The math functions of each target, as mutmut names them: `name` for a function, `Class.method` for a
# method (mutmut's key is `x_name` or `xǁClassǁmethod`); fnmatch patterns are allowed.
TARGETS = {
    "losses": ["masked_sum", "masked_mean", "_reduce", "_keep", "_keep_rows", "_valid", "_fp32", "log_likelihood",
               "nll", "entropy", "soft_cross_entropy", "kl_divergence", "perplexity", "bits_per_token",
               "bits_per_byte", "_log_ratio", "kl_k1", "kl_k2", "kl_k3", "cross_entropy", "ChunkedCrossEntropy.*",
               "chunked_cross_entropy", "sequence_logprob", "bradley_terry_loss", "_implicit_rewards", "dpo_loss",
               "ipo_loss", "ppo_policy_loss", "value_loss", "entropy_bonus", "reinforce_loss"],
    "optim": ["_params_and_grads", "_Optimizer.*", "SGD.*", "Adagrad.*", "RMSprop.*", "Adam.*", "AdamW.*", "Lion.*",
              "newton_schulz", "Muon.*", "weight_decay_groups", "_embedding_and_norm_ids", "muon_param_split",
              "_warmup", "lr_constant", "lr_cosine", "lr_linear", "lr_wsd", "scale_lr", "clip_grad_norm_", "_exact"],
    "grpo": ["group_advantages", "kl_k3", "aggregate", "grpo_loss", "policy_logprobs"],
    "ppo": ["masked_mean", "kl_shaped_rewards", "gae", "whiten", "policy_loss", "value_loss", "entropy",
            "adaptive_beta", "explained_variance"],
    "model": ["attention_mask", "KVCache.*", "DenseKVCache.*", "decode_attention", "padded_batch",
              "left_pad_inputs", "sampling_logprobs", "sample", "decode_one_token", "generate", "token_logprobs"],
    # lib/: the verifiers every reward comes from, and the arithmetic of reading real models' files
    "lib/tasks": ["extract_answer", "is_correct", "arith", "final_expression", "expression_numbers",
                  "expression_hits_target", "verify", "step_lines", "completion_style", "final_answer", "fit_prompts",
                  "evaluate"],
    "lib/tokenizer": ["pad_id", "chat_format_of", "encode_prompt", "end_of_turn", "stop_ids", "decode",
                      "added_tokens_pattern", "split_on_added", "encoding_from_spec", "encode_text", "decode_text"],
    "lib/formats": ["dequantize", "safetensors_layout"],
    "lib/convert": ["unpermute_llama_qk", "state_dict_from_hf", "state_dict_to_hf"],
    "sft": ["encode_example", "make_examples", "collate", "masked_nll", "length_sorted_micro_batches",
            "batch_indices", "lr_at", "train_step", "eval_loss"],
    "reward": ["last_token_index", "RewardModel.*", "encode_pair", "bradley_terry_loss", "pairwise_accuracy",
               "calibration", "accuracy_by_kind", "make_pairs", "pair_rewards", "lr_at"],
    "packing": ["check_lengths", "split_documents", "_place_in_columns", "fit_decreasing", "_tightest_first",
                "first_fit_decreasing", "best_fit_decreasing", "greedy_concat", "padded_cost", "efficiency",
                "lower_bound", "packed_batch", "padded_batch", "token_nll", "masked_loss"],
}

# Tests left out of a target's run, each failing under mutmut on the unchanged code (mutmut then stops: "failed
# to collect stats"). ppo: mutmut's mutated file imports mutmut, which reads setup.cfg from the working
# directory, so a test that runs ppo.py as a subprocess from another folder fails. model: the test that counts
# dynamo's traces of the compiled decode step fails: mutmut's trampolines (which read which mutant is under test)
# run inside the traced step, and dynamo traces them again.
DESELECT = {
    "ppo": ["tests/test_ppo.py::test_python_ppo_py_on_bad_input_is_one_line_exit_2_and_writes_nothing"],
    "model": ["tests/test_model.py::test_compiled_decode_step_is_traced_once_for_a_rollout_of_one_batch_size",
              # copies model.py into an empty folder, where the mutated file cannot find mutmut's setup.cfg
              "tests/test_model.py::test_python_model_py_alone_fits_a_paragraph_and_generates_what_recomputation_generates"],
    # the same as ppo's: each runs the mutated file as a subprocess in another folder
    "sft": ["tests/test_sft.py::test_a_huge_lr_is_one_line_exit_2_and_every_saved_weight_is_finite",
            "tests/test_sft.py::test_a_second_run_on_a_folder_being_written_is_refused_and_writes_nothing",
            "tests/test_sft.py::test_bad_input_is_one_line_exit_2_no_traceback_and_nothing_written"],
    "reward": ["tests/test_reward.py::test_python_reward_py_on_bad_input_is_one_line_exit_2_and_writes_nothing"],
    "packing": ["tests/test_packing.py::test_every_bad_option_or_data_file_is_one_line_exit_2_and_writes_nothing",
                "tests/test_packing.py::test_the_case_driver_agrees_with_a_real_process"],
}

# Decorated functions mutmut would skip: (target, "Class.method" or "function") -> how to re-apply the
# decorator after the definition, with {name} for the function's name.
UNDECORATE = {
    ("optim", "_Optimizer.step"): ("torch.no_grad()", "{name} = torch.no_grad()({name})"),
    ("losses", "ChunkedCrossEntropy.backward"): (
        "torch.autograd.function.once_differentiable",
        "{name} = staticmethod(torch.autograd.function.once_differentiable({name}.__func__))"),
    ("model", "generate"): ("torch.no_grad()", "{name} = torch.no_grad()({name})"),
    ("lib/tasks", "evaluate"): ("torch.no_grad()", "{name} = torch.no_grad()({name})"),
    ("sft", "eval_loss"): ("torch.no_grad()", "{name} = torch.no_grad()({name})"),
    ("reward", "RewardModel.score"): ("torch.no_grad()", "{name} = torch.no_grad()({name})"),
}

GENERATE_TESTS = ["tests/test_model.py", "-k", "generate or compact"]

# Hand mutations of the decorated functions, and of code mutmut cannot measure: (target, what it breaks,
# original text, mutated text, tests).
# The original text must occur exactly once in the file; the mutant is killed when the tests fail.
HAND = [
    ("optim", "step ignores the closure's loss", "                loss = closure()\n",
     "                closure()\n", ["tests/test_optim.py"]),
    ("optim", "step skips every param group but the first",
     "        for group in self.param_groups:\n            params, grads = _params_and_grads",
     "        for group in self.param_groups[:1]:\n            params, grads = _params_and_grads",
     ["tests/test_optim.py"]),
    ("optim", "step runs the closure without gradients", "            with torch.enable_grad():\n",
     "            with torch.no_grad():\n", ["tests/test_optim.py"]),
    ("losses", "backward ignores the incoming gradient (hidden)",
     "grad_hidden * grad_loss.to(grad_hidden.dtype)", "grad_hidden", ["tests/test_losses.py"]),
    ("losses", "backward ignores the incoming gradient (weight)",
     "grad_weight * grad_loss.to(grad_weight.dtype)", "grad_weight", ["tests/test_losses.py"]),
    ("losses", "backward returns no gradient for the weight",
     "        return grad_hidden, grad_weight, None, None, None, None, None, None",
     "        return grad_hidden, None, None, None, None, None, None, None", ["tests/test_losses.py"]),
    ("model", "generate counts the stop token's row as still running",
     "            done |= hit\n", "            done |= hit & False\n", GENERATE_TESTS),
    ("model", "generate does not mark rows that hit a stop id as finished",
     "            finished[rows] |= hit\n", "", GENERATE_TESTS),
    ("model", "generate counts only non-pad ids as new tokens",
     "            lengths[rows] += (~done).long()", "            lengths[rows] += (token != pad_id).long()",
     GENERATE_TESTS),
    ("model", "generate compacts the batch without compacting the positions",
     "rows, done, token, next_pos = rows[keep], done[keep], token[keep], next_pos[keep]",
     "rows, done, token, next_pos = rows[keep], done[keep], token[keep], next_pos[:len(keep)]",
     GENERATE_TESTS),
    ("model", "generate leaves the model in eval mode", "    model.train(was_training)\n", "",
     GENERATE_TESTS),
    # sft.train_step's two-process branches: they run in spawned processes, whose calls mutmut's stats do not see
    ("sft", "train_step under DDP does not all-reduce the gradients", "    elif world_size > 1:  # one flat",
     "    elif False:  # one flat", ["tests/test_sft.py", "-k", "ddp_two_gloo"]),
    ("sft", "train_step divides by this rank's token count, not the whole batch's",
     "    n_tokens = int(allreduce_sum(torch.tensor([float(n_local)], device=device), world_size).item())",
     "    n_tokens = n_local", ["tests/test_sft.py", "-k", "ddp_two_gloo"]),
    ("sft", "train_step under FSDP reports this rank's loss, not the sum over ranks",
     "        loss_sum = float(allreduce_sum(torch.tensor([loss_sum], device=device), world_size))",
     "        loss_sum = float(loss_sum)", ["tests/test_fsdp.py", "-k", "not torchrun"]),
]

# Surviving mutants that cannot change any result, with the reason (docs/testing.md lists them too). mutmut
# numbers the mutants of a function in order, so a name stays valid while that function's code is unchanged.
SUM_DIM = "sum(+1) is sum(-1): the tensor is the documented 2-D (N, L)"
NS_TRANSPOSE = ("whether a tall matrix is transposed first only picks the smaller Gram matrix (speed): the odd "
                "polynomial commutes with transposition, p(X^T) = p(X)^T, so the result is the same up to rounding")
ZERO_DTYPE = ("a 0-d zero without a dtype is float32: torch.where with a 0-d tensor keeps the other operand's "
              "floating dtype (0-d tensors do not promote)")
ZERO_DEVICE = "a 0-d zero made on the default device: the CPU, where the tests run (and 0-d CPU tensors mix with CUDA)"
FILL_ZERO_P = "the value filled where p == 0 is multiplied by p == 0: any finite value gives 0"
MASKED_TWICE = ("one of two guards dropped: the masked mean reads values through torch.where as well (and the log-ratio "
                "clamp has a zero gradient outside its range), so inf or NaN under the mask still reaches neither the "
                "loss, its gradient nor the statistics (a test puts each there)")
F32_START = ("the loss starts as a float32 zero but loss = loss + x is not in place: the first float64 chunk promotes "
             "it to float64 (a float64 test checks the dtype and the value to 1e-12)")
EXTRA_BUFFER = "allocates a gradient buffer that is not needed: memory only, the returned values are the same"
DEVICE_CPU = ("device=None or the argument dropped: the default device, the CPU, where the tests run; a CUDA run "
              "(tests/test_model.py's cuda tests) needs them")
INT_DTYPE = "dtype dropped: torch.full/tensor/as_tensor of Python ints is int64 (and of -1 too), the dtype written"
SAME_DIM = "the same dimension: +1 is -1 on the 2-D tensor (and transpose(-1, +2) is transpose(-1, -2) on 4-D k)"
DEFAULT_DIM = "dim=-1 is topk's and sort's default"
TOP_P_OFF = "top_p 2.0 as the default: like 1.0, not < 1, so no nucleus truncation either way"
SPEED = "a speed switch of generate: the tokens and log-probs are the same (tests compare both settings), only the work differs"
COMPILE = ("whether the CPU decode step is compiled: the compiled step gives the eager tokens and log-probs (a test "
           "checks it), only the time differs")
CHECKPOINT = ("whether (or how) a chunk of token_logprobs is checkpointed, or how many rows a chunk has: memory only; "
              "values and gradients are the same (tests compare them with one full forward for every chunk size)")
ALL_SLOTS = ("keep copies every slot instead of the written ones: the unwritten ones are zeros copied into zeros, "
             "or uninitialised memory that eager decoding never reads (a test fills it with NaN)")
SAME_SLICE = "slice(None, n) and slice(n) are slice(0, n)"
N_START = "n's start value is read only when max_new_tokens == 0, and the output then has no columns either way"
UNREACHABLE_EMPTY = "the branch for no rows cannot be taken: the function returned for an empty packing above"
ROWS_NOT_COPIES = ("counting rows instead of the copies they take: every candidate row takes >= 1 copy, so the cut "
                   "lands at the same room or a larger one; more rows are sorted, the tightest first as before")
KIND_CASE = "numpy reads sort kinds case-insensitively: 'STABLE' is 'stable'"
INT_DTYPE_NP = "dtype dropped: numpy makes int64 of Python ints here, the dtype written"
SEED_LABEL = ("which seed each (seed, epoch) maps to is arbitrary: the contract (a fresh permutation per epoch, the "
              "same batches for the same seed and step, on every rank) holds for any such map")
EMPTY_MEAN = "the mean of an empty selection is NaN in torch: the value the empty branch gives"
NO_DOCS_FLAT = "with no documents there are no pieces, so nothing is read from the empty (or one-zero) token array"
DECODE_SLOT = ("the decode step writes at the next slot, cache.length, instead of the slot it is handed: Decoder "
               "keeps cache.length equal to that slot, so the same slot is written and attended; only torch.compile "
               "retraces the step for each new length (the test that counts traces is left out under mutmut, DESELECT)")
EAGER_INDEX = ("a DenseKVCache serves eager decoding only, whose writes all pass index None: None and the default "
               "are the same argument")
FIRST_PIECE = ("s.split(sep, n)[0] is the text before the first sep for any n >= 1 and for no n: how many later "
               "pieces are split off does not change the first")
BOOL_SHARES = ("verify returns a bool, so the array is bool instead of float64: .mean() of a bool array is the float64 "
               "share of True, .reshape and .max(1) (any) then .mean() give the same float64 numbers, and the per-"
               "difficulty means are of the same values; an empty list makes a float64 array either way")
CHAT_DEFAULT = ("the default of getattr(enc, 'chat_format', 'none') is read only for a tokenizer on which no format "
                "was ever set, and the value is only compared with 'chatml' and 'llama3': any other default (None, "
                "'XXnoneXX', 'NONE') takes the same last branch as 'none' (the plain text in encode_prompt, "
                "enc.eot_token in end_of_turn); a tokenizer with no chat_format attribute is tested")
LONGEST_FIRST = ("sorted(tokens, reverse=True) without key=len (key=None is sorted's default): the tokens that can "
                 "match at one position of the text are all prefixes of the text there, so of one another, and a "
                 "proper prefix sorts before its extension, so reverse lexicographic order tries them longest first, "
                 "as the length order does; re's alternation takes the first alternative that matches at the leftmost "
                 "position, so the same match (two matching tokens of one length are the same string, and the tokens "
                 "are dict keys); the order of tokens that never match at the same position changes nothing")
EQUIVALENT = {
    "grpo.x_group_advantages__mutmut_5": "numel() == 1 instead of == 0: an empty (0, G) batch gives the same empty "
                                         "result through the main path, and a single reward is a constant group (0)",
    "grpo.x_aggregate__mutmut_2": "mask.to(None) keeps the mask's dtype: its 0/1 values multiply and sum exactly in any dtype",
    "grpo.x_aggregate__mutmut_16": SUM_DIM,
    "grpo.x_aggregate__mutmut_20": SUM_DIM,
    "grpo.x_grpo_loss__mutmut_9": "mask.to(None): maskf is only summed (exact counts in any dtype) to divide a float",
    "grpo.x_grpo_loss__mutmut_47": SUM_DIM,
    "grpo.x_grpo_loss__mutmut_55": SUM_DIM,
    "ppo.x_kl_shaped_rewards__mutmut_10": SUM_DIM,
    "ppo.x_kl_shaped_rewards__mutmut_21": "the row index made on the default device: identical on a CPU, where the tests "
                                          "run (torch indexing also takes CPU index tensors for CUDA tensors)",
    "ppo.x_kl_shaped_rewards__mutmut_23": "the same as mutant 21 (device argument dropped)",
    "ppo.x_policy_loss__mutmut_53": "binds.to(None) stays bool: masked_mean sums it to an exact integer count and "
                                    "divides by the float token count, the same number",
    "ppo.x_value_loss__mutmut_30": "the same as policy_loss 53, for vf_clipfrac",
    "ppo.x_explained_variance__mutmut_33": 'float("NAN") is float("nan")',
    "losses.x_masked_sum__mutmut_15": ZERO_DTYPE,
    "losses.x_masked_sum__mutmut_18": ZERO_DTYPE,
    "losses.x__reduce__mutmut_11": ZERO_DTYPE,
    "losses.x__reduce__mutmut_14": ZERO_DTYPE,
    "losses.x__keep__mutmut_9": ZERO_DTYPE,
    "losses.x__keep__mutmut_12": ZERO_DTYPE,
    "losses.x_masked_sum__mutmut_16": ZERO_DEVICE,
    "losses.x_masked_sum__mutmut_19": ZERO_DEVICE,
    "losses.x__reduce__mutmut_12": ZERO_DEVICE,
    "losses.x__reduce__mutmut_15": ZERO_DEVICE,
    "losses.x__keep__mutmut_10": ZERO_DEVICE,
    "losses.x__keep__mutmut_13": ZERO_DEVICE,
    "losses.x_value_loss__mutmut_32": ZERO_DEVICE,
    "losses.x_value_loss__mutmut_34": ZERO_DEVICE,
    "losses.x_masked_sum__mutmut_20": "sum(dim) with dim None is the sum over everything, as sum()",
    "losses.x_masked_mean__mutmut_27": "the same as masked_sum 20, for the count",
    "losses.x_masked_mean__mutmut_32": "count.to(None) stays an integer tensor: a float total divided by it keeps its dtype",
    "losses.x_entropy__mutmut_22": FILL_ZERO_P,
    "losses.x_soft_cross_entropy__mutmut_28": FILL_ZERO_P,
    "losses.x_kl_divergence__mutmut_35": FILL_ZERO_P,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_6": EXTRA_BUFFER,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_8": EXTRA_BUFFER,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_12": EXTRA_BUFFER,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_14": EXTRA_BUFFER,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_19": ZERO_DEVICE,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_22": ZERO_DEVICE,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_38": "the logits are already float32 (_fp32) and row_weight is float32 unless the inputs are float64",
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_56": SUM_DIM,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_60": SUM_DIM,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_66": SUM_DIM,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_113": "same dtypes take the out-of-place path: grad_weight += grad_logits.T @ h, the same sum as addmm_",
    "losses.xǁChunkedCrossEntropyǁbackward__mutmut_7": "a 0-d float32 factor keeps the gradient's dtype (0-d tensors do not promote)",
    "losses.xǁChunkedCrossEntropyǁbackward__mutmut_13": "the same as backward 7, for the weight",
    "losses.x_chunked_cross_entropy__mutmut_3": "the chunk size changes memory, not results (tested for every chunk size)",
    "losses.x_chunked_cross_entropy__mutmut_78": "an integer count divides a float row weight into the same float",
    "losses.x_chunked_cross_entropy__mutmut_91": EXTRA_BUFFER,
    "losses.x_sequence_logprob__mutmut_7": SUM_DIM,
    "losses.x_reinforce_loss__mutmut_9": "keepdim dropped on a dim-0 reduction: (T,) broadcasts over (B, T) as (1, T) does",
    "losses.x_reinforce_loss__mutmut_11": "keepdim dropped on a dim-0 reduction: (T,) broadcasts over (B, T) as (1, T) does",
    "losses.x_reinforce_loss__mutmut_28": "keepdim dropped on a dim-0 reduction: (T,) broadcasts over (B, T) as (1, T) does",
    "losses.x_reinforce_loss__mutmut_30": "keepdim dropped on a dim-0 reduction: (T,) broadcasts over (B, T) as (1, T) does",
    "losses.x_ppo_policy_loss__mutmut_9": MASKED_TWICE,
    "losses.x_ppo_policy_loss__mutmut_13": MASKED_TWICE,
    "losses.x_ppo_policy_loss__mutmut_17": MASKED_TWICE,
    "losses.x_reinforce_loss__mutmut_48": MASKED_TWICE,
    "losses.x_reinforce_loss__mutmut_52": MASKED_TWICE,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_18": F32_START,
    "losses.xǁChunkedCrossEntropyǁforward__mutmut_21": F32_START,
    "optim.x__params_and_grads__mutmut_10": "every group holds 'maximize' (the optimizers' defaults put it there), so "
                                            "the fallback of group.get is never read",
    "optim.x__params_and_grads__mutmut_12": "the same as mutant 10",
    "optim.xǁAdagradǁ_update__mutmut_40": "value=1 is addcmul's default",
    "optim.xǁRMSpropǁ__init____mutmut_15": "capturable passed in fused's place: _check_supported refuses either flag "
                                           "with the same message",
    "optim.x__embedding_and_norm_ids__mutmut_10": "recurse=None is falsy, the same as recurse=False",
    "optim.x_newton_schulz__mutmut_10": NS_TRANSPOSE,
    "optim.x_newton_schulz__mutmut_14": NS_TRANSPOSE,
    "optim.x_newton_schulz__mutmut_16": NS_TRANSPOSE,
    "optim.x_newton_schulz__mutmut_17": NS_TRANSPOSE,
    "optim.x_lr_wsd__mutmut_32": "step <= decay_start: at step == decay_start the decay formula gives lr - 0 = lr too",
    "optim.x_clip_grad_norm___mutmut_11": "n.to(None) for n.to(first norm's device): one device, the CPU, in the tests",
    "optim.x_clip_grad_norm___mutmut_23": "coef.to(None): _foreach_mul_ by a 0-d float tensor works on every gradient "
                                          "dtype, the same up to coef's rounding",
    # model.py
    "model.x_generate__mutmut_30": DEVICE_CPU,
    "model.x_generate__mutmut_32": DEVICE_CPU,
    "model.x_generate__mutmut_42": DEVICE_CPU,
    "model.x_generate__mutmut_46": DEVICE_CPU,
    "model.x_generate__mutmut_73": DEVICE_CPU,
    "model.x_generate__mutmut_81": DEVICE_CPU,
    "model.x_generate__mutmut_84": DEVICE_CPU,
    "model.x_generate__mutmut_91": DEVICE_CPU,
    "model.x_generate__mutmut_95": DEVICE_CPU,
    "model.x_generate__mutmut_99": DEVICE_CPU,
    "model.x_generate__mutmut_102": DEVICE_CPU,
    "model.x_generate__mutmut_106": DEVICE_CPU,
    "model.x_generate__mutmut_109": DEVICE_CPU,
    "model.x_generate__mutmut_113": DEVICE_CPU,
    "model.x_generate__mutmut_116": DEVICE_CPU,
    "model.x_generate__mutmut_119": DEVICE_CPU,
    "model.x_generate__mutmut_121": DEVICE_CPU,
    "model.x_generate__mutmut_125": DEVICE_CPU,
    "model.x_generate__mutmut_128": DEVICE_CPU,
    "model.x_generate__mutmut_82": INT_DTYPE,
    "model.x_generate__mutmut_85": INT_DTYPE,
    "model.x_generate__mutmut_90": INT_DTYPE,
    "model.x_generate__mutmut_94": INT_DTYPE,
    "model.x_generate__mutmut_5": SPEED,
    "model.x_generate__mutmut_6": SPEED,
    "model.x_generate__mutmut_20": SPEED,
    "model.x_generate__mutmut_22": SPEED,
    "model.x_generate__mutmut_24": SPEED,
    "model.x_generate__mutmut_25": SPEED,
    "model.x_generate__mutmut_209": SPEED,
    "model.x_generate__mutmut_210": SPEED,
    "model.x_generate__mutmut_211": SPEED,
    "model.x_generate__mutmut_57": COMPILE,
    "model.x_generate__mutmut_59": COMPILE,
    "model.x_generate__mutmut_60": COMPILE,
    "model.x_generate__mutmut_61": COMPILE,
    "model.x_generate__mutmut_3": TOP_P_OFF,
    "model.x_sample__mutmut_3": TOP_P_OFF,
    "model.x_sampling_logprobs__mutmut_3": TOP_P_OFF,
    "model.x_token_logprobs__mutmut_3": TOP_P_OFF,
    "model.x_generate__mutmut_134": N_START,
    "model.x_generate__mutmut_135": N_START,
    "model.x_decode_one_token__mutmut_7": DECODE_SLOT,
    "model.x_decode_one_token__mutmut_12": DECODE_SLOT,
    "model.x_decode_attention__mutmut_22": SAME_DIM,
    "model.x_left_pad_inputs__mutmut_5": SAME_DIM,
    "model.x_token_logprobs__mutmut_50": SAME_DIM,
    "model.x_token_logprobs__mutmut_52": SAME_DIM,
    "model.x_token_logprobs__mutmut_64": SAME_DIM,
    "model.x_token_logprobs__mutmut_71": CHECKPOINT,
    "model.x_token_logprobs__mutmut_85": CHECKPOINT,
    "model.x_token_logprobs__mutmut_86": CHECKPOINT,
    "model.x_token_logprobs__mutmut_87": CHECKPOINT,
    "model.x_token_logprobs__mutmut_92": CHECKPOINT,
    "model.x_token_logprobs__mutmut_96": CHECKPOINT,
    "model.x_token_logprobs__mutmut_97": CHECKPOINT,
    "model.x_padded_batch__mutmut_14": INT_DTYPE,
    "model.x_padded_batch__mutmut_17": INT_DTYPE,
    "model.x_padded_batch__mutmut_44": INT_DTYPE,
    "model.x_padded_batch__mutmut_46": INT_DTYPE,
    "model.xǁKVCacheǁ__init____mutmut_9": INT_DTYPE,
    "model.xǁKVCacheǁ__init____mutmut_13": INT_DTYPE,
    "model.x_padded_batch__mutmut_49": DEVICE_CPU,
    "model.x_padded_batch__mutmut_50": DEVICE_CPU,
    "model.x_sample__mutmut_32": DEVICE_CPU,
    "model.x_sample__mutmut_36": DEVICE_CPU,
    "model.xǁKVCacheǁ__init____mutmut_10": DEVICE_CPU,
    "model.xǁKVCacheǁ__init____mutmut_14": DEVICE_CPU,
    "model.xǁKVCacheǁ__init____mutmut_19": DEVICE_CPU,
    "model.xǁKVCacheǁ__init____mutmut_21": DEVICE_CPU,
    "model.xǁKVCacheǁbuffer__mutmut_3": DEVICE_CPU,
    "model.xǁKVCacheǁbuffer__mutmut_6": DEVICE_CPU,
    "model.xǁDenseKVCacheǁbuffer__mutmut_3": DEVICE_CPU,
    "model.xǁDenseKVCacheǁbuffer__mutmut_6": DEVICE_CPU,
    "model.x_sampling_logprobs__mutmut_51": DEFAULT_DIM,
    "model.x_sampling_logprobs__mutmut_67": DEFAULT_DIM,
    "model.xǁKVCacheǁkeep__mutmut_1": ALL_SLOTS,
    "model.xǁKVCacheǁkeep__mutmut_3": ALL_SLOTS,
    "model.xǁKVCacheǁkeep__mutmut_2": SAME_SLICE,
    "model.xǁKVCacheǁkeep__mutmut_4": SAME_SLICE,
    "model.xǁDenseKVCacheǁupdate__mutmut_33": EAGER_INDEX,
    "model.xǁDenseKVCacheǁupdate__mutmut_37": EAGER_INDEX,
    "model.x_padded_batch__mutmut_30": "slice(T - n, None) is slice(T - n, T) on a row of length T",
    "model.x_padded_batch__mutmut_37": "slice(None, n) is slice(0, n)",
    "model.x_padded_batch__mutmut_39": "slice(n) is slice(0, n)",
    "model.x_sampling_logprobs__mutmut_34": "top_k == V keeps every token either way",
    "model.x_token_logprobs__mutmut_63": "the value filled at -inf log-probs is multiplied by exp(-inf) = 0: any finite value gives 0",
    # packing.py
    "packing.x__place_in_columns__mutmut_40": UNREACHABLE_EMPTY,
    "packing.x__place_in_columns__mutmut_44": UNREACHABLE_EMPTY,
    "packing.x__tightest_first__mutmut_3": ROWS_NOT_COPIES,
    "packing.x__tightest_first__mutmut_5": ROWS_NOT_COPIES,
    "packing.x__tightest_first__mutmut_21": KIND_CASE,
    "packing.x_fit_decreasing__mutmut_21": KIND_CASE,
    "packing.x_check_lengths__mutmut_2": "reshape(None) keeps the shape: every caller passes 1-D lengths",
    "packing.x_check_lengths__mutmut_8": "numpy reads any negative size in reshape as -1",
    "packing.x_first_fit_decreasing__mutmut_6": "fit_decreasing's default rule is 'first' (a test checks the default)",
    "packing.x_fit_decreasing__mutmut_125": ("rank only orders pieces (lexsort): small integers order the same "
                                             "as float64"),
    "packing.x_fit_decreasing__mutmut_127": "the same as 125",
    "packing.x_fit_decreasing__mutmut_41": ("every piece its own group: placing a group of k copies at once is "
                                            "exact (the docstring's argument), so one copy at a time gives the "
                                            "same rows, slower"),
    "packing.x_fit_decreasing__mutmut_58": "best fit sorting one candidate row changes nothing",
    "packing.x_fit_decreasing__mutmut_72": (
        "short = k + copies opens rows this group does not use; they stay empty (room T) and are numbered right "
        "after the used rows, so a later piece that fits no used row meets the first of them where a new row would "
        "be opened, with the same number (first and best fit: a used row always has room < T); rows numbered past "
        "the room array are never needed, since the true packing uses at most one row per piece"),
    "packing.x_fit_decreasing__mutmut_74": "short == 0 opens zero new rows: nothing changes",
    "packing.x_packed_batch__mutmut_18": INT_DTYPE_NP,
    "packing.x_packed_batch__mutmut_20": INT_DTYPE_NP,
    "packing.x_packed_batch__mutmut_55": INT_DTYPE_NP,
    "packing.x_packed_batch__mutmut_58": INT_DTYPE_NP,
    "packing.x_packed_batch__mutmut_63": INT_DTYPE_NP,
    "packing.x_packed_batch__mutmut_66": INT_DTYPE_NP,
    "packing.x_packed_batch__mutmut_22": NO_DOCS_FLAT,
    "packing.x_packed_batch__mutmut_24": NO_DOCS_FLAT,
    "packing.x_packed_batch__mutmut_25": NO_DOCS_FLAT,
    "packing.x_padded_batch__mutmut_6": INT_DTYPE,
    "packing.x_padded_batch__mutmut_9": INT_DTYPE,
    "packing.x_padded_batch__mutmut_20": "the ints written into the int64 tokens tensor are cast to it either way",
    "packing.x_padded_batch__mutmut_22": "the same as 20",
    "packing.x_padded_cost__mutmut_1": ("a default window of 1 batch sorts inside each batch only: the batch's "
                                        "longest, so its cost, is the same"),
    "packing.x_padded_cost__mutmut_4": INT_DTYPE_NP + " (an empty list returns 0 before any arithmetic)",
    "packing.x_padded_cost__mutmut_6": "the same as 4",
    # sft.py
    "sft.x_make_examples__mutmut_23": INT_DTYPE,
    "sft.x_make_examples__mutmut_25": INT_DTYPE,
    "sft.x_batch_indices__mutmut_17": SEED_LABEL,
    "sft.x_batch_indices__mutmut_19": SEED_LABEL,
    "sft.x_eval_loss__mutmut_1": ("the default batch size groups the same per-token terms another way: the mean is "
                                  "the same up to rounding (a test checks several batch sizes against a loop)"),
    "sft.x_eval_loss__mutmut_28": DEVICE_CPU,
    "sft.x_eval_loss__mutmut_40": DEVICE_CPU,
    "sft.x_eval_loss__mutmut_41": DEVICE_CPU,
    "sft.x_eval_loss__mutmut_52": 'float("NAN") is float("nan")',
    "sft.x_train_step__mutmut_17": DEVICE_CPU,
    "sft.x_train_step__mutmut_19": DEVICE_CPU,
    "sft.x_train_step__mutmut_74": "zero_grad(set_to_none=None or False) zeroes the gradients instead: the same values",
    "sft.x_train_step__mutmut_75": "the same as 74",
    "sft.x_train_step__mutmut_80": DEVICE_CPU,
    "sft.x_train_step__mutmut_81": DEVICE_CPU,
    "sft.x_train_step__mutmut_82": DEVICE_CPU,
    "sft.x_train_step__mutmut_159": 'float("INF") is float("inf")',
    # reward.py
    "reward.x_calibration__mutmut_43": EMPTY_MEAN,
    "reward.x_calibration__mutmut_50": EMPTY_MEAN,
    "reward.x_calibration__mutmut_47": 'float("NAN") is float("nan")',
    "reward.x_calibration__mutmut_54": 'float("NAN") is float("nan")',
    "reward.x_last_token_index__mutmut_3": "sum(+1) is sum(-1): the mask is the documented 2-D (B, T)",
    "reward.xǁRewardModelǁforward__mutmut_11": "squeeze(+1) is squeeze(-1) on the head's (B, 1) output",
    "reward.xǁRewardModelǁforward__mutmut_5": DEVICE_CPU,
    "reward.xǁRewardModelǁforward__mutmut_7": DEVICE_CPU,
    "reward.x_pair_rewards__mutmut_5": DEVICE_CPU,
    "reward.x_pair_rewards__mutmut_9": DEVICE_CPU,
    "reward.xǁRewardModelǁscore__mutmut_27": DEVICE_CPU,
    "reward.xǁRewardModelǁscore__mutmut_31": DEVICE_CPU,
    "reward.xǁRewardModelǁscore__mutmut_1": ("the default batch size changes the work, not the scores: each row's "
                                            "reward ignores padding and batch-mates (a test checks every batch "
                                            "size against one forward per sequence)"),
    # lib/tasks.py
    "lib.tasks.x_final_expression__mutmut_11": FIRST_PIECE,
    "lib.tasks.x_final_expression__mutmut_16": FIRST_PIECE,
    "lib.tasks.x_expression_numbers__mutmut_6": (
        "mode='exec' for 'eval': arith(expr) has already parsed expr.strip() as one expression, which parses in exec "
        "mode as Module(body=[Expr(value=<the same tree>)]); ast.walk then meets the same Constant nodes in the same "
        "order (the two wrappers add one node each above the same subtree)"),
    "lib.tasks.x_evaluate__mutmut_53": BOOL_SHARES,
    "lib.tasks.x_evaluate__mutmut_55": BOOL_SHARES,
    "lib.tasks.x_evaluate__mutmut_3": (
        "the default batch size 257 for 256 changes how many completions one generate call makes: greedy tokens are "
        "the same (a row's logits do not depend on its batch-mates or their padding: "
        "test_model.py::test_left_padding_gives_each_row_its_result_alone; test_tasks.py's stub test counts every "
        "batch size 1-4 alike); only with sampling and more than 256 completions does a seeded generator hand its "
        "draws to the rows in another order, the same distribution"),
    # lib/formats.py
    # dequantize: reshape(-2) for reshape(-1). numpy reads any negative size as the one unknown dimension
    # (measured with numpy 2.4.6: reshape(-2) and reshape(-7) of a (2, 4) array are (8,), no warning).
    "lib.formats.x_dequantize__mutmut_7": "reshape(-2) is reshape(-1): numpy reads any negative size as the one "
                                          "unknown dimension (F32)",
    "lib.formats.x_dequantize__mutmut_17": "the same as 7 (F16)",
    "lib.formats.x_dequantize__mutmut_29": "the same as 7 (BF16)",
    "lib.formats.x_dequantize__mutmut_48": "the same as 7 (Q8_0)",
    "lib.formats.x_dequantize__mutmut_73": "the same as 7 (Q4_0)",
    "lib.formats.x_dequantize__mutmut_86": "the same as 7 (Q4_1)",
    "lib.formats.x_dequantize__mutmut_69": ("nibbles.astype(None) is float64 instead of int8: q - 8 is an integer in "
                                            "[-8, 7], exact in either dtype, and .astype(np.float32) then gives the "
                                            "same float32 before the float32 scale multiplies it"),
    # safetensors_layout
    "lib.formats.x_safetensors_layout__mutmut_13": '"UTF-8" and "utf-8" name one codec (codecs.lookup normalises case)',
    "lib.formats.x_safetensors_layout__mutmut_2": (
        "the text of no_duplicates' ValueError is never seen: json.loads lets it out as a ValueError, which the "
        "except clause replaces with the path's 'not valid JSON (or repeats a name)' message (raise ... from None: "
        "the inner error is left only in the suppressed __context__, which neither str() nor a traceback shows)"),
    "lib.formats.x_safetensors_layout__mutmut_3": "the same as 2 (another text for the inner ValueError)",
    "lib.formats.x_safetensors_layout__mutmut_4": "the same as 2 (another text for the inner ValueError)",
    "lib.formats.x_safetensors_layout__mutmut_93": (
        "end >= begin is always true there (0 <= begin <= end was checked), so empty tensors also become 'previous': "
        "tensors run in (begin, end) order, so the tensor after an empty one at offset b begins at >= b, while the "
        "previous_end an empty tensor replaces is <= b (else it raised); no overlap is raised right after an empty "
        "tensor either way, and right after a non-empty one both hold (its end, its name): the same errors, the "
        "same messages, the same layout"),
    # lib/convert.py
    "lib.convert.x_state_dict_from_hf__mutmut_48": "torch.cat's default dim is 0",
    "lib.convert.x_state_dict_to_hf__mutmut_5": ("pop without a default: a tied model's state_dict lists the shared "
                                                 "weight under both names, so lm_head.weight is always there to pop"),
    # lib/tokenizer.py
    "lib.tokenizer.x_encode_text__mutmut_36": ("the fallback for a panic with no text: pyo3's PanicException always "
                                               "carries Rust's panic message, so splitlines() is never empty"),
    "lib.tokenizer.x_encode_text__mutmut_38": ("the panic's first line cut at 121 characters instead of 120: tiktoken's "
                                               "backtracking panic is 81 characters, shorter than either"),
    "lib.tokenizer.x_encode_prompt__mutmut_4": CHAT_DEFAULT,
    "lib.tokenizer.x_encode_prompt__mutmut_10": CHAT_DEFAULT,
    "lib.tokenizer.x_encode_prompt__mutmut_11": CHAT_DEFAULT,
    "lib.tokenizer.x_end_of_turn__mutmut_4": CHAT_DEFAULT,
    "lib.tokenizer.x_end_of_turn__mutmut_10": CHAT_DEFAULT,
    "lib.tokenizer.x_end_of_turn__mutmut_11": CHAT_DEFAULT,
    "lib.tokenizer.x_pad_id__mutmut_9": (
        "getattr(enc, 'pad_token_id') without its default, in the branch taken only when getattr(enc, "
        "'pad_token_id', None) has just returned a value that is not None: the attribute exists, so the default is "
        "never used and the same value is returned"),
    "lib.tokenizer.x_added_tokens_pattern__mutmut_3": LONGEST_FIRST,
    "lib.tokenizer.x_added_tokens_pattern__mutmut_6": LONGEST_FIRST,
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}   # mutmut.stats


def mangled(function: str) -> str:
    """mutmut's name of a function ("x_f") or method ("xǁClassǁmethod")."""
    if "." in function:
        cls, method = function.split(".", 1)
        return f"xǁ{cls}ǁ{method}"
    return f"x_{function}"


def function_names(target: str) -> list[str]:
    """Every function and method of ROOT/<target>.py as TARGETS names them: `name` or `Class.method`."""
    tree = ast.parse((ROOT / f"{target}.py").read_text())
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.append(node.name)
        elif isinstance(node, ast.ClassDef):
            names += [f"{node.name}.{item.name}" for item in node.body
                      if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return names


def unmatched(target: str, functions) -> list[str]:
    """The patterns among `functions` that name no function or method of <target>.py (a typo or a rename,
    which mutmut would run as zero mutants and report as nothing)."""
    names = function_names(target)
    return [f for f in functions if not any(fnmatch.fnmatch(name, f) for name in names)]


def module_of(target: str) -> str:
    """The module name mutmut gives a target's mutants: "model", "lib.tasks"."""
    return target.replace("/", ".")


# A target whose functions are tested in more than its own test file: the spec-built encodings of lib/tokenizer
# are compared with Hugging Face's tokenizers in test_tokenizer_files.py; lib/convert's unpermute_llama_qk is
# tested without transformers in test_formats.py (test_convert.py skips whole where transformers is missing).
EXTRA_TESTS = {"lib/tokenizer": ["tests/test_tokenizer_files.py"], "lib/convert": ["tests/test_formats.py"]}


def tests_of(target: str) -> str:
    """A target's own test files, space-separated: tests/test_model.py; tests/test_tasks.py for lib/tasks."""
    return " ".join([f"tests/test_{Path(target).name}.py", *EXTRA_TESTS.get(target, [])])


def patterns(target: str, functions) -> list[str]:
    return [f"{module_of(target)}.{mangled(f)}__mutmut_*" for f in functions]


def copy_tree(destination: Path) -> None:
    """The files git knows (tracked, and new ones not ignored) into `destination`."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def undecorate(path: Path, qualname: str, decorator: str, reapply: str) -> None:
    """Remove `@decorator` from the function `qualname` in `path` and re-apply it by assignment right after
    the definition, in the same scope: the same object results, and mutmut mutates the body."""
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    scopes, name = qualname.split(".")[:-1], qualname.split(".")[-1]
    body = ast.parse(source).body
    for cls in scopes:
        body = next(node for node in body if isinstance(node, ast.ClassDef) and node.name == cls).body
    function = next(node for node in body if isinstance(node, ast.FunctionDef) and node.name == name)
    target = next(d for d in function.decorator_list if ast.unparse(d) == decorator)
    indent = " " * function.col_offset
    lines.insert(function.end_lineno, indent + reapply.format(name=name) + "\n")
    del lines[target.lineno - 1]
    path.write_text("".join(lines))


def mutmut_executable() -> str:
    beside = Path(sys.executable).parent / "mutmut"
    found = str(beside) if beside.exists() else shutil.which("mutmut")
    if not found:
        sys.exit("error: mutmut is not installed; it is a development-only tool: pip install mutmut")
    return found


def write_config(tree: Path, target: str, deselect=()) -> None:
    """The issue's setup.cfg; `deselect` adds pytest --deselect options (mutmut stops when a test fails on the
    unchanged code, so a test that is already failing must be set aside, and said so)."""
    sources = sorted(p.name for p in tree.glob("*.py")) + ["lib"]
    extra = "pytest_add_cli_args =\n" + "".join(f"    --deselect={node}\n" for node in deselect) if deselect else ""
    (tree / "setup.cfg").write_text(
        "[mutmut]\nsource_paths =\n" + "".join(f"    {s}\n" for s in sources)
        + f"only_mutate = {target}.py\npytest_add_cli_args_test_selection =\n"
        + "".join(f"    {tests}\n" for tests in tests_of(target).split()) + extra)


def run_mutmut(target: str, functions, work: Path, max_children: int, env: dict, deselect=()) -> dict:
    """One mutmut run over `functions` of `target` in its own copy of the tree: -> results with the status and
    (for survivors) the diff of every mutant."""
    tree = work / target.replace("/", "_")
    tree.mkdir()
    copy_tree(tree)
    for (owner, qualname), (decorator, reapply) in UNDECORATE.items():
        if owner == target and any(fnmatch.fnmatch(qualname, f) for f in functions):
            undecorate(tree / f"{target}.py", qualname, decorator, reapply)
    write_config(tree, target, DESELECT.get(target, []) + [node for node in deselect
                                                            if node.split("::")[0] in tests_of(target).split()])
    names = patterns(target, functions)
    command = [mutmut_executable(), "run", "--max-children", str(max_children), *names]
    print(f"[{target}] OMP_NUM_THREADS={env['OMP_NUM_THREADS']} {' '.join(command[1:])}   (in {tree})", flush=True)
    start = time.time()
    with open(tree / "mutmut.log", "w") as log:
        status = subprocess.run(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    meta = tree / "mutants" / f"{target}.py.meta"
    if not meta.exists() or status != 0:
        tail = (tree / "mutmut.log").read_text(errors="replace")[-3000:]
        print(f"[{target}] mutmut failed (exit {status}); the end of its log:\n{tail}", flush=True)
        return {"target": target, "error": f"mutmut exit {status}", "seconds": round(seconds), "mutants": {},
                "diffs": {}}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    mutants = {key: STATUS.get(code, "suspicious") for key, code in codes.items()
               if any(fnmatch.fnmatch(key, p) for p in names)}
    diffs = {}
    for key, state in sorted(mutants.items()):
        if state not in ("killed", "timeout"):
            shown = subprocess.run([mutmut_executable(), "show", key], cwd=tree, env=env, capture_output=True, text=True)
            diffs[key] = shown.stdout.strip()
    return {"target": target, "command": f"OMP_NUM_THREADS=1 mutmut {' '.join(command[1:])}",
            "config": (tree / "setup.cfg").read_text(),
            "seconds": round(seconds), "mutants": mutants, "diffs": diffs}


def run_hand(work: Path, targets, env: dict, deselect=()) -> list[dict]:
    """Each hand mutation in a fresh copy of its file; killed when its tests fail."""
    tree = work / "hand"
    tree.mkdir()
    copy_tree(tree)
    results, clean = [], {}

    def fails(tests) -> bool:
        skip = [f"--deselect={node}" for node in deselect]
        return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests, *skip],
                              cwd=tree, env=env, capture_output=True).returncode != 0
    for target, what, original, mutated, tests in HAND:
        if target not in targets:
            continue
        if tuple(tests) not in clean:            # the tests must pass on the unchanged code, or a kill means nothing
            clean[tuple(tests)] = not fails(tests)
        if not clean[tuple(tests)]:
            results.append({"target": target, "what": what, "state": "not run: the tests fail on the unchanged code"})
            print(f"[hand] {target}: {what}: {results[-1]['state']}", flush=True)
            continue
        path = tree / f"{target}.py"
        source = (ROOT / f"{target}.py").read_text()
        if source.count(original) != 1:
            results.append({"target": target, "what": what, "state": "stale (text not found once)"})
            continue
        path.write_text(source.replace(original, mutated))
        start = time.time()
        failed = fails(tests)
        path.write_text(source)
        results.append({"target": target, "what": what, "state": "killed" if failed else "survived",
                        "seconds": round(time.time() - start)})
        print(f"[hand] {target}: {what}: {results[-1]['state']}", flush=True)
    return results


def counts(mutants: dict) -> dict:
    states = list(mutants.values())
    killed = states.count("killed") + states.count("timeout")
    survivors = [k for k, s in mutants.items() if s not in ("killed", "timeout", "skipped", "not checked")]
    equivalent = [k for k in survivors if k in EQUIVALENT]
    tested = killed + len(survivors)
    return {"mutants": len(states), "killed": killed, "survived": len(survivors), "equivalent": len(equivalent),
            "score": 100.0 * killed / tested if tested else float("nan"),
            "score_with_equivalent": 100.0 * (killed + len(equivalent)) / tested if tested else float("nan")}


def report(results: list[dict], hand: list[dict]) -> None:
    if results:
        print("\n| file | mutants | killed | survived | equivalent (listed) | score | score, equivalent as killed | minutes |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            if r.get("error"):
                continue
            c = counts(r["mutants"])
            print(f"| {r['target']}.py | {c['mutants']} | {c['killed']} | {c['survived']} | {c['equivalent']} "
                  f"| {c['score']:.1f} % | {c['score_with_equivalent']:.1f} % | {r['seconds'] / 60:.0f} |")
    for r in results:
        if r.get("error"):
            print(f"\n{r['target']}.py: NOT MEASURED ({r['error']}; see mutmut.log in its tree, --keep)")
        for key, diff in r["diffs"].items():
            reason = EQUIVALENT.get(key)
            print(f"\n{'equivalent: ' + reason if reason else 'SURVIVED (no test notices it)'}\n{diff}")
    if hand:
        print("\n| hand mutation | file | result |\n|---|---|---|")
        for h in hand:
            print(f"| {h['what']} | {h['target']}.py | {h['state']} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"files to mutate, among {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--functions", default="", help="comma-separated functions of ONE target (default: TARGETS)")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested in parallel (default 1)")
    parser.add_argument("--hand", action="store_true", help="run only the hand mutations of the decorated functions")
    parser.add_argument("--no-hand", action="store_true", help="skip the hand mutations")
    parser.add_argument("--deselect", action="append", default=[], metavar="NODEID",
                        help="a test to leave out (one that fails on the unchanged code), e.g. tests/test_model.py::test_x")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary trees (mutmut browse works there)")
    args = parser.parse_args(argv)
    targets = args.targets or list(TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    if args.functions and len(targets) != 1:
        parser.error("--functions needs exactly one target")
    if args.functions:
        missing = unmatched(targets[0], args.functions.split(","))
        if missing:
            parser.error(f"--functions: {missing[0]!r} names no function or method of {targets[0]}.py "
                         f"(a function is `name`, a method `Class.method`; fnmatch patterns allowed)")
    if args.max_children < 1:
        parser.error("--max-children must be >= 1")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    work = Path(tempfile.mkdtemp(prefix="mutation-"))
    results, hand = [], []
    try:
        if not args.hand:
            for target in targets:
                functions = args.functions.split(",") if args.functions else TARGETS[target]
                results.append(run_mutmut(target, functions, work, args.max_children, env, args.deselect))
        if not args.no_hand:
            hand = run_hand(work, targets, env, args.deselect)
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(results, hand)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "hand": hand}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
