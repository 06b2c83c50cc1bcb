"""pass@k reports and the paired pass@1 gain, against plain statistics on simulated eval counts."""

import math
import statistics

import numpy as np
import pytest

from megatron_oapl.evaluation import paired_gain, report_from_counts


def test_report_pass1_and_stderr_match_plain_statistics():
    counts = [0, 3, 8, 5, 1, 7]
    report = report_from_counts(counts, 8)
    rates = [c / 8 for c in counts]
    assert report.pass_at_k[1] == pytest.approx(statistics.fmean(rates), abs=1e-12)
    assert report.stderr[1] == pytest.approx(statistics.stdev(rates) / math.sqrt(len(rates)), abs=1e-12)
    assert report.pass_at_k[8] == pytest.approx(5 / 6)  # prompts with at least one correct sample


def test_paired_gain_cancels_prompt_difficulty():
    # Prompts of very different difficulty, each improved by 0.1 in success probability.
    rng = np.random.default_rng(0)
    p = rng.uniform(0.0, 0.85, size=400)
    before = report_from_counts(list(rng.binomial(8, p)), 8)
    after = report_from_counts(list(rng.binomial(8, p + 0.1)), 8)
    gain, stderr = paired_gain(before, after)
    assert gain == pytest.approx(after.pass_at_k[1] - before.pass_at_k[1], abs=1e-12)
    assert abs(gain - 0.1) < 4 * stderr
    unpaired = math.hypot(before.stderr[1], after.stderr[1])
    assert stderr < 0.7 * unpaired  # the per-prompt difference removes the spread between prompts
    assert paired_gain(before, before) == (0.0, 0.0)


def test_paired_gain_refuses_reports_on_different_prompts():
    with pytest.raises(ValueError, match="same prompts"):
        paired_gain(report_from_counts([1, 2], 4), report_from_counts([1, 2, 3], 4))
