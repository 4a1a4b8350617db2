"""The layout's rules (docs/layout.md): one library, thin commands.

Read from the source with ``ast``, function-level imports included: no import cycle among qk_jax modules; no
library module imports a command (a module with a ``__main__`` block) or the command glue ``qk_jax.cli``; no
command imports another; and (run for real) ``python -m qk_jax.sample`` loads nothing of training or conversion.
"""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qk_jax"
CLI = "qk_jax.cli"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_command(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)


def _imports(name: str, tree: ast.Module, modules: set[str]) -> set[str]:
    """The qk_jax modules ``name`` imports anywhere in its body (``from a import b`` is ``a.b`` when that is a
    module, else ``a``)."""
    package = name if name in modules and (PACKAGE / "/".join(name.split(".")[1:]) / "__init__.py").exists() \
        else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph():
    paths = _modules()
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in paths.items()}
    graph = {name: _imports(name, tree, set(paths)) for name, tree in trees.items()}
    commands = {name for name, tree in trees.items() if _is_command(tree)}
    return graph, commands


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_rules_see_real_edges():
    """The reader finds what is there: commands, their library, imports inside functions, a cycle."""
    graph, commands = _graph()
    assert {"qk_jax.train", "qk_jax.sample", "qk_jax.evaluate", "qk_jax.convert.__main__"} <= commands
    assert "qk_jax.training.curriculum" in graph["qk_jax.train"] and CLI in graph["qk_jax.sample"]
    inner = ast.parse("def f():\n    from qk_jax.data import tasks\n    import qk_jax.ops.rope\n")
    assert _imports("qk_jax.x", inner, set(graph)) == {"qk_jax.data.tasks", "qk_jax.ops.rope"}  # in a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_qk_jax_modules():
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_library_modules_import_no_command_and_commands_no_other_command():
    graph, commands = _graph()
    library = set(graph) - commands - {CLI}
    wrong = sorted((m, dep) for m in library for dep in graph[m] if dep in commands or dep == CLI)
    assert not wrong, f"library modules importing commands: {wrong}"
    crossed = sorted((m, dep) for m in commands for dep in graph[m] if dep in commands)
    assert not crossed, f"commands importing commands: {crossed}"


def test_the_sample_command_loads_nothing_of_training_or_conversion():
    code = ("import sys, qk_jax.sample\n"
            "print(sorted(m for m in sys.modules if m.startswith(('qk_jax.training', 'qk_jax.convert'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
