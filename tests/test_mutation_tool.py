"""tools/mutation.py, the development tool behind docs/testing.md's mutation scores: its targets must name
functions that exist, or a rename would silently drop them from the score (mutmut runs a pattern that
matches nothing as zero mutants). Needs neither mutmut nor a mutation run."""
import ast
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("mutation_tool", os.path.join(ROOT, "tools", "mutation.py"))
mutation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation)


@pytest.mark.parametrize("target", sorted(mutation.TARGETS))
def test_every_target_pattern_names_a_function_of_its_file(target):
    assert mutation.unmatched(target, mutation.TARGETS[target]) == []


def test_function_names_are_the_files_functions_and_methods():
    """Against a second reading of the file: every `def` at the top level or directly in a class, by walking
    the whole tree and keeping the definitions whose parent is the module or a class."""
    tree = ast.parse(open(os.path.join(ROOT, "grpo.py")).read())
    expected = set()
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if isinstance(parent, ast.Module):
                    expected.add(child.name)
                elif isinstance(parent, ast.ClassDef) and parent in tree.body:
                    expected.add(f"{parent.name}.{child.name}")
    assert set(mutation.function_names("grpo")) == expected
    assert {"group_advantages", "grpo_loss", "main"} <= expected


@pytest.mark.parametrize("functions, missing", [("sample", []), ("KVCache.*", []), ("sample,smaple", ["smaple"]),
                                                ("generate_fast", ["generate_fast"]), ("KVCache.nope", ["KVCache.nope"])])
def test_unmatched_names_typos_and_renames(functions, missing):
    assert mutation.unmatched("model", functions.split(",")) == missing


def test_a_function_that_does_not_exist_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        mutation.main(["model", "--functions", "sample,smaple"])
    assert exit_info.value.code == 2
    assert "'smaple' names no function or method of model.py" in capsys.readouterr().err
