"""Prompt building: ``<image>`` expansion, chat format, completion masks, truncation.

A prompt for the model is the chat-formatted user turn with every ``<image>`` replaced by
``<img>`` + ``<IMG_CONTEXT>`` x (tokens_per_tile * tiles) + ``</img>``, followed by the opened
assistant turn. The checkpoint tokenizer's chat template is used when there is one
(rendered with Jinja2 in a sandbox); otherwise ChatML. With ``think=True`` the assistant turn
is pre-filled with ``<think>\\n`` (added after the template's output unless it already ends
so). Truncation never cuts an image's tokens: a prompt longer than ``max_prompt_len`` is an
error for that sample (:class:`PromptTooLong`), while a completion is cut on the right.

Text from a dataset is never turned into special tokens. The tokenizer matches its added
tokens (``<|im_end|>``, ``<img>``, ``<IMG_CONTEXT>``, ...) anywhere in a string, so a question
that contains ``<IMG_CONTEXT>`` would make an image slot with no image, and one containing
``<|im_end|>`` would end the user turn early. Such text is refused for that sample
(:class:`SpecialTokenInText`, counted as ``special_token_in_text`` by the pipelines): we skip
rather than escape, because any escape changes the text the answer checker and reward model
compare against, and such records are rare. Completions may hold ``<think>``/``</think>``
(the format asks for them) and may end with one end-of-turn token (a sampled completion's
eos), which stands for the closing ``<|im_end|>``; any other special token in them is refused.
A question whose ``<image>`` placeholders do not match its images is
:class:`ImageCountMismatch`. All three are :class:`PromptError` with a ``reason`` for counting.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from r1v2_jax.data.tokenizer import END_THINK, ENDOFTEXT, IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, THINK

IMAGE_PLACEHOLDER = "<image>"
THINK_PREFILL = "<think>\n"


class PromptError(ValueError):
    """A sample whose text cannot become a prompt; ``reason`` is its skip-count category."""

    reason = "bad_prompt"


class PromptTooLong(PromptError):
    """The prompt (with its image tokens) does not fit in max_prompt_len."""

    reason = "prompt_too_long"


class ImageCountMismatch(PromptError):
    """The text's ``<image>`` placeholders do not match the record's images."""

    reason = "image_count_mismatch"


class SpecialTokenInText(PromptError):
    """Dataset text contains a special token's string (see the module docstring)."""

    reason = "special_token_in_text"


def find_special(text: str, reserved) -> str | None:
    """The first reserved token string found in ``text``, or None."""
    for t in reserved:
        if t in text:
            return t
    return None


def without_eos(completion: str) -> str:
    """A completion without its one trailing end-of-turn token (a sampled completion's eos)."""
    for end in (IM_END, ENDOFTEXT):
        if completion.endswith(end):
            return completion[: -len(end)]
    return completion


def expand_images(text: str, tiles_per_image: list[int], tokens_per_tile: int) -> str:
    """Replace the i-th ``<image>`` by ``<img>`` + ``<IMG_CONTEXT>`` x (tokens_per_tile * tiles_i)
    + ``</img>``. The number of placeholders must equal the number of images."""
    n = text.count(IMAGE_PLACEHOLDER)
    if n != len(tiles_per_image):
        raise ImageCountMismatch(
            f"prompt has {n} {IMAGE_PLACEHOLDER} placeholder(s) for {len(tiles_per_image)} image(s)"
        )
    for tiles in tiles_per_image:
        text = text.replace(IMAGE_PLACEHOLDER, IMG_START + IMG_CONTEXT * (tokens_per_tile * tiles) + IMG_END, 1)
    return text


def chatml(user: str, think: bool = True) -> str:
    """ChatML with the assistant turn opened (and ``<think>\\n`` pre-filled for reasoning)."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n" + (THINK_PREFILL if think else "")


def render_template(template: str, user: str) -> str:
    """Render an HF chat template for one user message with the generation prompt."""

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[{"role": "user", "content": user}], add_generation_prompt=True, bos_token="", eos_token=IM_END
    )


@dataclasses.dataclass
class PromptBuilder:
    """Turns questions (and completions) into token ids for one tokenizer and model config."""

    tokenizer: object  # tokenizers.Tokenizer
    tokens_per_tile: int
    template: str | None = None
    think: bool = True
    max_prompt_len: int = 4096
    max_completion_len: int = 2048
    _reserved: tuple[str, ...] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def reserved(self) -> tuple[str, ...]:
        """Every added token's string of this tokenizer (and the chat and image tokens)."""
        if self._reserved is None:
            found = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
            found |= {ENDOFTEXT, IM_START, IM_END, THINK, END_THINK, IMG_START, IMG_END, IMG_CONTEXT}
            self._reserved = tuple(sorted(found, key=lambda t: (-len(t), t)))
        return self._reserved

    def prompt_text(self, question: str, tiles_per_image: list[int]) -> str:
        token = find_special(question, self.reserved())
        if token is not None:
            raise SpecialTokenInText(f"the prompt text contains the special token {token!r}")
        if tiles_per_image and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER * len(tiles_per_image) + "\n" + question
        user = expand_images(question, tiles_per_image, self.tokens_per_tile)
        if self.template is None:
            return chatml(user, self.think)
        text = render_template(self.template, user)
        if self.think:
            # Templates that pre-fill <think> themselves may lose the newline (Jinja drops a
            # template's trailing newline): normalise to exactly one "<think>\n".
            if text.rstrip("\n").endswith("<think>"):
                text = text.rstrip("\n") + "\n"
            else:
                text += THINK_PREFILL
        return text

    def encode_prompt(self, question: str, tiles_per_image: list[int]) -> list[int]:
        ids = self.tokenizer.encode(self.prompt_text(question, tiles_per_image), add_special_tokens=False).ids
        if len(ids) > self.max_prompt_len:
            raise PromptTooLong(
                f"prompt has {len(ids)} tokens (images included) > max_prompt_len "
                f"{self.max_prompt_len}; images are never cut"
            )
        return ids

    def completion_special_token(self, completion: str) -> str | None:
        """The special token a completion holds that it may not (see :meth:`encode_completion`), or None."""
        return find_special(without_eos(completion), [t for t in self.reserved() if t not in (THINK, END_THINK)])

    def encode_completion(self, completion: str, close: bool = True) -> tuple[list[int], bool]:
        """Completion ids (with ``<|im_end|>`` when ``close``) and whether they were truncated.

        A completion that repeats the pre-filled ``<think>\\n`` has it removed (the prompt
        already holds it); one trailing ``<|im_end|>`` / ``<|endoftext|>`` (a sampled
        completion's eos) is the closing token itself. Other special tokens are refused."""
        if self.think and completion.startswith(THINK_PREFILL):
            completion = completion[len(THINK_PREFILL) :]
        completion = without_eos(completion)
        token = self.completion_special_token(completion)
        if token is not None:
            raise SpecialTokenInText(f"the completion text contains the special token {token!r}")
        ids = self.tokenizer.encode(completion + (IM_END if close else ""), add_special_tokens=False).ids
        if len(ids) > self.max_completion_len:
            return ids[: self.max_completion_len], True
        return ids, False

    def encode_pair(self, question: str, completion: str, tiles_per_image: list[int]):
        """(ids i32[P+C], loss_mask bool[P+C] True exactly at completion tokens, truncated)."""
        p = self.encode_prompt(question, tiles_per_image)
        c, truncated = self.encode_completion(completion)
        ids = np.asarray(p + c, np.int32)
        mask = np.zeros(len(ids), bool)
        mask[len(p) :] = True
        return ids, mask, truncated
