"""The runtime stays torch-free and Python-3.8 compatible (JetPack 5 ships Python 3.8)."""
import ast
import glob
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_FILES = sorted(glob.glob(os.path.join(ROOT, "runtime", "**", "*.py"), recursive=True))
DEVICE_SIDE_FILES = RUNTIME_FILES + [os.path.join(ROOT, "edgead", "cli", "run_cmd.py")]


def _module_name(path):
    """runtime/engines/base.py -> edgead.runtime.engines.base; runtime/__init__.py -> edgead.runtime."""
    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["edgead"] + parts)


#: every runtime module on disk (so modules added later are covered too), plus the device-side CLI
RUNTIME_MODULES = [_module_name(p) for p in RUNTIME_FILES] + ["edgead.cli", "edgead.cli.run_cmd"]

_BLOCKER = textwrap.dedent("""
    import sys

    class _NoTorch(object):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch.") or name in ("torchvision", "timm"):
                raise ImportError("torch is blocked in this test: " + name)
            return None

    sys.meta_path.insert(0, _NoTorch())
""")


def _run_blocked(body, cwd):
    code = _BLOCKER + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=120)


def test_blocker_really_blocks(tmp_path):
    proc = _run_blocked("import torch\n", str(tmp_path))
    assert proc.returncode != 0 and b"torch is blocked" in proc.stderr


def test_runtime_imports_and_runs_without_torch(tmp_path):
    from fake_models import write_fake_model

    model = write_fake_model(tmp_path / "m.onnx", batch=1)
    body = """
        import importlib, json
        for name in {modules!r}:
            importlib.import_module(name)
        from edgead.cli import main
        try:
            main(["bench", {model!r}, "--frames", "4", "--warmup", "1", "--json"])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        try:
            main(["run", {model!r}, "--source", "synthetic://?frames=3&defect=1", "--save", "out", "--json"])
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        assert not [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        print("OK")
    """.format(modules=RUNTIME_MODULES, model=model)
    proc = _run_blocked(body, str(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().strip().endswith("OK")
    assert len(os.listdir(tmp_path / "out")) == 3


class _Py38Checker(ast.NodeVisitor):
    """Constructs that parse under feature_version=(3, 8) but fail at runtime on 3.8."""

    BUILTIN_GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}

    def __init__(self):
        self.problems = []

    def _annotation(self, node):
        if node is None:
            return
        for sub in ast.walk(node):
            if isinstance(sub, ast.Subscript) and isinstance(sub.value, ast.Name) \
                    and sub.value.id in self.BUILTIN_GENERICS:
                self.problems.append("line {}: {}[...] annotation".format(sub.lineno, sub.value.id))
            if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr):
                self.problems.append("line {}: X | Y annotation".format(sub.lineno))

    def visit_FunctionDef(self, node):
        args = node.args
        for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if arg is not None:
                self._annotation(arg.annotation)
        self._annotation(node.returns)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_AnnAssign(self, node):
        self._annotation(node.annotation)
        self.generic_visit(node)

    def visit_Call(self, node):
        # str.removeprefix/removesuffix are 3.9+
        if isinstance(node.func, ast.Attribute) and node.func.attr in ("removeprefix", "removesuffix"):
            self.problems.append("line {}: .{}() is Python 3.9+".format(node.lineno, node.func.attr))
        self.generic_visit(node)


def test_checker_catches_py39_constructs():
    checker = _Py38Checker()
    checker.visit(ast.parse("def f(a: list[int]) -> str | None:\n    return 'x'.removeprefix('y')\n"))
    assert len(checker.problems) == 3
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 8))


@pytest.mark.parametrize("path", DEVICE_SIDE_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_python38_syntax(path):
    with open(path, "r", encoding="utf-8") as fh:
        source = fh.read()
    tree = ast.parse(source, filename=path, feature_version=(3, 8))
    checker = _Py38Checker()
    checker.visit(tree)
    assert not checker.problems, "{}: {}".format(path, checker.problems)


def test_every_runtime_file_is_checked():
    assert "edgead.runtime.engines.ort_engine" in RUNTIME_MODULES and "edgead.runtime" in RUNTIME_MODULES
    names = {os.path.relpath(p, ROOT) for p in RUNTIME_FILES}
    for expected in ("runtime/sources.py", "runtime/capture.py", "runtime/pipeline.py", "runtime/overlay.py",
                     "runtime/report.py", "runtime/modelinfo.py", "runtime/engines/ort_engine.py"):
        assert expected in names
