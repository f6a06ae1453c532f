"""Security rules as checks on the source: inputs never reach pickle, YAML is only read safely, torch.load only
with weights_only, remote code only when a config asks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "recaption"


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_unsafe_deserialisation(path):
    for name, node in calls(path):
        assert not name.startswith(("pickle.", "cPickle.", "dill.", "marshal.")), f"{path}:{node.lineno} {name}"
        assert name not in ("eval", "exec", "yaml.load", "yaml.unsafe_load"), f"{path}:{node.lineno} {name}"
        if name.endswith("torch.load"):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert keywords.get("weights_only") == "True", f"{path}:{node.lineno} torch.load without weights_only"
        for k in node.keywords:
            if k.arg == "trust_remote_code":
                assert ast.unparse(k.value) != "True", f"{path}:{node.lineno} trust_remote_code hard-coded on"


def test_trust_remote_code_is_off_by_default():
    from recaption.config import ModelConfig

    assert ModelConfig(path="some/model").trust_remote_code is False
