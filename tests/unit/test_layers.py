"""hvjit's import graph follows docs/architecture.md: no cycles, and no module imports a
layer above its own. The graph is read from the source (every import statement, also those
inside functions and ``if TYPE_CHECKING:`` blocks)."""

import ast
import fnmatch
from pathlib import Path

import hvjit

PACKAGE = Path(hvjit.__file__).resolve().parent

# Bottom to top; a module may import its own layer and the ones below (docs/architecture.md).
LAYERS = [
    ("base", ["hvjit", "hvjit._cachedir", "hvjit._jit", "hvjit.abi", "hvjit.errors", "hvjit.helper_threads"]),
    ("kernels and the C ABI", ["hvjit.kernels", "hvjit.kernels.*", "hvjit._trampoline"]),
    ("devices and firmware tables", ["hvjit.devices", "hvjit.devices.*", "hvjit.firmware", "hvjit.firmware.*"]),
    ("the machine", ["hvjit.system", "hvjit.memory", "hvjit.watchdog", "hvjit.exits", "hvjit.interrupts",
                     "hvjit.run_loop", "hvjit.emulation", "hvjit.emulation.*", "hvjit.exit_handlers",
                     "hvjit.vcpu_lifecycle", "hvjit.vcpu_debug", "hvjit.vcpu_events", "hvjit.cpuid",
                     "hvjit.msr_filter", "hvjit.tsc", "hvjit.vcpu", "hvjit.vcpu_threads", "hvjit.dirty",
                     "hvjit.snapshot_file", "hvjit.snapshot", "hvjit.reset", "hvjit.gdb_protocol", "hvjit.gdb_registers",
                     "hvjit.gdbstub", "hvjit.trace", "hvjit.hooks", "hvjit.syscall_entry", "hvjit.rep_strings",
                     "hvjit.kvm_stats", "hvjit.timer_slack",
                     "hvjit.vm", "hvjit.entry", "hvjit.asm"]),
    ("management", ["hvjit.handles", "hvjit.objects", "hvjit.factory", "hvjit.gip", "hvjit.session"]),
    ("front", ["hvjit.boot_progress", "hvjit.loaders", "hvjit.loaders.*", "hvjit.msr", "hvjit.benchmarks", "hvjit.benchmarks.*",
               "hvjit.fuzz", "hvjit.fuzz.*", "hvjit.fleet", "hvjit.cli", "hvjit.__main__", "hvjit.trace_plot",
               "hvjit.serve", "hvjit.serve_client"]),
]
# Stricter rooms inside a layer: pure kernels and devices see only the base (and their own package).
ONLY = {
    "hvjit.kernels.*": ["hvjit", "hvjit._cachedir", "hvjit._jit", "hvjit.abi", "hvjit.errors", "hvjit.kernels", "hvjit.kernels.*"],
    "hvjit.devices.*": ["hvjit", "hvjit._cachedir", "hvjit._jit", "hvjit.abi", "hvjit.errors", "hvjit.devices", "hvjit.devices.*"],
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                candidates = [f"{target}.{a.name}" for a in node.names] if not node.module or node.level else []
                candidates += [target] if not candidates or node.module else []
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                while c and c not in mods:
                    c = c.rpartition(".")[0]
                # A submodule naming its own package (``from . import x``) is not an edge.
                if c and c != name and not name.startswith(c + "."):
                    graph[name].add(c)
    return graph


def _matches(module: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)


def layer_of(module: str) -> int:
    for rank, (_, patterns) in enumerate(LAYERS):
        if _matches(module, patterns):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def _cycles(graph):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = import_graph()
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m)]
    assert upward == []


def test_kernels_and_devices_see_only_the_base():
    graph = import_graph()
    bad = [f"{m} imports {t}" for m, targets in graph.items() for room, allowed in ONLY.items()
           if fnmatch.fnmatchcase(m, room) for t in targets if not _matches(t, allowed)]
    assert bad == []


def test_the_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The graph is real: a device importing the session is found (a test that can fail)."""
    original = ast.parse

    def with_extra_import(source, *args, **kwargs):
        tree = original(source, *args, **kwargs)
        if "Universal asynchronous receiver" in source or "class Uart16550" in source:
            tree.body.insert(0, ast.parse("from hvjit.session import Session").body[0])
        return tree

    monkeypatch.setattr(ast, "parse", with_extra_import)
    graph = import_graph()
    assert "hvjit.session" in graph["hvjit.devices.uart16550"]
    assert layer_of("hvjit.session") > layer_of("hvjit.devices.uart16550")
