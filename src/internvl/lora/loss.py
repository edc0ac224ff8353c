"""transformers' causal-LM loss of a linear head, computed in chunks of tokens so the [tokens, vocab] logits never
exist in full.

`linear_cross_entropy(hidden, head_weight, labels)` equals `ForCausalLMLoss(hidden @ head_weight.T, labels)`
(shift labels left, ignore -100, mean, or sum / `num_items_in_batch` under gradient accumulation), with the
gradient of `hidden` only (the head is frozen).

The gradient is computed chunk by chunk in forward, while each chunk's logits exist, and kept as the summed
loss's gradient, `(softmax - onehot) @ head`, which lies within the head's own range: the divisor, and the
incoming gradient (which carries a GradScaler's scale, 65536 to start with under float16), multiply it in
backward in float32. Neither a 1/divisor underflow nor a scale beyond float16's 65504 ever meets a float16
tensor, so float16 trains as PEFT's float32 loss does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from internvl.lora.elementwise import compiled, scaled

IGNORE_INDEX = -100


def _cross_entropy_chunk(logit_parts, targets, weights):
    """Weighted summed cross-entropy of logits given as column blocks, and its gradient (softmax - onehot, times
    each row's weight) for each block.

    The blocks stay in the GEMM's dtype; the arithmetic runs in float32 on the fly (one fused kernel on CUDA),
    so no float32 copy of the [rows, vocab] logits is ever made.
    """
    parts = [part.float() for part in logit_parts]
    row_max = torch.stack([part.amax(-1) for part in parts]).amax(0)  # [n]
    sum_exp = sum(torch.exp(part - row_max[:, None]).sum(-1) for part in parts)
    lse = row_max + torch.log(sum_exp)
    target_logit, grads, start = torch.zeros_like(lse), [], 0
    for part in parts:
        columns = torch.arange(start, start + part.shape[1], device=part.device)
        is_target = columns[None, :] == targets[:, None]  # [n, width]
        target_logit = target_logit + torch.where(is_target, part, 0.0).sum(-1)
        grads.append(((torch.exp(part - lse[:, None]) - is_target.float()) * weights[:, None])
                     .to(logit_parts[0].dtype))
        start += part.shape[1]
    return ((lse - target_logit) * weights).sum(), grads


class LinearCrossEntropy(torch.autograd.Function):
    """Next-token cross-entropy of `hidden @ weight.T` without the full logits; gradient for hidden only.

    Arguments: hidden [N, H] and targets [N] (already shifted; IGNORE_INDEX skipped), the frozen head weight
    [V, H], each target's loss weight [N] (float32), the divisor of the summed loss, and the rows per chunk. Saves
    the summed loss's gradient of hidden ([N, H], hidden's dtype), so backward is one multiply.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, target_weights, divisor, chunk_rows):
        rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        # A vocabulary that is no multiple of 8 (92553, 151674) gives the logits a row stride on which cuBLAS
        # falls back to slow unaligned kernels; the head's first `aligned` rows keep every product aligned.
        aligned = weight.shape[0] - weight.shape[0] % 8
        blocks = [weight[:aligned], weight[aligned:]] if aligned < weight.shape[0] else [weight]
        chunk_loss = compiled(_cross_entropy_chunk, hidden)
        for start in range(0, rows.numel(), chunk_rows):
            index = rows[start : start + chunk_rows]
            h = hidden[index]
            chunk_sum, logit_grads = chunk_loss([h @ block.t() for block in blocks], targets[index],
                                                target_weights[index])
            loss += chunk_sum
            if grad is not None:
                grad_rows = logit_grads[0] @ blocks[0]
                for logit_grad, block in zip(logit_grads[1:], blocks[1:]):
                    grad_rows.addmm_(logit_grad, block)
                grad[index] = grad_rows
        ctx.save_for_backward(grad)
        ctx.divisor = divisor
        return loss / divisor

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return compiled(scaled, grad)(grad, dloss.float() / ctx.divisor), None, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, num_items_in_batch=None, loss_weight=None, chunk_elements=2**24):
    """transformers' causal-LM loss (shift labels left, ignore -100, mean or sum / `num_items_in_batch`) of
    `hidden @ weight.T`, computed `chunk_elements` logits at a time.

    With `loss_weight` (per label, as `labels`) it is the weighted loss sum(w * ce) / sum(w) of the official
    `loss_reduction`, the divisor being `num_items_in_batch` when given (the Trainer's sum of w over the step).
    """
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)  # [N]
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if loss_weight is None:
        target_weights = (targets != IGNORE_INDEX).float()
    else:
        target_weights = F.pad(loss_weight.float(), (0, 1))[..., 1:].reshape(-1)
    if num_items_in_batch is None:
        divisor = target_weights.sum().item() or 1.0
    else:
        divisor = num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    chunk_rows = max(1, chunk_elements // weight.shape[0])
    return LinearCrossEntropy.apply(hidden2, weight, targets, target_weights, float(divisor), chunk_rows)
