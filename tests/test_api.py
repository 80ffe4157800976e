"""The package face: what `import tunesmith` offers, and that no name there shadows a submodule."""

import pkgutil
import subprocess
import sys
import types

import tunesmith

SUBMODULES = sorted(m.name for m in pkgutil.iter_modules(tunesmith.__path__))


def test_no_public_name_shadows_a_submodule():
    for name in tunesmith.__all__:
        if name in SUBMODULES:
            assert isinstance(getattr(tunesmith, name), types.ModuleType), name


def test_every_exported_name_resolves():
    for name in tunesmith.__all__:
        assert getattr(tunesmith, name) is not None, name


# In a fresh interpreter: the first access, the second, and after a submodule of each package was imported
# (which once rebound `tunesmith.continual` from the function to the module between two calls).
_FRESH = """
import importlib, types, tunesmith
for name in ("compare", "continual", "serve"):
    first = getattr(tunesmith, name)
    assert isinstance(first, types.ModuleType), (name, first)
    assert callable(first.run), name
    importlib.import_module(f"tunesmith.{name}.config" if name != "serve" else "tunesmith.serve.app")
    assert getattr(tunesmith, name) is first and callable(getattr(tunesmith, name).run), name
assert callable(tunesmith.train) and callable(tunesmith.train)
assert callable(tunesmith.generate) and isinstance(tunesmith.generation, types.ModuleType)
print("ok")
"""


def test_the_api_resolves_the_same_twice_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
