"""The wheel as a user gets it: scripts/build_wheel.sh builds the sdist and, from it, a
CPU-only wheel (FORCE_CUDA=0, to keep the compile short); the wheel goes into a fresh virtual
environment and is smoke-tested there, from a directory outside the source tree.

The fresh venv reuses this interpreter's site-packages through a path line in a .pth file
(torch, numpy: installing torch anew takes minutes). Only plain paths are added, so the
parent's .pth hooks (such as an editable lora_ext install) do not run: the lora_ext that
imports is the one the wheel installed, which the tests check.
"""
import ast
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SERIES = ".".join(torch.__version__.split("+")[0].split(".")[:2])

pytestmark = pytest.mark.slow   # compiles the extension (a few minutes on 2 cores)


def clean_env(**extra) -> dict:
    """The environment without anything that would point Python at the source tree."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", clean_env())
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    if shutil.which("readelf") is None:
        pytest.fail("readelf (binutils) is needed to check what the wheel links to")
    built = run(["bash", ROOT / "scripts" / "build_wheel.sh", out], cwd=ROOT, timeout=3600,
                env=clean_env(FORCE_CUDA="0", PYTHON=sys.executable,
                              MAX_JOBS=str(os.cpu_count() or 1)))
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, (list(out.iterdir()), built.stdout)
    return {"wheel": wheels[0], "sdist": sdists[0], "log": built.stdout}


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory):
    """A fresh venv with the wheel installed (pip from the parent, via the path line)."""
    home = tmp_path_factory.mktemp("venv") / "env"
    run([sys.executable, "-m", "venv", "--without-pip", home])
    python = home / "bin" / "python"
    own_site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                    .stdout.strip())
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (own_site / "_parent_site.pth").write_text("\n".join(parents) + "\n")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir",
         "--disable-pip-version-check", dist["wheel"]], timeout=600)
    return {"home": home, "python": python, "site": own_site}


def test_wheel_name_and_metadata(dist):
    wheel = dist["wheel"]
    # CPU-only: +cputorch<series>; stable ABI (abi3), so one wheel per platform and torch
    assert re.fullmatch(rf"lora_ext-\d+\.\d+\.\d+\+cputorch{re.escape(SERIES)}-cp39-abi3-\w+\.whl",
                        wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
        info = ast.literal_eval(zf.read("lora_ext/_build_info.py").decode().split("BUILD_INFO = ", 1)[1])
    major, minor = map(int, SERIES.split("."))
    requires = [line.split(":", 1)[1].strip().replace(" ", "")
                for line in text.splitlines() if line.startswith("Requires-Dist:")]
    torch_req = [r for r in requires if r.startswith("torch")]
    assert len(torch_req) == 1
    assert set(torch_req[0][len("torch"):].split(",")) == {f">={major}.{minor}", f"<{major}.{minor + 1}"}
    assert info["with_cuda"] is False and info["cuda_version"] is None
    assert info["torch_version"] == torch.__version__
    assert info["package_version"] == wheel.name.split("-")[1]


def test_check_wheel_passes_and_links_only_torch_and_base_system(dist):
    result = run([sys.executable, ROOT / "scripts" / "check_wheel.py", "--json", dist["wheel"]])
    report = json.loads(result.stdout)
    assert report["problems"] == []
    needed = report["needed"]
    assert set(needed.values()) <= {"torch", "system"}, needed
    assert "libc10.so" in needed and needed["libc10.so"] == "torch"
    assert not any("cud" in lib for lib in needed)
    assert all(p.startswith("$ORIGIN") for p in report["rpath"])
    # every subpackage travels with the wheel
    for pkg in ("lora_ext", "lora_ext.ops", "lora_ext.reference", "lora_ext.layers", "lora_ext.benchmark"):
        assert pkg in report["packages"], report["packages"]


def test_check_wheel_fails_on_an_incomplete_wheel(dist, tmp_path):
    # the check can fail: drop a subpackage module and add a bogus dependency of the metadata
    broken = tmp_path / dist["wheel"].name
    with zipfile.ZipFile(dist["wheel"]) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            if item.filename == "lora_ext/ops/__init__.py":
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/METADATA"):
                data = re.sub(rb"Requires-Dist: torch[^\n]*\n", b"", data)
            dst.writestr(item, data)
    result = subprocess.run([sys.executable, ROOT / "scripts" / "check_wheel.py", broken],
                            capture_output=True, text=True, env=clean_env())
    assert result.returncode == 1
    assert "lora_ext/ops/__init__.py" in result.stderr
    assert "Requires-Dist" in result.stderr


def test_sdist_is_complete_and_build_neutral(dist):
    with tarfile.open(dist["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        pkg_info = tf.extractfile(next(m for m in tf.getmembers() if m.name.endswith("/PKG-INFO")
                                       and m.name.count("/") == 1)).read().decode()
    tracked = run(["git", "ls-files", "csrc", "lora_ext", "CMakeLists.txt"], cwd=ROOT).stdout.split()
    missing = [f for f in tracked if f not in names]
    assert not missing, f"files missing from the sdist: {missing}"
    for required in ("setup.py", "pyproject.toml", "MANIFEST.in", "lora_ext/VERSION",
                     "scripts/build_wheel.sh", "scripts/check_wheel.py"):
        assert required in names
    assert "lora_ext/_build_info.py" not in names
    assert not any(n.endswith(".so") for n in names)
    assert re.search(r"^Version: \d+\.\d+\.\d+$", pkg_info, re.M), pkg_info[:300]
    assert "Requires-Dist: torch>=2.6" in pkg_info


def test_smoke_in_fresh_venv(venv, dist, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    smoke = outside / "smoke.py"
    smoke.write_text(f'''
import json, sys
from pathlib import Path
import torch
import lora_ext
from lora_ext import ops, reference
home = Path({str(venv["home"])!r}).resolve()
assert Path(lora_ext.__file__).resolve().is_relative_to(home), lora_ext.__file__
assert Path(lora_ext._C.__file__).resolve().is_relative_to(home), lora_ext._C.__file__
g = torch.Generator().manual_seed(0)
x = torch.randn(3, 37, 48, generator=g)
w, a, b = torch.randn(40, 48, generator=g), torch.randn(8, 48, generator=g), torch.randn(40, 8, generator=g)
bias = torch.randn(40, generator=g)
exact = reference.lora_linear(x.double(), w.double(), bias.double(), a.double(), b.double(), 0.5)
torch_err = (reference.lora_linear(x, w, bias, a, b, 0.5).double() - exact).abs().max().item()
ours_err = (ops.lora_linear(x, w, bias, a, b, 0.5).double() - exact).abs().max().item()
# with dropout: the same Philox mask as the reference for the same seed
yd = ops.lora_linear(x, w, bias, a, b, 0.5, 0.25, 7)
rd = reference.lora_linear(x, w, bias, a, b, 0.5, 0.25, 7)
print(json.dumps({{"ours_err": ours_err, "torch_err": torch_err,
                  "dropout_err": (yd - rd).abs().max().item(), "scale": rd.abs().max().item(),
                  "version": lora_ext.__version__}}))
''')
    python = venv["python"]
    out = json.loads(run([python, smoke], cwd=outside).stdout)
    assert out["ours_err"] <= 2 * max(out["torch_err"], 1e-6), out
    assert out["dropout_err"] <= 1e-5 * out["scale"], out

    info = json.loads(run([venv["home"] / "bin" / "lora-ext", "info", "--json"], cwd=outside).stdout)
    assert info["package_version"] == dist["wheel"].name.split("-")[1]
    assert info["with_cuda"] is False and info["cuda_kernels_present"] is False
    assert info["installed_torch"] == torch.__version__ == info["torch_version"]


def test_mismatched_torch_says_which_wheel_to_get(venv, tmp_path):
    # as if torch 2.99 were installed: import refuses with the wheel (or build) that would load
    code = "import torch; torch.__version__ = '2.99.0'; import lora_ext"
    result = subprocess.run([str(venv["python"]), "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, env=clean_env())
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError"), result.stderr
    device = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    assert f"+{device}torch2.99" in message
    assert "torch>=2.99,<2.100" in message
    assert f"built for torch {torch.__version__}" in message
    assert "pip install --no-build-isolation" in message
