"""Allowed values are stated once: `config.CHOICES` (its code-sandbox kinds come from rewards/sandbox.py).
Error messages elsewhere print them from there, each field's doc explains every value, and the model presets
offered are the architectures built."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from megatron_oapl import config
from megatron_oapl.models.presets import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[2]


def _field_doc(dotted: str) -> str:
    *path, leaf = dotted.split(".")
    cls = config.RunConfig
    for part in path:
        cls = typing.get_type_hints(cls)[part]
    return config.field_docs(cls).get(leaf, "")


@pytest.mark.parametrize("name", sorted(config.CHOICES))
def test_each_allowed_value_is_documented_on_its_field(name):
    doc = _field_doc(name)
    assert [v for v in config.CHOICES[name] if v not in doc] == [], f"{name}: {doc}"


def test_model_presets_are_the_architectures_built():
    assert config.CHOICES["model.preset"] == tuple(ARCHITECTURES)


def _restatements(path: Path) -> list[str]:
    """Strings in `path` that spell out a choice field's allowed values the way a message would."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for name, values in config.CHOICES.items():
                if len(values) > 1 and any(sep.join(values) in node.value for sep in (", ", " | ")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} restates {name}")
    return found


def test_no_module_restates_allowed_values():
    files = [*(ROOT / "megatron_oapl").rglob("*.py"), *(ROOT / "launch").rglob("*.py")]
    found = [hit for path in sorted(files) if path.relative_to(ROOT).as_posix() not in
             {"megatron_oapl/config.py"} for hit in _restatements(path)]
    assert found == [], "print them from config.CHOICES instead:\n" + "\n".join(found)
