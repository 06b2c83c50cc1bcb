"""pass@k evaluation on held-out prompts: n samples per prompt, the unbiased estimator for k = 1..n,
with the standard error over prompts; a JSON report and a PNG plot (before vs after).

Two paths: `evaluate` samples an HF directory with the light engine in this process (`oapl eval`, and
`oapl train`'s before/after on one machine); during training (eval.every > 0) the fleet's engines sample
eval work orders and the coordinator tallies them in an `EvalRound` (rollout/orders.py)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_oapl.algo import pass_at_k
from megatron_oapl.rollout.types import SamplingParams

_PROMPTS_PER_CALL = 32


@dataclass
class EvalReport:
    num_prompts: int
    num_samples: int
    pass_at_k: dict[int, float]
    stderr: dict[int, float]  # std over prompts of the per-prompt estimate / sqrt(num_prompts)
    correct: list[int]  # correct samples per prompt

    def to_dict(self) -> dict:
        return asdict(self)


def report_from_counts(correct: list[int], n: int) -> EvalReport:
    counts = np.asarray(correct)
    values, errors = {}, {}
    for k in range(1, n + 1):
        per_prompt = pass_at_k(n, counts, k)
        values[k] = float(per_prompt.mean())
        errors[k] = float(per_prompt.std(ddof=1) / math.sqrt(len(counts))) if len(counts) > 1 else 0.0
    return EvalReport(len(counts), n, values, errors, [int(c) for c in counts])


@dataclass
class EvalRound:
    """The evaluation of one policy version through the fleet (eval.every > 0): correct samples per
    held-out prompt, as eval groups come back from the engines."""

    version: int
    step: int  # the optimizer step after which `version` was pushed (0: the initial weights)
    num_prompts: int
    num_samples: int
    correct: dict[int, int] = field(default_factory=dict)

    def add(self, group) -> None:
        self.correct[group.order_index] = sum(r == 1.0 for r in group.rewards)

    @property
    def done(self) -> bool:
        return len(self.correct) == self.num_prompts

    def report(self) -> EvalReport:
        return report_from_counts([self.correct[i] for i in range(self.num_prompts)], self.num_samples)


def paired_gain(before: EvalReport, after: EvalReport) -> tuple[float, float]:
    """pass@1 gain of `after` over `before` and its standard error, paired by prompt: both reports score the
    same held-out prompts, so the per-prompt differences carry the noise (prompt difficulty cancels)."""
    if before.num_prompts != after.num_prompts:
        raise ValueError(f"paired_gain needs reports on the same prompts: {before.num_prompts} vs "
                         f"{after.num_prompts} prompts")
    diff = (np.asarray(after.correct) / after.num_samples) - (np.asarray(before.correct) / before.num_samples)
    stderr = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
    return float(diff.mean()), stderr


def evaluate(cfg, model_dir: str, progress: bool = False) -> EvalReport:
    """Sample `eval.num_samples` completions per eval prompt with the light engine and score them."""
    from megatron_oapl.data.prompts import load_prompts
    from megatron_oapl.data.templates import render_prompt
    from megatron_oapl.data.tokenizer import TokenizerError, encode_prompt, load_tokenizer, stop_token_ids
    from megatron_oapl.rewards.registry import RewardScorer
    from megatron_oapl.rollout.torch_engine import TorchEngine

    tokenizer = load_tokenizer(model_dir)
    engine = TorchEngine(model_dir, seed=cfg.seed + 7)
    scorer = RewardScorer(cfg.rewards)
    prompts = load_prompts(cfg.data, "eval")
    params = SamplingParams(
        n=cfg.eval.num_samples, temperature=cfg.eval.temperature, top_p=cfg.fleet.top_p,
        max_new_tokens=cfg.fleet.max_new_tokens, stop_token_ids=tuple(stop_token_ids(tokenizer)),
        seed=cfg.seed,
    )
    chunks = range(0, len(prompts), _PROMPTS_PER_CALL)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="eval", unit="batch", leave=False)
    correct = []
    for start in chunks:
        chunk = prompts[start : start + _PROMPTS_PER_CALL]
        ids = [encode_prompt(tokenizer, render_prompt(tokenizer, cfg.data.chat_template, p.text)) for p in chunk]
        empty = next((p for p, i in zip(chunk, ids) if not i), None)
        if empty is not None:
            raise TokenizerError(f"eval prompt {empty.prompt_id!r} encodes to no tokens with the tokenizer of "
                                 f"{model_dir} (is it this model's tokenizer?)")
        for prompt, samples in zip(chunk, engine.generate(ids, params)):
            correct.append(sum(scorer.score(s.text, prompt) == 1.0 for s in samples))
    return report_from_counts(correct, params.n)


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
    names = list(reports)
    ks = sorted(next(iter(reports.values())).pass_at_k)
    lines = ["k  " + "  ".join(f"{n:>16}" for n in names)]
    for k in ks:
        cells = [f"{reports[n].pass_at_k[k]:.3f} ± {reports[n].stderr[k]:.3f}" for n in names]
        lines.append(f"{k:<3}" + "  ".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)
