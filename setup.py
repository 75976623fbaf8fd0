"""Builds lora_ext._C against the installed torch (ninja through torch.utils.cpp_extension).

CUDA kernels join the build when a GPU is visible or FORCE_CUDA=1; their architectures
come from TORCH_CUDA_ARCH_LIST (default: DEFAULT_ARCHS for the CUDA version, below; "native"
= the visible GPUs). MAX_JOBS bounds parallel compiles. The facts of the build are written
to lora_ext/_build_info.py so that `lora-ext info` can print them.

A compiled extension only loads with the torch series (major.minor) it was built against,
so the package version carries the build in its local part, e.g. 0.1.0+cu130torch2.14 or
0.1.0+cputorch2.14, and the package requires that series (torch>=2.14,<2.15).
LORA_EXT_LOCAL_VERSION overrides the local part ("" for none). LORA_EXT_SDIST=1 (set by
scripts/build_wheel.sh for the sdist) makes the metadata build-neutral: version 0.1.0 and
torch>=2.6; the wheel built from the sdist pins the series of the torch it is built with.
"""
import os
import platform
import re
import subprocess
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent.resolve()
VERSION = (ROOT / "lora_ext" / "VERSION").read_text().strip()

# TORCH_CUDA_ARCH_LIST when it is not set: the datacenter and consumer GPUs of Ampere and
# newer that the CUDA toolkit can target, and PTX of the newest so later GPUs can JIT it.
#   8.0 A100, A30   8.6 A10, A40, RTX 30xx   8.9 L4, L40(S), RTX 40xx   9.0 H100, H200, GH200
#   10.0 B200, GB200 (its SASS also runs on 10.3, B300)   12.0 RTX 50xx, RTX PRO 6000
# (minimum CUDA version, arch list), newest first.
DEFAULT_ARCHS = (
    ((12, 8), "8.0;8.6;8.9;9.0;10.0;12.0+PTX"),
    ((11, 8), "8.0;8.6;8.9;9.0+PTX"),
    ((11, 1), "8.0;8.6+PTX"),
    ((0, 0), "8.0+PTX"),
)


def torch_series(version: str) -> tuple[int, int]:
    """'2.14.1+cu130' -> (2, 14)."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def torch_requirement(version: str) -> str:
    """The torch series this build loads with, as a requirement: torch>=2.14,<2.15."""
    major, minor = torch_series(version)
    # a pre-release torch (2.15.0.dev...) sorts below 2.15: admit it explicitly
    pre = re.search(r"\d(\.?dev|a|b|rc)\d*", version.split("+")[0])
    low = f"{major}.{minor}.0.dev0" if pre else f"{major}.{minor}"
    return f"torch>={low},<{major}.{minor + 1}"


SDIST = os.environ.get("LORA_EXT_SDIST", "0") == "1"
MIN_TORCH = "torch>=2.6"


def local_version(with_cuda: bool) -> str:
    """cu130torch2.14 / cputorch2.14 (LORA_EXT_LOCAL_VERSION replaces it)."""
    if SDIST:
        return ""
    if "LORA_EXT_LOCAL_VERSION" in os.environ:
        return os.environ["LORA_EXT_LOCAL_VERSION"]
    major, minor = torch_series(torch.__version__)
    device = "cu" + torch.version.cuda.replace(".", "") if with_cuda and torch.version.cuda else "cpu"
    return f"{device}torch{major}.{minor}"


def default_arch_list(cuda_version: str | None) -> str:
    parts = tuple(int(v) for v in (cuda_version or "0.0").split(".")[:2])
    return next(archs for floor, archs in DEFAULT_ARCHS if parts >= floor)


def full_version(with_cuda: bool) -> str:
    local = local_version(with_cuda)
    return f"{VERSION}+{local}" if local else VERSION


def want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def compiler_version(cmd: list[str]) -> str:
    """First line of `--version`, or nvcc's "Cuda compilation tools, release X.Y, VX.Y.Z" line."""
    try:
        lines = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
        return next((line for line in lines if "release" in line), lines[0])
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def write_build_info(with_cuda: bool) -> None:
    info = {
        "version": VERSION,
        "package_version": full_version(with_cuda),
        "torch_version": torch.__version__,
        "torch_requirement": torch_requirement(torch.__version__),
        "cuda_version": torch.version.cuda if with_cuda else None,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "with_cuda": with_cuda,
        "cxx_compiler": compiler_version([os.environ.get("CXX", "c++"), "--version"]),
        "cuda_compiler": compiler_version([os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc"), "--version"])
        if with_cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    lines = ['"""Facts of the build that produced lora_ext._C (written by setup.py)."""', ""]
    lines.append("BUILD_INFO = " + repr(info))
    (ROOT / "lora_ext" / "_build_info.py").write_text("\n".join(lines) + "\n")


def extension(with_cuda: bool):
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # torch reads it when it compiles the .cu files; unset, it would target only the
        # visible GPUs (or fail without one)
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list(torch.version.cuda)
    if not SDIST:  # an sdist carries no build facts (and must not overwrite a built tree's)
        write_build_info(with_cuda)
    # One orchestration file per family in csrc/, its CPU kernels in csrc/cpu/ and its
    # CUDA kernels in csrc/cuda/: new families join the build by adding files.
    sources = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("csrc/*.cpp"), *ROOT.glob("csrc/cpu/*.cpp")])
    # No contraction of a*b+c into FMA: the NF4 kernels must round as bitsandbytes does.
    # -g0: Python's CFLAGS carry -g, which makes the .so 5x larger and the compile slower.
    # -fopenmp: at::parallel_for is an inline OpenMP loop in ATen's headers; without the flag
    # it runs on one thread. The .so then needs libgomp.so.1, which torch itself loads.
    cxx_flags = ["-O3", "-g0", "-fvisibility=hidden", "-ffp-contract=off", "-fopenmp"]
    link_flags = ["-fopenmp"]
    macros = [("Py_LIMITED_API", "0x03090000")]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "lora_ext._C", sources, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags, define_macros=macros, py_limited_api=True)
    sources += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "lora_ext._C", sources,
        extra_compile_args={"cxx": cxx_flags + ["-DLORA_EXT_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags, define_macros=macros, py_limited_api=True)


WITH_CUDA = want_cuda()

setup(
    version=full_version(WITH_CUDA),
    install_requires=[MIN_TORCH if SDIST else torch_requirement(torch.__version__), "numpy"],
    ext_modules=[extension(WITH_CUDA)],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
