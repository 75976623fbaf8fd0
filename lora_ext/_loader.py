"""Loads the compiled extension, or explains why it cannot be loaded and how to rebuild."""
import importlib

import torch

REBUILD_HINT = (
    "Rebuild lora-ext against the torch you have: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` from a source checkout "
    "(or `pip install --no-build-isolation lora-ext` from the sdist), "
    "or install the wheel built for your torch and CUDA (README, 'Build options')."
)


def _series(version: str) -> str:
    """'2.14.1+cu130' -> '2.14': the torch ABI is stable only within a minor series."""
    return ".".join(version.split("+")[0].split(".")[:2])


def check_torch_matches(build_info: dict, torch_version: str) -> None:
    built = build_info.get("torch_version")
    if built and _series(built) != _series(torch_version):
        raise ImportError(
            f"lora_ext was built for torch {built} but torch {torch_version} is installed; "
            f"a compiled extension only loads with the torch series it was built for. {REBUILD_HINT}")


def load_extension(module: str = "lora_ext._C"):
    from ._build_info import BUILD_INFO

    check_torch_matches(BUILD_INFO, torch.__version__)
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as error:
        raise ImportError(
            f"lora_ext's compiled extension {module} could not be loaded: {error}. "
            f"It was built for torch {BUILD_INFO.get('torch_version')} "
            f"(CUDA {BUILD_INFO.get('cuda_version')}); this process has torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}). {REBUILD_HINT}") from error
