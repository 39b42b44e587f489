"""Distillation losses: pure functions of tensors (no Ray, no I/O).

Shapes: B batch, T positions, V student vocabulary, K teacher top-k width. Positions are already
aligned: `logits[b, t]` predicts `labels[b, t]` (the caller shifts by one). A position counts when
`labels != IGNORE` (prompt tokens and padding are IGNORE).

Logit-level KD against a *stored top-k* teacher: the teacher is known only on its K best tokens
per position. Both distributions are compared on the K+1-way partition {the K teacher tokens,
everything else}: the teacher's tail mass is 1 - sum(exp(topk_logprobs)) (what the stored top-k
leaves over), the student's is 1 - sum of its probabilities on the same K tokens. This keeps
every divergence finite (reverse KL and JSD included), charges the student explicitly for mass
it puts outside the teacher's support, and is a lower bound of the full-vocabulary divergence
(coarsening a distribution can only shrink a divergence). Temperature tau tempers both
partitioned distributions (p^(1/tau), renormalised) and the loss is scaled by tau^2 so gradient
magnitudes do not depend on tau (Hinton et al.).

Across tokenizers (`distill.token_alignment`), a top-k id can be UNMAPPED (-1): no student token
spells that teacher token. Its probability counts in both tails. A position whose ids are all
UNMAPPED has no vocabulary in common with the student there, and is compared tokenizer-free
instead: the L1 distance between the sorted probability vectors (the teacher's K and tail, the
student's K largest and tail; ULD, Boizard et al. 2024), untempered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
UNMAPPED = -1  # a teacher id with no student counterpart (distill.token_alignment)
_EPS = 1e-6  # representable next to 1.0 in fp32
_LOG_ZERO = -1e4  # log of a probability that is 0, finite so no 0 * inf makes a NaN


def response_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label cross-entropy over response tokens only (sequence-level KD).

    logits [B, T, V], labels [B, T] with IGNORE where masked -> scalar mean over counted tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE)


def _partition_logprobs(student_logits: torch.Tensor, topk_ids: torch.Tensor,
                        topk_logprobs: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of teacher and student on the K+1 partition, tempered: each [B, T, K+1]."""
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    mapped = topk_ids != UNMAPPED
    s_top = s_logp.gather(-1, topk_ids.long().clamp(min=0))  # [B, T, K]
    s_top = torch.where(mapped, s_top, torch.full_like(s_top, _LOG_ZERO))
    s_tail = torch.log1p(-s_top.exp().sum(-1).clamp(max=1 - _EPS)).unsqueeze(-1)
    t_top = topk_logprobs.float().clamp(min=_LOG_ZERO)  # -inf (a top-k padded by the teacher) -> probability 0, no NaN
    t_top = torch.where(mapped, t_top, torch.full_like(t_top, _LOG_ZERO))
    t_tail = torch.log1p(-t_top.exp().sum(-1).clamp(max=1 - _EPS)).unsqueeze(-1)
    student = torch.cat([s_top, s_tail], -1)
    teacher = torch.cat([t_top, t_tail], -1)
    if tau != 1.0:
        student = F.log_softmax(student / tau, dim=-1)
        teacher = F.log_softmax(teacher / tau, dim=-1)
    return teacher, student


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last dim, from log-probabilities; [...]."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def generalised_jsd(p_log: torch.Tensor, q_log: torch.Tensor, beta: float) -> torch.Tensor:
    """beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q; at the ends, as in TRL's
    generalized_jsd_loss, the KLs themselves: beta=0 -> KL(p||q), beta=1 -> KL(q||p)."""
    if beta == 0.0:
        return kl(p_log, q_log)
    if beta == 1.0:
        return kl(q_log, p_log)
    m_log = torch.logsumexp(torch.stack([p_log + torch.log(torch.tensor(beta)),
                                         q_log + torch.log(torch.tensor(1 - beta))]), dim=0)
    return beta * kl(p_log, m_log) + (1 - beta) * kl(q_log, m_log)


def sorted_probability_distance(student_logits: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """ULD at every position, [B, T]: sum |p_teacher(i-th likeliest) - p_student(i-th likeliest)|
    over the K likeliest of each, plus the difference of what is left over. Needs no shared
    vocabulary; zero when the two sorted distributions agree; at most 2."""
    k = topk_logprobs.size(-1)
    teacher = topk_logprobs.float().clamp(min=_LOG_ZERO).exp().sort(-1, descending=True).values
    student = F.softmax(student_logits.float(), dim=-1).topk(k, dim=-1).values
    tails = (1 - teacher.sum(-1)).clamp(min=0) - (1 - student.sum(-1)).clamp(min=0)
    return (teacher - student).abs().sum(-1) + tails.abs()


def topk_kd(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
            mask: torch.Tensor, divergence: str = "forward_kl", beta: float = 0.5,
            temperature: float = 1.0) -> torch.Tensor:
    """Logit-level KD against stored teacher top-k: scalar mean over masked-in positions.

    student_logits [B, T, V]; topk_ids [B, T, K] (int); topk_logprobs [B, T, K] (teacher
    log-probabilities at temperature 1); mask [B, T] (bool: positions that count).
    divergence: forward_kl = KL(teacher || student) (mode-covering), reverse_kl =
    KL(student || teacher) (mode-seeking), jsd = generalised JSD with `beta`."""
    teacher, student = _partition_logprobs(student_logits, topk_ids, topk_logprobs, temperature)
    if divergence == "forward_kl":
        per_pos = kl(teacher, student)
    elif divergence == "reverse_kl":
        per_pos = kl(student, teacher)
    elif divergence == "jsd":
        per_pos = generalised_jsd(teacher, student, beta)
    else:
        raise ValueError(f"unknown divergence {divergence!r}: forward_kl, reverse_kl or jsd")
    unmatched = (topk_ids == UNMAPPED).all(-1) & mask
    if unmatched.any():  # scaled back below: the sorted distance is untempered
        uld = sorted_probability_distance(student_logits, topk_logprobs) / temperature**2
        per_pos = torch.where(unmatched, uld, per_pos)
    per_pos = torch.where(mask, per_pos, torch.zeros_like(per_pos))  # masked: no NaN/inf leaks in
    return per_pos.sum() / mask.float().sum().clamp(min=1) * temperature**2


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, topk_ids: torch.Tensor | None,
                 topk_logprobs: torch.Tensor | None, kd_weight: float,
                 kd_mask: torch.Tensor | None = None, **kd) -> tuple[torch.Tensor, dict]:
    """(1 - kd_weight) * hard CE + kd_weight * top-k KD; without top-k, the hard CE alone.
    `kd_mask` [B, T] defaults to the response positions. Returns the loss and its parts
    (detached floats) for logging."""
    ce = response_ce(student_logits, labels)
    if topk_ids is None or kd_weight == 0.0:
        return ce, {"ce": ce.item()}
    mask = labels != IGNORE if kd_mask is None else kd_mask
    kd_loss = topk_kd(student_logits, topk_ids, topk_logprobs, mask, **kd)
    loss = (1 - kd_weight) * ce + kd_weight * kd_loss
    return loss, {"ce": ce.item(), "kd": kd_loss.item()}


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Relative squared error between paired hidden states, averaged over counted tokens, then pairs.

    student[i], teacher[i] [B, L, H] (the same H); mask [B, L] bool: the tokens that count. Each
    token's error is divided by the squared norm of the teacher's state there, so that a layer
    whose residual stream is larger, or a token with outsized states (the first one often has),
    does not outweigh the rest; 1 is the error of a student state of zero."""
    errors = []
    for s, t in zip(student, teacher, strict=True):
        s, t = s[mask].float(), t[mask].float()
        errors.append(((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(_EPS)).mean())
    return torch.stack(errors).mean()
