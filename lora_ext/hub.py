"""The Hugging Face Hub side of PeftModel: the model card and push_to_hub, as PEFT has them.

A saved lora-ext adapter is a PEFT adapter (same files), so the card says
`library_name: peft` and the Hub offers PEFT's loading snippet for it. huggingface_hub
is imported only here and only when used (it comes with transformers and peft; without it
save_pretrained writes no card).
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ._build_info import BUILD_INFO


def available() -> bool:
    return importlib.util.find_spec("huggingface_hub") is not None


def _hub():
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError("model cards and push_to_hub need huggingface_hub (pip install huggingface_hub); "
                          f"importing it failed: {error}") from error
    return huggingface_hub


def _model_tags(peft_model: nn.Module) -> set[str]:
    """PEFT's tags: the base model's own, 'transformers' for transformers models, 'lora',
    and base_model:adapter:<name> so the Hub links the adapter to its base."""
    base = peft_model.get_base_model()
    tags = set(getattr(base, "model_tags", None) or [])
    try:
        from transformers import PreTrainedModel
        if isinstance(base, PreTrainedModel):
            tags.add("transformers")
    except ImportError:
        pass
    tags.add("lora")
    if hasattr(base, "name_or_path"):  # PEFT's test (so "" from a from-config model gives a bare tag too)
        tags.add(f"base_model:adapter:{base.name_or_path}")
    return tags


def create_or_update_model_card(peft_model: nn.Module, output_dir: str | os.PathLike) -> None:
    """Write (or update) output_dir/README.md: library, tags, pipeline tag, base model,
    bitsandbytes quantization settings and the framework versions, as PEFT does."""
    hub = _hub()
    path = Path(output_dir) / "README.md"
    card = hub.ModelCard.load(path) if path.exists() else hub.ModelCard.from_template(hub.ModelCardData())
    card.data["library_name"] = "peft"
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | _model_tags(peft_model))
    if not card.data.pipeline_tag and type(peft_model).__name__ == "PeftModelForCausalLM":
        card.data.pipeline_tag = "text-generation"
    base_config = getattr(peft_model.get_base_model(), "config", None)
    base_name = getattr(base_config, "_name_or_path", None)
    if base_name is not None:  # PEFT writes it whenever the config has one, "" included
        card.data["base_model"] = base_name
    lines = card.text.splitlines()
    quantization = getattr(base_config, "quantization_config", None)
    prefix = "The following `bitsandbytes` quantization config was used during training:"
    if quantization is not None and prefix not in lines:
        settings = quantization.to_dict() if hasattr(quantization, "to_dict") else dict(quantization)
        text = "\n".join([f"\n{prefix}", *(f"- {k}: {v}" for k, v in settings.items()), ""])
        heading = "## Training procedure"
        if heading in lines:
            lines.insert(lines.index(heading) + 2, text)
        else:
            lines.append(f"{heading}\n{text}")
    version_line, heading = f"- lora-ext {BUILD_INFO['version']}", "### Framework versions"
    if version_line not in lines:
        if heading in lines:
            lines.insert(lines.index(heading) + 2, version_line)
        else:
            lines.append(f"{heading}\n\n{version_line}")
    card.text = "\n".join(lines)
    card.save(path)


def push_to_hub(peft_model: nn.Module, repo_id: str, *, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: bool | str | None = None,
                revision: str | None = None, create_pr: bool = False, tags: list[str] | None = None,
                **save_kwargs: Any):
    """Save the adapters into a temporary folder and upload it as one commit (PEFT's
    push_to_hub, which is transformers' PushToHubMixin.push_to_hub). Returns the
    huggingface_hub CommitInfo."""
    hub = _hub()
    api = hub.HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        peft_model.save_pretrained(folder, **save_kwargs)
        if tags:
            card = hub.ModelCard.load(Path(folder) / "README.md")
            card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(tags))
            card.save(Path(folder) / "README.md")
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message or "Upload model",
                                 commit_description=commit_description, token=token, revision=revision,
                                 create_pr=create_pr)
