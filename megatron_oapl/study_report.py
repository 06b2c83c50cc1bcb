"""The report of a study (`oapl study`): report.md and PNG plots in the study's directory.

Each finished cell is read from its run directory: the TensorBoard scalars with TensorBoard's own reader
(names from megatron_oapl/metrics.py) and `eval/eval.json`, the before/after evaluation `oapl train` ends
with. Cells that differ only in the seed axis form one line; the table gives mean ± standard error over
their seeds (std with ddof=1 / sqrt(seeds)) and each plot draws the mean with a band of ± one standard error.

- final pass@k: `eval.json`'s "after" (the final model, all held-out prompts x eval.num_samples); a cell
  without it falls back to its last fleet evaluation (TensorBoard eval/pass@k).
- generations sampled by step s: (s x prompts_per_step + groups dropped as stale so far) x group_size for an
  online run; an offline round sampled its whole dataset before step 1. Consumed: steps x prompts x G.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from megatron_oapl import metrics as M

ABS_LOG_RATIO = M.LOSS_PREFIX + "abs_log_ratio_mean"  # OAPL's sequence log-ratio vs pi_lag
CLIP_FRACTION = M.LOSS_PREFIX + "clip_frac"  # GRPO's clipped-token fraction


def read_scalars(tensorboard_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}}; a step logged twice (a resumed run redoes steps after its checkpoint) keeps
    the later value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tensorboard_dir.is_dir():
        return {}
    acc = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        series = out.setdefault(tag, {})
        for event in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
            series[event.step] = event.value
    return out


class CellResult:
    """What the report needs of one finished cell."""

    def __init__(self, cell):
        from megatron_oapl.config import load_config

        self.cell = cell
        # What the run actually ran with (`oapl train` writes it before training, so every finished cell has
        # it), even if the study's base file changed since.
        cfg = load_config(cell.run_dir / "config.yaml", check_hardware=False)
        self.steps, self.prompts, self.group = cfg.optim.train_steps, cfg.fleet.prompts_per_step, cfg.fleet.group_size
        self.tb = read_scalars(cell.run_dir / "tensorboard")
        path = cell.run_dir / "eval" / "eval.json"
        reports = json.loads(path.read_text()) if path.is_file() else {}
        self.before = _pass_at_k(reports.get("before"))
        after = _pass_at_k(reports.get("after"))
        evals = {k: self.tb[M.pass_at(k)] for k in range(1, 1025) if M.pass_at(k) in self.tb}
        if not after and evals:  # the last fleet evaluation stands in
            last = max(evals[1])
            after = {k: series[last] for k, series in evals.items() if last in series}
        self.after = after
        self.offline_groups = None
        if cell.reuse is not None:
            with open(cell.rollouts) as f:
                self.offline_groups = sum(1 for _ in f)
        self.pass1_curve = dict(evals.get(1, {}))
        if not self.pass1_curve:  # no evaluation during the run (offline): before and after
            self.pass1_curve = {s: v[1] for s, v in ((0, self.before), (self.steps, self.after)) if 1 in v}

    def generations(self, step: int) -> float:
        """Generations sampled by the end of `step` (0: none)."""
        if step <= 0:
            return 0.0
        if self.offline_groups is not None:
            return float(self.offline_groups * self.group)
        dropped = self.tb.get(M.DROPPED_STALE, {})
        seen = [s for s in dropped if s <= step]
        # Dynamic sampling: the orders each step looked at beyond prompts_per_step (all-equal groups).
        extra = sum(v for s, v in self.tb.get(M.EXTRA_ORDERS, {}).items() if s <= step)
        return float((step * self.prompts + (dropped[max(seen)] if seen else 0) + extra) * self.group)

    @property
    def consumed(self) -> int:
        return self.steps * self.prompts * self.group


def _pass_at_k(report: dict | None) -> dict[int, float]:
    return {int(k): float(v) for k, v in (report or {}).get("pass_at_k", {}).items()}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (nan with fewer than two values)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else math.nan
    return float(arr.mean()), se


def _fmt(mean: float, se: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}")


def _count(mean: float, se: float) -> str:
    """A count's mean, with its standard error only where the seeds differ."""
    return f"{mean:.0f}" + (f" ± {se:.0f}" if se > 0 else "")


def group_lines(study, results: list[CellResult]) -> dict[str, list[CellResult]]:
    """Line name (the cell's labels except the seed axis) -> its cells, in study order."""
    lines: dict[str, list[CellResult]] = {}
    for r in results:
        name = " ".join(label for axis, label in r.cell.labels.items() if axis != study.seed_axis) or "all"
        lines.setdefault(name, []).append(r)
    return lines


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _band(curves: list[dict[int, float]], smooth: int = 1) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Steps every curve has, the mean over curves and its standard error (0 with one curve); values are
    first averaged over a trailing window of `smooth` logged steps."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    if not steps:
        return [], np.zeros(0), np.zeros(0)
    values = np.asarray([[c[s] for s in steps] for c in curves], dtype=float)
    if smooth > 1:
        kernel = np.ones(smooth)
        counts = np.convolve(np.ones(len(steps)), kernel)[: len(steps)]
        values = np.stack([np.convolve(row, kernel)[: len(steps)] / counts for row in values])
    mean = values.mean(axis=0)
    se = values.std(axis=0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else np.zeros(len(steps))
    return steps, mean, se


def _plot(path: Path, lines: dict[str, list[CellResult]], curve, xlabel: str, ylabel: str,
          x_of=None, smooth: int = 1) -> bool:
    """One line per entry of `lines` (mean over its cells, band of ± SE); False if no cell has the curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    styles = _line_styles(list(lines))
    for name, cells in lines.items():
        curves = [c for c in (curve(r) for r in cells) if c]
        steps, mean, se = _band(curves, smooth)
        if not steps:
            continue
        xs = np.asarray([np.mean([x_of(r, s) for r in cells]) for s in steps]) if x_of else np.asarray(steps)
        (line,) = ax.plot(xs, mean, label=f"{name} (n={len(curves)})", marker="o" if len(steps) < 12 else None,
                          markersize=3, **styles[name])
        ax.fill_between(xs, mean - se, mean + se, color=line.get_color(), alpha=0.2)
        drawn = True
    if drawn:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel + (f" (mean of {smooth} steps)" if smooth > 1 else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        _save_compact(fig, path)
    plt.close(fig)
    return drawn


def _line_styles(names: list[str]) -> dict[str, dict]:
    """Line name -> matplotlib style: with two or more axes, the first axis's label sets the dash pattern and
    the rest the colour, so a 2 x 6 grid reads as six colours, solid and dashed (not 12 cycled colours)."""
    import matplotlib

    parts = [name.split(" ") for name in names]
    if len(names) < 2 or any(len(p) < 2 for p in parts):
        return {name: {} for name in names}
    firsts = list(dict.fromkeys(p[0] for p in parts))
    rests = list(dict.fromkeys(" ".join(p[1:]) for p in parts))
    colours = matplotlib.colormaps["tab10" if len(rests) <= 10 else "tab20"]
    dashes = ["-", "--", ":", "-."]
    return {name: {"color": colours(rests.index(" ".join(p[1:])) % colours.N),
                   "linestyle": dashes[firsts.index(p[0]) % len(dashes)]} for name, p in zip(names, parts)}


def _save_compact(fig, path: Path) -> None:
    """A 64-colour palette PNG (~1/3 the bytes of matplotlib's RGBA, so plots can live in docs/)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=100)
    Image.open(buf).convert("RGB").quantize(colors=64).save(path, optimize=True)


def write_plots(out: Path, lines: dict[str, list[CellResult]]) -> list[str]:
    """The study's PNGs in `out`; returns the file names written."""
    steps = max((r.steps for cells in lines.values() for r in cells), default=1)
    smooth = max(1, steps // 10)
    plots = [
        ("pass1_vs_step.png", lambda r: r.pass1_curve, "optimizer step", "held-out pass@1", None, 1),
        ("pass1_vs_generations.png", lambda r: r.pass1_curve, "generations sampled", "held-out pass@1",
         CellResult.generations, 1),
        ("pass_at_k_final.png", lambda r: r.after, "k", "final held-out pass@k", lambda r, k: k, 1),
        ("sequence_entropy_vs_step.png", lambda r: r.tb.get(M.SEQUENCE_ENTROPY, {}), "optimizer step",
         "sequence entropy (nats)", None, smooth),
        ("abs_log_ratio_vs_step.png", lambda r: r.tb.get(ABS_LOG_RATIO, {}), "optimizer step",
         "mean |log pi_theta - log pi_lag| (nats/seq)", None, smooth),
        ("clip_fraction_vs_step.png", lambda r: r.tb.get(CLIP_FRACTION, {}), "optimizer step",
         "GRPO clipped-token fraction", None, smooth),
        ("grad_norm_vs_step.png", lambda r: r.tb.get(M.GRAD_NORM, {}), "optimizer step", "gradient norm", None,
         smooth),
    ]
    written = []
    for name, curve, xlabel, ylabel, x_of, window in plots:
        if _plot(out / name, lines, curve, xlabel, ylabel, x_of, window):
            written.append(name)
    return written


# --------------------------------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------------------------------


def _window_mean(series: dict[int, float], first: float, last: float) -> float:
    """Mean of the logged values in the fraction [first, last) of the run's logged steps, at least one value
    (nan: nothing logged)."""
    if not series:
        return math.nan
    values = [series[s] for s in sorted(series)]
    lo = min(int(first * len(values)), len(values) - 1)
    return float(np.mean(values[lo : max(lo + 1, round(last * len(values)))]))


def _spread(values: list[float]) -> str:
    """How far seeds fall apart: their standard deviation (not the mean's standard error) and range."""
    if len(values) < 2:
        return "n/a"
    return f"{np.std(values, ddof=1):.3f} [{min(values):.3f}, {max(values):.3f}]"


def _table(lines: dict[str, list[CellResult]]) -> list[str]:
    """Per line: final pass@k, generations, and the drift signals of the run's first and last tenth (entropy)
    or last quarter (|log-ratio| to the sampling policy, GRPO's clipped-token fraction, the gradient norm)."""
    ks = sorted({k for cells in lines.values() for r in cells for k in r.after})
    k_top = ks[-1] if ks else 1
    k_mid = max((k for k in ks if k < k_top and k & (k - 1) == 0), default=None)  # a power of two below
    final_ks = [1, *([k_mid] if k_mid else []), *([k_top] if k_top != 1 else [])]
    rows = ["| run | seeds | pass@1 before | " + " | ".join(f"pass@{k} final" for k in final_ks) + " | pass@1 final "
            "seed sd [min, max] | generations sampled | generations consumed | seq. entropy first 10% -> last 10% | "
            "abs log-ratio last 25% | clip fraction last 25% | grad norm last 25% |",
            "|---|---|---|" + "---|" * len(final_ks) + "---|" * 7]

    def over_seeds(cells, value) -> tuple[float, float]:
        return mean_se([v for v in (value(r) for r in cells) if not math.isnan(v)])

    for name, cells in lines.items():
        before = mean_se([r.before[1] for r in cells if 1 in r.before])
        finals = [_fmt(*mean_se([r.after[k] for r in cells if k in r.after])) for k in final_ks]
        spread = _spread([r.after[1] for r in cells if 1 in r.after])
        sampled = mean_se([r.generations(r.steps) for r in cells])
        consumed = mean_se([r.consumed for r in cells])
        entropy = [over_seeds(cells, lambda r, a=a, b=b: _window_mean(r.tb.get(M.SEQUENCE_ENTROPY, {}), a, b))
                   for a, b in ((0.0, 0.1), (0.9, 1.0))]
        log_ratio = over_seeds(cells, lambda r: _window_mean(r.tb.get(ABS_LOG_RATIO, {}), 0.75, 1.0))
        clipped = over_seeds(cells, lambda r: _window_mean(r.tb.get(CLIP_FRACTION, {}), 0.75, 1.0))
        grad = over_seeds(cells, lambda r: _window_mean(r.tb.get(M.GRAD_NORM, {}), 0.75, 1.0))
        rows.append(f"| {name} | {len(cells)} | {_fmt(*before)} | {' | '.join(finals)} | {spread} | {_count(*sampled)} | "
                    f"{_count(*consumed)} | {_fmt(*entropy[0], 2)} -> {_fmt(*entropy[1], 2)} | "
                    f"{_fmt(*log_ratio, 2)} | {_fmt(*clipped, 4)} | {_fmt(*grad, 3)} |")
    return rows


def write_report(study) -> Path:
    """report.md and the plots in the study's directory, from every finished cell."""
    out = study.out
    out.mkdir(parents=True, exist_ok=True)
    finished = [c for c in study.cells if c.done]
    results = [CellResult(c) for c in finished]
    lines = group_lines(study, results)
    plots = write_plots(out, lines) if results else []
    text = [f"# Study {study.path.name}", "",
            f"Base config `{study.base}`; {len(finished)} of {len(study.cells)} cells finished; mean ± standard "
            f"error over the `{study.seed_axis}` axis. Rebuild with `oapl study {study.path} --report-only`.", "",
            "Final pass@k: each run's closing evaluation (`eval/eval.json`, after); generations sampled include "
            "groups dropped as stale (online), all-equal groups a dynamically sampled step skipped, or the whole "
            "offline dataset. Sequence entropy is the sampling "
            "policy's (the fleet's log-probs): in an offline round, or with L >= the run's steps, that stays the "
            "starting model throughout.", ""]
    text += _table(lines) if results else ["No cell has finished yet."]
    missing = [c.name for c in study.cells if not c.done]
    if missing:
        text += ["", f"Not finished ({len(missing)}): " + ", ".join(missing)]
    if results:
        text += ["", "## Runs", "", "| cell | pass@1 before | pass@1 final | generations sampled |",
                 "|---|---|---|---|"]
        for r in results:
            text.append(f"| {r.cell.name} | {_fmt(r.before.get(1, math.nan), math.nan)} | "
                        f"{_fmt(r.after.get(1, math.nan), math.nan)} | {r.generations(r.steps):.0f} |")
    if plots:
        text += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path
