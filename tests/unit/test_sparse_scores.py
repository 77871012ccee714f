"""Slot scoring and top-t selection (Lin et al. 2025; Goyal et al. 2026 sec. 3.5), checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from titan_mem.sparse.counts import SlotBackground
from titan_mem.sparse.select import KL_EPS, select_slots, slot_scores

# n_slots = 8, N = 9 background batches; batch touches slots 1, 3, 4, 6 with counts 2, 5, 1, 2 (C = 10).
DF = torch.tensor([0, 3, 1, 9, 0, 2, 5, 0])
N = 9
TOUCHED = torch.tensor([1, 3, 4, 6])
COUNTS = torch.tensor([2, 5, 1, 2])


def bg() -> SlotBackground:
    return SlotBackground(DF, N)


def test_tf_by_hand():
    got = slot_scores(TOUCHED, COUNTS, "tf")
    assert got.dtype == torch.float64
    assert got.tolist() == [0.2, 0.5, 0.1, 0.2]


def test_tfidf_by_hand():
    # idf = log((N + 1) / (df + 1)) with df at the touched slots = 3, 9, 0, 5
    want = [0.2 * math.log(10 / 4), 0.5 * math.log(10 / 10), 0.1 * math.log(10 / 1), 0.2 * math.log(10 / 6)]
    got = slot_scores(TOUCHED, COUNTS, "tfidf", bg())
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[1].item() == 0.0  # a slot used by every background batch has no idf
    # order by score: slot 4 (0.230), slot 1 (0.183), slot 6 (0.102), slot 3 (0)
    assert select_slots(TOUCHED, COUNTS, "tfidf", 2, bg()).tolist() == [1, 4]
    assert select_slots(TOUCHED, COUNTS, "tfidf", 3, bg()).tolist() == [1, 4, 6]


def test_kl_by_hand():
    # p_bg denominator: sum_j (df_j + 1) = df.sum() + n_slots = 20 + 8 = 28, over all slots, touched or not
    assert bg().bg_norm == 28
    p_b = [0.2, 0.5, 0.1, 0.2]
    p_bg = [4 / 28, 10 / 28, 1 / 28, 6 / 28]
    want = [p * math.log((p + KL_EPS) / (q + KL_EPS)) for p, q in zip(p_b, p_bg)]
    got = slot_scores(TOUCHED, COUNTS, "kl", bg())
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    # 0.2*log(1.4)=0.067, 0.5*log(1.4)=0.168, 0.1*log(2.8)=0.103, 0.2*log(0.933)=-0.014
    assert select_slots(TOUCHED, COUNTS, "kl", 2, bg()).tolist() == [3, 4]
    assert KL_EPS == 1e-10


def test_all_keeps_every_touched_slot_whatever_top_t():
    """Ranking 'all' is the all-indices ablation: no top_t cut (tf would keep [3] at top_t=1)."""
    assert slot_scores(TOUCHED, COUNTS, "all").tolist() == [2.0, 5.0, 1.0, 2.0]
    for top_t in (0, 1, 2, 10):
        assert select_slots(TOUCHED, COUNTS, "all", top_t).tolist() == [1, 3, 4, 6]
    assert select_slots(TOUCHED, COUNTS, "tf", 1).tolist() == [3]
    # only slots with c > 0, sorted, whatever order they come in and whatever rule
    perm = torch.tensor([2, 0, 3, 1])
    zero_one = torch.tensor([2, 0, 1, 2])
    assert select_slots(TOUCHED[perm], zero_one[perm], "all", 1).tolist() == [1, 4, 6]
    assert select_slots(TOUCHED, COUNTS, "all", 1, rule="mass", mass=0.1).tolist() == [1, 3, 4, 6]
    assert select_slots(TOUCHED[:0], COUNTS[:0], "all", 5).tolist() == []
    with pytest.raises(ValueError, match="finetune.top_t"):
        select_slots(TOUCHED, COUNTS, "all", -1)


def test_exact_ties_prefer_lower_slot_id():
    touched = torch.tensor([2, 5, 7, 9, 11])
    counts = torch.tensor([3, 4, 3, 4, 3])
    assert select_slots(touched, counts, "tf", 1).tolist() == [5]
    assert select_slots(touched, counts, "tf", 2).tolist() == [5, 9]
    assert select_slots(touched, counts, "tf", 3).tolist() == [2, 5, 9]
    assert select_slots(touched, counts, "tf", 4).tolist() == [2, 5, 7, 9]
    # the rule holds whatever order the candidates come in
    perm = torch.tensor([4, 0, 3, 2, 1])
    assert select_slots(touched[perm], counts[perm], "tf", 3).tolist() == [2, 5, 9]
    # tfidf ties: equal counts and equal df
    df = torch.zeros(12, dtype=torch.int64)
    df[[2, 7, 11]] = 4
    got = select_slots(touched, torch.full((5,), 3), "tfidf", 2, SlotBackground(df, 10))
    assert got.tolist() == [5, 9]  # df 0 beats df 4; among the df-0 pair, both fit
    got = select_slots(touched, torch.full((5,), 3), "tfidf", 4, SlotBackground(df, 10))
    assert got.tolist() == [2, 5, 7, 9]


def test_top_t_edges_and_untouched_slots():
    assert select_slots(TOUCHED, COUNTS, "tfidf", 0, bg()).numel() == 0
    assert select_slots(TOUCHED, COUNTS, "tfidf", 4, bg()).tolist() == [1, 3, 4, 6]
    assert select_slots(TOUCHED, COUNTS, "kl", 1000, bg()).tolist() == [1, 3, 4, 6]
    empty = torch.empty(0, dtype=torch.int64)
    assert select_slots(empty, empty, "kl", 5, bg()).numel() == 0
    # a zero count is not a candidate, even with the highest idf
    counts = torch.tensor([2, 5, 0, 2])
    assert 4 not in select_slots(TOUCHED, counts, "tfidf", 4, bg()).tolist()
    assert select_slots(TOUCHED, counts, "tfidf", 1, bg()).tolist() == [1]
    with pytest.raises(ValueError, match="top_t"):
        select_slots(TOUCHED, COUNTS, "tf", -1)


def test_bad_ranking_and_missing_background():
    with pytest.raises(ValueError, match=r"^finetune\.ranking: .*'bm25'"):
        select_slots(TOUCHED, COUNTS, "bm25", 2, bg())
    with pytest.raises(ValueError, match=r"^finetune\.ranking: "):
        slot_scores(TOUCHED, COUNTS, "TFIDF", bg())
    for ranking in ("tfidf", "kl"):
        with pytest.raises(ValueError, match="background"):
            select_slots(TOUCHED, COUNTS, ranking, 2, None)
        with pytest.raises(ValueError, match="background"):
            select_slots(TOUCHED, COUNTS, ranking, 100, None)  # even when every slot would be kept
    with pytest.raises(ValueError, match="outside"):
        slot_scores(torch.tensor([3, 8]), torch.tensor([1, 1]), "tfidf", bg())


def _reference_top(touched: torch.Tensor, scores: torch.Tensor, t: int) -> list[int]:
    order = sorted(zip(touched.tolist(), scores.tolist()), key=lambda p: (-p[1], p[0]))
    return sorted(i for i, _ in order[:t])


@pytest.mark.parametrize("ranking", ["tfidf", "tf", "kl"])
def test_many_slots_match_reference_and_stay_in_touched(ranking):
    g = torch.Generator().manual_seed(0)
    n_slots = 1 << 20
    df = torch.randint(0, 6, (n_slots,), generator=g)
    touched = torch.randperm(n_slots, generator=g)[:5000].sort().values
    counts = torch.randint(1, 9, (5000,), generator=g)  # many exact ties
    background = SlotBackground(df, 5)
    got = select_slots(touched, counts, ranking, 700, background)
    assert got.numel() == 700
    assert bool(torch.isin(got, touched).all())
    assert bool((got[1:] > got[:-1]).all())
    assert got.tolist() == _reference_top(touched, slot_scores(touched, counts, ranking, background), 700)


def test_cost_follows_touched_slots_not_table():
    # A 2**40-slot background as a stride-0 view: any dense per-step op over n_slots would not finish
    # (or would need terabytes), so passing shows scoring only reads df at the touched ids.
    df = torch.full((1,), 3, dtype=torch.int64).expand(1 << 40)
    background = SlotBackground(df, 10, df_sum=3 << 40)
    assert background.bg_norm == 4 << 40
    touched = torch.tensor([5, 1 << 20, (1 << 40) - 1])
    counts = torch.tensor([1, 3, 2])
    assert select_slots(touched, counts, "tfidf", 2, background).tolist() == [1 << 20, (1 << 40) - 1]
    kl = slot_scores(touched, counts, "kl", background)
    p_bg = 4 / (4 << 40)
    assert kl[1].item() == pytest.approx(0.5 * math.log((0.5 + KL_EPS) / (p_bg + KL_EPS)), rel=1e-12)


def test_adaptive_mass_keeps_the_fewest_slots_holding_the_mass():
    # ranking 'tf': scores = counts / 10; order slot 3 (5), 1 (2), 6 (2; tie -> lower id first), 4 (1);
    # cumulative mass 5, 7, 9, 10 of 10
    def pick(mass: float, top_t: int = 100) -> list[int]:
        return select_slots(TOUCHED, COUNTS, "tf", top_t, rule="mass", mass=mass).tolist()

    assert pick(0.5) == [3]
    assert pick(0.6) == [1, 3]
    assert pick(0.9) == [1, 3, 6]
    assert pick(1.0) == [1, 3, 4, 6]
    assert pick(1.0, top_t=2) == [1, 3]  # top_t caps the adaptive count


def _poisson_tail(c: int, rate: float) -> float:
    return 1.0 - sum(math.exp(-rate) * rate**k / math.factorial(k) for k in range(c))


def test_adaptive_poisson_keeps_slots_read_more_than_background_predicts():
    # p_read = (df + 1) / (N + 2), rate = -log(1 - p_read); significant when P(X >= c) < alpha / K
    tails = {}
    for slot, c in zip(TOUCHED.tolist(), COUNTS.tolist()):
        rate = -math.log(1 - (DF[slot].item() + 1) / (N + 2))
        tails[slot] = _poisson_tail(c, rate)
    for alpha in (0.2, 0.35, 0.6, 0.9):
        want = sorted(s for s, p in tails.items() if p < alpha / 4)
        got = select_slots(TOUCHED, COUNTS, "tfidf", 100, bg(), rule="poisson", alpha=alpha).tolist()
        assert got == want
    assert len({p < 0.6 / 4 for p in tails.values()}) == 2  # the levels above really split the slots
    with pytest.raises(ValueError, match="needs background counts"):
        select_slots(TOUCHED, COUNTS, "tf", 4, rule="poisson")
    with pytest.raises(ValueError, match="top_t_rule"):
        select_slots(TOUCHED, COUNTS, "tf", 4, rule="sqrt")
