"""pass@k evaluation on eval sets: n samples per prompt, the unbiased estimator for k = 1..n with the
standard error over prompts, and avg@n (the mean reward of the n samples); a JSON report and a PNG plot.

Eval sets (`eval_sets`): the data section's held-out prompts (set "heldout", split "eval", metrics
eval/pass@k) unless eval.sets names its own (split "eval/<set>", metrics eval/<set>/pass@k). Every
evaluation samples through the fleet's engine processes, with the fleet's engine, TP, dtype and device,
and scores in their reward pools. During training the training fleet samples eval work orders of the
initial weights, of pushed versions (eval.every) and of the final weights; the coordinator tallies them in
`EvalRound`s (rollout/orders.py ranks them between the round's training orders) and appends each finished
one to RUN_DIR/eval/history.jsonl (`record_round`), where `oapl train` reads its before / after report
(`fleet_reports`). `evaluate` starts a fleet of its own on an HF directory: `oapl eval`, and the
before / after report of an offline round, which runs no fleet."""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_oapl.algo import pass_at_k
from megatron_oapl.rollout.orders import eval_split, sampling_params

log = logging.getLogger(__name__)

DEFAULT_SET = "heldout"  # the data section's held-out prompts, when eval.sets is empty (metrics.DEFAULT_EVAL_SET)


@dataclass
class EvalReport:
    num_prompts: int
    num_samples: int
    pass_at_k: dict[int, float]
    stderr: dict[int, float]  # std over prompts of the per-prompt estimate / sqrt(num_prompts)
    correct: list[int]  # correct samples per prompt
    avg_at_n: float | None = None  # mean reward over prompts x samples (= pass@1 with binarized rewards)

    def to_dict(self) -> dict:
        return asdict(self)


def report_from_counts(correct: list[int], n: int, avg_at_n: float | None = None) -> EvalReport:
    counts = np.asarray(correct)
    values, errors = {}, {}
    for k in range(1, n + 1):
        per_prompt = pass_at_k(n, counts, k)
        values[k] = float(per_prompt.mean())
        errors[k] = float(per_prompt.std(ddof=1) / math.sqrt(len(counts))) if len(counts) > 1 else 0.0
    return EvalReport(len(counts), n, values, errors, [int(c) for c in counts], avg_at_n)


# ------------------------------------------------------------------------------------------------ sets


def eval_sets(cfg) -> dict[str, str]:
    """Set name -> order split, in config order."""
    if not cfg.eval.sets:
        return {DEFAULT_SET: eval_split(None)}
    return {name: eval_split(name) for name in cfg.eval.sets}


def set_name(split: str) -> str:
    return DEFAULT_SET if split == "eval" else split.removeprefix("eval/")


def check_eval_sets(cfg, tokenizer=None) -> dict[str, int]:
    """Read (and with a tokenizer, encode) every eval set as the engines will; split -> prompt count.
    An empty set, or a prompt that encodes to no tokens, is one line naming the set."""
    from megatron_oapl.config import ConfigError
    from megatron_oapl.data.prompts import load_split

    counts = {}
    for name, split in eval_sets(cfg).items():
        where = "data (num_eval_prompts)" if split == "eval" else f"eval.sets.{name}"
        prompts = load_split(cfg, split, tokenizer)
        if not prompts:
            raise ConfigError(f"{where}: eval set {name!r} holds no prompts (allowed: at least 1)")
        empty = next((p for p in prompts if tokenizer is not None and not p.token_ids), None)
        if empty is not None:
            raise ConfigError(f"{where}: prompt {empty.prompt_id!r} of eval set {name!r} encodes to no tokens "
                              f"with the tokenizer of {cfg.model.hf_path} (is it this model's tokenizer?)")
        counts[split] = len(prompts)
    return counts


@dataclass
class EvalRound:
    """The evaluation of one policy version on one eval set: correct samples (and the mean reward) per
    prompt, as eval groups come back from the engines."""

    version: int
    step: int  # the optimizer step after which `version` was pushed (0: the initial weights)
    num_prompts: int
    num_samples: int
    split: str = "eval"
    correct: dict[int, int] = field(default_factory=dict)
    reward_sum: float = 0.0

    @property
    def name(self) -> str:
        return set_name(self.split)

    def add(self, group) -> None:
        self.correct[group.order_index] = sum(r == 1.0 for r in group.rewards)
        self.reward_sum += sum(group.rewards)

    @property
    def done(self) -> bool:
        return len(self.correct) == self.num_prompts

    def report(self) -> EvalReport:
        avg = self.reward_sum / (self.num_prompts * self.num_samples)
        return report_from_counts([self.correct[i] for i in range(self.num_prompts)], self.num_samples, avg)


def eval_rounds(cfg, counts: dict[str, int], version: int, step: int) -> dict[str, EvalRound]:
    """One `EvalRound` per eval set (by split) for `version`."""
    return {split: EvalRound(version, step, n, sampling_params(cfg, split).n, split) for split, n in counts.items()}


def report_metrics(report: EvalReport, name: str) -> dict[str, float]:
    """TensorBoard values of one set's report: pass@k for k = 1..n and avg@n."""
    from megatron_oapl import metrics as M

    values = {M.eval_pass_at(name, k): v for k, v in report.pass_at_k.items()}
    values[M.eval_avg_at(name, report.num_samples)] = report.avg_at_n
    return values


HISTORY = "history.jsonl"  # RUN_DIR/eval/: one line per finished evaluation of the training fleet


def record_round(run_dir: str | Path, done: EvalRound) -> EvalReport:
    """Append a finished evaluation of the training fleet to RUN_DIR/eval/history.jsonl (one JSON line:
    version, step, set, the report); `oapl train` reads its before / after reports from there."""
    report = done.report()
    path = Path(run_dir) / "eval" / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"version": done.version, "step": done.step, "set": done.name, **report.to_dict()})
    with open(path, "ab+") as f:  # appends whatever the position
        start = b""
        if f.seek(0, 2) > 0:
            f.seek(-1, 2)
            start = b"" if f.read(1) == b"\n" else b"\n"  # end a line a crash cut short (read back: skipped)
        f.write(start + line.encode() + b"\n")
    return report


def fleet_reports(run_dir: str | Path, step: int, names: list[str]) -> dict[str, EvalReport] | None:
    """The training fleet's latest evaluation at `step` (0: the initial weights) of every set in `names`, in
    that order; None unless every one of them is there."""
    path = Path(run_dir) / "eval" / HISTORY
    found: dict[str, EvalReport] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if record["step"] == step:
            fields = {k: record[k] for k in ("num_prompts", "num_samples", "correct", "avg_at_n")}
            found[record["set"]] = EvalReport(**fields, pass_at_k={int(k): v for k, v in record["pass_at_k"].items()},
                                              stderr={int(k): v for k, v in record["stderr"].items()})
    return {name: found[name] for name in names} if set(names) <= set(found) else None


def paired_gain(before: EvalReport, after: EvalReport) -> tuple[float, float]:
    """pass@1 gain of `after` over `before` and its standard error, paired by prompt: both reports score the
    same held-out prompts, so the per-prompt differences carry the noise (prompt difficulty cancels)."""
    if before.num_prompts != after.num_prompts:
        raise ValueError(f"paired_gain needs reports on the same prompts: {before.num_prompts} vs "
                         f"{after.num_prompts} prompts")
    diff = (np.asarray(after.correct) / after.num_samples) - (np.asarray(before.correct) / before.num_samples)
    stderr = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()), stderr


def evaluate(cfg, model_dir: str, progress: bool = False) -> dict[str, EvalReport]:
    """Every eval set of `cfg` sampled by the fleet's engines holding `model_dir` (version 0) and scored in
    their reward pools; reports by set name. The sets are read and encoded first, so a bad one costs one
    line and no engine start. Engines are always local here (fleet.external is for training)."""
    from megatron_oapl.config import to_dict
    from megatron_oapl.data.tokenizer import load_tokenizer
    from megatron_oapl.rollout.fleet import Fleet
    from megatron_oapl.rollout.orders import OrderBook, PromptSampler

    from megatron_oapl.rollout.placement import compile_cache_dir

    cfg = copy.deepcopy(cfg)
    cfg.model.hf_path, cfg.fleet.external = str(model_dir), False
    # The run's compile cache, but engine pid files under RUN_DIR/eval: RUN_DIR/engines is the training fleet's.
    cfg.fleet.compile_cache_dir = compile_cache_dir(cfg)
    cfg.run_dir = str(Path(cfg.run_dir) / "eval")
    counts = check_eval_sets(cfg, load_tokenizer(model_dir))
    book = OrderBook(PromptSampler(1, cfg.data.seed), cfg.seed, cfg.fleet.prompts_per_step, sync_every=1)
    for split, n in counts.items():
        book.plan_eval(0, split, n)
    rounds = eval_rounds(cfg, counts, version=0, step=0)
    bar = _bar(progress, sum(counts.values()))
    fleet = Fleet(cfg, to_dict(cfg), str(model_dir))
    try:
        fleet.wait_ready(list(fleet.engines))
        _collect(fleet, book, rounds, bar)
    finally:
        fleet.close()
        if bar is not None:
            bar.close()
    return {r.name: r.report() for r in rounds.values()}


def _collect(fleet, book, rounds: dict[str, EvalRound], bar) -> None:
    """Deal every open eval order of `book` (version 0) and tally each group as it arrives."""
    errors = timeouts = 0
    while book.open:
        stale, arrived = fleet.serve(book, version=0)
        if stale:
            raise RuntimeError(f"engines {stale} hold a version other than 0 while evaluating")
        for group in arrived:
            if book.delivered((group.split, group.order_index)):
                rounds[group.split].add(group)
                errors, timeouts = errors + group.reward_errors, timeouts + group.reward_timeouts
                if bar is not None:
                    bar.update(1)
    if errors or timeouts:
        log.warning("%d reward call(s) failed and %d timed out (each scored 0)", errors, timeouts)


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="eval", unit="prompt", leave=False)


def train_reports(before: dict[str, EvalReport], after: dict[str, EvalReport]) -> dict[str, EvalReport]:
    """`oapl train`'s eval.json entries: "before" / "after" for the first eval set (what `oapl study`
    reads), "<set>/before" / "<set>/after" for each other set."""
    reports = {}
    for i, name in enumerate(before):
        prefix = "" if i == 0 else f"{name}/"
        reports[prefix + "before"], reports[prefix + "after"] = before[name], after[name]
    return reports


def write_reports(out_dir: str | Path, reports: dict[str, EvalReport]) -> Path:
    """`eval.json` with every report and `pass_at_k.png` plotting pass@k against k for each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({name: r.to_dict() for name, r in reports.items()}, indent=2))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, report in reports.items():
        ks = sorted(report.pass_at_k)
        ax.errorbar(ks, [report.pass_at_k[k] for k in ks], yerr=[report.stderr[k] for k in ks],
                    marker="o", capsize=3, label=name)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pass_at_k.png", dpi=120)
    plt.close(fig)
    return out


def format_table(reports: dict[str, EvalReport]) -> str:
    """pass@k ± SE by k (rows) and report (columns); a report with fewer samples leaves its cells empty."""
    names = list(reports)
    ks = sorted({k for r in reports.values() for k in r.pass_at_k})
    lines = ["k  " + "  ".join(f"{n:>16}" for n in names)]
    for k in ks:
        cells = [f"{reports[n].pass_at_k[k]:.3f} ± {reports[n].stderr[k]:.3f}" if k in reports[n].pass_at_k
                 else "" for n in names]
        lines.append(f"{k:<3}" + "  ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def format_sets_table(reports: dict[str, EvalReport]) -> str:
    """One row per eval set: prompts, samples, pass@1, pass@n (± SE) and avg@n."""
    width = max(len("set"), *(len(n) for n in reports))
    lines = [f"{'set':<{width}}  prompts    n  {'pass@1':>15}  {'pass@n':>15}  avg@n"]
    for name, r in reports.items():
        n = r.num_samples
        avg = "" if r.avg_at_n is None else f"{r.avg_at_n:.3f}"
        lines.append(f"{name:<{width}}  {r.num_prompts:>7}  {n:>3}  {r.pass_at_k[1]:.3f} ± {r.stderr[1]:.3f}  "
                     f"{r.pass_at_k[n]:.3f} ± {r.stderr[n]:.3f}  {avg}")
    return "\n".join(lines)
