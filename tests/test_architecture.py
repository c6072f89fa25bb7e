"""The code's shape: the public API each package front promises, and no import cycles.

Like httpx's tests/test_exported_members.py: a name dropped from a front, or a private module
leaking into one, fails here before it breaks a user's import.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "localllm"

FRONTS = {
    "localllm": {
        "DoesNotFitError",
        "FitRequest",
        "GGUFError",
        "Hardware",
        "LocalLLMError",
        "ModelHeader",
        "Plan",
        "Settings",
        "fit",
        "format_plan",
        "hardware_for",
        "load_settings",
        "read_header",
    },
    "localllm.fitter": {
        "DeviceMemory",
        "FitRequest",
        "Plan",
        "fit",
        "fit_header",
        "fit_ladder",
        "format_plan",
        "load_quality_loss",
        "measured_quality_losses",
        "plan_summary_line",
        "quant_name",
        "read_headers",
    },
    "localllm.router": {
        "UNSET",
        "Lease",
        "LoadedModel",
        "ModelCounters",
        "ModelEntry",
        "Registry",
        "Router",
        "WorkerClient",
        "parse_keep_alive",
    },
    "localllm.server": {"create_app", "serve"},
    "localllm.tools": {
        "ContentDelta",
        "GrammarBuilder",
        "OutputParser",
        "ParsedOutput",
        "ReasoningDelta",
        "ReasoningFormat",
        "ReasoningSplitter",
        "TemplateCaps",
        "Tool",
        "ToolCall",
        "ToolCallDelta",
        "ToolCallParser",
        "ToolChoice",
        "ToolFormat",
        "ToolSyntax",
        "ToolUse",
        "check_messages",
        "detect_format",
        "json_schema_grammar",
        "parse_output",
        "parse_tool_choice",
        "parse_tools",
        "render_prompt",
        "split_reasoning",
        "tool_syntax",
    },
}


@pytest.mark.parametrize("front", sorted(FRONTS))
def test_exported_members(front: str) -> None:
    module = importlib.import_module(front)
    assert set(module.__all__) == FRONTS[front]
    for name in module.__all__:
        member = getattr(module, name)
        # everything exported is defined in this package, and none of it is a module
        assert not isinstance(member, type(sys))
        assert getattr(member, "__module__", "localllm").startswith("localllm")


def test_engine_front_exports_what_it_names() -> None:
    engine = importlib.import_module("localllm.engine")
    for name in engine.__all__:
        assert hasattr(engine, name), name


def test_fit_is_a_function_however_it_is_reached(tmp_path: Path) -> None:
    # A fresh interpreter: `import localllm.fitter` must not turn `localllm.fit` into a module,
    # and calling it twice works (a subpackage named `fit` used to shadow the function).
    from tests.gguf_factory import LLAMA_7B, write_gguf

    model = write_gguf(tmp_path / "llama-7b.Q4_K_M.gguf", LLAMA_7B)
    code = f"""
import localllm
from localllm import fit
import localllm.fitter
card = localllm.hardware_for(None, gpus=localllm.hardware.parse_gpu_names("rtx3090"))
first = localllm.fit({str(model)!r}, card)
second = localllm.fit({str(model)!r}, card)
assert fit is localllm.fit and callable(fit)
assert first.quant == second.quant == "Q4_K_M"
assert first.n_gpu_layers == second.n_gpu_layers == 33
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_readme_library_example_runs(tmp_path: Path) -> None:
    """The Python block of docs/library.md, run as written against a folder."""
    from tests.gguf_factory import LLAMA_7B, write_gguf

    text = (REPO / "docs" / "library.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, "docs/library.md has no python block"
    folder = tmp_path / "models"
    folder.mkdir()
    for quant in ("Q4_K_M", "Q8_0"):
        write_gguf(folder / f"llama-7b.{quant}.gguf", LLAMA_7B, quant=quant)
    result = subprocess.run(
        [sys.executable, "-c", match[1]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "Plan: " in result.stdout


def _imports(path: Path, module: str) -> set[str]:
    """localllm modules `path` imports (at any depth, lazily or not), resolved to module names."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("localllm"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("localllm"):
                found.add(base)
                # `from localllm.engine import build` imports the module localllm.engine.build
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        graph[name] = {dep for dep in _imports(path, name) if dep in modules and dep != name}
    return graph


def test_no_import_cycles() -> None:
    """Lower layers never import the layers above them, lazily or not.

    A package's own `__init__` re-exporting its submodules is not a cycle: edges from a package to
    its submodules are ignored, edges from a submodule up to its package front are not.
    """
    graph = _module_graph()
    edges = {
        name: {dep for dep in deps if not dep.startswith(name + ".")}
        for name, deps in graph.items()
    }
    visiting: list[str] = []
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycles.append(visiting[visiting.index(node) :] + [node])
            return
        visiting.append(node)
        for dep in sorted(edges[node]):
            visit(dep)
        visiting.pop()
        done.add(node)

    for node in sorted(edges):
        visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles(tmp_path: Path) -> None:
    a = tmp_path / "a.py"
    a.write_text("from localllm.doctor import x\n\ndef f():\n    from localllm.loading import y\n")
    assert _imports(a, "localllm.a") == {
        "localllm.doctor",
        "localllm.doctor.x",
        "localllm.loading",
        "localllm.loading.y",
    }


def test_the_fitter_core_does_no_io() -> None:
    """Only `fitter/sources.py` may reach the disk, the hardware probes or llama.cpp."""
    graph = _module_graph()
    allowed = {
        "localllm.errors",
        "localllm.ggml",
        "localllm.units",
        "localllm.gguf_header",  # the ModelHeader record
        "localllm.hardware",  # the Hardware record
        "localllm.architectures",  # llama.cpp's per-architecture memory facts, pure data
        "localllm.vision.projector",  # the Projector record and its per-type facts, pure
    }
    for name, deps in graph.items():
        if name.startswith("localllm.fitter.") and name != "localllm.fitter.sources":
            outside = {d for d in deps if not d.startswith("localllm.fitter")}
            assert outside <= allowed, (name, outside - allowed)
    source = (PACKAGE / "fitter" / "search.py").read_text()
    assert "open(" not in source and "read_header(" not in source
