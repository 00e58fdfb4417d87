"""Cross-entropy over the output head without ever holding the full logits.

The head (576 x 49,152 for the default model) is frozen, so the gradient with respect to the hidden
states can be computed in the forward pass, chunk by chunk, and backward has no matmul left to redo.
Chunks of 128 positions keep each temporary (25 MB of fp32 log-probabilities) below glibc's mmap
threshold: larger ones are fresh mappings every time, and their page faults cost a third of the head's
time here. Only positions with a label take part, so prompt tokens cost nothing."""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


def _chunk_log_likelihood(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one chunk (n, V) in the compute dtype, and the summed fp32 loss of its targets."""
    logits = h @ weight.T
    log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # one fused pass
    return logits, -log_probs.gather(1, t[:, None]).sum()


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            t = targets[start : start + chunk]  # (n,)
            logits, loss = _chunk_log_likelihood(hidden[start : start + chunk], weight, t)
            total += loss
            probs = torch.softmax(logits, dim=-1)  # the gradient, in the logits' own dtype
            probs[torch.arange(t.shape[0]), t] -= 1.0
            grad_hidden[start : start + chunk] = probs @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def head_weight(head: nn.Module) -> torch.Tensor | None:
    """The weight of a plain, frozen, bias-free linear head; None if the fast path does not apply."""
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        return head.weight
    return None


def causal_lm_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk: int = 128) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over labelled positions, and how many there were.

    hidden: (B, T, C) final hidden states; labels: (B, T) with IGNORE_INDEX where no loss is taken."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    selected = hidden[:, :-1][keep]  # (N, C): only positions that predict a response token
    targets = targets[keep]
    weight = head_weight(head)
    if weight is not None:
        weight = weight.to(selected.dtype)
        if not (torch.is_grad_enabled() and selected.requires_grad):  # evaluation: no gradient to fold in
            return sum(_chunk_log_likelihood(selected[s : s + chunk], weight, targets[s : s + chunk])[1] for s in range(0, selected.shape[0], chunk)), count
        return _FrozenHeadCrossEntropy.apply(selected, weight, targets, chunk), count
    total = sum(
        torch.utils.checkpoint.checkpoint(_chunk_loss, head, selected[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
        for s in range(0, selected.shape[0], chunk)
    )
    return total, count


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
