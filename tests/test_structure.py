"""The house's rules, checked mechanically over every module in minidiff/ and every numbered notebook:
no unused imports; no module imports the package `minidiff` (its `__init__`) or a module later in the reading order;
no notebook uses a name from a later notebook; few library lines over 120 characters.

The reading order is the notebook number each module is exported from (the `File to edit: ../nbs/NN_name.ipynb`
header nbdev writes); `14a_x` comes after `14_y` and before `15_z`."""
import ast, json, re
from pathlib import Path
import pytest

ROOT = Path(__file__).parents[1]
PKG, NBS = ROOT/"minidiff", ROOT/"nbs"
MAX_LINE, MAX_LONG_SHARE = 120, 0.02
_HEADER = re.compile(r"File to edit: \.\./nbs/((\d+)([a-z]?)_[\w-]+)\.ipynb")
_NB_NAME = re.compile(r"^(\d+)([a-z]?)_[\w-]+\.ipynb$")

def order_key(num, suffix): return (int(num), suffix)

def module_order(path):
    "Reading-order key of a module, from its nbdev header; None for a module no notebook exports."
    m = _HEADER.search(path.read_text(encoding="utf-8")[:2000])
    return order_key(m[2], m[3]) if m else None

MODULES = {p.stem: p for p in sorted(PKG.glob("*.py")) if p.name != "_modidx.py"}
ORDER = {name: module_order(p) for name, p in MODULES.items()}

def imports(tree, module):
    "(line, target module name or 'minidiff' for the package, names) of every import of minidiff, anywhere in `tree`."
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 1: out.append((node.lineno, node.module or "minidiff", names))
            elif node.module and (node.module == "minidiff" or node.module.startswith("minidiff.")):
                out.append((node.lineno, node.module.split(".")[1] if "." in node.module else "minidiff", names))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "minidiff" or a.name.startswith("minidiff."):
                    out.append((node.lineno, a.name.split(".")[1] if "." in a.name else "minidiff", []))
    return out

def unused_imports(tree, exported=()):
    "Names bound by imports in `tree` that are never read (names in `__all__` count as read)."
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names: bound[a.asname or a.name.split(".")[0]] = node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for a in node.names:
                if a.name != "*": bound[a.asname or a.name] = node.lineno
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return sorted((line, name) for name, line in bound.items() if name not in used and name not in exported)

def dunder_all(tree):
    "Names a module declares public: `__all__`, or nbdev's `_all_` in the package `__init__`."
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in ("__all__", "_all_") for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()

@pytest.mark.parametrize("name", MODULES)
def test_no_unused_imports(name):
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    bad = unused_imports(tree, dunder_all(tree))
    assert not bad, f"minidiff/{name}.py imports names it never uses: " + ", ".join(f"{n} (line {l})" for l, n in bad)

@pytest.mark.parametrize("name", [n for n in MODULES if n != "__init__"])
def test_imports_only_earlier_modules(name):
    tree, here = ast.parse(MODULES[name].read_text(encoding="utf-8")), ORDER[name]
    assert here is not None, f"minidiff/{name}.py has no nbdev header naming its notebook"
    bad = []
    for line, target, names in imports(tree, name):
        if target == "minidiff":
            bad.append(f"line {line}: imports the package minidiff ({', '.join(names) or 'import minidiff'}); "
                       "import from the module that defines the name")
        elif target not in ORDER: bad.append(f"line {line}: imports minidiff.{target}, which does not exist")
        elif ORDER[target] is None or ORDER[target] > here:
            bad.append(f"line {line}: imports minidiff.{target} (notebook {ORDER[target]}), later than this module's "
                       f"notebook {here}")
    assert not bad, f"minidiff/{name}.py reaches forward or up:\n  " + "\n  ".join(bad)

def library_lines(path):
    "The lines of a module that people wrote: without nbdev's module docstring and its generated `__all__` cell."
    lines, out, generated = path.read_text(encoding="utf-8").splitlines(), [], False
    for i, l in enumerate(lines):
        if i == 0 and l.startswith('"""'): continue
        if l.startswith("# %% "): generated = l.startswith("# %% auto")
        if not generated: out.append(l)
    return out

def test_few_long_lines():
    lines = {n: library_lines(p) for n, p in MODULES.items()}
    long = {n: sum(len(l) > MAX_LINE for l in ls) for n, ls in lines.items()}
    total, n_long = sum(map(len, lines.values())), sum(long.values())
    worst = ", ".join(f"{n} {k}" for n, k in sorted(long.items(), key=lambda kv: -kv[1]) if k)
    assert n_long <= MAX_LONG_SHARE * total, (f"{n_long} of {total} library lines ({n_long / total:.1%}) are over "
                                              f"{MAX_LINE} characters (at most {MAX_LONG_SHARE:.0%}): {worst}")

# --- notebooks: a notebook uses only what it or an earlier notebook defines ---

NOTEBOOKS = {p.name: order_key(*_NB_NAME.match(p.name).groups()) for p in sorted(NBS.glob("*.ipynb"))
             if _NB_NAME.match(p.name) and not p.name.startswith("99_")}

def public_names():
    "name -> module, for what `from minidiff import name` gives (read from the package's __init__)."
    tree = ast.parse((PKG/"__init__.py").read_text(encoding="utf-8"))
    return {a.asname or a.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 1
            for a in node.names}

def notebook_uses(path):
    "(cell index, module, name) of every minidiff import in the code cells of a notebook."
    out, public = [], public_names()
    for i, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] != "code": continue
        src = "\n".join(l for l in "".join(cell["source"]).splitlines() if not l.lstrip().startswith(("#|", "%", "!")))
        try: tree = ast.parse(src)
        except SyntaxError: continue
        for _, target, names in imports(tree, None):
            if target == "minidiff": out += [(i, public.get(n, "?"), n) for n in names]
            else: out += [(i, target, n) for n in names or ["*"]]
    return out

@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_notebook_uses_only_earlier_notebooks(nb):
    here, bad = NOTEBOOKS[nb], []
    for cell, module, name in notebook_uses(NBS/nb):
        there = ORDER.get(module)
        if there is None: bad.append(f"cell {cell}: {name} from minidiff.{module}, which no notebook exports")
        elif there > here: bad.append(f"cell {cell}: {name} from minidiff.{module} (notebook {there}), later than {here}")
    assert not bad, f"nbs/{nb} uses names defined later in the reading order:\n  " + "\n  ".join(bad)
