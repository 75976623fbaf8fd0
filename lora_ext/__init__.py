"""lora-ext: fused C++/CUDA LoRA kernels for PyTorch, compatible with PEFT."""
from pathlib import Path

try:
    from ._build_info import BUILD_INFO
except ImportError as _error:  # a source tree that was never built
    raise ImportError(
        "lora_ext is not built: run `pip install --no-build-isolation .` in the source tree "
        "(this compiles lora_ext._C against your torch).") from _error

from ._loader import load_extension

_C = load_extension()


def cpu_capability() -> str:
    """The instruction set lora_ext's CPU kernels run: "avx512", "avx2" or "default" (portable
    x86-64). It is the best this CPU supports unless LORA_EXT_CPU_CAPABILITY (read once per
    process, like PyTorch's ATEN_CPU_CAPABILITY) names a lower one."""
    return _C.cpu_capability()[0]


from . import ops  # noqa: E402  (registers fakes and autograd for the ops _C defined)
from .accelerate import accelerate, restore  # noqa: E402  (needs peft only when called)
from .config import LoraConfig, PeftType, TaskType  # noqa: E402
from .peft_model import (AutoPeftModel, AutoPeftModelForCausalLM, AutoPeftModelForFeatureExtraction,  # noqa: E402
                         AutoPeftModelForSeq2SeqLM, AutoPeftModelForSequenceClassification,
                         AutoPeftModelForTokenClassification, PeftModel, PeftModelForCausalLM,
                         PeftModelForFeatureExtraction, PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM,
                         PeftModelForSequenceClassification, PeftModelForTokenClassification, get_peft_model)
from .serialization import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from .nf4 import NF4Linear, memory_footprint, quantize_model  # noqa: E402
from .loftq import LoftQConfig  # noqa: E402
from .loftq_model import replace_lora_weights_loftq  # noqa: E402
from .peft_interop import register_layers_with_peft  # noqa: E402

register_layers_with_peft()  # PEFT's own utilities see our layers (when peft is imported)

__version__ = (Path(__file__).parent / "VERSION").read_text().strip()

__all__ = ["BUILD_INFO", "AutoPeftModel", "AutoPeftModelForCausalLM", "AutoPeftModelForFeatureExtraction",
           "AutoPeftModelForSeq2SeqLM", "AutoPeftModelForSequenceClassification",
           "AutoPeftModelForTokenClassification", "LoraConfig", "PeftModel", "PeftModelForCausalLM",
           "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM",
           "PeftModelForSequenceClassification", "PeftModelForTokenClassification", "PeftType", "TaskType",
           "LoftQConfig", "NF4Linear", "accelerate", "cpu_capability", "get_peft_model", "memory_footprint", "quantize_model",
           "replace_lora_weights_loftq", "get_peft_model_state_dict", "ops", "restore", "set_peft_model_state_dict", "__version__"]
