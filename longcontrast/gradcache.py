"""GradCache: full-batch contrastive gradients with memory bounded by the mini-batch.

Gao et al. (2021), "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup".
A training step is three small functions:

1. :func:`embed_without_grad` encodes every mini-batch under ``no_grad``, recording the RNG state
   before each one;
2. :func:`cache_embedding_gradients` computes the loss over all embeddings at once and the gradient
   of the loss with respect to each embedding;
3. :func:`replay` re-encodes each mini-batch with autograd under its recorded RNG state (so dropout
   draws the same masks) and back-propagates ``sum(embedding * cached_gradient)``, whose gradient
   with respect to the parameters is this mini-batch's share of the full-batch gradient.

Only one mini-batch's graph is alive at a time. The optimizer step stays in the training loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .late_interaction import cat_padded
from .loss import LossOutput

# encode(inputs) -> (N, D) embeddings, or (N, L, D) token vectors; inputs is one padded mini-batch.
EncodeFn = Callable[[dict], torch.Tensor]


@dataclass
class RandState:
    """The CPU and (when the mini-batch runs on CUDA) CUDA generator states at one moment."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> "RandState":
        device = torch.device(device)
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """Run the block from this state, then put the generators back where they were."""
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def embed_without_grad(
    encode: EncodeFn, mini_batches: Sequence[dict], device: torch.device
) -> tuple[torch.Tensor, list[RandState]]:
    """Pass 1: (N, D) embeddings of all mini-batches, and the RNG state before each."""
    states, embeddings = [], []
    with torch.no_grad():
        for inputs in mini_batches:
            states.append(RandState.capture(device))
            embeddings.append(encode(inputs))  # (n_i, D)
    return cat_padded(embeddings), states  # (N, D), or (N, L, D) token vectors zero-padded to the longest


def cache_embedding_gradients(
    loss_fn: Callable[..., LossOutput], *embeddings: torch.Tensor, scale: float = 1.0
) -> tuple[LossOutput, list[torch.Tensor]]:
    """Pass 2: the loss over all embeddings and d(scale * loss)/d(embedding) for each input.

    ``embeddings`` are detached (N_k, D) tensors; ``loss_fn(*embeddings)`` returns a ``LossOutput``.
    ``scale`` multiplies the loss before differentiation (e.g. 1 / gradient accumulation steps).
    """
    leaves = [e.detach().requires_grad_(True) for e in embeddings]
    output = loss_fn(*leaves)
    gradients = torch.autograd.grad(output.loss * scale, leaves)
    return LossOutput(output.loss.detach(), output.accuracy.detach(), output.parts), list(gradients)


def replay(
    encode: EncodeFn,
    mini_batches: Sequence[dict],
    states: Sequence[RandState],
    gradients: torch.Tensor,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    sync_context: Callable[[bool], contextlib.AbstractContextManager] | None = None,
) -> None:
    """Pass 3: re-encode each mini-batch with autograd and back-propagate its cached gradient.

    Args:
        gradients: (N, D) cached gradients (or (N, L, D) for token vectors), rows in mini-batch order.
        backward: back-propagates a scalar (``accelerator.backward`` applies the fp16 loss scale).
        sync_context: ``sync_context(is_last)`` wraps each mini-batch's forward and backward; a DDP
            caller passes ``no_sync`` for all but the last so gradients are reduced once.
    """
    start = 0
    for index, (inputs, state) in enumerate(zip(mini_batches, states)):
        is_last = index == len(mini_batches) - 1
        context = sync_context(is_last) if sync_context is not None else contextlib.nullcontext()
        with context:
            with state.restored():
                embeddings = encode(inputs)  # (n_i, D)
            cached = gradients[start : start + embeddings.size(0)]  # (n_i, D)
            if cached.dim() == 3:  # token vectors: this mini-batch's own length of the padded cache
                cached = cached[:, : embeddings.size(1)]  # (n_i, L_i, D)
            start += embeddings.size(0)
            # d(surrogate)/d(params) = sum_k cached_k * d(embedding_k)/d(params): this mini-batch's
            # share of the full-batch gradient. Embeddings come out of the encoder in float32 (or
            # float64) even under mixed precision, so the product runs at full precision.
            surrogate = torch.dot(embeddings.flatten(), cached.flatten())
            backward(surrogate)
    if start != gradients.size(0):
        raise ValueError(f"replayed {start} embeddings but {gradients.size(0)} gradients were cached")


def grad_cache_step(
    encode: Callable[[dict, str], torch.Tensor],
    query_batches: Sequence[dict],
    passage_batches: Sequence[dict],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], LossOutput],
    device: torch.device,
    scale: float = 1.0,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    sync_context: Callable[[bool], contextlib.AbstractContextManager] | None = None,
) -> LossOutput:
    """One GradCache forward/backward over a contrastive batch; leaves the gradients in ``.grad``.

    Args:
        encode: ``encode(inputs, side)`` -> (n, D) embeddings, ``side`` in {"query", "passage"}.
        query_batches, passage_batches: padded mini-batches, in the order of the loss's rows.
        loss_fn: ``loss_fn(queries (B, D), passages (P, D))`` -> ``LossOutput``.
        scale: multiplies the loss before differentiation (1 / gradient accumulation steps).
        backward, sync_context: see :func:`replay`.

    Returns:
        The (unscaled, detached) loss and in-batch accuracy.
    """
    encoders = {side: (lambda inputs, side=side: encode(inputs, side)) for side in ("query", "passage")}
    queries, query_states = embed_without_grad(encoders["query"], query_batches, device)  # (B, D)
    passages, passage_states = embed_without_grad(encoders["passage"], passage_batches, device)  # (P, D)
    output, (query_grads, passage_grads) = cache_embedding_gradients(loss_fn, queries, passages, scale=scale)
    del queries, passages
    # Queries first, passages last: with DDP only the very last replay synchronises gradients.
    replay(encoders["query"], query_batches, query_states, query_grads, backward,
           (lambda is_last: sync_context(False)) if sync_context else None)
    replay(encoders["passage"], passage_batches, passage_states, passage_grads, backward, sync_context)
    return output
