"""The asymmetric loss (Ridnik et al., ICCV 2021) on P(present), with the paper's learned global score bias.

Scenes hold a few of many objects, so absent (negative) entries dominate. ASL down-weights easy negatives
harder than positives (gamma_neg > gamma_pos) and ignores negatives whose probability is below ``clip``
(probability shifting). Written on probabilities, as the official code calls it (``use_sigmoid=False``) on
the heads' softmax(pos, neg) output. With q = clamp(p + shift, 0, 1) and q_neg = min(1 - q + clip, 1):

    loss = -mean_b sum_k [ y (1 - q)^gamma_pos log q + (1 - y) (1 - q_neg)^gamma_neg log q_neg ]

where the focusing weights (1 - q)^gamma are constants of the gradient (the official
``disable_torch_grad_focal_loss=True``). An entry is predicted present when clamp(p + shift, 0, 1) > 0.5,
i.e. when p > 0.5 - shift (the official code adds the bias to the score rather than to the threshold).

Bias modes (``bias_mode``), b the learned scalar:
- ``"tanh"`` (default): shift = tanh(b) in the loss *and* at prediction, so the decision uses the very shift
  the loss trained; tanh keeps it within (-1, 1).
- ``"paper"``: shift = tanh(b) in the loss but the raw b at prediction, as the official ``robotics.py`` does
  (the two differ once |b| is not small: b = -0.5 trains a -0.46 shift but predicts with -0.5).

The clamp of p + shift: in ``"paper"`` mode a plain clamp, whose gradient is zero wherever it is active, so a
negative pushed to q = 1 stops pulling the shift down while positives below 1 still push it up. ``"tanh"``
mode keeps the clamped values but passes the gradient of the unclamped sum (straight-through), so such a
negative still pulls the shift down; values, and so the loss, are the same. Neither helps once tanh(b) itself
saturates (|b| > ~9 in float32): the bias's gradient sums over every (scene, name) entry, so at a learning rate
meant for weights (the clutter demo's SGD 0.05) one step can throw it there, after which every object is
"present" (b = 16.9) or "absent" (b = -20.1) for good; the paper trains at lr 1e-3.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

BiasMode = Literal["tanh", "paper"]
THRESHOLD = 0.5


class AsymmetricLoss(nn.Module):
    """ASL with gamma_neg=2, gamma_pos=1, clip=0.05 (the paper's) and a learned global score bias ``bias``."""

    def __init__(self, gamma_neg: float = 2.0, gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-8,
                 bias_mode: BiasMode = "tanh") -> None:
        super().__init__()
        if bias_mode not in ("tanh", "paper"):
            raise ValueError(f"bias_mode must be 'tanh' or 'paper', got {bias_mode!r}")
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.bias_mode = bias_mode
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of P(present) [B, K] against {0, 1} targets [B, K]."""
        y = target.to(prob.dtype)
        shifted = prob + torch.tanh(self.bias)
        q = shifted.clamp(0.0, 1.0)
        if self.bias_mode == "tanh":  # straight-through: clamped values, the gradient of the unclamped shift
            q = shifted + (q - shifted).detach()
        q_neg = (1.0 - q + self.clip).clamp(max=1.0)
        log_likelihood = y * q.clamp(min=self.eps).log() + (1 - y) * q_neg.clamp(min=self.eps).log()
        with torch.no_grad():
            p_true = y * q + (1 - y) * q_neg
            focus = (1.0 - p_true).pow(y * self.gamma_pos + (1 - y) * self.gamma_neg)
        return -(log_likelihood * focus).sum(dim=-1).mean()

    def decision_shift(self) -> torch.Tensor:
        """The shift added to P(present) before thresholding (see the module docstring's bias modes)."""
        return torch.tanh(self.bias) if self.bias_mode == "tanh" else self.bias

    def decision_scores(self, prob: torch.Tensor) -> torch.Tensor:
        """clamp(p + shift, 0, 1): what is compared with 0.5. Rank-equivalent to p except for clamped ties, so
        average precision is best computed on ``prob`` itself."""
        return (prob + self.decision_shift()).clamp(0.0, 1.0)

    def predict(self, prob: torch.Tensor) -> torch.Tensor:
        """Boolean [B, K]: present where the shifted score exceeds 0.5."""
        return self.decision_scores(prob) > THRESHOLD
