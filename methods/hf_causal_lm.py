"""hf-causal-lm: any pretrained Hugging Face causal LM as a leaderboard row, evaluated under
the suite's protocol (exact likelihood; nothing is trained).

    methods: [{method: hf-causal-lm, model: gpt2, label: GPT-2 (OpenAI)}]   # or a save_pretrained dir
    methods: [{method: hf-causal-lm, model: smollm2}]   # a named model (bench.models), offline

−log p(x) = Σ_j −log p_θ(x_j | x_<j) per block, the first token of each block conditioned on
the model's BOS (GPT-2: ``<|endoftext|>``), as lm-eval's rolling loglikelihood; blocks longer
than the model's context are scored in windows (bench.hf.causal_lm_token_nll).

Which ids: when the suite's tokenizer is the model's (``gpt2`` for GPT-2 models, also when a
saved directory holds no tokenizer), the suite's token ids are scored as they are, so the row
scores exactly the tokens every other row scores. Otherwise each block's counted tokens are
detokenized and retokenized with the model's own tokenizer; the NLL of that text is divided
by the suite's counted tokens (per original token, so the ppl column stays comparable), and
the record says so (``method_info.retokenized``, ``counted_per``). With ``eval.per_byte: true``
every row also gets ``bpb`` = Σ NLL / (ln 2 · UTF-8 bytes of the decoded counted tokens), a
unit that does not depend on either tokenizer (bench.runner.utf8_bytes_per_block). A named
model (``smollm2``: its own 49k BPE, so always retokenised) records its identity
(``method_info.named``: source file and weights sha256, bench.models.identity); give it
``eval.per_byte: true`` to sit beside models of other tokenizers in bits per byte.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from pydantic import Field, model_serializer

from bench import hf, models
from bench.config_io import drop_defaults
from bench.method import Method, Params, weights_sha256
from bench.registry import register


class HFCausalLMParams(Params):
    model: str = Field("gpt2", description="hub name (gpt2, gpt2-medium, ...), a named model (smollm2) or a "
                                           "save_pretrained directory (a path-like name must exist locally: it "
                                           "never reaches the hub)")
    stride: Optional[int] = Field(None, ge=1,
                                  description="window stride beyond the model's context (default: its context)")
    revision: Optional[str] = Field(None, min_length=1, max_length=100,
                                    description="hub commit (or tag/branch) to load; pins the model and is part "
                                                "of the run id (unpinned, the record shows the commit loaded)")

    @model_serializer(mode="wrap")
    def _drop_unpinned(self, handler):
        # ``revision`` came later: absent from the spec (and the run id) of rows that do not pin one
        return drop_defaults(handler(self), revision=None)


@register("hf-causal-lm")
class HFCausalLM(Method):
    Params = HFCausalLMParams
    likelihood = "exact"
    time = "none"
    causal = True
    trains = False
    # the conditional NLL of a continuation given a prefix (bench.evaluate.conditional_nll), exact
    # on the suite's ids; retokenizing, the context would be dropped with the uncounted tokens
    # (``nll``), so such a model narrows it to "none" (choose_ids)
    conditioning = "prefix"

    @classmethod
    def default_label(cls, params) -> str:
        return f"{Path(params.model).name} (pretrained)"

    @classmethod
    def example_params(cls, workdir: Path) -> dict:
        """A tiny random GPT-2 (GPT-2's vocabulary, no tokenizer saved: it scores the suite's
        GPT-2 ids as they are) saved under ``workdir``: the hub is not needed to check it."""
        import transformers

        path = Path(workdir) / "tiny-gpt2"
        if not path.is_dir():
            torch.manual_seed(0)
            cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64)
            transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
        return {"model": str(path)}

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        self.retokenized = self.first_context = None
        if self.context.tokenizer is not None:   # the suite's tokenizer: which ids the model scores
            self.choose_ids(self.context.tokenizer)

    def build_network(self, cfg):
        net = hf.load_causal_lm(self.p.model, revision=self.p.revision, where="methods[hf-causal-lm].model")
        self.weights_sha256 = weights_sha256(net)   # hashed once, on the CPU, as loaded (it never trains)
        return net

    def choose_ids(self, tokenizer) -> None:
        """Score the suite's ids as they are when ``tokenizer`` is the model's own; else
        detokenize each block and retokenize its text with the model's tokenizer."""
        self.suite_tok = tokenizer
        self.hf_tok = hf.load_tokenizer(self.p.model, self.p.revision)
        if hf.same_tokenizer(tokenizer, self.net, self.hf_tok):
            self.retokenized = False
        elif self.hf_tok is None:
            from bench.errors import UserError
            raise UserError(f"methods[hf-causal-lm].model: {self.p.model} has no tokenizer of its own and the suite's "
                            f"({tokenizer.key}) is not its vocabulary; save its tokenizer beside it")
        else:
            self.retokenized = True
            self.conditioning = "none"
        self.first_context = hf.bos_id(self.net, self.hf_tok)

    def info(self) -> dict:
        """``revision``: the hub commit loaded (None for a local directory); ``weights_sha256``
        (bench.method.weights_sha256): a changed model shows in the record even unpinned;
        ``named``: a named model's identity (bench.models)."""
        return {"model": self.p.model, "retokenized": self.retokenized, "first_context_id": self.first_context,
                "counted_per": "suite token", "context": hf.context_length(self.net),
                "revision": hf.hub_revision(self.p.model, self.p.revision), "weights_sha256": self.weights_sha256,
                **({"named": ident} if (ident := models.identity(self.p.model)) else {})}

    def nll(self, x0, counted, u=None):
        if not self.retokenized:
            tok_nll = hf.causal_lm_token_nll(self.net, x0, self.first_context, self.p.stride)
            return (tok_nll.to(x0.device) * counted).sum(1)
        texts = [self.suite_tok.decode(x[c].tolist()) for x, c in zip(x0.cpu(), counted.cpu())]
        return torch.tensor(hf.text_nll(self.net, self.hf_tok, texts, self.first_context, self.p.stride),
                            dtype=torch.float64, device=x0.device)
