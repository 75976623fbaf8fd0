"""setup.py's build naming: the wheel's local version, its torch requirement and the default
CUDA architectures; and that the loader's "which wheel you need" names what setup.py builds.

setup.py runs setup() when executed, so its helper functions are taken out of its syntax tree
and run on their own (no build, no file written).
"""
import ast
import os
import re
from pathlib import Path

import pytest
import torch

from lora_ext._loader import wheel_tag_for

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def load_helpers(env=None):
    tree = ast.parse(SETUP.read_text())
    keep = [node for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.Import, ast.ImportFrom))
            or (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id in
                ("DEFAULT_ARCHS", "SDIST", "MIN_TORCH", "VERSION", "ROOT") for t in node.targets))]
    keep = [n for n in keep if not (isinstance(n, ast.ImportFrom) and n.module == "setuptools")]
    ns = {"__file__": str(SETUP)}
    old = dict(os.environ)
    try:
        os.environ.update(env or {})
        exec(compile(ast.Module(body=keep, type_ignores=[]), str(SETUP), "exec"), ns)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return ns


@pytest.fixture(scope="module")
def helpers():
    return load_helpers()


@pytest.mark.parametrize("version,requirement", [
    ("2.14.1+cu130", "torch>=2.14,<2.15"),
    ("2.14.0", "torch>=2.14,<2.15"),
    ("2.9.1+cpu", "torch>=2.9,<2.10"),
    ("3.0.0", "torch>=3.0,<3.1"),
    ("2.15.0.dev20260101+cu130", "torch>=2.15.0.dev0,<2.16"),   # nightlies are pre-releases
    ("2.15.0rc1", "torch>=2.15.0.dev0,<2.16"),
    ("2.14.0a0+gitabc1234", "torch>=2.14.0.dev0,<2.15"),
])
def test_torch_requirement_is_the_series(helpers, version, requirement):
    assert helpers["torch_requirement"](version) == requirement


@pytest.mark.parametrize("cuda,archs", [
    ("13.0", "8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
    ("12.8", "8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
    ("12.6", "8.0;8.6;8.9;9.0+PTX"),
    ("11.8", "8.0;8.6;8.9;9.0+PTX"),
    ("11.4", "8.0;8.6+PTX"),
])
def test_default_arch_list(helpers, cuda, archs):
    got = helpers["default_arch_list"](cuda)
    assert got == archs
    # only the newest carries PTX, and torch knows every entry
    entries = got.split(";")
    assert all("+PTX" not in e for e in entries[:-1]) and entries[-1].endswith("+PTX")
    assert entries == sorted(entries, key=lambda e: tuple(map(int, e.split("+")[0].split("."))))


def test_local_version_matches_the_loaders_advice(helpers):
    series = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert helpers["local_version"](False) == f"cputorch{series}" == wheel_tag_for(torch.__version__, None)
    if torch.version.cuda:
        cu = "cu" + torch.version.cuda.replace(".", "")
        assert helpers["local_version"](True) == f"{cu}torch{series}" \
            == wheel_tag_for(torch.__version__, torch.version.cuda)
    version = helpers["full_version"](False)
    assert re.fullmatch(rf"\d+\.\d+\.\d+\+cputorch{re.escape(series)}", version)


def test_local_version_overrides(monkeypatch):
    monkeypatch.setenv("LORA_EXT_LOCAL_VERSION", "custom1")
    assert load_helpers()["local_version"](True) == "custom1"
    monkeypatch.setenv("LORA_EXT_LOCAL_VERSION", "")
    assert load_helpers()["full_version"](True) == load_helpers()["VERSION"]
    monkeypatch.delenv("LORA_EXT_LOCAL_VERSION")
    neutral = load_helpers({"LORA_EXT_SDIST": "1"})
    assert neutral["full_version"](True) == neutral["VERSION"]
    assert neutral["MIN_TORCH"] == "torch>=2.6"
