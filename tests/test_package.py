"""Packaging: `lora-ext info`, and the loader's torch-version check and error messages."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_ext
from lora_ext import cli
from lora_ext._loader import check_torch_matches, load_extension

ROOT = Path(__file__).resolve().parents[1]
REBUILD_COMMAND = "pip install --no-build-isolation"
INFO_KEYS = ("version", "torch_version", "installed_torch", "with_cuda", "cuda_kernels_present",
             "gpu_visible")


# ================================================================ lora-ext info


def check_report(report: dict) -> None:
    missing = [key for key in INFO_KEYS if key not in report]
    assert not missing, f"info lacks {missing}"
    assert report["version"] == lora_ext.BUILD_INFO["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", report["version"]), report["version"]
    assert report["torch_version"] == lora_ext.BUILD_INFO["torch_version"]
    assert report["installed_torch"] == torch.__version__
    assert report["with_cuda"] is bool(lora_ext.BUILD_INFO["with_cuda"])
    # CUDA kernels are registered exactly when the extension was built with them
    assert report["cuda_kernels_present"] is report["with_cuda"]
    assert report["gpu_visible"] is torch.cuda.is_available()


def run_cli(*argv: str, executable=(sys.executable, "-m", "lora_ext.cli")):
    result = subprocess.run([*executable, *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_info_json_subprocess():
    check_report(json.loads(run_cli("info", "--json")))


@pytest.mark.skipif(shutil.which("lora-ext") is None, reason="console script not installed")
def test_info_console_script():
    check_report(json.loads(run_cli("info", "--json", executable=(shutil.which("lora-ext"),))))


def test_info_in_process_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    check_report(json.loads(capsys.readouterr().out))


def test_info_in_process_text(capsys):
    assert cli.main(["info"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines()
                if line.strip())
    missing = [key for key in INFO_KEYS if key not in rows]
    assert not missing, f"info lacks {missing}"
    assert rows["version"] == lora_ext.BUILD_INFO["version"]
    assert rows["installed_torch"] == torch.__version__
    assert rows["with_cuda"] == str(bool(lora_ext.BUILD_INFO["with_cuda"]))
    assert rows["gpu_visible"] == str(torch.cuda.is_available())


def test_info_does_not_need_the_benchmark_harness(monkeypatch, capsys):
    # as if lora_ext/benchmark/ (or a package it needs) failed to import
    monkeypatch.setitem(sys.modules, "lora_ext.benchmark", None)
    monkeypatch.delattr(lora_ext, "benchmark", raising=False)
    assert cli.main(["info", "--json"]) == 0
    check_report(json.loads(capsys.readouterr().out))


# ================================================================ torch version check


@pytest.mark.parametrize("built,installed", [
    ("2.14.1+cu130", "2.13.0"),
    ("2.14.1+cu130", "2.15.0+cu130"),
    ("2.14.1", "3.14.1"),
    ("2.1.0", "2.14.1"),       # a prefix is not the same series
    ("2.14.1", "2.140.0"),
    ("2.14.1+cu130", "2.15.0.dev20260101+cu130"),
])
def test_check_torch_matches_rejects_other_series(built, installed):
    with pytest.raises(ImportError) as info:
        check_torch_matches({"torch_version": built}, installed)
    message = str(info.value)
    assert built in message and installed in message
    assert REBUILD_COMMAND in message


@pytest.mark.parametrize("built,installed", [
    ("2.14.1+cu130", "2.14.1+cu130"),
    ("2.14.1+cu130", "2.14.0"),
    ("2.14.1+cu130", "2.14.3+cpu"),
    ("2.14.0", "2.14.1+cu126"),
    ("2.14.0", "2.14.0a0+gitabc1234"),
])
def test_check_torch_matches_accepts_same_series(built, installed):
    check_torch_matches({"torch_version": built}, installed)


def test_load_extension_refuses_other_torch_series(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    with pytest.raises(ImportError, match=re.escape(REBUILD_COMMAND)) as info:
        load_extension()
    assert "2.99.0" in str(info.value)
    assert lora_ext.BUILD_INFO["torch_version"] in str(info.value)


def test_load_extension_missing_module_says_how_to_rebuild():
    with pytest.raises(ImportError) as info:
        load_extension("lora_ext._does_not_exist")
    message = str(info.value)
    assert "lora_ext._does_not_exist" in message
    assert REBUILD_COMMAND in message
    assert torch.__version__ in message
    assert isinstance(info.value.__cause__, ImportError)


def test_load_extension_default_module_loads():
    assert load_extension() is lora_ext._C
