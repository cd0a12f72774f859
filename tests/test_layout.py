"""The shape of the code: layers as folders importing one way (serving -> runtime -> model),
no module reaching for another's `_underscore` names, no library or plugin file over 500
lines, and nothing in the repository pointing outside it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "chroma_agent"
SOURCES = [*LIBRARY.rglob("*.py"), *(REPO / "plugins").rglob("*.py")]
LAYERS = ["model", "runtime", "serving"]   # each may import only those before it


def _module(path: Path) -> list[str]:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "plugins":   # plugins/NAME/<package...>
        parts = parts[2:]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path):
    """(imported module, names) of every import in `path`, relative ones resolved."""
    package = _module(path) if path.name == "__init__.py" else _module(path)[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            yield module, [alias.name for alias in node.names]


def test_layers_import_one_way():
    wrong = []
    for path in LIBRARY.rglob("*.py"):
        layer = _module(path)[1] if len(_module(path)) > 1 else None
        if layer not in LAYERS:
            continue
        allowed = LAYERS[: LAYERS.index(layer) + 1]
        for module, _ in _imports(path):
            parts = module.split(".")
            if parts[0] == "chroma_agent" and len(parts) > 1 and parts[1] in LAYERS and parts[1] not in allowed:
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
            if parts[0] == "chroma_agent" and len(parts) > 1 and parts[1] in ("api", "cli"):
                wrong.append(f"{path.relative_to(REPO)} imports {module} (above the layers)")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = [f"{path.relative_to(REPO)}: from {module} import {name}"
             for path in SOURCES for module, names in _imports(path)
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert not wrong, "\n".join(wrong)


def test_no_library_or_plugin_file_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_plugins_never_imported_by_the_library():
    wrong = [f"{path.relative_to(REPO)} imports {module}" for path in LIBRARY.rglob("*.py")
             for module, _ in _imports(path) if module.split(".")[0] in ("pipecat_chroma", "livekit")]
    assert not wrong, "\n".join(wrong)


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:   # not a git checkout (an sdist): the files on disk
        tracked = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()]
    beside = "../" + "shared"   # the workspace folder beside a checkout, never part of the project
    outside = [name for name in tracked if (REPO / name).suffix in (".py", ".md", ".toml", "")
               and (REPO / name).is_file() and beside in (REPO / name).read_text(errors="ignore")]
    assert not outside, outside


def test_cli_help_loads_no_framework():
    code = ("import sys; from chroma_agent.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'pipecat') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
