"""Closed-form DP-SGD for fedpriv's split head, without per-sample gradients: the one copy in bench.

A bench-side prototype, not used by fedpriv (fedpriv's regions train through Opacus in
``client/trainer.py``). ``bench/dp_cost.py`` times it against Opacus; ``bench/utility.py``'s
hyper-parameter sweep uses it as its fast in-process round. ``tests/test_per_sample_gradients.py``
checks that one noiseless step with active clipping equals Opacus' step.

The head (``ClassifierTop`` with no encoder layer) is ``classifier(dropout(tanh(dense(a))))`` on one
pooled vector ``a`` per post, so each post's gradient of a Linear layer is the rank-1 ``g_i a_i^T``
(``g_i`` = gradient at the layer's output) and its squared norm is ``|g_i|^2 (|a_i|^2 + 1)`` with the
bias. One forward and one backward to the layer outputs give every per-post norm; the clipped sum is
then one matmul per layer: ``(c * g)^T a``. Then Gaussian noise ``N(0, sigma^2 C^2)`` per coordinate
and division by the expected batch size -- exactly Opacus' ``DPOptimizer`` step (same clipping, same
noise, same accounting), which is what ghost clipping computes with a second backward pass and hooks.
"""

from __future__ import annotations


def head_params(top) -> list:
    """The split head's trainable parameters, in the order the gradients below come in."""
    return [top.dense.weight, top.dense.bias, top.classifier.weight, top.classifier.bias]


def clipped_noisy_head_grads(top, pooled, labels, clip: float, sigma: float, generator=None):
    """Sum over the posts of each post's gradient clipped to norm ``clip``, plus ``N(0, (sigma·clip)²)`` noise.

    ``pooled``: one vector per post (batch, hidden). Returns ``(grads, summed loss)`` with ``grads`` in
    :func:`head_params` order, not yet divided by the expected batch size. An empty batch (Poisson
    sampling can draw one) gives noise only.
    """
    import torch
    import torch.nn.functional as F

    params = head_params(top)
    loss = 0.0
    if len(labels):
        z1 = F.linear(pooled, top.dense.weight, top.dense.bias)
        a2 = top.dropout(torch.tanh(z1))
        z2 = F.linear(a2, top.classifier.weight, top.classifier.bias)
        summed = F.cross_entropy(z2, labels, reduction="sum")
        g1, g2 = torch.autograd.grad(summed, [z1, z2])
        loss = float(summed.detach())
        with torch.no_grad():
            a2 = a2.detach()
            norms = (g1.square().sum(1) * (pooled.square().sum(1) + 1) + g2.square().sum(1) * (a2.square().sum(1) + 1)).sqrt()
            c = (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]
            g1, g2 = g1 * c, g2 * c
            grads = [g1.T @ pooled, g1.sum(0), g2.T @ a2, g2.sum(0)]
    else:
        grads = [torch.zeros_like(p) for p in params]
    if sigma > 0:
        with torch.no_grad():
            grads = [g + torch.normal(0.0, sigma * clip, size=g.shape, generator=generator) for g in grads]
    return grads, loss


def dp_head_step(top, optimizer, pooled, labels, clip: float, sigma: float, expected_batch: int,
                 generator=None) -> float:
    """One DP-SGD step of ``optimizer`` (over :func:`head_params`); returns the mean loss of the batch."""
    import torch

    grads, loss = clipped_noisy_head_grads(top, pooled, labels, clip, sigma, generator)
    with torch.no_grad():
        for p, g in zip(head_params(top), grads):
            p.grad = g / expected_batch
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss / max(1, len(labels))


class ClosedFormDPHead:
    """:func:`dp_head_step` with its own SGD optimizer, for a fixed (expected) batch size."""

    def __init__(self, top, lr: float, momentum: float, sigma: float, clip: float, expected_batch: int):
        import torch

        self.top, self.sigma, self.clip, self.expected_batch = top, sigma, clip, expected_batch
        self.optimizer = torch.optim.SGD(head_params(top), lr=lr, momentum=momentum)

    def loss_and_step(self, hidden, labels) -> float:
        """``hidden``: (batch, 1, hidden) as ``collate_features`` gives the head its pooled vectors."""
        return dp_head_step(self.top, self.optimizer, hidden[:, 0], labels, self.clip, self.sigma, self.expected_batch)
