"""scripts/peft_suite: the runner of PEFT's own LoRA tests, on a small stand-in for PEFT's
tests/ folder (PEFT's real files stay outside this repository)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "scripts" / "peft_suite"
sys.path.insert(0, str(SUITE))
import compare  # noqa: E402

FAKE_TESTS = {
    "__init__.py": "",
    "conftest.py": "",
    "testing_utils.py": "from datasets import load_dataset\nfrom diffusers import StableDiffusionPipeline\n",
    "testing_common.py": '''
import torch
from torch import nn


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
''',
    "test_custom_models.py": '''
import os

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from .testing_common import make_model
from .testing_utils import load_dataset  # noqa: F401  (guarded by the runner when datasets is missing)


@pytest.mark.parametrize("config_cls", [LoraConfig, IA3Config])
def test_forward(config_cls):
    model = get_peft_model(make_model(), config_cls(target_modules=["0"])).eval()
    assert model(torch.randn(4, 10)).shape == (4, 2)


@pytest.mark.parametrize("config_cls", [LoraConfig])
def test_entry_points(config_cls, tmp_path):
    ours = os.environ["LORA_EXT_SUITE_MODE"] == "ours"
    model = get_peft_model(make_model(), config_cls(target_modules=["0"]))
    assert type(model).__module__.startswith("lora_ext") == ours
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert type(loaded).__module__.startswith("lora_ext") == ours
    loaded(torch.randn(3, 10))


@pytest.mark.parametrize("config_cls", [LoraConfig])
def test_fails(config_cls):
    raise ValueError("boom 17")


def test_not_parametrized():
    pass
''',
}


@pytest.fixture(scope="module")
def fake_peft(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    (root / "tests").mkdir()
    for name, text in FAKE_TESTS.items():
        (root / "tests" / name).write_text(text)
    return root


@pytest.mark.parametrize("mode", ["stock", "ours", "accelerate"])
def test_runner_modes(fake_peft, tmp_path, mode):
    summary_path = tmp_path / "summary.json"
    env = {**os.environ, "PYTHON": sys.executable, "SCRATCH": str(tmp_path / "scratch"),
           "SUMMARY": str(summary_path)}
    result = subprocess.run(["bash", str(SUITE / "run_peft_suite.sh"), mode, str(fake_peft), "-q", "-p", "no:warnings"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr  # test_fails fails
    summary = json.loads(summary_path.read_text())
    assert summary["mode"] == mode
    assert summary["selected"] == 3  # the LoraConfig cases only
    assert summary["counts"]["passed"] == 2 and summary["counts"]["failed"] == 1
    failing = "tests/test_custom_models.py::test_fails[LoraConfig]"
    assert summary["errors"] == {failing: "ValueError: boom 17"}
    # PEFT's files were copied, and only the two imports were changed
    copied = (tmp_path / "scratch" / "tests" / "testing_utils.py").read_text()
    assert "try:\n    from datasets import load_dataset\nexcept ImportError:" in copied
    assert (tmp_path / "scratch" / "tests" / "testing_common.py").read_text() == FAKE_TESTS["testing_common.py"]
    if mode == "accelerate":
        # test_forward: one forward; test_entry_points: one forward of the loaded model
        assert summary["lora_forwards"] == 2
        assert summary["fused_forwards"] == 2 and summary["fused_share"] == 1.0
        assert "fused share: 100.0%" in result.stdout
    else:
        assert "lora_forwards" not in summary


def test_runner_rejects_bad_arguments(tmp_path):
    bad_mode = subprocess.run(["bash", str(SUITE / "run_peft_suite.sh"), "fast", str(tmp_path)],
                              capture_output=True, text=True)
    assert bad_mode.returncode == 2 and "MODE must be stock, ours or accelerate" in bad_mode.stderr
    no_peft = subprocess.run(["bash", str(SUITE / "run_peft_suite.sh"), "stock", str(tmp_path)],
                             capture_output=True, text=True)
    assert no_peft.returncode == 2 and "neither a bare git dir of PEFT nor a checkout" in no_peft.stderr


def test_compare_groups_regressions_by_cause(tmp_path, capsys):
    base = "tests/test_custom_models.py::TestPeftCustomModel::"
    ids = [base + "test_a[Vanilla MLP 1 LoRA-MLP-LoraConfig-config_kwargs0]",
           base + "test_b[False-True-dtype1-Conv3d 1 LoRA-Conv3d-LoraConfig-config_kwargs37]",
           base + "test_c[BD-LoRA A only-MLP-LoraConfig-config_kwargs283]"]
    stock = {"mode": "stock", "selected": 3, "outcomes": dict.fromkeys(ids, "passed"), "errors": {}}
    ours_parts = [
        {"mode": "ours", "selected": 2, "outcomes": {ids[0]: "passed", ids[1]: "failed"},
         "errors": {ids[1]: "ValueError: layer Conv3d(3, 4) is not supported"}},
        {"mode": "ours", "selected": 1, "outcomes": {ids[2]: "failed"},
         "errors": {ids[2]: "ValueError: layer Conv3d(5, 6) is not supported"}},
    ]
    paths = []
    for i, summary in enumerate([stock, *ours_parts]):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(summary))
    assert compare.main([str(p) for p in paths]) == 0
    out = capsys.readouterr().out
    assert "| ours | 3 | 3 | 1 | 2 | 0 | 0 |" in out
    assert "2 tests pass in stock but not in ours" in out
    assert "- 2: ValueError: layer ConvNd(N, N) is not supported" in out
    assert "rows: Conv3d 1 LoRA (1), BD-LoRA A only (1)" in out or "rows: BD-LoRA A only (1), Conv3d 1 LoRA (1)" in out


def test_compare_keeps_assert_locations_apart():
    a = compare.cause("AssertionError:  [at testing_common.py:136: assert os.path.exists(filename)]")
    b = compare.cause("AssertionError:  [at testing_common.py:200: assert hasattr(model, 'push_to_hub')]")
    assert a != b and "testing_common.py:136" in a
