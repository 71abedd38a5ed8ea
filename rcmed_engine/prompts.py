"""What the model reads and answers: prompt parsing and the released conversation templates.

The templates follow SYRE_SPEC §3.4 to the character, the double space before "ASSISTANT:" included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<im_start>", "<im_end>"
SEG_TOKEN, P_START, P_END = "[SEG]", "<p>", "</p>"
# Order matters: the released vocabulary gives these ids 32000..32006 (SYRE_SPEC §2).
ADDED_TOKENS = (IM_START, IM_END, "<bbox>", "<point>", SEG_TOKEN, P_START, P_END)

MAX_PROMPT_CHARS = 500

MED_SEG_QUESTIONS = (
    "Can you segment the {class_name} in this {modality} image? {description}",
    "Please segment {class_name} in this {modality} image. {description}",
    "What is {class_name} in this {modality} image? Please respond with segmentation mask. {description}",
    "What is {class_name} in this {modality} image? Please output segmentation mask. {description}",
    "Could you provide a segmentation mask for the {class_name} in this {modality} image? {description}",
    "Please identify and segment the {class_name} in this {modality} image. {description}",
    "Can you highlight the {class_name} in this {modality} image with a segmentation mask? {description}",
)

PREFIX_TEMPLATE = "{system} USER: The " + IM_START + IMAGE_TOKEN + IM_END + " provides an overview of the picture.\n"
POSITIVE_WORD = "contains"
NEGATIVE_WORD = "does not contain"


class PromptError(ValueError):
    """A prompt the model cannot be asked."""


_LEADING_VERBS = re.compile(
    r"^(?:please\s+)?(?:(?:segment|find|show|highlight|outline|delineate|mark|label|detect|locate)\b\s*(?:me\s+)?)?"
    r"(?:(?:the|all|all the|a|an)\s+)?",
    re.IGNORECASE,
)
_SPLIT = re.compile(r"\s*(?:,|;|\band\b|&|\+)\s*", re.IGNORECASE)


def parse_targets(prompt: str) -> list[str]:
    """Split a prompt such as "segment the liver, spleen and left kidney" into its targets.

    Returns the target names in order, with leading verbs and articles removed and duplicates dropped.
    """
    if not isinstance(prompt, str):
        raise PromptError("the prompt must be text")
    text = " ".join(prompt.split())
    if not text:
        raise PromptError("the prompt is empty: name what to segment, e.g. 'liver'")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"the prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    text = text.rstrip(".!? ")
    targets: list[str] = []
    for part in _SPLIT.split(text):
        name = _LEADING_VERBS.sub("", part.strip()).strip(" .")
        # Angle brackets and the [SEG] marker are the model's own syntax; never let a prompt inject them.
        name = re.sub(r"<[^<>]*>|\[[^\[\]]*\]|[<>\[\]]", " ", name)
        name = " ".join(name.split())
        if name and name.lower() not in (t.lower() for t in targets):
            targets.append(name)
    if not targets:
        raise PromptError(f"no target found in the prompt {prompt!r}: name what to segment, e.g. 'liver'")
    if not any(ch.isalnum() for ch in "".join(targets)):
        raise PromptError(f"the prompt {prompt!r} names nothing to segment")
    return targets


def _display(name: str) -> str:
    return name.replace("_", " ")


def build_question(targets: list[str], modality_text: str, question_index: int = 0) -> str:
    class_name = ", ".join(_display(t) for t in targets).lower()
    return MED_SEG_QUESTIONS[question_index].format(class_name=class_name, modality=modality_text, description="")


def _items(targets: list[str], with_seg: bool) -> str:
    items = [f"{P_START} {_display(t)} {P_END}" + (f" {SEG_TOKEN}" if with_seg else "") for t in targets]
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def build_answer(targets: list[str], modality_text: str, present: bool = True) -> str:
    """The teacher-forced answer. Positive: one [SEG] per target, in order (SYRE_SPEC §3.4)."""
    head = f"This is a {P_START} {modality_text} {P_END} image."
    if not targets:
        return head
    if present:
        return f"{head} The image {POSITIVE_WORD} {_items(targets, with_seg=True)}."
    return f"{head} The image {NEGATIVE_WORD} {_items(targets, with_seg=False)}."


@dataclass(frozen=True)
class Conversation:
    """A conversation split where the prefix cache splits it.

    ``prefix`` holds the image placeholder and does not depend on the prompt; ``suffix`` is the rest.
    """

    prefix: str
    suffix: str

    @property
    def text(self) -> str:
        return self.prefix + self.suffix


def build_conversation(system: str, question: str, answer: str, eos: str = "</s>") -> Conversation:
    return Conversation(prefix=PREFIX_TEMPLATE.format(system=system), suffix=f"{question} ASSISTANT: {answer}{eos}")
