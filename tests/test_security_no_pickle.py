"""No pickle anywhere: the installed vlmq packages never import a code-executing deserializer
(pickle and its relatives), never ask numpy or torch to unpickle, never load YAML unsafely.
The scan reads the source of the packages as installed (what `import schemas` finds), with
the Python parser, so comments and docstrings that mention pickle don't count."""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Iterator, List, Tuple

import pytest

PACKAGES = ("schemas", "broker", "inference_worker", "env_agents", "ops")
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_YAML_LOADERS = {"Loader", "UnsafeLoader", "FullLoader"}


def _files() -> Iterator[str]:
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        assert spec is not None and spec.submodule_search_locations, f"{pkg} is not installed"
        for root in spec.submodule_search_locations:
            for dirpath, _, names in os.walk(root):
                for n in names:
                    if n.endswith(".py"):
                        yield os.path.join(dirpath, n)


def _const(node: ast.AST):
    return node.value if isinstance(node, ast.Constant) else None


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def violations(source: str, path: str = "<src>") -> List[Tuple[str, int, str]]:
    out = []
    for node in ast.walk(ast.parse(source, path)):
        where = (path, getattr(node, "lineno", 0))
        if isinstance(node, ast.Import):
            out += [
                (*where, f"import {a.name}") for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            out.append((*where, f"from {node.module} import"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            target = str(_const(node.args[0])) if node.args else ""
            if (
                name.split(".")[-1] in ("__import__", "import_module")
                and target.split(".")[0] in FORBIDDEN_MODULES
            ):
                out.append((*where, f"{name}({target!r})"))
            if _const(kw.get("allow_pickle")) is True:
                out.append((*where, f"{name}(allow_pickle=True)"))
            torch_load = name.endswith("torch.load") or (name == "load" and "weights_only" in kw)
            if torch_load and _const(kw.get("weights_only")) is not True:
                out.append((*where, f"{name} without weights_only=True"))
            if name in ("yaml.unsafe_load", "yaml.full_load") or name.endswith("read_pickle"):
                out.append((*where, name))
            if name == "yaml.load":
                loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
                if loader is None or _dotted(loader).split(".")[-1] in UNSAFE_YAML_LOADERS:
                    out.append((*where, "yaml.load with an unsafe Loader"))
    return out


def test_no_package_uses_a_code_executing_deserializer() -> None:
    files = list(_files())
    assert len(files) > 20  # the scan found the packages
    found = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            found += violations(f.read(), path)
    assert not found, "\n".join(f"{p}:{line}: {what}" for p, line, what in found)


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import cloudpickle as cp",
        "from pickle import loads",
        "from dill import loads",
        "import importlib; importlib.import_module('pickle')",
        "__import__('marshal')",
        "import numpy as np; np.load('x.npy', allow_pickle=True)",
        "import torch; torch.load('x.pt')",
        "import torch; torch.load('x.pt', weights_only=False)",
        "import yaml; yaml.load(open('x'))",
        "import yaml; yaml.load(open('x'), Loader=yaml.Loader)",
        "import yaml; yaml.unsafe_load(open('x'))",
        "import pandas as pd; pd.read_pickle('x')",
    ],
)
def test_the_scan_catches(snippet: str) -> None:
    assert violations(snippet), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        '"""We never pickle anything."""',
        "# import pickle",
        "import numpy as np; np.load('x.npz', allow_pickle=False)",
        "import torch; torch.load('x.pt', map_location='cpu', weights_only=True)",
        "import yaml; yaml.safe_load(open('x'))",
        "import yaml; yaml.load(open('x'), Loader=yaml.SafeLoader)",
        "import msgpack; msgpack.unpackb(b'', raw=False)",
    ],
)
def test_the_scan_allows(snippet: str) -> None:
    assert not violations(snippet), snippet


def test_a_pickle_on_the_wire_is_just_malformed_bytes() -> None:
    import pickle  # here only, to build the hostile payload

    from schemas.errors import ErrorCode, ProtocolError
    from schemas.messages import decode_request

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    with pytest.raises(ProtocolError) as err:
        decode_request(pickle.dumps(Boom()))
    assert err.value.code == ErrorCode.MALFORMED
