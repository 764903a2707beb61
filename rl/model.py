"""Models: tiny Llama models built from a config with an offline character tokenizer, or any local HF causal LM."""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

# name -> (width, depth, heads); parameter counts with the 100-symbol character vocabulary.
SIZES: dict[str, tuple[int, int, int]] = {
    "nano": (64, 3, 4),  # 0.2M
    "micro": (96, 4, 4),  # 0.6M
    "tiny": (128, 4, 4),  # 1.1M
    "mini": (192, 4, 6),  # 2.4M
    "small": (256, 6, 8),  # 6.3M
    "medium": (384, 8, 8),  # 19M
}
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


class ModelConfig(BaseModel):
    """Which model to train: a tiny Llama built from a size name or width/depth, or a local HF directory."""

    model_config = ConfigDict(extra="forbid")
    size: str | None = Field("tiny", description=f"Tiny model size by name: one of {', '.join(SIZES)}.")
    width: int | None = Field(None, ge=16, le=4096, description="Hidden size (overrides `size`, with `depth`).")
    depth: int | None = Field(None, ge=1, le=64, description="Number of layers (overrides `size`, with `width`).")
    heads: int | None = Field(None, ge=1, le=64, description="Attention heads (default: width // 32, at least 2).")
    path: str | None = Field(None, description="Local directory of a Hugging Face causal LM (overrides size).")
    max_positions: int = Field(256, ge=16, le=131072, description="Context length of a tiny model.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' is bf16 on a GPU that supports it, else float32."
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if (self.width is None) != (self.depth is None):
            raise ValueError("model.width and model.depth must be given together")
        if self.path is None and self.width is None and self.size not in SIZES:
            raise ValueError(f"unknown model.size {self.size!r}; choose one of {', '.join(SIZES)}")
        if self.width is not None:
            heads = self.heads or max(2, self.width // 32)
            if self.width % heads:
                raise ValueError(f"model.width {self.width} is not divisible by {heads} heads")
        return self

    @property
    def name(self) -> str:
        if self.path:
            return Path(self.path).name
        if self.width is not None:
            return f"llama-w{self.width}-d{self.depth}"
        return f"llama-{self.size}"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII, built offline."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def pick_device(name: str = "auto") -> torch.device:
    """The requested device, or the best available for 'auto'."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU a rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32 on CPU for 'auto'; bf16 on a GPU that supports it."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def tiny_llama(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A freshly initialised Llama of the configured size."""
    width, depth, heads = (cfg.width, cfg.depth, cfg.heads) if cfg.width else SIZES[cfg.size]  # type: ignore[index]
    heads = heads or max(2, width // 32)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def load_model(cfg: ModelConfig, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a tiny model or load a local HF causal LM (safetensors only); move it to the configured device."""
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.path:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path {cfg.path!r} is not a model directory (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=dtype)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = char_tokenizer()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = tiny_llama(cfg, tokenizer).to(dtype)
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.to(device), tokenizer


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    """Save weights (safetensors) and tokenizer so `load_model(ModelConfig(path=...))` reads them back."""
    hf_logging.disable_progress_bar()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def count_params(model: torch.nn.Module, non_embedding: bool = False) -> int:
    """Parameter count; with `non_embedding`, the input embedding table is left out (the 2N/6N convention)."""
    total = sum(p.numel() for p in model.parameters())
    if non_embedding:
        emb = model.get_input_embeddings().weight
        tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
        # a tied table still does the output projection's matmul, so only an untied input table is excluded
        total -= 0 if tied else emb.numel()
    return total
