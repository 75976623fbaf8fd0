"""Loads the compiled extension, or explains why it cannot be loaded and how to rebuild."""
import importlib

import torch

REBUILD_HINT = (
    "Rebuild lora-ext against the torch you have: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` from a source checkout "
    "(or `pip install --no-build-isolation lora-ext` from the sdist), "
    "or install the wheel built for your torch and CUDA (docs/install.md, 'Wheels')."
)


def _series(version: str) -> str:
    """'2.14.1+cu130' -> '2.14': the torch ABI is stable only within a minor series."""
    return ".".join(version.split("+")[0].split(".")[:2])


def wheel_tag_for(torch_version: str, cuda_version: str | None) -> str:
    """Local version of the lora-ext wheel that loads with this torch: cu130torch2.14, cputorch2.14."""
    device = "cu" + cuda_version.replace(".", "") if cuda_version else "cpu"
    return f"{device}torch{_series(torch_version)}"


def check_torch_matches(build_info: dict, torch_version: str, cuda_version: str | None = None) -> None:
    built = build_info.get("torch_version")
    if built and _series(built) != _series(torch_version):
        have = build_info.get("package_version") or build_info.get("version", "?")
        need = wheel_tag_for(torch_version, cuda_version)
        raise ImportError(
            f"lora_ext {have} was built for torch {built} but torch {torch_version} is installed; "
            f"a compiled extension only loads with the torch series it was built for. "
            f"You need the lora-ext wheel whose version ends in +{need} "
            f"(requires torch>={_series(torch_version)},<{_next_series(torch_version)}), "
            f"or go back to torch {_series(built)}.x. {REBUILD_HINT}")


def _next_series(version: str) -> str:
    major, minor = _series(version).split(".")
    return f"{major}.{int(''.join(ch for ch in minor if ch.isdigit()) or 0) + 1}"


def load_extension(module: str = "lora_ext._C"):
    from ._build_info import BUILD_INFO

    check_torch_matches(BUILD_INFO, torch.__version__, torch.version.cuda)
    try:
        extension = importlib.import_module(module)
    except (ImportError, OSError) as error:
        raise ImportError(
            f"lora_ext's compiled extension {module} could not be loaded: {error}. "
            f"It was built for torch {BUILD_INFO.get('torch_version')} "
            f"(CUDA {BUILD_INFO.get('cuda_version')}); this process has torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}). {REBUILD_HINT}") from error
    extension.cpu_capability()  # a LORA_EXT_CPU_CAPABILITY that names no level fails the import
    return extension
