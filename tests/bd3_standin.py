"""A tiny stand-in for a released BD3-LM checkpoint (kuleshov-group/bd3lm-owt-block_size{4,8,16})
with the forward interface of its modelling code, and no remote code: a transformers class
registered in this process (model type ``tinybd3-test``), saved with ``save_pretrained``.

The interface, as kuleshov-group/bd3lms models/hf/modeling_bd3lm.py has it (read for these
tests, none of it copied): ``forward(input_ids, timesteps)`` with ``input_ids`` = [x_t, x_0], exactly
2·``model_length`` ids (the block-diff mask is built inside, from the config's ``block_size`` and
``model_length``), ``timesteps`` required (a model trained with time_conditioning: False zeroes
it); it returns the raw logits of the x_t half only, (B, model_length, vocab_size), the [MASK]
column (vocab_size − 1, GPT-2's 50257 appended) included — SUBS is the caller's.

The network is tdbench's own backbone under methods/bd3lm.py's block-diff mask, both halves at
positions 0 … L−1, so the weights of a ``bd3lm`` run load into it (``save_from_bd3lm``): its
number under a ``block_size`` row of hf-masked-diffusion can be compared with that run's bound.
The [MASK] column gets ``MASK_LOGIT``, far above the others, so reading the logits without SUBS
moves every number. ``legacy_init``: like modelling code written for transformers 4 (BD3-LM's is,
for 4.49), the model never calls ``post_init()``, which transformers 5 needs to load it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from bench.backbone import Backbone
from bench.config import BackboneConfig
from methods.bd3lm import block_diff_mask

MASK_LOGIT = 8.0
SEEN: list[torch.Tensor] = []     # every ``timesteps`` the stand-ins were given


class TinyBD3Config(PretrainedConfig):
    model_type = "tinybd3-test"

    def __init__(self, vocab_size=50258, block_size=4, model_length=32, backbone=None, legacy_init=False, **kw):
        self.vocab_size, self.block_size, self.model_length = vocab_size, block_size, model_length
        self.legacy_init = legacy_init
        self.backbone = backbone or {"layers": 1, "hidden": 16, "heads": 2, "cond_dim": 8}   # a BackboneConfig
        super().__init__(**kw)


class TinyBD3(PreTrainedModel):
    config_class = TinyBD3Config

    def __init__(self, config):
        super().__init__(config)
        self.backbone = Backbone(BackboneConfig(**config.backbone), vocab_in=config.vocab_size,
                                 vocab_out=config.vocab_size - 1, seq_len=config.model_length)
        if not config.legacy_init:
            self.post_init()

    def _init_weights(self, module):   # the backbone's own initialisation stands
        pass

    def forward(self, input_ids, timesteps=None, **kw):
        if timesteps is None:
            raise TypeError("timesteps is required")
        SEEN.append(timesteps.detach().clone())
        L, size = self.config.model_length, self.config.block_size
        if input_ids.shape[1] != 2 * L:
            raise ValueError(f"input_ids: [x_t, x_0] of exactly 2·{L} ids, got {input_ids.shape[1]}")
        dev = input_ids.device
        h = self.backbone(input_ids, attn_mask=block_diff_mask(L, size, dev),
                          positions=torch.arange(L, device=dev).repeat(2), return_hidden=True)
        logits = self.backbone.head(h[:, :L])
        return torch.cat([logits, torch.full_like(logits[..., :1], MASK_LOGIT)], -1)


AutoConfig.register(TinyBD3Config.model_type, TinyBD3Config)
AutoModelForMaskedLM.register(TinyBD3Config, TinyBD3)


def save_standin(path: Path, block_size: int, model_length: int, vocab_size: int = 50258, seed: int = 0,
                 legacy_init: bool = False) -> TinyBD3:
    """A random stand-in (its head and adaLN given structure: the backbone starts them at zero)."""
    torch.manual_seed(seed)
    model = TinyBD3(TinyBD3Config(vocab_size=vocab_size, block_size=block_size, model_length=model_length)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.config.legacy_init = legacy_init       # read when it is loaded
    model.save_pretrained(path)
    return model


def save_from_bd3lm(method, path: Path) -> TinyBD3:
    """The stand-in holding a ``bd3lm`` method's network (its V ids plus [MASK] = V)."""
    cfg = TinyBD3Config(vocab_size=method.V + 1, block_size=method.p.block_size, model_length=method.L,
                        backbone=method.net.cfg.model_dump())
    model = TinyBD3(cfg).eval()
    model.backbone.load_state_dict(method.net.state_dict())
    model.save_pretrained(path)
    return model
