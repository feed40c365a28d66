"""Main gradients: where a training step's weight gradients accumulate, in at least float32.

The engine runs one backward per unit (hundreds per step with DTA, one per rollout dense), and
autograd adds each into ``p.grad`` in the parameter's dtype: in bfloat16 every addition rounds the
running sum, so the step's gradient error grows with the number of units. As megatron-core's DDP
does, each parameter gets a ``main_grad`` buffer in ``promote(dtype, float32)``, and a hook moves
every backward's ``p.grad`` into it (then drops ``p.grad``): each unit's gradient is rounded to the
parameter dtype once, by its own matmuls, and the sum over units is float32. float32 and float64
parameters accumulate exactly as autograd would (``0 + g1 + g2 ...`` in the same order), so the
float64 results stay bit-identical.

Invariant: while a model's main grads are attached, ``grad_of(p)`` is the step's gradient so far
and ``p.grad`` is None between backward calls. megatron-core's DDP (optimizer.backend=megatron)
keeps its own ``param.main_grad`` (float32, ``grad_reduce_in_fp32``) filled the same way, so
``grad_of`` serves it too.
"""

from __future__ import annotations

import torch


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """The gradient accumulated so far: the main grad when one is attached, else ``p.grad``."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


class MainGrads:
    """A ``main_grad`` buffer per parameter and the hooks that fill it after every backward."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        for p in params:
            p.main_grad = torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
        self._hooks = [p.register_post_accumulate_grad_hook(self._move) for p in params]

    @staticmethod
    def _move(p: torch.Tensor) -> None:
        p.main_grad += p.grad
        p.grad = None

    def zero(self) -> None:
        for p in self.params:
            p.main_grad.zero_()

    def remove(self) -> None:
        """Detach: hooks off, buffers dropped; backward fills ``p.grad`` again."""
        for h in self._hooks:
            h.remove()
        for p in self.params:
            del p.main_grad
