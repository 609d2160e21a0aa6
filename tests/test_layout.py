"""The import arrows of the architecture (README, Layout): the library never imports our
training application, the framework patches never import the integrations that use them, and
``ops/`` needs only the schema, ``numbers`` and its own math. Read from the sources with ``ast``
(lazy imports inside functions count too)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(folder, package):
    """``{dotted module name: path}`` of every .py file under ``folder``."""
    found = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), os.path.join(ROOT, folder))
                parts = rel[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join([package, *parts])] = os.path.join(dirpath, name)
    return found


LIBRARY = modules("ntl_deepspeed", "ntl_deepspeed")
PATCHES = modules("patches", "ntl_deepspeed.patches")


def imports(module, path):
    """Absolute names of everything ``module`` imports (relative imports resolved)."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def offending(sources, forbidden):
    return sorted(f"{m} imports {name}" for m, path in sources.items()
                  for name in imports(m, path)
                  if any(name == f or name.startswith(f + ".") for f in forbidden))


def test_library_never_imports_the_training_application():
    library = {m: p for m, p in {**LIBRARY, **PATCHES}.items()
               if not m.startswith("ntl_deepspeed.train")}
    assert not offending(library, ["ntl_deepspeed.train"])


def test_patches_never_import_the_integrations():  # integrations -> patches only: no cycle
    assert not offending(PATCHES, ["ntl_deepspeed.integrations"])


@pytest.mark.parametrize("forbidden", ["ntl_deepspeed.integrations", "ntl_deepspeed.patches",
                                       "ntl_deepspeed.loss", "ntl_deepspeed.metrics"])
def test_ops_import_only_schema_numbers_and_math(forbidden):
    ops = {m: p for m, p in LIBRARY.items() if m.startswith("ntl_deepspeed.ops")}
    assert ops and not offending(ops, [forbidden])
