"""Attention of grouped-query models (several query heads read one key/value head, as in SmolLM2): rlscale's SDPA
call hands the shared heads to torch's kernel instead of transformers' copies, bit for bit the same."""

from __future__ import annotations

import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlscale.rl import attention
from rlscale.rl.model import ModelConfig, load_model, save_model


def _gqa_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation=attn)
    return LlamaForCausalLM(cfg)


def test_shared_key_value_heads_give_the_same_logits_and_gradients(monkeypatch):
    ran = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        ran.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    ids = torch.randint(3, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: a mask, where transformers copies each key/value head per query head
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {}
    for attn in ("sdpa", attention.SDPA):
        model = _gqa_llama(attn)
        first = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], use_cache=True)
        rest = model(input_ids=ids[:, 6:], attention_mask=mask, position_ids=pos[:, 6:], cache=first.cache)
        logits = torch.cat([first.logits, rest.logits], dim=1)  # a prefill, then a pass continuing its KV cache
        (logits.log_softmax(-1)[..., 7] * mask).sum().backward()
        out[attn] = logits, [p.grad for p in model.parameters()]
    (a, grads_a), (b, grads_b) = out["sdpa"], out[attention.SDPA]
    assert ran == [False] * 4 + [True] * 4  # 2 layers x 2 passes: transformers' copies, then the shared heads
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))


def test_models_load_with_it_and_save_without_it(tmp_path, nano):
    model, tok = nano
    assert model.config._attn_implementation == attention.SDPA
    assert load_model(ModelConfig(size="nano", attn_implementation="eager"))[0].config._attn_implementation == "eager"
    save_model(model, tok, tmp_path / "m")
    assert attention.SDPA not in json.dumps(json.loads((tmp_path / "m" / "config.json").read_text()))
    assert load_model(ModelConfig(path=str(tmp_path / "m")))[0].config._attn_implementation == attention.SDPA
