"""The HH-RLHF dialogue format, in one place: '\\n\\nHuman: ...\\n\\nAssistant: ...' turns.

Used by the dataset loaders (wrap a bare instruction, cut a dialogue before its answer), the chat
template path (HH turns -> user / assistant messages), the testbeds' corpora, prompts and rewards.
Plain string functions: no tqstar imports.
"""

from __future__ import annotations

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def is_hh(text: str) -> bool:
    """Already an HH prompt: starts with a Human turn and ends with an open Assistant turn."""
    return text.lstrip("\n ").startswith(HUMAN.strip("\n")) and text.rstrip().endswith(ASSISTANT.strip("\n"))


def wrap(instruction: str) -> str:
    """A bare instruction as a one-turn HH prompt (text already in HH format is kept as is)."""
    if is_hh(instruction):
        return instruction
    return f"{HUMAN} {instruction.strip()}{ASSISTANT}"


def prompt_of_dialogue(dialogue: str) -> str | None:
    """The prompt of a whole HH conversation: the text up to and including its last Assistant marker."""
    cut = dialogue.rfind(ASSISTANT)
    return None if cut == -1 else dialogue[: cut + len(ASSISTANT)]


def last_human_turn(prompt: str) -> str:
    """The text of the last Human turn (what the user asked last)."""
    return prompt.rsplit(HUMAN, 1)[-1].split(ASSISTANT, 1)[0]


def to_messages(prompt: str) -> list[dict] | None:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> user/assistant turns; None if not HH format."""
    text = prompt.strip("\n ")
    if not is_hh(prompt):
        return None
    messages: list[dict] = []
    rest = "\n\n" + text
    roles = {HUMAN: "user", ASSISTANT: "assistant"}
    while rest:
        marker = HUMAN if rest.startswith(HUMAN) else ASSISTANT if rest.startswith(ASSISTANT) else None
        if marker is None:
            return None
        rest = rest[len(marker) :]
        ends = [i for i in (rest.find(HUMAN), rest.find(ASSISTANT)) if i != -1]
        end = min(ends) if ends else len(rest)
        messages.append({"role": roles[marker], "content": rest[:end].strip()})
        rest = rest[end:]
    if messages[-1]["role"] != "assistant" or messages[-1]["content"]:
        return None
    return messages[:-1]  # the empty last Assistant turn is what the model writes
