"""The healing losses (pure math): next-token cross-entropy, logit distillation, or a mix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import HealConfig

__all__ = ["heal_loss", "kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, times T^2, mean over positions.

    Args:
        student_logits, teacher_logits: [..., vocab].
        temperature: T > 0.
    Returns:
        A scalar.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # [...]
    return kl.mean() * temperature ** 2


def heal_loss(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logits: torch.Tensor | None,
              config: HealConfig) -> torch.Tensor:
    """The training loss of one batch.

    Args:
        student_logits: [batch, seq, vocab].
        ids: [batch, seq] the input ids (next-token targets are ids[:, 1:]).
        teacher_logits: [batch, seq, vocab], or None for `ce`.
        config: its `loss`, `alpha` and `temperature` decide.
    Returns:
        A scalar: CE, T^2 * KL, or alpha * KD + (1 - alpha) * CE.
    """
    def ce() -> torch.Tensor:
        pred = student_logits[:, :-1].float()  # [batch, seq - 1, vocab] predicts ids[:, 1:]
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].reshape(-1))

    if config.loss == "ce":
        return ce()
    kd = kd_loss(student_logits, teacher_logits, config.temperature)
    if config.loss == "kd":
        return kd
    return config.alpha * kd + (1 - config.alpha) * ce()
