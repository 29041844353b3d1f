"""Format reward: exactly one ``<think>…</think>`` block followed by a non-empty answer.

The known pitfall: when the prompt pre-fills ``<think>\\n`` the completion starts inside the
thinking block and contains no ``<think>`` of its own. With ``prefilled=True`` (the default,
matching our prompts) the completion must contain no ``<think>`` and exactly one
``</think>``; with ``prefilled=False`` it must start with ``<think>`` and contain exactly one
of each. Patterns are configurable, and an optional regex constrains the answer
(e.g. ``\\\\boxed\\{``).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class FormatConfig:
    open_tag: str = "<think>"
    close_tag: str = "</think>"
    prefilled: bool = True
    answer_pattern: str | None = None  # regex the answer must contain (None: any non-empty answer)
    end_tokens: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")


def format_reward(completion: str, cfg: FormatConfig = FormatConfig()) -> float:
    text = completion
    for t in cfg.end_tokens:
        text = text.replace(t, "")
    n_open, n_close = text.count(cfg.open_tag), text.count(cfg.close_tag)
    if cfg.prefilled:
        if n_open != 0 or n_close != 1:
            return 0.0
    else:
        if n_open != 1 or n_close != 1 or not text.lstrip().startswith(cfg.open_tag):
            return 0.0
    thinking, answer = text.split(cfg.close_tag, 1)
    if not thinking.replace(cfg.open_tag, "").strip():
        return 0.0  # an empty reasoning block
    answer = answer.strip()
    if not answer:
        return 0.0
    if cfg.answer_pattern is not None and not re.search(cfg.answer_pattern, answer):
        return 0.0
    return 1.0
