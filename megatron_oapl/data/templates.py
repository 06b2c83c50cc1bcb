"""Prompt templates: how a question becomes the text the policy continues.

`data.chat_template` may be:
- null: the tokenizer's own chat template if it has one, else `plain` (`render_prompt`); without a
  tokenizer (`apply_template`) always `plain`;
- a name in `TEMPLATES`: `plain` ("{question}\\nAnswer:", for tiny models trained from scratch) or
  `chatml` (Qwen-style `<|im_start|>` turns);
- `hf`: the tokenizer's own chat template (`tokenizer.apply_chat_template`, one user turn, generation
  prompt added) — needs `render_prompt`;
- a path to a Jinja file: rendered as a chat template through the tokenizer (needs `render_prompt`);
- a literal format string containing `{question}` (only that placeholder is substituted, so other
  braces in the string stay as they are).

The question text is substituted verbatim (never `str.format`-ed), so braces in questions are safe.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_oapl.config import ConfigError

__all__ = ["TEMPLATES", "apply_template", "render_prompt"]

TEMPLATES: dict[str, str] = {
    "plain": "{question}\nAnswer:",
    "chatml": "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
}
_PLACEHOLDER = "{question}"
_ALLOWED = "null, " + ", ".join(TEMPLATES) + ", hf, a Jinja file path, or a string containing '{question}'"


def _fill(template: str, text: str) -> str:
    return template.replace(_PLACEHOLDER, text)


def _is_jinja_file(template: str) -> bool:
    return (_PLACEHOLDER not in template and "\n" not in template and os.path.isfile(template))


def apply_template(template: str | None, prompt_text: str) -> str:
    """The prompt text under a template that needs no tokenizer (None = `plain`).

    Raises ValueError naming data.chat_template for unknown names, and for `hf` / Jinja files (use
    `render_prompt`, which has the tokenizer).
    """
    if template is None:
        return _fill(TEMPLATES["plain"], prompt_text)
    if template in TEMPLATES:
        return _fill(TEMPLATES[template], prompt_text)
    if _PLACEHOLDER in template:
        return _fill(template, prompt_text)
    if template == "hf" or _is_jinja_file(template):
        raise ValueError(f"data.chat_template={template!r} is rendered through the tokenizer; use "
                         "render_prompt(tokenizer, template, text)")
    raise ConfigError(f"data.chat_template={template!r} is not a known template (allowed: {_ALLOWED})")


def render_prompt(tokenizer: Any, template: str | None, prompt_text: str) -> str:
    """The prompt text under `template`, using the tokenizer's chat template for null / `hf` / Jinja files.

    null picks the tokenizer's own chat template when it has one and `plain` otherwise.
    """
    has_chat = getattr(tokenizer, "chat_template", None) is not None
    jinja: str | None = None
    if template is None:
        if not has_chat:
            return apply_template(None, prompt_text)
    elif template == "hf":
        if not has_chat:
            raise ConfigError("data.chat_template='hf' needs a tokenizer with a chat template; this one has "
                              f"none (allowed here: {_ALLOWED.replace('hf, ', '')})")
    elif template in TEMPLATES or _PLACEHOLDER in template:
        return apply_template(template, prompt_text)
    elif _is_jinja_file(template):
        with open(template, encoding="utf-8") as f:
            jinja = f.read()
    else:
        raise ConfigError(f"data.chat_template={template!r} is not a known template (allowed: {_ALLOWED})")
    kwargs = {"chat_template": jinja} if jinja is not None else {}
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt_text}], tokenize=False,
                                         add_generation_prompt=True, **kwargs)
