"""One layer per runtime: imports only point down.

core (`deployments.core.*`, no Ray) <- Serve layer (`deployments.{image_encoder,text_encoder,
search,metrics}`, `serve_app.*`) and job (`batch_index.*`); benchmarks and tests may import
anything. Every import is read from the source (ast), including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("deployments", "serve_app", "batch_index")
SERVE_DEPLOYMENTS = ("image_encoder", "text_encoder", "search", "metrics")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or base.is_dir()


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in a file; `from a import b` names `a.b` when b is a
    module, else `a`; relative imports resolved against the file's package."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if _is_module(sub) else base))
    return found


def layer_of(module: str) -> str | None:
    """core, serve or job for this project's modules; None for third-party, benchmarks, tests."""
    if module == "deployments.core" or module.startswith("deployments.core."):
        return "core"
    parts = module.split(".")
    if parts[0] == "deployments":
        return "serve" if len(parts) == 1 or parts[1] in SERVE_DEPLOYMENTS else "unknown"
    if parts[0] == "serve_app":
        return "serve"
    if parts[0] == "batch_index":
        return "job"
    return None


def _top(module: str, name: str) -> bool:
    return module == name or module.startswith(name + ".")


def violation(importer: str, imported: str) -> str | None:
    """Why `importer` may not import `imported`, or None when it may."""
    layer = layer_of(importer)
    if _top(imported, "tests") or _top(imported, "benchmarks"):
        return "benchmarks and tests are not importable from the service"
    if layer == "core":
        if _top(imported, "ray"):
            return "core must not need Ray"
        if layer_of(imported) not in (None, "core"):
            return "core imports only core"
    elif layer == "serve":
        if _top(imported, "batch_index"):
            return "the Serve layer must not import the batch job"
        if importer.startswith("deployments") and _top(imported, "serve_app"):
            return "deployments must not import serve_app (it wires them)"
    elif layer == "job":
        if _top(imported, "serve_app"):
            return "the batch job must not import serve_app"
        if layer_of(imported) == "serve" and _top(imported, "deployments"):
            return "the batch job imports core, not Serve deployments"
    if layer_of(imported) == "unknown" or layer == "unknown":
        return "module outside the known layers (add it to tests/test_layers.py)"
    return None


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_layer_has_modules():
    layers = {layer_of(_module_name(p)) for p in _sources()}
    assert {"core", "serve", "job"} <= layers


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    importer = _module_name(path)
    bad = [f"{path.relative_to(ROOT)}:{line}: {imported} ({why})"
           for line, imported in imports_of(path)
           if (why := violation(importer, imported))]
    assert not bad, "\n".join(bad)


def test_rules_catch_upward_imports():
    assert violation("deployments.core.store", "ray") is not None
    assert violation("deployments.core.store", "ray.util.metrics") is not None
    assert violation("deployments.core.store", "deployments.metrics") is not None
    assert violation("deployments.core.store", "serve_app.http") is not None
    assert violation("deployments.search", "serve_app.schemas") is not None
    assert violation("deployments.search", "batch_index.pipeline") is not None
    assert violation("serve_app.ingress", "batch_index") is not None
    assert violation("batch_index.pipeline", "deployments.search") is not None
    assert violation("batch_index.pipeline", "serve_app.app") is not None
    assert violation("serve_app.app", "tests.support") is not None
    assert violation("serve_app.app", "deployments.search") is None
    assert violation("deployments.search", "deployments.metrics") is None
    assert violation("batch_index.pipeline", "ray") is None
    assert violation("batch_index.pipeline", "deployments.core.writes") is None


def test_lazy_and_relative_imports_are_seen(tmp_path, monkeypatch):
    module = ROOT / "deployments" / "core" / "_probe.py"
    source = "def f():\n    import ray\n    from . import store\n    from ..search import x\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    found = [m for _, m in imports_of(module)]
    assert found == ["ray", "deployments.core.store", "deployments.search"]
