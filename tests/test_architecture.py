"""The package's shape: no two modules import each other, directly or in a loop (lazy imports
inside functions count too), and long modules say why at their top."""
from pathlib import Path

from avepipe import provenance

PKG = Path(provenance.__file__).parent


def _graph() -> dict[str, set[str]]:
    mods = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)
    return {m: {x for x in provenance._imports(m) if x != m} for m in mods}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_long_modules_say_why():
    for p in PKG.rglob("*.py"):
        text = p.read_text()
        if text.count("\n") > 470:
            head = text.split('"""')[1] if text.lstrip().startswith(('"""', 'from __future__')) and '"""' in text else ""
            assert "Why one long module" in head, f"{p.relative_to(PKG)}: {text.count(chr(10))} lines, no reason given"
