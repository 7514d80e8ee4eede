"""The method contract of bench/method.py: Context, stages (defaults keep a single-stage method
as it was) and frozen parts (no gradient, no parameter, no state, moved with the method, always
in eval mode, identified by source + sha256). What every registered method must do is checked
on each of them in tests/test_contract_every_method.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from bench.config import BackboneConfig
from bench.errors import UserError
from bench.method import Context, Method, weights_sha256

BB = BackboneConfig(layers=1, hidden=32, heads=2, cond_dim=16)


class _Frozen(Method):
    """Tokens → trainable embedding → frozen encoder (linear + dropout) → trainable head: the
    gradient has to pass *through* the frozen encoder to reach the embedding."""

    likelihood = "none"

    def __init__(self, params, backbone, vocab_size, seq_len, context=None):
        super().__init__(params, backbone, vocab_size, seq_len, context)
        self.emb = nn.Embedding(vocab_size, 8)
        self.add_frozen("encoder", nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)), source="tests/encoder")

    def build_network(self, cfg):
        return nn.Linear(8, self.V)

    def loss(self, x0, counted, u):
        h = self.encoder(self.emb(x0))
        return nn.functional.cross_entropy(self.net(h).flatten(0, 1), x0.flatten())


def _frozen(seed=0):
    torch.manual_seed(seed)
    return _Frozen(_Frozen.Params(), BB, 11, 6)


def _batch():
    x = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(1))
    return x, torch.ones_like(x, dtype=torch.bool), torch.rand(3, generator=torch.Generator().manual_seed(2))


def test_frozen_module_gets_no_gradient_and_is_no_parameter_or_state():
    m = _frozen()
    enc = m.encoder
    assert m.frozen_modules() == {"encoder": enc}
    assert not any(p is q for p in m.parameters() for q in enc.parameters())
    assert not any(k.startswith("encoder") for k in m.state_dict())
    assert all(not p.requires_grad for p in enc.parameters())
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m.train()
    m(*_batch()).backward()
    assert all(p.grad is None for p in enc.parameters())
    assert m.emb.weight.grad is not None and m.emb.weight.grad.abs().sum() > 0  # the gradient went through it
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_frozen_module_moves_with_the_method_and_stays_in_eval_mode():
    m = _frozen()
    m.train()
    assert m.training and not m.encoder.training and not m.encoder[1].training
    m.to(torch.float64)
    assert m.encoder[0].weight.dtype == torch.float64 and m.emb.weight.dtype == torch.float64
    m.float()
    assert m.encoder[0].weight.dtype == torch.float32
    m.eval()
    m.train(True)
    assert not m.encoder.training
    # dropout of the frozen encoder is off in training mode: two forwards agree exactly
    x, c, u = _batch()
    assert torch.equal(m(x, c, u), m(x, c, u))


def test_frozen_info_and_check():
    m = _frozen()
    info = m.info()["frozen"]["encoder"]
    assert info["source"] == "tests/encoder" and info["sha256"] == weights_sha256(m.encoder)
    same = _frozen()
    same.check_frozen(m.frozen_info())                 # the same weights from the same source: fine
    other = _frozen(seed=1)                            # the "source" now holds other weights
    assert other.frozen_info()["encoder"]["sha256"] != info["sha256"]
    with pytest.raises(UserError, match=r"^tests/encoder: frozen module 'encoder' changed") as e:
        other.check_frozen(m.frozen_info())
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="already an attribute"):
        m.add_frozen("encoder", nn.Linear(2, 2), "x")
    with pytest.raises(ValueError, match="already an attribute"):
        m.add_frozen("emb", nn.Linear(2, 2), "x")


def test_sha256_sees_one_changed_weight():
    enc = nn.Linear(4, 4)
    h = weights_sha256(enc)
    with torch.no_grad():
        enc.bias[2] += 1e-6
    assert weights_sha256(enc) != h


def test_context_reaches_the_method():
    tok = object()
    m = _Frozen(_Frozen.Params(), BB, 11, 6, context=Context(tokenizer=tok))
    assert m.context.tokenizer is tok
    assert _frozen().context == Context()


def test_forward_routes_to_the_current_stage():
    class TwoStage(Method):
        stages = ("a", "b")
        likelihood = "none"

        def build_network(self, cfg):
            return nn.Linear(1, 1)

        def stage_loss(self, stage, x0, counted, u):
            return torch.tensor({"a": 1.0, "b": 2.0}[stage])

    m = TwoStage(TwoStage.Params(), BB, 5, 4)
    assert m.current_stage == "a" and float(m(*_batch())) == 1.0
    m.current_stage = "b"
    assert float(m(*_batch())) == 2.0
