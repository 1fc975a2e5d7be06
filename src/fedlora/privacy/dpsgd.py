"""Sample-level DP-SGD in a client's local training, through Opacus.

Opacus computes the per-example gradients (``GradSampleModule``'s hooks on the LoRA ``nn.Linear``
factors and the classification head; every other module is frozen) and its ``DPOptimizer`` clips
each example's gradient to L2 norm C, sums them, adds N(0, σ²C²) and divides by the expected batch
size. Batches are Poisson-sampled (:func:`poisson_batches`): each example joins each step with
probability q = batch size / the client's examples, the sampling the accounting assumes. An empty
batch is a step too: the optimiser then adds noise alone, as Opacus's own Poisson loader does.

A strategy's regulariser (Subspace-Reg's proximal terms) depends on the factors only, not on any
example, so its gradient costs no privacy: it is added after the noise, to the gradient Opacus
made, before the optimiser's update.

What Opacus supports is what can be trained privately: PEFT LoRA's ``nn.Linear`` factors and linear
heads are; a model whose trainable modules Opacus has no per-sample rule for raises a ConfigError
naming the module.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from fedlora.errors import ConfigError


def poisson_batches(indices: np.ndarray, batch_size: int, steps: int, seed: int) -> Iterator[np.ndarray]:
    """``steps`` Poisson-sampled batches: each index joins each batch with probability
    batch_size / len(indices) (expected size ``batch_size``), independently."""
    rng = np.random.default_rng([seed, 0xD9])
    q = min(1.0, batch_size / max(len(indices), 1))
    for _ in range(steps):
        yield indices[rng.random(len(indices)) < q]


class PrivateTraining:
    """Opacus around one client's round on the shared model; use as a context manager (the hooks
    are removed on exit, so the shared model is left as it was)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, sigma: float, clip: float,
                 expected_batch_size: int, seed: int):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        try:
            self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        except Exception as e:  # opacus: NotImplementedError / UnsupportedModuleError for a module type
            raise ConfigError(f"privacy.mode = 'sample': Opacus cannot compute per-example gradients for this "
                              f"model's trainable modules ({type(e).__name__}: {e})") from e
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        generator = torch.Generator(device=self.params[0].device if self.params else "cpu").manual_seed(seed)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=clip,
                                     expected_batch_size=expected_batch_size, generator=generator)

    def __enter__(self) -> PrivateTraining:
        # Opacus's full backward hooks fire on modules whose inputs need no gradient (the frozen
        # embeddings feed the LoRA layers); torch warns about it on every step, harmlessly
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        return self

    def __exit__(self, *exc) -> None:
        self._warnings.__exit__(*exc)
        self.gsm._close()  # remove the hooks and the grad_sample attributes

    def empty_batch(self) -> None:
        """A step whose Poisson batch is empty: zero per-example gradients (noise alone follows)."""
        for p in self.params:
            p.grad_sample = p.new_zeros((0, *p.shape))

    def step(self, regularizer: torch.Tensor | None = None) -> None:
        """Clip, noise and average the per-example gradients (Opacus), add the regulariser's gradient
        (data-independent), update, and clear the per-example state."""
        if self.optimizer.pre_step():
            if regularizer is not None:
                grads = torch.autograd.grad(regularizer, self.params, allow_unused=True)
                for p, g in zip(self.params, grads):
                    if g is not None:
                        p.grad.add_(g)
            self.optimizer.original_optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
