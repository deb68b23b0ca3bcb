"""The layout every reader relies on: the six stage files import strictly left to right,
data -> tokenizer -> diffusion -> rollout -> evaluate -> train, also inside functions, and the
repository refers to nothing outside itself."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDER = ["data", "tokenizer", "diffusion", "rollout", "evaluate", "train"]


def project_imports(name):
    """(line, module) of every import of a stage file by `name`.py, at any depth (functions included)."""
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module.split(".")[0]))
    return [(line, module) for line, module in found if module in ORDER]


@pytest.mark.parametrize("name", ORDER)
def test_imports_point_left_only(name):
    wrong = [f"{name}.py:{line} imports {module}" for line, module in project_imports(name)
             if ORDER.index(module) >= ORDER.index(name)]
    assert not wrong, wrong


def test_the_checker_sees_imports_inside_functions(tmp_path, monkeypatch):
    """A control: an import hidden in a function body is found, so the test above could fail."""
    (tmp_path / "data.py").write_text("def f():\n    import train\n    from rollout import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    assert project_imports("data") == [(2, "train"), (3, "rollout")]


def test_no_reference_outside_the_repository():
    files = [f for f in os.listdir(ROOT) if f.endswith((".py", ".md"))]
    files += [os.path.join("tests", f) for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")]
    for f in files:
        text = open(os.path.join(ROOT, f)).read()
        if f != os.path.join("tests", "test_architecture.py"):
            assert "../shared" not in text and "CONTRACTS.md" not in text and "spec/" not in text, f
