"""The paper's three claims, tested on per-seed final results: statistics and verdicts, nothing else.

d'Ascoli et al. (2019) claim that an eFCN relaxed from a CNN at time t_w

1. ``deviation``: stays close to the CNN subspace at every relax time (its final deviation
   ||W - P(W)|| / ||W|| stays below :data:`DEVIATION_SMALL`; an FCN from scratch sits near 1);
2. ``above_fcn``: ends above a standard FCN of the same architecture at every relax time;
3. ``above_cnn``: ends above the CNN it came from at some intermediate relax time (0 < t_w < T).

Every comparison is made per seed (the eFCN of seed s against the CNN / FCN of seed s: paired
differences) and summarised by its mean, sample standard deviation and standard error over the
seeds. The *margin* of one comparison is its mean distance from the claim's boundary in units of
the standard error; a claim over all relax times is decided by its smallest margin, a claim about
some relax time by its largest. The verdict is ``holds`` when that margin exceeds the two-sided 95 %
Student t critical value for n - 1 degrees of freedom, ``fails`` when it is below minus that value,
and ``undecided`` otherwise (always with fewer than 2 seeds: no standard error). There is no
correction for testing several relax times at once; the per-t_w table shows every margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

__all__ = ["Stat", "stat", "t_critical", "margin", "verdict", "Claim", "evaluate_claims", "claims_markdown",
           "DEVIATION_SMALL", "CONFIDENCE"]

DEVIATION_SMALL = 0.25  # "close to the CNN subspace": a quarter of the weight norm (an FCN from scratch: ~1)
CONFIDENCE = 0.95

SeedValues = Mapping[int, float]  # seed -> value


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (ddof 1; NaN for n < 2), n, and the standard error std / sqrt(n)."""

    mean: float
    std: float
    n: int

    @property
    def se(self) -> float:
        return self.std / math.sqrt(self.n) if self.n >= 2 else math.nan

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        """``mean ± std`` (just the mean when n < 2), values multiplied by ``scale``."""
        if self.n == 0:
            return "—"
        if self.n < 2:
            return f"{scale * self.mean:.{digits}f}"
        return f"{scale * self.mean:.{digits}f} ± {scale * self.std:.{digits}f}"


def stat(values: Sequence[float]) -> Stat:
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n >= 2 else math.nan
    return Stat(mean, std, n)


def t_critical(n: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student t critical value for n samples (n - 1 degrees of freedom); NaN for n < 2."""
    if n < 2:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, n - 1))


def margin(s: Stat, boundary: float = 0.0, sign: float = 1.0) -> float:
    """sign * (mean - boundary) / se: how many standard errors the mean lies on the claim's side."""
    if s.n < 2:
        return math.nan
    d = sign * (s.mean - boundary)
    if s.se == 0:
        return math.copysign(math.inf, d) if d != 0 else 0.0
    return d / s.se


def verdict(m: float, n: int, confidence: float = CONFIDENCE) -> str:
    """``holds`` / ``fails`` / ``undecided`` for a margin ``m`` (in standard errors) from n seeds."""
    if n < 2 or math.isnan(m):
        return "undecided"
    c = t_critical(n, confidence)
    return "holds" if m > c else "fails" if m < -c else "undecided"


@dataclass
class Claim:
    key: str
    text: str
    numbers: str
    margin: float  # the deciding margin, in standard errors (NaN: none)
    n: int  # seeds behind the deciding comparison
    verdict: str
    per_t_w: Dict[int, Stat]  # the compared quantity per relax time (a difference, or the deviation)


def _paired(a: SeedValues, b: SeedValues) -> Stat:
    seeds = sorted(set(a) & set(b))
    return stat([a[s] - b[s] for s in seeds])


def _decide(per_t: Dict[int, Stat], margins: Dict[int, float], every: bool, boundary: float = 0.0,
            sign: float = 1.0):
    """The deciding relax time: the smallest margin for 'every', the largest for 'some' (ties, such as
    infinite margins from zero spread: the mean farther on that side)."""
    usable = {t: m for t, m in margins.items() if not math.isnan(m)}
    if not usable:
        t = min(per_t, key=lambda t: per_t[t].n) if per_t else None
        return t, math.nan
    t = (min if every else max)(usable, key=lambda t: (usable[t], sign * (per_t[t].mean - boundary)))
    return t, usable[t]


def _pts(s: Stat) -> str:
    if s.n < 2:
        return f"{100 * s.mean:+.2f} points (n = {s.n})"
    return f"{100 * s.mean:+.2f} ± {100 * s.se:.2f} points (mean ± s.e., n = {s.n})"


def evaluate_claims(cnn: SeedValues, fcn: SeedValues, efcn: Mapping[int, SeedValues],
                    deviation: Mapping[int, SeedValues], epochs: int,
                    deviation_small: float = DEVIATION_SMALL, confidence: float = CONFIDENCE) -> List[Claim]:
    """The three claims from final values per seed.

    ``cnn``/``fcn``: final test accuracy per seed; ``efcn``: t_w -> final test accuracy per seed;
    ``deviation``: t_w -> final deviation per seed (eFCNs trained after relaxing only: at t_w = T
    nothing was trained and the eFCN is the CNN); ``epochs``: T, which bounds "intermediate".
    """
    trained = sorted(t for t in efcn if t in deviation)
    mid = [t for t in trained if 0 < t < epochs]

    def deviation_numbers(t, per):
        means = [per[u].mean for u in trained]
        return (f"final deviation {min(means):.3f} to {max(means):.3f} across t_w; deciding t_w = {t}: "
                f"{per[t].fmt(digits=3)} (n = {per[t].n}) against {deviation_small}")

    return [
        _claim("deviation", "the deviation from the CNN subspace stays small at every relax time",
               {t: stat(list(deviation[t].values())) for t in trained}, True, confidence,
               deviation_numbers, "no eFCN trained after relaxing", boundary=deviation_small, sign=-1.0),
        _claim("above_fcn", "the eFCN ends above the FCN at every relax time",
               {t: _paired(efcn[t], fcn) for t in trained}, True, confidence,
               lambda t, per: f"eFCN - FCN at the deciding t_w = {t}: {_pts(per[t])}", "no FCN or no eFCN"),
        _claim("above_cnn", "the eFCN ends above its CNN at some intermediate relax time",
               {t: _paired(efcn[t], cnn) for t in mid}, False, confidence,
               lambda t, per: f"eFCN - CNN at the deciding t_w = {t}: {_pts(per[t])}",
               "no intermediate relax time (0 < t_w < T) trained"),
    ]


def _claim(key: str, text: str, per: Dict[int, Stat], every: bool, confidence: float, numbers, missing: str,
           boundary: float = 0.0, sign: float = 1.0) -> Claim:
    """One claim over the relax times: decided by its smallest margin (``every``) or its largest."""
    ms = {t: margin(per[t], boundary, sign) for t in per}
    t, m = _decide(per, ms, every, boundary, sign)
    n = per[t].n if t is not None else 0
    nums = missing if n == 0 else numbers(t, per)
    return Claim(key, text, nums, m, n, verdict(m, n, confidence), per)


def claims_markdown(claims: List[Claim], confidence: float = CONFIDENCE) -> List[str]:
    """The claims table (markdown lines)."""
    lines = ["| claim | numbers | margin (s.e.) | needed | verdict |", "|---|---|---:|---:|---|"]
    for i, c in enumerate(claims, 1):
        need = t_critical(c.n, confidence)
        lines.append(f"| {i}. {c.text} | {c.numbers} | {_fmt_margin(c.margin)} | "
                     f"{'—' if math.isnan(need) else f'±{need:.2f}'} | **{c.verdict}** (n = {c.n}) |")
    return lines


def _fmt_margin(m: Optional[float]) -> str:
    if m is None or math.isnan(m):
        return "—"
    return "+inf" if m == math.inf else "-inf" if m == -math.inf else f"{m:+.2f}"
