"""`reasoning_gym` reward: the task's own `score_answer`, from reasoning-gym itself.

The task is `prompt.metadata["task"]`; the entry `score_answer(answer, entry)` sees is rebuilt from the
prompt: question = `prompt.text` (or `metadata["question"]`), answer = `prompt.answer`, metadata =
`metadata["entry_metadata"]` — exactly what `data.prompts.load_prompts` stores for source=reasoning_gym.

Answer extraction (`extract_answer`):
1. strip surrounding whitespace;
2. if the completion holds `<answer>...</answer>`, the content of the last such tag (reasoning-gym's own
   `utils.extract_answer` rule, stripped);
3. otherwise the completion up to its first newline, or up to the first end-of-sequence marker that
   survived decoding (`</s>`, `<|im_end|>`, `<|endoftext|>`, `<|eot_id|>`), whichever comes first.
Small models answer "= 12" style prompts on one line; anything after that line is not the answer.

The raw score can be partial credit (chain_sum gives len(answer)/len(completion) when the completion
merely contains the answer); `rewards.binarize=true` (`registry.validate_score`) turns that into 0.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

from megatron_oapl.rewards.registry import register_reward
from megatron_oapl.rollout.types import Prompt

__all__ = ["extract_answer", "reasoning_gym_reward", "score_answer_fn"]

EOS_MARKERS = ("</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>")
_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", flags=re.DOTALL)


def extract_answer(completion: str) -> str:
    """The answer part of a completion (see the module docstring for the rule)."""
    text = completion.strip()
    tagged = _ANSWER_TAG.findall(text)
    if tagged:
        return tagged[-1].strip()
    cut = len(text)
    for marker in ("\n", *EOS_MARKERS):
        pos = text.find(marker)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut].strip()


@functools.lru_cache(maxsize=None)
def score_answer_fn(task: str) -> Callable[[str | None, dict[str, Any]], float]:
    """reasoning-gym's `score_answer` of `task` (built once per task; the dataset's default config)."""
    import reasoning_gym  # here: importing reasoning-gym takes seconds

    if hasattr(reasoning_gym, "get_score_answer_fn"):
        return reasoning_gym.get_score_answer_fn(task)
    return reasoning_gym.create_dataset(task).score_answer  # older releases


@register_reward("reasoning_gym")
def reasoning_gym_reward(completion_text: str, prompt: Prompt) -> float:
    """score_answer(extracted answer, entry rebuilt from the prompt) of the task in metadata["task"]."""
    meta = prompt.metadata or {}
    task = meta.get("task")
    if not task:
        raise ValueError(f"prompt {prompt.prompt_id} has no metadata['task'] (the reasoning-gym dataset "
                         "name); the reasoning_gym reward needs prompts from data.source=reasoning_gym")
    entry = {
        "question": prompt.text or meta.get("question", ""),
        "answer": prompt.answer,
        "metadata": meta.get("entry_metadata", {}),
    }
    return float(score_answer_fn(task)(extract_answer(completion_text), entry))
