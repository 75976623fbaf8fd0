"""Builds lora_ext._C against the installed torch (ninja through torch.utils.cpp_extension).

CUDA kernels join the build when a GPU is visible or FORCE_CUDA=1; their architectures
come from TORCH_CUDA_ARCH_LIST. MAX_JOBS bounds parallel compiles. The facts of the build
are written to lora_ext/_build_info.py so that `lora-ext info` can print them.
"""
import os
import platform
import subprocess
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent.resolve()
VERSION = (ROOT / "lora_ext" / "VERSION").read_text().strip()


def want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def compiler_version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown"


def write_build_info(with_cuda: bool) -> None:
    info = {
        "version": VERSION,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda if with_cuda else None,
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "auto") if with_cuda else None,
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


def extension():
    with_cuda = want_cuda()
    write_build_info(with_cuda)
    # One orchestration file per family in csrc/, its CPU kernels in csrc/cpu/ and its
    # CUDA kernels in csrc/cuda/: new families join the build by adding files.
    sources = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("csrc/*.cpp"), *ROOT.glob("csrc/cpu/*.cpp")])
    # No contraction of a*b+c into FMA: the NF4 kernels must round as bitsandbytes does.
    cxx_flags = ["-O3", "-fvisibility=hidden", "-ffp-contract=off"]
    macros = [("Py_LIMITED_API", "0x03090000")]
    if not with_cuda:
        return cpp_extension.CppExtension(
            "lora_ext._C", sources, extra_compile_args={"cxx": cxx_flags},
            define_macros=macros, py_limited_api=True)
    sources += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("csrc/cuda/*.cu"))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "lora_ext._C", sources,
        extra_compile_args={"cxx": cxx_flags + ["-DLORA_EXT_WITH_CUDA"], "nvcc": nvcc_flags},
        define_macros=macros, py_limited_api=True)


setup(
    version=VERSION,
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
