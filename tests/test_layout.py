"""The package layout keeps its promises (docs/architecture.md): no import cycle between herllm's
modules, lazy (function-level) imports included; no module named like a setuptools script; no
file far past the house limit of about 400 lines; every folder the architecture page names."""

import ast
from pathlib import Path

import herllm

ROOT = Path(herllm.__file__).parent
MAX_LINES = 440  # "files under about 400 lines"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """herllm modules `path` imports anywhere in it (top level or inside functions)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("herllm")}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            arg = node.args[0] if node.args else None  # importlib.import_module("herllm.x")
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("herllm"):
                out.add(arg.value)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1]
                    + ([base] if base else [])
                )
            if not base.startswith("herllm"):
                continue
            for a in node.names:  # `from herllm.x import y` imports module herllm.x.y if it is one
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != me}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_no_import_cycle_lazy_imports_included():
    known = modules()
    graph = {m: imports_of(p, known) for m, p in known.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_setup_module_inside_the_package():
    assert not list(ROOT.rglob("setup.py"))


def test_files_stay_near_the_house_limit():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_folders_the_architecture_page_names_exist():
    for folder in ("acquire", "refine", "memory", "update", "evaluate", "run", "parallel",
                   "models", "bench", "infer", "config", "cli"):  # fmt: skip
        assert (ROOT / folder / "__init__.py").is_file(), folder
    doc = (ROOT.parents[1] / "docs" / "architecture.md").read_text()
    for folder in ("acquire/", "refine/", "memory/", "update/", "evaluate/", "run/", "parallel/",
                   "models/", "bench/", "infer/"):  # fmt: skip
        assert folder in doc, f"docs/architecture.md does not describe {folder}"


def test_test_file_names_are_unique():
    """tests/ has no __init__.py: two test files with one basename cannot both be collected."""
    names = [p.name for p in (ROOT.parents[1] / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
