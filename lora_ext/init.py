"""Adapter initialisations as PEFT does them (placeholder for True/gaussian/False until the full module lands)."""
import math

import torch
from torch import nn


@torch.no_grad()
def init_lora_weights(lora_A, lora_B, init, *, base_weight=None, r, scaling, fan_in_fan_out=False,
                      layer_kind="linear"):
    if init is False:
        return None
    if layer_kind == "embedding":
        if init == "gaussian":
            nn.init.normal_(lora_A, std=1 / r)
            nn.init.zeros_(lora_B)
        else:
            nn.init.zeros_(lora_A)
            nn.init.normal_(lora_B)
        return None
    if init == "gaussian":
        nn.init.normal_(lora_A, std=1 / r)
    elif init is True:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    else:
        raise ValueError(f"init_lora_weights={init!r} is not supported yet")
    nn.init.zeros_(lora_B)
    return None
