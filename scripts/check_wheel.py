#!/usr/bin/env python
"""Checks a built lora-ext wheel: contents, metadata and what its compiled extension links to.

    python scripts/check_wheel.py dist/lora_ext-0.1.0+cputorch2.14-cp39-abi3-linux_x86_64.whl [--json]

Contents: every module of the source package (git ls-files lora_ext), VERSION, the generated
_build_info.py and one lora_ext/_C*.so; the console script `lora-ext`.
Metadata: Version = BUILD_INFO["package_version"] with local part cu<CUDA>torch<series> or
cputorch<series>, and Requires-Dist holds the torch series it was built for.
Linking (what `auditwheel show` checks, for a torch extension): each DT_NEEDED library of the
.so must be provided by torch itself (torch/lib), by the CUDA runtime torch depends on
(nvidia/*/lib), or be one of the base system libraries every Linux has (glibc's libraries,
libstdc++, libgcc_s); no RPATH/RUNPATH into the build machine. The glibc/libstdc++ symbol
versions it needs are reported beside torch's own (a wheel needing a newer glibc than torch
does loads on fewer machines than torch). `auditwheel show` is run too when installed (it
reports libtorch/libc10 as external: they are, by design, torch's).

Exit status 0 when every check passes, 1 otherwise (problems on stderr).
"""
from __future__ import annotations

import argparse
import ast
import email.parser
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# glibc's libraries, the GCC runtime and the dynamic loader: on every Linux system, and the
# only system libraries the manylinux policies let a wheel need without bundling.
SYSTEM_LIBS = {
    "libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0", "libutil.so.1",
    "libgcc_s.so.1", "libstdc++.so.6", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1",
}
VERSION_PREFIXES = ("GLIBC", "GLIBCXX", "CXXABI")


def source_modules(root: Path = ROOT) -> set[str]:
    """Tracked lora_ext/**.py paths (every module the wheel must carry)."""
    try:
        out = subprocess.run(["git", "ls-files", "lora_ext"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        files = {f for f in out if f.endswith(".py")}
        if files:
            return files
    except (OSError, subprocess.SubprocessError):
        pass
    return {str(p.relative_to(root)) for p in (root / "lora_ext").rglob("*.py")
            if "__pycache__" not in p.parts and p.name != "_build_info.py"}


def _same_requirement(a: str, b: str) -> bool:
    """'torch<2.15,>=2.14' == 'torch>=2.14,<2.15' (same name, same set of specifiers)."""
    def split(req: str):
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(.*)", req.replace(" ", ""))
        return (m.group(1).lower(), frozenset(filter(None, m.group(2).split(",")))) if m else (req, None)
    return ";" not in a and split(a) == split(b)


def readelf(args: list[str], path: Path) -> str:
    return subprocess.run(["readelf", *args, str(path)], capture_output=True, text=True,
                          check=True).stdout


def dynamic_section(so: Path) -> dict:
    text = readelf(["-d", "--wide"], so)
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", text)
    paths = re.findall(r"\((?:RPATH|RUNPATH)\)\s+Library r(?:un)?path: \[([^\]]*)\]", text)
    return {"needed": needed, "rpath": [p for entry in paths for p in entry.split(":") if p]}


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def symbol_versions(so: Path) -> dict[str, str]:
    """Highest GLIBC_/GLIBCXX_/CXXABI_ version the library needs, per prefix."""
    found: dict[str, str] = {}
    for prefix, version in re.findall(r"\b(GLIBCXX|GLIBC|CXXABI)_([0-9][0-9.]*[0-9])\b",
                                      readelf(["-V", "--wide"], so)):
        if prefix not in found or _vkey(version) > _vkey(found[prefix]):
            found[prefix] = version
    return found


def torch_lib_dir() -> Path | None:
    try:
        import torch
    except ImportError:
        return None
    return Path(torch.__file__).parent / "lib"


def cuda_runtime_dirs() -> list[Path]:
    """Where torch's CUDA runtime dependency (nvidia-cuda-runtime-*) keeps its libraries."""
    try:
        import torch
    except ImportError:
        return []
    site = Path(torch.__file__).parent.parent
    return [p for p in (site / "nvidia").glob("**/lib") if p.is_dir()]


def classify(needed: list[str], torch_lib: Path | None, cuda_dirs: list[Path]) -> dict[str, str]:
    where = {}
    for lib in needed:
        if torch_lib is not None and (torch_lib / lib).exists():
            where[lib] = "torch"
        elif lib.startswith("libcudart.so") and any((d / lib).exists() for d in cuda_dirs):
            where[lib] = "cuda runtime (torch dependency)"
        elif lib in SYSTEM_LIBS:
            where[lib] = "system"
        else:
            where[lib] = "UNDECLARED"
    return where


def check(wheel: Path) -> tuple[dict, list[str]]:
    problems: list[str] = []
    report: dict = {"wheel": wheel.name}
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory() as tmp:
        names = set(zf.namelist())
        dist_info = next((n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")), None)
        if dist_info is None:
            return report, ["no .dist-info directory in the wheel"]

        # ---- contents
        missing = sorted(m for m in source_modules() if m not in names)
        if missing:
            problems.append(f"modules missing from the wheel: {missing}")
        for required in ("lora_ext/VERSION", "lora_ext/_build_info.py"):
            if required not in names:
                problems.append(f"{required} missing from the wheel")
        sos = sorted(n for n in names if re.fullmatch(r"lora_ext/_C[^/]*\.so", n))
        if len(sos) != 1:
            problems.append(f"expected one lora_ext/_C*.so, found {sos}")
        report["files"] = len(names)
        report["packages"] = sorted({n.rsplit("/", 1)[0].replace("/", ".") for n in names
                                     if n.endswith("/__init__.py")})

        # ---- metadata
        meta = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
        report["version"] = version = meta["Version"]
        report["requires"] = requires = meta.get_all("Requires-Dist") or []
        info = {}
        if "lora_ext/_build_info.py" in names:
            tree = ast.parse(zf.read("lora_ext/_build_info.py").decode())
            for node in tree.body:
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "BUILD_INFO":
                    info = ast.literal_eval(node.value)
        report["build_info"] = info
        if info:
            if version != info.get("package_version"):
                problems.append(f"METADATA version {version} != BUILD_INFO package_version "
                                f"{info.get('package_version')}")
            series = ".".join(info["torch_version"].split("+")[0].split(".")[:2])
            device = ("cu" + info["cuda_version"].replace(".", "")) if info.get("with_cuda") else "cpu"
            if not version.endswith(f"+{device}torch{series}"):
                problems.append(f"version {version} lacks the local part +{device}torch{series}")
            if not any(_same_requirement(r, info["torch_requirement"]) for r in requires):
                problems.append(f"Requires-Dist {requires} lacks {info['torch_requirement']}")
        else:
            problems.append("no BUILD_INFO in lora_ext/_build_info.py")
        entry_points = f"{dist_info}/entry_points.txt"
        if entry_points not in names or "lora-ext = lora_ext.cli:main" not in zf.read(entry_points).decode():
            problems.append("console script lora-ext = lora_ext.cli:main missing")

        # ---- linking
        if len(sos) == 1:
            so = Path(zf.extract(sos[0], tmp))
            dyn = dynamic_section(so)
            torch_lib = torch_lib_dir()
            where = classify(dyn["needed"], torch_lib, cuda_runtime_dirs())
            report["needed"] = where
            report["rpath"] = dyn["rpath"]
            for lib, source in where.items():
                if source == "UNDECLARED":
                    problems.append(f"{sos[0]} needs {lib}, which neither torch nor the base "
                                    "system provides")
            for p in dyn["rpath"]:
                if not p.startswith("$ORIGIN"):
                    problems.append(f"{sos[0]} has RPATH/RUNPATH {p} (a path on the build machine)")
            if info.get("with_cuda") is False and any("cud" in lib for lib in dyn["needed"]):
                problems.append(f"CPU-only wheel links CUDA libraries: {dyn['needed']}")
            ours = symbol_versions(so)
            report["symbol_versions"] = ours
            if torch_lib is not None and (torch_lib / "libtorch_cpu.so").exists():
                theirs: dict[str, str] = {}
                for lib in ("libtorch_cpu.so", "libc10.so"):
                    for k, v in symbol_versions(torch_lib / lib).items():
                        if k not in theirs or _vkey(v) > _vkey(theirs[k]):
                            theirs[k] = v
                report["torch_symbol_versions"] = theirs
                report["raises_floor"] = {k: v for k, v in ours.items()
                                          if k in theirs and _vkey(v) > _vkey(theirs[k])}
        auditwheel = shutil.which("auditwheel")
        if auditwheel:
            run = subprocess.run([auditwheel, "show", str(wheel)], capture_output=True, text=True)
            report["auditwheel_show"] = (run.stdout + run.stderr).strip()
    return report, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report, problems = check(args.wheel)
    report["problems"] = problems
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['wheel']}: version {report.get('version')}, {report.get('files')} files")
        print(f"  requires: {', '.join(report.get('requires', []))}")
        print(f"  packages: {', '.join(report.get('packages', []))}")
        for lib, source in report.get("needed", {}).items():
            print(f"  needs {lib:<24} from {source}")
        if "symbol_versions" in report:
            print(f"  symbol versions: {report['symbol_versions']} "
                  f"(torch: {report.get('torch_symbol_versions')})")
        if report.get("raises_floor"):
            print(f"  note: needs newer {report['raises_floor']} than torch itself; build in an "
                  "older distribution (e.g. a manylinux_2_28 image) to reach torch's floor")
        if "auditwheel_show" in report:
            print("  auditwheel show:\n    " + report["auditwheel_show"].replace("\n", "\n    "))
    for p in problems:
        print(f"check_wheel: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
