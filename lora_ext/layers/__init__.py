"""LoRA modules. They call lora_ext.ops for their arithmetic and never torch.ops directly."""
from .base import LoraLayer
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .linear import Linear
from .mha import MultiheadAttention
from .modules_to_save import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from .nf4 import Linear4bit
from .param_wrapper import ParamWrapper
from .trainable_tokens import TrainableTokensLayer, TrainableTokensWrapper

__all__ = ["AuxiliaryTrainingWrapper", "Conv1d", "Conv2d", "Conv3d", "Embedding", "Linear", "Linear4bit", "LoraLayer",
           "ModulesToSaveWrapper", "MultiheadAttention", "ParamWrapper", "TrainableTokensLayer",
           "TrainableTokensWrapper"]
