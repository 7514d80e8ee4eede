"""An autoregressive LM turned into a masked diffusion LM's denoiser (A2D): the network of
``mdlm``'s ``init_from`` (methods/mdlm.py) — the 2025 adaptation recipe of DiffuGPT and
DiffuLLaMA (Gong et al. 2024, "Scaling Diffusion Language Models via Adaptation from
Autoregressive Models", arXiv 2410.17891, §3.2) and of dllm's A2D models.

A pretrained Hugging Face causal LM (Llama, GPT-2 or any ``AutoModelForCausalLM`` whose decoder
takes a 4-D attention mask) becomes p_θ(x_0 | x_t), read with MDLM's SUBS (§3.2: [MASK] never
predicted, unmasked tokens carried over):

1. **Attention made bidirectional.** Every forward passes an explicit (1, 1, L+1, L+1) mask.
   In evaluation and sampling it is full attention. In training, with ``anneal_steps`` N > 0,
   DiffuLLaMA's attention-mask annealing (§3.2; ``get_anneal_attn_mask`` in its
   ``LLaMA-Factory/src/llamafactory/train/ddm/trainer.py``): query i may attend key j when
   j ≤ i (the causal mask) or a Bernoulli(r) coin drawn per (i, j) and forward says so, with
   r rising linearly from 0 to 1 over the first N optimizer steps, r_k = min(1, k/N) at step k.
   DiffuLLaMA uses r_k = min(1, (k+1)/N), which opens a share 1/N of the future keys already at
   step 0; r_k = k/N keeps step 0 the AR model exactly (the step-0 identity below) and reaches
   full attention one step later. N = 0: full attention from the first step (dllm's A2D, whose
   converted models simply drop the causal mask).
2. **The logit shift.** The AR model's output at input position j predicts the token at j + 1;
   the recipe keeps that: p_θ(x_0^i | x_t) is read from the output at position i − 1
   (DiffuLLaMA's ``shift``, Dream's AR-adapted head). Position 0 has no i − 1: the input is
   prefixed with the model's BOS (its ``bos_token_id``, else EOS; SmolLM2 converted:
   ``<|endoftext|>``), the token the AR model conditions its first token on, so position 0 is
   read from the BOS position and every position has a proper left context. (DiffuLLaMA and Dream
   instead read position 0 from its own output.) Step-0 identity: with causal attention and clean
   input x_t = x_0, Σ_i −log p_θ(x_0^i | x_0) is the AR model's −log p(x_0 | BOS) exactly —
   the shifted model starts where the AR model is (tests/test_a2d.py).
3. **The mask token.** [MASK] is a new input id, the model's vocabulary size V_m (so the
   vocabulary grows by exactly one); its input embedding row is the mean of the V_m pretrained
   rows (the centre of the embedding cloud: no direction favoured, the scale of a typical token;
   transformers' ``resize_token_embeddings`` draws new rows around that mean). The output head
   stays the pretrained one over the suite's V ≤ V_m ids (with tied embeddings the first V rows
   of the — now shared and trained — input matrix), so the logits of the old ids are unchanged
   and [MASK] is never predicted (SUBS).
4. **No time input.** The causal LM takes no t: the denoiser is time-agnostic (MDLM's
   ``time_conditioning: false``).

The adapter offers the shared backbone's interface (bench/backbone.py): ``net(x_t, t)`` → logits,
``net(x_t, t, return_hidden=True)`` → hidden states, ``net.head(h, targets)`` → the fused
head + cross-entropy per row (never an (N, V) log-probability tensor), so MDLM's loss, bound and
sampler run on it unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bench import hf, models
from bench.backbone import fused_nll
from bench.errors import UserError
from bench.method import weights_sha256


def anneal_ratio(step: int, steps: int) -> float:
    """r_k = min(1, k/N): the share of future keys open at optimizer step k (module doc, 1.);
    N = 0: 1 (full attention from the start)."""
    return 1.0 if steps <= 0 else min(1.0, step / steps)


def attention_allowed(n: int, ratio: float, device=None) -> torch.Tensor:
    """(n, n) bool, True where query i may attend key j: j ≤ i, or a Bernoulli(``ratio``) coin
    (the global RNG: the harness seeds it per micro-batch, so a resumed run draws the same)."""
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    if ratio >= 1.0:
        return torch.ones_like(causal)
    if ratio <= 0.0:
        return causal
    return causal | (torch.rand(n, n, device=device) < ratio)


class A2DHead(nn.Module):
    """The pretrained output head over the suite's V ids: ``head(h)`` → logits (…, V),
    ``head(h, targets)`` → −log softmax(logits)[target] per row (bench.backbone.fused_nll).
    With tied embeddings it reads the first V rows of the (resized) input embedding, held
    unregistered so the shared matrix is saved once."""

    def __init__(self, V: int, out: nn.Module | None, tied: nn.Embedding | None):
        super().__init__()
        self.V = V
        self.out = out                                   # an untied lm_head (a child), else None
        self.__dict__["tied"] = tied                      # not a child: the body holds it

    def weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.out is None:
            return self.tied.weight[:self.V], None
        b = getattr(self.out, "bias", None)
        return self.out.weight[:self.V], (b[:self.V] if b is not None else None)

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        W, b = self.weight_bias()
        if targets is None:
            return torch.nn.functional.linear(h, W, b)
        lead = h.shape[:-1]
        return fused_nll(h.reshape(-1, h.shape[-1]), W, targets.reshape(-1), b).view(lead)


class A2DNet(nn.Module):
    """The causal LM's decoder (``body``) + its head (``head``) as p_θ(x_0 | x_t) (module doc).
    ``ratio`` is the share of future keys open in a training forward (set by the method from the
    optimizer step, ``anneal_ratio``); evaluation mode always uses full attention."""

    def __init__(self, body: nn.Module, head: A2DHead, bos_id: int, mask_id: int, eager: bool):
        super().__init__()
        self.body, self.head = body, head
        self.bos_id, self.mask_id, self.eager = bos_id, mask_id, eager
        self.ratio = 1.0

    def mask(self, n: int, device, dtype) -> torch.Tensor:
        allowed = attention_allowed(n, self.ratio if self.training else 1.0, device)[None, None]
        if not self.eager:
            return allowed                                # SDPA: a boolean mask, True = attend
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """x_t (B, L) → logits (B, L, V) (or hidden states (B, L, d)): input [BOS, x_t], the
        output at position i (BOS for i = 0, else x_t^{i−1}) read for x_0^i. ``t`` is ignored."""
        B, L = x_t.shape
        x = torch.cat([torch.full((B, 1), self.bos_id, dtype=x_t.dtype, device=x_t.device), x_t], dim=1)
        emb = self.body.get_input_embeddings()
        out = self.body(input_ids=x, attention_mask=self.mask(L + 1, x.device, emb.weight.dtype), use_cache=False)
        h = out.last_hidden_state[:, :L]
        return h if return_hidden else self.head(h)


def grow_embedding(emb: nn.Embedding) -> nn.Embedding:
    """The input embedding with one more row ([MASK]), initialised to the mean of the others."""
    V, d = emb.weight.shape
    new = nn.Embedding(V + 1, d, padding_idx=emb.padding_idx, device=emb.weight.device, dtype=emb.weight.dtype)
    with torch.no_grad():
        new.weight[:V] = emb.weight
        new.weight[V] = emb.weight.mean(0)
    return new


def build_a2d(name: str, V: int, L: int, where: str, suite_tok=None) -> tuple[A2DNet, dict]:
    """(the A2D network of the causal LM ``name`` for a suite of V ids (``suite_tok``, when
    given, must encode as the model's tokenizer does) and blocks of L, facts
    to record: the pretrained weights' sha256 as loaded, a named model's identity). On the meta
    device (``--dry-run``) only the config is read: the network is built empty, with the
    parameter count of the real one."""
    lm = load_lm(name, where)
    cfg = lm.config
    V_m = lm.get_input_embeddings().weight.shape[0]
    if V > V_m:
        raise UserError(f"{where}: the suite's vocabulary ({V} ids) is not {name}'s ({V_m}); use its tokenizer: "
                        f"data.tokenizer: {{name: hf, model: {name}}}")
    if L + 1 > hf.context_length(lm):
        raise UserError(f"{where}: blocks of {L} tokens + BOS exceed {name}'s context of {hf.context_length(lm)}")
    body, out = lm.base_model, lm.get_output_embeddings()
    tied = out.weight is lm.get_input_embeddings().weight
    meta = torch.empty(0).device.type == "meta"
    hf_tok = None if meta else hf.load_tokenizer(name)
    if suite_tok is not None and not hf.same_tokenizer(suite_tok, lm, hf_tok):
        raise UserError(f"{where}: the suite's tokenizer ({suite_tok.key}) does not give {name}'s ids; use its "
                        f"own: data.tokenizer: {{name: hf, model: {name}}}")
    bos = hf.bos_id(lm, hf_tok)
    facts = {"init_from": name, "architecture": type(lm).__name__, "vocab_model": V_m, "mask_id": V_m,
             "first_context_id": bos, "tied_embeddings": tied, "mask_init": "mean of the pretrained input embeddings",
             "weights_sha256": None if meta else weights_sha256(lm),
             **({"named": ident} if not meta and (ident := models.identity(name)) else {})}
    body.set_input_embeddings(grow_embedding(body.get_input_embeddings()))
    head = A2DHead(V, None if tied else out, body.get_input_embeddings() if tied else None)
    net = A2DNet(body, head, bos, V_m, getattr(cfg, "_attn_implementation", "sdpa") == "eager")
    return net, facts


def load_lm(name: str, where: str) -> nn.Module:
    """The causal LM: from its weights, or (on the meta device) from its config alone."""
    if torch.empty(0).device.type != "meta":
        return hf.load_causal_lm(name, where=where).float()
    from transformers import AutoConfig, AutoModelForCausalLM

    src, local = hf.resolve_pretrained(name, where, "a causal LM")
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src, local_files_only=local))
