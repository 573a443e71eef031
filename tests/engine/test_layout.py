"""The engine's shape: sub-packages whose imports point one way, one import name.

docs/architecture.md draws the layers; these tests keep the code to the drawing.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "mapclip" / "engine"

#: each sub-package and the sub-packages it may import (at run time)
ALLOWED = {
    "core": set(),
    "geo": {"core"},
    "raster": {"geo", "core"},
    "model": {"core"},
    "data": {"core"},
    "dedup": {"model", "core"},
    "archive": {"model", "raster", "geo", "core"},
    "cache": {"model", "raster", "geo", "core"},
}


def _engine_imports(path: Path):
    """(target sub-package, line) of every run-time relative import in ``path``."""
    rel = path.relative_to(ENGINE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if path.name != "__init__.py" else list(rel.parts[:-1])
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level and id(node) not in type_only:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = base + (node.module.split(".") if node.module else [])
            if len(target) >= 2 and target[0] == "engine":
                yield target[1], node.lineno
            elif len(target) == 1 and target[0] == "engine":
                for alias in node.names:
                    yield alias.name, node.lineno


def _module_name(path: Path) -> str:
    rel = path.relative_to(ENGINE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph():
    """Engine module -> engine modules it imports: every relative ``from`` import at
    any depth (deferred, function-level ones too; not those under TYPE_CHECKING)."""
    modules = {_module_name(f): f for f in ENGINE.rglob("*.py")}
    graph = {}
    for name, f in modules.items():
        package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        tree = ast.parse(f.read_text(encoding="utf-8"))
        type_only = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                type_only |= {id(n) for n in ast.walk(node)}
        out = set()
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.level) or id(node) in type_only:
                continue
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:          # ``from . import ann`` names a module
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in modules else target)
        graph[name] = {t for t in out if t in modules and t != name}
    return graph


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_engine_modules():
    """No engine module imports itself back through others, counting deferred
    (function-level) imports: archive/ stands on its format floor, archive and model
    do not call back into each other, raster's thread and process readers are chosen
    from above them (raster/stream.py), and the GSD maths sit below the tile grid."""
    cycles = [sorted(c) for c in _cycles(_import_graph())]
    assert not cycles, "import cycles among engine modules:\n" + "\n".join(map(" <-> ".join, cycles))


def test_archive_stands_on_its_format_floor():
    """archive/format.py imports nothing of the archive; approx and ann never import
    the store (an Index hands itself to them)."""
    graph = _import_graph()
    arch = "engine.archive."
    assert not {m for m in graph[arch + "format"] if m.startswith(arch)}
    for low in ("approx", "ann", "shards", "embed"):
        assert arch + "store" not in graph[arch + low], low
        assert arch + "writer" not in graph[arch + low], low


def test_sub_packages_import_only_downwards():
    wrong = []
    for pkg, allowed in ALLOWED.items():
        for f in sorted((ENGINE / pkg).rglob("*.py")):
            for target, line in _engine_imports(f):
                if target != pkg and target not in allowed:
                    wrong.append(f"{f.relative_to(ROOT)}:{line} imports engine.{target}")
    assert not wrong, "imports against the layering of docs/architecture.md:\n" + "\n".join(wrong)


#: the jobs (one user task each), the passes they share beneath them, the protocols above them
JOBS = ("detect", "count", "classify", "caption")
SHARED = ("rasterjob", "dense_pass")
PROTOCOLS = ("finetune", "evaluate", "quality", "caption_eval")


def test_jobs_do_not_import_each_other():
    """Arrows point down: a job (or a pass the jobs share) imports no job; what two jobs
    share lives beneath them (rasterjob, dense_pass). Protocols (quality, evaluate,
    caption_eval) are front ends over the jobs and may import them."""
    graph = _import_graph()
    jobs = {f"engine.{j}" for j in JOBS}
    wrong = {m: sorted(graph[m] & (jobs - {m})) for m in sorted(jobs | {f"engine.{s}" for s in SHARED})}
    assert not any(wrong.values()), {m: t for m, t in wrong.items() if t}


def test_every_engine_module_sits_in_a_sub_package_or_is_a_job():
    jobs = {"__init__", "__main__", *JOBS, *SHARED, *PROTOCOLS}
    loose = sorted(p.stem for p in ENGINE.glob("*.py") if p.stem not in jobs)
    assert not loose, f"modules outside the sub-packages: {loose}"
    for pkg in ALLOWED:
        assert (ENGINE / pkg / "__init__.py").is_file(), pkg


def test_core_needs_only_the_standard_library():
    code = ("import sys; import mapclip.engine.core.options, mapclip.engine.core.errors, "
            "mapclip.engine.core.outputs, mapclip.engine.core.jobs; "
            "print(sorted(m for m in ('numpy', 'torch', 'rasterio', 'open_clip', 'qgis') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_one_import_name_for_the_engine():
    """The top-level ``engine`` folder is only ``python -m engine``'s entry point: the
    engine's classes exist once, as ``mapclip.engine``."""
    shim = ROOT / "engine"
    assert sorted(p.name for p in shim.glob("*.py")) == ["__init__.py", "__main__.py"]
    code = ("import runpy, sys; sys.argv = ['engine', '--version'];\n"
            "try:\n    runpy.run_module('engine', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "import mapclip.engine.core.errors as e\n"
            "print(sorted(m for m in sys.modules if m.startswith('engine.')))\n"
            "print(e.MapClipError.__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    from mapclip.engine import __version__
    assert __version__ in lines[0]                    # the entry point ran the CLI
    assert lines[-2] == "[]"                          # nothing of the engine under the short name
    assert lines[-1] == "mapclip.engine.core.errors"


def test_raster_jobs_start_through_the_one_setup():
    """detect, count, classify and caption open the raster, load the model and prepare
    the device through engine.rasterjob (the embedding cache lives there), never by hand;
    the index build, which opens many rasters, through the setup's two halves
    (engine.model.setup.job_model, engine.raster.sources.open_job_raster)."""
    by_hand = ("open_raster(", "as_loaded(", "accel.prepare(", "auto_batch_size(")
    for name in ("detect", "count", "classify", "caption", "archive/build"):
        text = (ENGINE / f"{name}.py").read_text(encoding="utf-8")
        uses = ("job_model(", "open_job_raster(") if name == "archive/build" else ("raster_job(",)
        for use in uses:
            assert use in text, (name, use)
        for call in by_hand:
            assert call not in text, (name, call)


#: a module's and a function's size bound; a longer function says why on its def line
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 120
LONG = "# long:"
#: modules over the bound today, each with the split that would bring it under (the list may
#: only shrink: a listed module that is no longer long fails the test until it is taken off)
LONG_MODULES = {
}


def test_engine_modules_have_at_most_800_lines_but_the_named_ones():
    long = {p.relative_to(ENGINE).as_posix(): n for p in ENGINE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert set(long) <= set(LONG_MODULES), {k: v for k, v in long.items() if k not in LONG_MODULES}
    assert set(LONG_MODULES) <= set(long), f"no longer long, take off LONG_MODULES: {set(LONG_MODULES) - set(long)}"


def test_engine_functions_have_at_most_120_lines_or_say_why():
    too_long = []
    for path in sorted(ENGINE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and LONG not in lines[node.lineno - 1]:
                    too_long.append(f"{path.relative_to(ENGINE)}:{node.lineno} {node.name} ({length})")
    assert not too_long, too_long


def test_every_option_class_lives_in_core_options():
    """Facts live once: every *Options dataclass of the engine is in core/options.py."""
    stray = []
    for path in ENGINE.rglob("*.py"):
        if path == ENGINE / "core" / "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Options"):
                stray.append(f"{path.relative_to(ENGINE)}: {node.name}")
    assert not stray, stray


#: packages whose import costs seconds or may be missing when the plugin starts: an import of
#: a project module that (through its module-level imports) pulls one of them in may stay
#: inside a function
HEAVY = {"torch", "torchvision", "open_clip", "faiss", "ray", "rasterio", "osgeo", "PIL", "cv2",
         "pystac", "shapely", "pyogrio", "timm", "huggingface_hub", "safetensors", "tqdm"}
DEFERRED = "# deferred:"


def _dotted_name(path: Path) -> str:
    parts = list(path.relative_to(ENGINE.parent.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    base = _dotted_name(path).split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def test_deferred_imports_of_the_projects_modules_have_a_heavy_package_behind_them():
    """An import of one of the engine's own modules inside a function is kept there only when
    that module pulls in a heavy package at import time (HEAVY), or its line says why
    (``# deferred: reason``, e.g. a test replaces the name at call time); the rest sit at
    the top of their file, where a reader sees a module's dependencies."""
    top: Dict[str, set] = {}
    for path in ENGINE.rglob("*.py"):
        found = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                full = _absolute(path, node) if node.level else node.module
                found.update([f"{full}.{a.name}" for a in node.names] if node.module is None else [full])
        top[_dotted_name(path)] = found
    memo: Dict[str, bool] = {}

    def heavy(mod: str, stack=()) -> bool:
        if mod not in memo:
            memo[mod] = any(t.split(".")[0] in HEAVY or (t in top and t not in stack and heavy(t, stack + (mod,)))
                            for t in top.get(mod, ()))
        return memo[mod]

    light = []
    for path in sorted(ENGINE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level:
                    full = _absolute(path, node)
                    targets = [f"{full}.{a.name}" for a in node.names] if node.module is None else [full]
                    if any(t in top and not heavy(t) for t in targets) and DEFERRED not in lines[node.lineno - 1]:
                        light.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not light, ("imports of light modules inside functions (move them to the top, or say "
                       f"why with '{DEFERRED} reason'):\n" + "\n".join(sorted(set(light))))
