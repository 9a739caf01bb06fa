"""Several problems' operators side by side in one batch (the service batches jobs this way)."""
from __future__ import annotations

import torch

from .base import Operator


class Unbatchable(RuntimeError):
    """The sampler needs something a mixed batch cannot give; its problems run alone instead."""


class BatchedOperator(Operator):
    """Several problems' operators side by side: problem ``j`` owns rows ``counts[:j].sum()`` onward.

    Every method applies each problem's operator to its own slice of the batch (so each sees
    exactly what it would see alone). A batch of one row is broadcast: each operator is
    applied to it and the result repeated over its problem's rows (``channel_masks`` probes the
    operator that way). ``svd()`` is the shared SVD when ``shared_svd`` (the operators are
    identical), else None.
    """

    def __init__(self, ops: list[Operator], counts: list[int], shared_svd: bool = False):
        first = ops[0]
        super().__init__(first.in_shape)
        self.ops, self.counts, self.total = ops, list(counts), int(sum(counts))
        self.linear = first.linear  # type: ignore[misc]
        self.kind = first.kind  # type: ignore[misc]
        self.channel_separable = first.channel_separable
        self.row_gram = getattr(first, "row_gram", None)
        self._shared_svd = shared_svd

    @property
    def obs_shape(self):
        return self.ops[0].obs_shape

    def _split(self, arg):
        if isinstance(arg, torch.Tensor) and arg.dim() >= 1 and arg.shape[0] == self.total:
            return list(torch.split(arg, self.counts))
        return [arg] * len(self.ops)

    def _map(self, name: str, x: torch.Tensor, *rest):
        b = x.shape[0]
        if b == 1 and self.total != 1 and not any(
                isinstance(r, torch.Tensor) and r.dim() >= 1 and r.shape[0] == self.total for r in rest):
            outs = [getattr(op, name)(x, *rest) for op in self.ops]
            return torch.cat([o.expand((n,) + tuple(o.shape[1:])) for o, n in zip(outs, self.counts)])
        if b == 1 and self.total != 1:
            x = x.expand((self.total,) + tuple(x.shape[1:]))
        elif b != self.total:
            raise ValueError(f"batched operator got a batch of {b}, expected {self.total} or 1")
        parts = [self._split(a) for a in (x, *rest)]
        return torch.cat([getattr(op, name)(*(p[i] for p in parts)) for i, op in enumerate(self.ops)])

    def forward(self, x):
        return self._map("forward", x)

    __call__ = forward

    def adjoint(self, y):
        return self._map("adjoint", y)

    def normal(self, x):
        return self._map("normal", x)

    def pseudo_inverse(self, y):
        return self._map("pseudo_inverse", y)

    def project(self, x, y):
        return self._map("project", x, y)

    def prox(self, z, y, rho):
        return self._map("prox", z, y, rho)

    def residual(self, x):
        return self._map("residual", x)

    def svd(self):
        if self._shared_svd:
            return self.ops[0].svd()
        if all(op.svd() is None for op in self.ops):
            return None
        # different operators with their own SVDs: no one basis serves the batch
        raise Unbatchable("the batch's operators have different SVDs")
