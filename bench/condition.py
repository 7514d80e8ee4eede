"""Conditioning in the method contract: which positions are given, checked in one place.

A conditional draw ``method.sample(n, steps, generator, given=ids, keep=mask)`` fixes the
positions where ``keep`` is true to ``given`` and generates the rest; the likelihood side,
``conditional_nll`` (bench/evaluate.py), scores the positions where ``keep`` is false given the
kept ones. The same two arrays serve every use: a prompt (keep true on a prefix), a suffix, a
middle span to infill, a random share of positions, lm-eval's context and continuation.

``given`` and ``keep`` are (n, L) — or (L,), the same for every row — with ``given`` integer ids
in [0, V) wherever ``keep`` is true (elsewhere ignored) and ``keep`` bool. What a method accepts
is its ``conditioning`` (a class attribute of :class:`bench.method.Method`, which an instance
may narrow, e.g. hf-causal-lm when it retokenizes):

- ``"any"``: any keep pattern (the diffusion methods: absorbing ones start the kept positions
  unmasked, uniform-state and continuous ones replace them at every step; each sampler's
  docstring says which);
- ``"prefix"``: keep true on positions 0..k−1 of each row and false after (k may differ by row):
  a left-to-right model conditions on what precedes and nothing else (AR, hf-causal-lm);
- ``"none"``: the method cannot condition (the latent methods generate a whole block from a
  latent); a table shows "—" for it (:func:`can_condition`).

:func:`condition` is what a sampler calls: it checks the arrays against the method and returns
a :class:`Condition`, or None when nothing is kept (an unconditional draw, the same draws as
``sample(n, steps, generator)``). :func:`conditional_sample` is what the harness calls: it
refuses a method that cannot condition before calling its sampler (whose signature may predate
``given``/``keep``). Bad arrays are a one-line :class:`~bench.errors.UserError` naming
``given`` or ``keep``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from bench.errors import UserError

Conditioning = Literal["any", "prefix", "none"]
KINDS: tuple[str, ...] = ("any", "prefix", "none")


@dataclass(frozen=True)
class Condition:
    """A checked conditioning: ``given`` (n, L) long, ``keep`` (n, L) bool, on the method's device.
    ``given`` holds 0 where ``keep`` is false (the value there is never read)."""

    given: torch.Tensor
    keep: torch.Tensor

    def fix(self, x: torch.Tensor) -> torch.Tensor:
        """x with the kept positions set to the given ids."""
        return torch.where(self.keep, self.given, x)

    def prefix_lengths(self) -> torch.Tensor:
        """(n,) the number of leading kept positions of each row."""
        return prefix_lengths(self.keep)


def prefix_lengths(keep: torch.Tensor) -> torch.Tensor:
    """(n,) how many positions each row keeps before its first unkept one."""
    return keep.long().cumprod(-1).sum(-1)


def is_prefix(keep: torch.Tensor) -> torch.Tensor:
    """(n,) whether each row of ``keep`` is true on a prefix and false after it."""
    return prefix_lengths(keep) == keep.sum(-1)


def can_condition(conditioning: str, keep: torch.Tensor) -> bool:
    """Whether a method with ``conditioning`` accepts every row of ``keep`` (what a table reads
    to show "—": a latent method never, AR only a prefix)."""
    if conditioning not in KINDS:
        raise ValueError(f"conditioning {conditioning!r}: one of {', '.join(KINDS)}")
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if conditioning == "none":
        return not bool(keep.any())
    return conditioning == "any" or bool(is_prefix(keep.reshape(-1, keep.shape[-1])).all())


def _rows(name: str, a, n: int, L: int) -> torch.Tensor:
    a = torch.as_tensor(a)
    if a.dim() == 1 and a.shape[0] == L:
        a = a.expand(n, L)
    if tuple(a.shape) != (n, L):
        raise UserError(f"{name}: shape {tuple(a.shape)}, expected ({n}, {L}) or ({L},) (n rows of L positions)")
    return a


def _keep_of(keep, n: int, L: int) -> torch.Tensor:
    keep = _rows("keep", keep, n, L)
    if keep.dtype != torch.bool:
        raise UserError(f"keep: dtype {keep.dtype}, expected bool (true where the position is given)")
    return keep


def check_pattern(method, keep: torch.Tensor) -> None:
    """UserError unless ``method`` (its instance's ``conditioning``) accepts every row of ``keep``."""
    kind = method.conditioning
    if not keep.any() or kind == "any":
        return
    if kind == "none":
        raise UserError(f"keep: {method.name} cannot condition on given positions (conditioning: none); "
                        f"its conditional rows show —")
    bad = (~is_prefix(keep)).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        raise UserError(f"keep: {method.name} conditions on a prefix only (keep true on positions 0..k−1, false "
                        f"after); row {row} keeps positions {_spans(keep[row])}")


def _spans(row: torch.Tensor) -> str:
    """The kept positions of one row as ranges, e.g. '0–2, 5' (at most four shown)."""
    idx = row.nonzero()[:, 0].tolist()
    spans, start = [], None
    for a, b in zip(idx, idx[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            spans.append(f"{start}–{a}" if a > start else f"{a}")
            start = None
    return ", ".join(spans[:4]) + (", …" if len(spans) > 4 else "")


def condition(method, n: int, given=None, keep=None) -> Condition | None:
    """The checked :class:`Condition` of a conditional draw of ``n`` rows from ``method`` (its
    ``L``, ``V``, ``conditioning`` and device), or None when nothing is kept. UserError (one line,
    naming ``given`` or ``keep``) for arrays of the wrong shape or dtype, ids out of range at a
    kept position, one without the other, or a pattern the method does not accept."""
    if given is None and keep is None:
        return None
    if given is None or keep is None:
        missing = "given" if given is None else "keep"
        raise UserError(f"{missing}: missing (a conditional draw needs both given ids and a keep mask)")
    L, V, dev = method.L, method.V, method.device
    keep = _keep_of(keep, n, L)
    check_pattern(method, keep)
    if not keep.any():
        return None
    given = _rows("given", given, n, L)
    if given.dtype.is_floating_point or given.dtype == torch.bool or given.is_complex():
        raise UserError(f"given: dtype {given.dtype}, expected integer token ids")
    keep = keep.to(dev)
    given = torch.where(keep, given.to(dev).long(), torch.zeros((), dtype=torch.long, device=dev))
    if bool((given < 0).any() or (given >= V).any()):
        bad = given[keep]
        raise UserError(f"given: id {int(bad[(bad < 0) | (bad >= V)][0])} at a kept position is outside the "
                        f"vocabulary [0, {V})")
    return Condition(given, keep)


def continuation(method, x: torch.Tensor, keep) -> torch.Tensor:
    """The positions a conditional likelihood scores, ~keep (B, L), after checking ``keep``
    against ``method`` as :func:`condition` does (a left-to-right model: the context a prefix)."""
    B, L = x.shape
    keep = _keep_of(keep, B, L)
    check_pattern(method, keep)
    return ~keep.to(x.device)


def conditional_sample(method, n: int, steps, generator=None, given=None, keep=None) -> torch.Tensor:
    """``method.sample`` with ``given``/``keep`` when something is kept, checked first here — so a
    method that cannot condition is refused with one line before its sampler is called — and
    the unconditional call ``sample(n, steps, generator=…)`` otherwise."""
    cond = condition(method, n, given, keep)
    if cond is None:
        return method.sample(n, steps, generator=generator)
    return method.sample(n, steps, generator=generator, given=cond.given, keep=cond.keep)
