"Every module imports in a fresh interpreter, without diffusers or transformers."
import pkgutil, subprocess, sys
import minidiff

MODULES = sorted(m.name for m in pkgutil.iter_modules(minidiff.__path__) if not m.name.startswith('_'))

def test_modules_import_in_fresh_interpreter():
    code = ("import sys, importlib\n"
            f"for m in {MODULES!r}: importlib.import_module('minidiff.' + m)\n"
            "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
            "assert not bad, f'minidiff imported {bad}'\n")
    subprocess.run([sys.executable, '-c', code], check=True)

def test_public_names_resolve():
    "Every name in `minidiff.__all__` exists, and the fixtures stay importable from the package."
    assert all(hasattr(minidiff, n) for n in minidiff.__all__)
    from minidiff import save_tiny_sd
    assert save_tiny_sd.__module__ == 'minidiff.tiny_sd'
