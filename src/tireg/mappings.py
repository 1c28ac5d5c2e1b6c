"""Parameter mappings: an unconstrained raw value ``r`` (what the optimiser
updates) to a parameter value ``p = m(r)``.

Each mapping gives the value ``m(r)``, the derivative ``m'(r)`` (which the
analytic gradient multiplies in by the chain rule, ``dL/dr = dL/dp * m'(r)``)
and the inverse ``r = m^{-1}(p)`` (the seed calls it ``solve``).  Mappings
are plain callables on tensors of any shape, dtype and device.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = ["Mapping", "IdentityMapping", "SigmoidMapping", "ExpMapping"]

Number = Union[float, torch.Tensor]


class Mapping:
    """Base class: ``p = forward(r)``, ``derivative(r) = dp/dr``, ``solve(p) = r``."""

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """Parameter value ``p = m(r)``."""
        raise NotImplementedError

    def derivative(self, raw: torch.Tensor) -> torch.Tensor:
        """``dp/dr = m'(r)``."""
        raise NotImplementedError

    def solve(self, value: Number) -> torch.Tensor:
        """Raw value ``r`` with ``m(r) = value`` (the inverse mapping)."""
        raise NotImplementedError

    def inverse(self, value: Number) -> torch.Tensor:
        """Alias of :meth:`solve`."""
        return self.solve(value)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        return self.forward(raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _as_float_tensor(value: Number) -> torch.Tensor:
    value = torch.as_tensor(value)
    return value if value.is_floating_point() else value.to(torch.get_default_dtype())


class IdentityMapping(Mapping):
    """``p = r``, ``m'(r) = 1``."""

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def derivative(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(raw)

    def solve(self, value: Number) -> torch.Tensor:
        return _as_float_tensor(value).clone()


class SigmoidMapping(Mapping):
    """A bounded parameter: ``p = lo + (hi - lo) * sigmoid(r)`` in the open range ``(lo, hi)``.

    ``m'(r) = (hi - lo) * sigmoid(r) * (1 - sigmoid(r))`` and
    ``m^{-1}(p) = log(q / (1 - q))`` with ``q = (p - lo) / (hi - lo)``; a value
    outside ``(lo, hi)`` has no inverse and raises ``ValueError``.
    """

    def __init__(self, lo: float, hi: float):
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"SigmoidMapping(): need finite lo < hi; got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.sigmoid(raw)

    def derivative(self, raw: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(raw)
        return (self.hi - self.lo) * s * (1.0 - s)

    def solve(self, value: Number) -> torch.Tensor:
        value = _as_float_tensor(value)
        if not bool(((value > self.lo) & (value < self.hi)).all()):
            raise ValueError(
                f"SigmoidMapping.solve(): value {value.tolist()} is outside the open range "
                f"({self.lo}, {self.hi}); widen the range or choose another start value"
            )
        fraction = (value - self.lo) / (self.hi - self.lo)
        return torch.log(fraction) - torch.log1p(-fraction)

    def __repr__(self) -> str:
        return f"SigmoidMapping({self.lo}, {self.hi})"


class ExpMapping(Mapping):
    """A positive parameter such as a scale: ``p = exp(r)``, ``m'(r) = exp(r)``, ``m^{-1}(p) = log p``.

    Gives equal steps in ``r`` equal *relative* changes of ``p``; a value
    ``p <= 0`` raises ``ValueError``.
    """

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.exp(raw)

    def derivative(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.exp(raw)

    def solve(self, value: Number) -> torch.Tensor:
        value = _as_float_tensor(value)
        if not bool((value > 0).all()):
            raise ValueError(f"ExpMapping.solve(): value {value.tolist()} must be positive")
        return torch.log(value)


def mapping_state(mapping: Mapping) -> Optional[tuple]:
    """A built-in mapping as plain data for a state dict, ``(name, *arguments)``; ``None`` for a
    mapping of one's own (an arbitrary object would not load with ``weights_only=True``)."""
    kind = type(mapping)
    if kind is IdentityMapping:
        return ("identity",)
    if kind is ExpMapping:
        return ("exp",)
    if kind is SigmoidMapping:
        return ("sigmoid", mapping.lo, mapping.hi)
    return None


def mapping_from_state(state: Sequence) -> Mapping:
    """The mapping that :func:`mapping_state` described."""
    name, *arguments = state
    makers = {"identity": IdentityMapping, "exp": ExpMapping, "sigmoid": SigmoidMapping}
    if name not in makers:
        raise ValueError(f"unknown mapping {name!r} in a saved state; expected one of {sorted(makers)}")
    return makers[name](*arguments)
