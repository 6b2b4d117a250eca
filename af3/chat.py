"""Chat template: a conversation (list of messages) -> AF3's prompt string, written out by hand.

The format the checkpoint was trained on (Qwen2's ChatML plus AF3's `<sound>` placeholder):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n   (only when the first message is not a system message)
    <|im_start|>{role}\\n{<sound> per audio item}{text items concatenated}<|im_end|>\\n   (per message)
    <|im_start|>assistant\\n                                        (when add_generation_prompt)

A message is `{"role": ..., "content": ...}`; content is a string, or a list of items
`{"type": "text", "text": ...}` and `{"type": "audio", "audio" | "path" | "url": ...}`.

This renders the same string as the checkpoint's `chat_template.jinja` for every conversation
that template handles, with one difference: we emit one `<sound>` per audio item, while the
jinja template emits one per message however many clips it holds, so two clips in one message
cannot work there. Here they do: each `<sound>` later expands to its own clip's tokens.
"""

from __future__ import annotations

from typing import Any

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")
AUDIO_KEYS = ("audio", "path", "url")  # where an audio item may keep its source, as in HF
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

Message = dict[str, Any]


def turn(role: str, body: str) -> str:
    """One ChatML turn: `<|im_start|>{role}\n{body}<|im_end|>\n`."""
    return f"{IM_START}{role}\n{body}{IM_END}\n"


GENERATION_PROMPT = f"{IM_START}assistant\n"  # opens the turn the model writes


def next_user_turn(text: str) -> str:
    """What follows a generated reply (which stops before its `<|im_end|>`) to ask `text` next:
    the reply's closing, the user's turn, and the opening of the next reply."""
    return f"{IM_END}\n{turn('user', text)}{GENERATION_PROMPT}"


def render_conversation(messages: list[Message], *, add_generation_prompt: bool = True,
                        audio_token: str = "<sound>") -> str:
    """Render one conversation as AF3's prompt string (one `audio_token` per audio item).

    The audio placeholders of a message come first, then its text items in order, as in the
    checkpoint's template. Malformed input raises TypeError (a wrong type) or ValueError, naming
    the message and item.
    """
    check_conversation(messages)
    parts = []
    if messages[0]["role"] != "system":
        parts.append(turn("system", DEFAULT_SYSTEM_PROMPT))
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            body = content
        else:
            n_audio = sum(1 for item in content if item["type"] == "audio")
            text = "".join(item["text"] for item in content if item["type"] == "text")
            body = audio_token * n_audio + text
        parts.append(turn(message["role"], body))
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    return "".join(parts)


def conversation_audio(messages: list[Message]) -> list[Any]:
    """The audio sources of a conversation, in the order their placeholders appear in the prompt."""
    check_conversation(messages)
    sources = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            continue
        for item in content:
            if item["type"] == "audio":
                sources.append(next(item[key] for key in AUDIO_KEYS if key in item))
    return sources


def is_conversation(obj: Any) -> bool:
    """True for one conversation (a list of message dicts), False for a list of conversations."""
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and isinstance(obj[0], dict)


def check_conversation(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("the conversation is empty: it needs at least one message")
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise TypeError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"{where} has no {key!r} key; a message is {{'role': ..., 'content': ...}}")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; AF3 knows the roles {', '.join(ROLES)}")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise TypeError(f"{where}: content must be a string or a list of items, "
                            f"got {type(content).__name__}")
        for j, item in enumerate(content):
            _check_item(item, f"{where}, item {j}")


def _check_item(item: Any, where: str) -> None:
    if not isinstance(item, dict):
        raise TypeError(f"{where} must be a dict like {{'type': 'text', 'text': ...}}, got {type(item).__name__}")
    kind = item.get("type")
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise ValueError(f"{where}: a text item needs a string under 'text', got {item.get('text')!r}")
    elif kind == "audio":
        found = [key for key in AUDIO_KEYS if key in item]
        if len(found) != 1:
            raise ValueError(f"{where}: an audio item needs exactly one of 'audio', 'path' or 'url', "
                             f"found {found or 'none'}")
        if item[found[0]] is None:
            raise ValueError(f"{where}: the audio item's {found[0]!r} is None; give a path, URL, bytes or array")
    else:
        raise ValueError(f"{where} has type {kind!r}; AF3 takes 'text' and 'audio' items")
