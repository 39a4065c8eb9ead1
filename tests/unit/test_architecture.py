"""The layers of docs/design.md, checked in the code so that they cannot drift: which parts of
dkim_sidecar may import which, what the libraries keep out, how long a module may grow."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from harness.paths import REPO

PACKAGE = REPO / "milter" / "dkim_sidecar"
DESIGN = REPO / "docs" / "design.md"

# Each library: the parts of dkim_sidecar it may import (itself only), and outside packages it
# must never import (I/O and application concerns stay out of it).
LIBRARIES = {
    "dkim": {"asyncio", "redis", "yaml", "prometheus_client", "socket", "uvloop", "dkim"},
    "milter": {"redis", "yaml", "prometheus_client", "cryptography", "dkim"},
}

# Inside the application, the directions that keep it layered: a module (or package) and what
# of dkim_sidecar it must never import.
FORBIDDEN = {
    "relay": ("dkim_sidecar.",),
    "keysources": tuple(
        f"dkim_sidecar.{m}"
        for m in ("config", "runtime", "session", "service", "cli", "peers", "metrics", "milter")
    ),
    "config": (
        *(f"dkim_sidecar.{m}" for m in ("runtime", "session", "service", "cli", "peers")),
        "dkim_sidecar.metrics",
        "dkim_sidecar.logs",
        "dkim_sidecar.keysources.local",
        "dkim_sidecar.keysources.mailcow",
    ),
    "session": ("dkim_sidecar.service", "dkim_sidecar.cli", "dkim_sidecar.peers"),
    "runtime": ("dkim_sidecar.service", "dkim_sidecar.session", "dkim_sidecar.cli"),
}

# No module grows past ~400 lines (the C helper aside): past that, a module holds more than
# one concern. A module allowed more, with a reason, would be listed here with its length.
OVERSIZE: dict[str, int] = {}
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports (relative imports resolved), at any depth of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_the_libraries_import_nothing_of_the_application() -> None:
    problems = []
    for name, path in _modules().items():
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in LIBRARIES:
            continue
        library = f"dkim_sidecar.{parts[1]}"
        for imported in _imports(name, path):
            top = imported.split(".")[0]
            if imported.startswith("dkim_sidecar") and not (
                imported == library or imported.startswith(library + ".")
            ):
                # `from dkim_sidecar import x` shows as dkim_sidecar and dkim_sidecar.x
                if imported != "dkim_sidecar":
                    problems.append(f"{name} imports {imported}")
            elif top in LIBRARIES[parts[1]]:
                problems.append(f"{name} imports {imported} (kept out of {library})")
    assert not problems, "\n".join(sorted(problems))


def test_the_application_imports_point_one_way() -> None:
    problems = []
    for name, path in _modules().items():
        part = name.split(".")[1] if "." in name else ""
        for imported in _imports(name, path):
            if any(imported.startswith(f) for f in FORBIDDEN.get(part, ())):
                problems.append(f"{name} imports {imported}")
    assert not problems, "\n".join(sorted(problems))


def test_the_checks_see_a_forbidden_import() -> None:
    """The walker resolves relative imports: the test above can fail."""
    found = _imports("dkim_sidecar.milter.server", PACKAGE / "milter" / "server.py")
    assert "dkim_sidecar.milter.address" in found and "asyncio" in found
    fake = PACKAGE / "dkim" / "canon.py"
    assert "dkim_sidecar.dkim._scan" in _imports("dkim_sidecar.dkim.canon", fake)


def test_modules_stay_short() -> None:
    long = {}
    for name, path in _modules().items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        allowed = OVERSIZE.get(str(path.relative_to(PACKAGE)), MAX_LINES)
        if lines > allowed:
            long[name] = lines
    assert not long, f"over {MAX_LINES} lines (or over their length today): {long}"


def test_the_design_document_names_every_module() -> None:
    """docs/design.md's map of the package lists each module by its path: a new or renamed
    module is written down there too."""
    text = DESIGN.read_text(encoding="utf-8")
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py" and str(path.relative_to(PACKAGE)) not in text
    ]
    assert not missing, f"not in docs/design.md: {missing}"
    # and the other way: every file it names is there
    named = re.findall(r"`((?:[\w.-]+/)*[\w.-]+\.(?:py|c))`", text)
    gone = [
        n
        for n in named
        if (n.endswith(".py") or "/" in n)  # ours (milter8.c is Postfix's)
        and not (REPO / n if n.startswith("tests/") else PACKAGE / n).exists()
        and not (REPO / n).exists()
    ]
    assert not gone, f"docs/design.md names files that do not exist: {gone}"
