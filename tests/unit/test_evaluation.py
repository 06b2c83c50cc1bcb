"""pass@k reports and the paired pass@1 gain, against plain statistics on simulated eval counts."""

import math
from pathlib import Path
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


# --- eval orders beside training, eval sets and their refusals ------------------------------------------


def test_eval_orders_are_ranked_between_the_coming_rounds_training_orders():
    """A version's eval orders are dealt with the round's training orders, spread over all of its steps
    but the last (so the round-ending push finds them done); sorted after the round they made that push
    wait for every one of them."""
    from megatron_oapl.rollout.orders import OrderBook, PromptSampler

    book = OrderBook(PromptSampler(50, seed=0), run_seed=0, prompts_per_step=4, sync_every=3)
    book.plan_eval(version=0, split="eval", num_prompts=4, after_step=0)  # the initial weights
    book.plan_round(step=1, version=0)  # steps 1-3: training orders 0..11
    dealt = [(o.split, o.index) for o in book.unassigned()]
    evals = [i for i, (split, _) in enumerate(dealt) if split == "eval"]
    last_step = dealt.index(("train", 8))  # the first order of step 3, the round's last
    assert len(evals) == 4 and evals[0] > 0 and evals[-1] < last_step
    assert [dealt[i + 1][0] for i in evals[:-1]].count("train") >= 2  # interleaved, not one block
    # A later round: ranks follow that round's order indices (after the push of step 3: steps 4-6).
    book.plan_eval(version=1, split="eval/other", num_prompts=2, after_step=3)
    assert all(12 <= book.open[("eval/other", i)].priority < 20 for i in range(2))


def _run_cfg(*overrides):
    from megatron_oapl.config import load_config

    return load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml",
                       ["data.num_train_prompts=50", "data.num_eval_prompts=4", *overrides])


def test_eval_sets_sampling_params_and_metric_names(tmp_path):
    from megatron_oapl import metrics as M
    from megatron_oapl.evaluation import check_eval_sets, eval_sets
    from megatron_oapl.rollout.orders import sampling_params

    (tmp_path / "f.jsonl").write_text('{"prompt": "1 + 1 =", "answer": "2"}\n{"prompt": "2 + 1 =", "answer": "3"}\n')
    cfg = _run_cfg("eval.num_samples=3", "eval.sets={a: {source: reasoning_gym, task: chain_sum, num_eval_prompts: 2},"
                   f" b: {{source: file, path: {tmp_path / 'f.jsonl'}, num_samples: 5}}}}")
    assert eval_sets(cfg) == {"a": "eval/a", "b": "eval/b"}
    assert check_eval_sets(cfg) == {"eval/a": 2, "eval/b": 2}
    assert [sampling_params(cfg, s).n for s in ("train", "eval", "eval/a", "eval/b")] == [8, 3, 3, 5]
    assert M.eval_pass_at("a", 2) == "eval/a/pass@2" and M.eval_avg_at("b", 5) == "eval/b/avg@5"
    assert M.eval_pass_at("heldout", 1) == "eval/pass@1"  # the single-set names are unchanged
    assert eval_sets(_run_cfg()) == {"heldout": "eval"}


def test_bad_eval_sets_are_one_line_naming_the_set(tmp_path):
    from megatron_oapl.config import ConfigError
    from megatron_oapl.data.prompts import DataError
    from megatron_oapl.evaluation import check_eval_sets

    with pytest.raises(ConfigError, match=r"eval\.sets\.x\.source='hub' is not a known source") as err:
        _run_cfg("eval.sets={x: {source: hub}}")
    assert "\n" not in str(err.value).strip()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"eval\.sets\.e: eval set 'e' holds no prompts"):
        check_eval_sets(_run_cfg(f"eval.sets={{e: {{source: file, path: {empty}}}}}"))
    with pytest.raises(DataError, match=r"eval\.sets\.m: the file .*missing\.jsonl does not exist"):
        check_eval_sets(_run_cfg(f"eval.sets={{m: {{source: file, path: {tmp_path / 'missing.jsonl'}}}}}"))

    class NoTokens:  # a tokenizer for which every prompt encodes to nothing (no BOS, no chat template)
        bos_token_id = chat_template = None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": []}

    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"prompt": "", "answer": "1"}\n')
    with pytest.raises(ConfigError, match=r"eval\.sets\.b: prompt .* of eval set 'b' encodes to no tokens"):
        check_eval_sets(_run_cfg(f"eval.sets={{b: {{source: file, path: {blank}}}}}"), NoTokens())


def test_the_training_fleets_evaluations_are_read_back_by_step_and_set(tmp_path):
    """record_round appends each finished evaluation; fleet_reports gives the latest one of a step for every
    set asked, in the order asked (the first set is the one `oapl study` reads), or None if one is missing."""
    from megatron_oapl.evaluation import EvalRound, HISTORY, fleet_reports, record_round

    def finished(version, step, split, correct):
        r = EvalRound(version, step, num_prompts=len(correct), num_samples=4, split=split)
        for i, c in enumerate(correct):
            r.correct[i], r.reward_sum = c, r.reward_sum + c
        return r

    record_round(tmp_path, finished(0, 0, "eval/b", [1, 2]))
    record_round(tmp_path, finished(0, 0, "eval/a", [0, 4]))
    record_round(tmp_path, finished(3, 6, "eval/a", [2, 2]))
    with open(tmp_path / "eval" / HISTORY, "a") as f:
        f.write('{"version": 9, "st')  # a line a crash cut short
    before = fleet_reports(tmp_path, 0, ["a", "b"])
    assert list(before) == ["a", "b"]
    assert before["a"] == report_from_counts([0, 4], 4, avg_at_n=0.5)
    assert before["b"].pass_at_k == report_from_counts([1, 2], 4).pass_at_k
    assert fleet_reports(tmp_path, 6, ["a", "b"]) is None  # set b of step 6 never finished
    assert fleet_reports(tmp_path, 6, ["a"])["a"].correct == [2, 2]
    record_round(tmp_path, finished(4, 6, "eval/a", [3, 3]))  # a later evaluation at the same step wins
    assert fleet_reports(tmp_path, 6, ["a"])["a"].correct == [3, 3]
