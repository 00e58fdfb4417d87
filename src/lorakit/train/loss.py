"""Cross-entropy over the output head without ever holding the full logits.

The head (576 x 49,152 for the default model) is frozen, so the gradient with respect to the hidden
states can be computed in the forward pass, chunk by chunk, and backward has no matmul left to redo.
One set of chunk buffers (logits, fp32 log-probabilities, gradient: 200 MB at 512 positions) serves
every chunk, so the head costs little more than its two matmuls. Only positions with a label take
part, so prompt tokens cost nothing."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.data.tokenize import IGNORE_INDEX

LOSS_CHUNK = 512  # positions per chunk of the head loss


class _ChunkBuffers:
    """Scratch tensors for one chunk's logits, reused chunk after chunk: fresh 50-100 MB tensors would
    each be new pages to fault in, and on this kind of VM that costs as much as the arithmetic."""

    def __init__(self, chunk: int, vocab: int, like: torch.Tensor) -> None:
        self.logits = like.new_empty(chunk, vocab)
        self.fp32 = like.new_empty(chunk, vocab, dtype=torch.float32) if like.dtype != torch.float32 else None
        self.probs = like.new_empty(chunk, vocab)

    def log_likelihood(self, h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Summed fp32 loss of one chunk's targets; leaves its logits (fp32: their log-probabilities) in self.logits[:n]."""
        n = h.shape[0]
        logits = torch.mm(h, weight.T, out=self.logits[:n])
        # fp32 logits are overwritten by their log-probabilities: softmax is shift-invariant, so
        # logit_gradient's softmax of them is the same
        log_probs = logits if self.fp32 is None else self.fp32[:n].copy_(logits)
        torch.ops.aten._log_softmax.out(log_probs, -1, False, out=log_probs)  # in place, row by row
        return -log_probs.gather(1, t[:, None]).sum()

    def logit_gradient(self, n: int, t: torch.Tensor) -> torch.Tensor:
        """softmax - one_hot(t) of the last chunk, in the logits' dtype: d loss / d logits."""
        probs = torch.ops.aten._softmax.out(self.logits[:n], -1, False, out=self.probs[:n])
        probs[torch.arange(n), t] -= 1.0
        return probs


def _head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
               grad_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Summed loss over the rows of `hidden`; with `grad_hidden`, also d loss / d hidden written into it."""
    buffers = _ChunkBuffers(min(chunk, hidden.shape[0]), weight.shape[0], hidden)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        t = targets[start : start + chunk]  # (n,)
        total += buffers.log_likelihood(hidden[start : start + chunk], weight, t)
        if grad_hidden is not None:
            torch.mm(buffers.logit_gradient(t.shape[0], t), weight, out=grad_hidden[start : start + chunk])
    return total


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        total = _head_loss(hidden, weight, targets, chunk, grad_hidden)
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


def causal_lm_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, int]:
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
            return _head_loss(selected, weight, targets, chunk), count
        return _FrozenHeadCrossEntropy.apply(selected, weight, targets, chunk), count
    total = sum(
        torch.utils.checkpoint.checkpoint(_chunk_loss, head, selected[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
        for s in range(0, selected.shape[0], chunk)
    )
    return total, count


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
