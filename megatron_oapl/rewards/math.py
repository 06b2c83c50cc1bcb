"""`math` reward: math-verify's equivalence check of the completion's final answer against the gold one.

- Gold: `prompt.answer` (str or number). Without LaTeX delimiters (`$`, `\\(`, `\\[`, `\\boxed`) it is
  wrapped in `$...$` so plain numbers and expressions ("0.5", "1/2", "x+1") parse as LaTeX.
- Prediction: the content of the last `<answer>...</answer>` tag if there is one, else the whole
  completion; math-verify's extraction then prefers the last `\\boxed{}` and falls back to the final
  expression in the text.
- 1.0 if `verify(gold, pred)` else 0.0. A gold answer math-verify cannot parse raises (a data problem the
  scorer counts as an error); an unparseable prediction scores 0.

math-verify's own timeouts use `signal.alarm`, which only works in the main thread and would fight the
caller's own limit, so they are switched off here (`parsing_timeout=None`,
`timeout_seconds=None`) and the caller bounds the call instead (the engines' reward pool kills a worker
process that runs past rewards.timeout_s).
"""

from __future__ import annotations

import logging
import re

from megatron_oapl.rewards.registry import register_reward
from megatron_oapl.rollout.types import Prompt

__all__ = ["math_reward", "gold_latex"]

_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", flags=re.DOTALL)

# math-verify warns once per process that its (signal) timeout is off; that is deliberate here. Only
# quieten it when nobody configured that logger.
if logging.getLogger("math_verify").level == logging.NOTSET:
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def gold_latex(answer: object) -> str:
    """The gold answer as text math-verify parses: wrapped in $...$ unless it already has delimiters."""
    text = str(answer).strip()
    if any(d in text for d in _DELIMITERS):
        return text
    return f"${text}$"


@register_reward("math")
def math_reward(completion_text: str, prompt: Prompt) -> float:
    """1.0 if the completion's final answer equals prompt.answer by math-verify, else 0.0."""
    from math_verify import parse, verify  # here: math-verify pulls in sympy

    if prompt.answer is None or str(prompt.answer).strip() == "":
        raise ValueError(f"prompt {prompt.prompt_id} has no answer; the math reward needs prompt.answer")
    gold = parse(gold_latex(prompt.answer), parsing_timeout=None)
    if not gold:
        raise ValueError(f"math-verify could not parse the gold answer {prompt.answer!r} of prompt "
                         f"{prompt.prompt_id}")
    tagged = _ANSWER_TAG.findall(completion_text)
    pred_text = tagged[-1] if tagged else completion_text
    pred = parse(pred_text, parsing_timeout=None)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0
