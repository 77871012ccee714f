"""Slot scores for sparse memory finetuning: which touched memory rows a batch may update.

Everything here works on the sparse view of one layer's batch counts, `touched` (sorted unique slot ids,
K of them) and `counts` (accesses per touched slot), so a step costs O(K log K), never O(n_slots). The
background `df` vector is only ever indexed at `touched`; its one dense reduction (the KL normaliser) is
computed once, when the `SlotBackground` is built.
"""

from __future__ import annotations

import torch

RANKINGS = ("tfidf", "tf", "kl", "all")
# How many rows a batch may update: a fixed t, or an input-dependent count capped at t (`adaptive_keep`).
TOP_T_RULES = ("fixed", "mass", "poisson")
# Goyal et al. 2026, sec. 3.5: the eps inside the KL log. It keeps log finite for p -> 0; it is far below
# any p_batch (>= 1/C) or p_bg (>= 1/(df.sum() + n_slots)) a real run produces, so it never reorders slots.
KL_EPS = 1e-10


class SlotBackground:
    """One layer's background statistics: df[i] = background batches touching slot i, over N batches.

    `df_sum` (= df.sum()) may be given when already known; otherwise it is computed here, once, so the KL
    background normaliser sum_j (df_j + 1) = df_sum + n_slots never costs O(n_slots) per step.
    """

    def __init__(self, df: torch.Tensor, n_batches: int, df_sum: int | None = None) -> None:
        if df.dim() != 1:
            raise ValueError(f"background df: expected a 1-D tensor, got shape {tuple(df.shape)}")
        if n_batches < 0:
            raise ValueError(f"background n_batches: must be >= 0, got {n_batches}")
        self.df = df
        self.n_batches = int(n_batches)
        self.n_slots = df.numel()
        self.df_sum = int(df.sum().item()) if df_sum is None else int(df_sum)

    @property
    def bg_norm(self) -> int:
        """sum_j (df_j + 1) over all n_slots slots (Goyal et al. 2026, sec. 3.5, p_bg denominator)."""
        return self.df_sum + self.n_slots


def _check_ranking(ranking: str, background: SlotBackground | None) -> None:
    if ranking not in RANKINGS:
        raise ValueError(f"finetune.ranking: unknown ranking {ranking!r}, expected one of {RANKINGS}")
    if background is None and ranking in ("tfidf", "kl"):
        raise ValueError(f"finetune.ranking={ranking!r} needs background counts (df, N), but none were given")


def _check_sparse(touched: torch.Tensor, counts: torch.Tensor) -> None:
    if touched.dim() != 1 or counts.shape != touched.shape:
        raise ValueError(
            f"slot scores: touched and counts must be 1-D of equal length, got {tuple(touched.shape)} "
            f"and {tuple(counts.shape)}"
        )


def slot_scores(
    touched: torch.Tensor, counts: torch.Tensor, ranking: str, background: SlotBackground | None = None
) -> torch.Tensor:
    """Float64 score per touched slot (same order as `touched`); higher means "update this row first".

    tf    = c / C,  C = sum(c)                                     (Lin et al. 2025; Goyal et al. 2026 3.5)
    tfidf = tf * log((N + 1) / (df + 1))                           (same)
    kl    = p_b * log((p_b + eps) / (p_bg + eps)),  p_b = c / C,
            p_bg = (df + 1) / sum_j (df_j + 1)                      (Goyal et al. 2026, sec. 3.5)
    all   = c  (only a score for logs: `select_slots` keeps every touched slot under 'all', no cut)
    Float64 so that equal inputs give bit-equal scores and the tie rule below is exact.
    """
    _check_ranking(ranking, background)
    _check_sparse(touched, counts)
    c = counts.to(torch.float64)
    if ranking == "all":
        return c
    total = c.sum()
    tf = c / total
    if ranking == "tf":
        return tf
    assert background is not None
    if touched.numel() and int(touched.max().item()) >= background.n_slots:
        raise ValueError(
            f"slot scores: slot id {int(touched.max().item())} outside the background's "
            f"{background.n_slots} slots"
        )
    df = background.df.index_select(0, touched.to(background.df.device)).to(c.device, torch.float64)
    if ranking == "tfidf":
        return tf * torch.log((background.n_batches + 1) / (df + 1))
    p_bg = (df + 1) / background.bg_norm
    return tf * torch.log((tf + KL_EPS) / (p_bg + KL_EPS))


def select_slots(
    touched: torch.Tensor,
    counts: torch.Tensor,
    ranking: str,
    top_t: int,
    background: SlotBackground | None = None,
    *,
    rule: str = "fixed",
    mass: float = 0.5,
    alpha: float = 0.01,
) -> torch.Tensor:
    """The top touched slots by `ranking`, returned as sorted ascending slot ids: top_t of them (rule
    'fixed'), or as many as the adaptive `rule` allows, never more than top_t (see `adaptive_keep`).
    Ranking 'all' is the "all indices" ablation of Lin et al. 2025's ranking study: every touched slot with
    c > 0, whatever top_t and rule (the config refuses an adaptive rule with it).

    Only slots with c > 0 are candidates. Ties are broken deterministically so every rank picks the same
    rows: higher score first, then lower slot id (a stable sort by id, then a stable descending sort by
    score). Ranking 'all' aside, top_t = 0 selects nothing; with rule 'fixed', top_t >= K selects every
    touched slot.
    """
    _check_ranking(ranking, background)
    _check_sparse(touched, counts)
    _check_rule(rule, background)
    if top_t < 0:
        raise ValueError(f"finetune.top_t: must be >= 0, got {top_t}")
    keep = counts > 0
    touched, counts = touched[keep], counts[keep]
    if ranking == "all":
        return torch.sort(touched).values
    if top_t == 0 or touched.numel() == 0:
        return touched.new_empty(0)
    if rule == "fixed" and top_t >= touched.numel():
        return torch.sort(touched).values
    scores = slot_scores(touched, counts, ranking, background)
    by_id = torch.sort(touched, stable=True).indices
    by_score = by_id[torch.sort(scores[by_id], descending=True, stable=True).indices]
    if rule != "fixed":
        by_score = adaptive_keep(touched, counts, scores, by_score, background, rule, mass, alpha)
    return torch.sort(touched[by_score[:top_t]]).values


def _check_rule(rule: str, background: SlotBackground | None) -> None:
    if rule not in TOP_T_RULES:
        raise ValueError(f"finetune.top_t_rule: unknown rule {rule!r}, expected one of {TOP_T_RULES}")
    if rule == "poisson" and background is None:
        raise ValueError("finetune.top_t_rule='poisson' needs background counts (df, N), but none were given")


def adaptive_keep(
    touched: torch.Tensor,
    counts: torch.Tensor,
    scores: torch.Tensor,
    by_score: torch.Tensor,
    background: SlotBackground | None,
    rule: str,
    mass: float,
    alpha: float,
) -> torch.Tensor:
    """Which of the scored slots (`by_score`: positions into `touched`, best first) a batch may update, in
    the same order (the caller keeps at most top_t of them). The adaptive-t rules (Lin et al. 2025 fix t
    and leave an input-dependent t open):

    mass:    the smallest prefix holding a share `mass` of the batch's positive score mass. A batch whose
             reads concentrate on a few slots (one fact) updates few rows; a diffuse batch updates more.
    poisson: the slots whose batch count is improbably high under the background: slot i's background
             rate of reads per batch is lambda_i = -log(1 - p_i), p_i = (df_i + 1) / (N + 2) (the chance a
             background batch reads it, Laplace-smoothed, read as a Poisson process); a slot counts when
             P(X >= c_i | lambda_i) < alpha / K, Bonferroni over the K touched slots. Reads of one token
             repeat across heads, so counts are over-dispersed against Poisson: the test is liberal, and
             the top_t cap still applies.
    """
    if rule == "mass":
        ordered = scores[by_score].clamp(min=0)
        total = float(ordered.sum())
        if total <= 0:
            return by_score[:0]
        cumulative = torch.cumsum(ordered, 0)
        n = int(torch.searchsorted(cumulative, torch.tensor(mass * total, dtype=cumulative.dtype))) + 1
        return by_score[:n]
    assert background is not None
    df = background.df.index_select(0, touched.to(background.df.device)).to(torch.float64)
    p_read = (df + 1) / (background.n_batches + 2)
    rate = -torch.log1p(-p_read)
    # P(X >= c) for X ~ Poisson(rate) is the regularized lower incomplete gamma P(c, rate)
    p_value = torch.special.gammainc(counts.to(torch.float64).cpu(), rate.cpu())
    significant = (p_value < alpha / touched.numel()).to(by_score.device)
    return by_score[significant[by_score]]
