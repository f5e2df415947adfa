"""The package's import graph, read from the source (ast): no import cycle, and no module
reaches into another's private names, in icl_jax/ and in launch/. A name a second module
needs is that module's public interface, or it lives in a module both import."""
import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "icl_jax")


def _modules(folder, prefix):
    """{dotted name: path} of the .py files under folder."""
    out = {}
    for here, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(here, f), folder)[:-3].replace(os.sep, ".")
                name = prefix + ("" if rel == "__init__" else "." + rel.removesuffix(".__init__"))
                out[name.strip(".")] = os.path.join(here, f)
    return out


def _imports(path, known):
    """(icl_jax modules this file imports, anywhere in it; private names it takes from
    them, as 'module.name')."""
    tree = ast.parse(open(path).read(), path)
    deps, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    deps.add(a.name)
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in known:  # from icl_jax import data as data_lib
                    deps.add(sub)
                    aliases[a.asname or a.name] = sub
                elif node.module in known:
                    deps.add(node.module)
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        private.append(sub)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            private.append(f"{aliases[node.value.id]}.{node.attr}")
    return deps, private


def _graph():
    known = _modules(PACKAGE, "icl_jax")
    return known, {name: _imports(path, known) for name, path in known.items()}


def _cycles(edges):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def _edges(graph):
    # a package's __init__ importing its own submodules is how a package is built, not a cycle
    return {m: {d for d in deps if not d.startswith(m + ".")} for m, (deps, _) in graph.items()}


def test_the_package_has_no_import_cycle():
    _, graph = _graph()
    assert _cycles(_edges(graph)) == []


def test_no_module_takes_another_modules_private_names():
    known, graph = _graph()
    launch = _modules(os.path.join(ROOT, "launch"), "launch")
    found = {m: p for m, (_, p) in graph.items() if p}
    found.update({m: p for m, path in launch.items() for p in [_imports(path, known)[1]] if p})
    assert found == {}


def test_the_checks_find_what_they_look_for():
    # a cycle and a private import written the ways the package writes imports
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    import tempfile
    known = {"icl_jax.data": "", "icl_jax": ""}
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write("def f():\n    from icl_jax.data import _need, need\n"
                "    from icl_jax import data as d\n    return d._rng(0)\n")
    deps, private = _imports(f.name, known)
    os.unlink(f.name)
    assert deps == {"icl_jax.data"} and sorted(private) == ["icl_jax.data._need",
                                                            "icl_jax.data._rng"]
