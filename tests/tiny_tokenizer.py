"""A tiny byte-level BPE tokenizer.json in the real AF3 (Qwen2) format, generated in pure Python.

`write_tiny_tokenizer(directory)` learns `TINY_MERGES` merges from the built-in English text below
with the same split regex as the real tokenizer, then appends AF3's added tokens (`<|endoftext|>`,
`<|im_start|>`, `<|im_end|>`, ..., `<sound>`). The output is deterministic (ties between equally
frequent pairs go to the lexicographically smallest pair), so ids are stable across runs and
machines, and takes a few tens of milliseconds. HF `tokenizers` loads the file as it is.

Ids: 0..255 are the byte tokens (id = byte value), 256..256+TINY_MERGES-1 the merged tokens in
merge order, then the added tokens in AF3's order.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import regex

from af3.tokenizer import bytes_to_unicode

# The real AF3 tokenizer's pre-tokenizer split pattern (Qwen2).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# AF3's added tokens in id order, with their `special` flag (as in the real tokenizer.json).
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("[BOS]", True), ("[PAD]", True), ("<vila/sentinel>", True), ("<image>", True), ("<sound>", True),
]

TINY_MERGES = 300
TINY_BASE_VOCAB = 256 + TINY_MERGES  # 556 byte + merged tokens
TINY_TOKEN_IDS = {content: TINY_BASE_VOCAB + i for i, (content, _) in enumerate(ADDED_TOKENS)}
TINY_AUDIO_TOKEN_ID = TINY_TOKEN_IDS["<sound>"]  # 582
TINY_PAD_TOKEN_ID = TINY_TOKEN_IDS["<|endoftext|>"]  # 556
TINY_EOS_TOKEN_ID = TINY_TOKEN_IDS["<|im_end|>"]  # 558
TINY_VOCAB_SIZE = 600  # a round embedding size >= the highest id + 1 (583), as real checkpoints pad theirs

TRAINING_TEXT = """\
The system prompt tells the assistant what to do. The user asks a question about the audio, and the
assistant answers it in plain English. Transcribe the input speech. Describe the sound you hear in
this recording: is it music, speech, or something else? What instruments are playing, and what is the
mood of the song? The speaker talks about the weather, the city and the river; there is a dog barking
in the background and the sound of rain on the window. Please answer the questions with short,
clear sentences. It's a quiet evening, we're listening to the radio, they've been waiting for the
train since seven o'clock and I'll tell you when it arrives. She said that the concert was the best
thing she had heard this year. Audio Flamingo reads sound, speech and music and then writes text.
In 2025 the model was trained on 10 million clips of up to 10 minutes each.
    def transcribe(audio):
        return model.generate(audio, max_new_tokens=128)
"""


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    byte_char = bytes_to_unicode()
    words = Counter("".join(byte_char[b] for b in w.encode("utf-8")) for w in regex.findall(SPLIT_PATTERN, text))
    splits = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, parts in splits.items():
            for pair in pairwise(parts):
                pairs[pair] += words[w]
        if not pairs:
            raise ValueError(f"the training text only supports {len(merges)} merges, {n_merges} were asked")
        # Most frequent pair; ties to the smallest pair so the result never depends on dict order.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, parts in splits.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    return merges


def tiny_tokenizer_json() -> dict:
    """The tiny tokenizer as the dict that `write_tiny_tokenizer` saves."""
    byte_char = bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    merges = _learn_merges(TRAINING_TEXT, TINY_MERGES)
    for a, b in merges:
        if a + b in vocab:  # the same string reached by two merge paths would break id = 256 + rank
            raise ValueError(f"merge {a!r} + {b!r} repeats a token already in the vocabulary")
        vocab[a + b] = len(vocab)
    added = [{"id": TINY_TOKEN_IDS[c], "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": special} for c, special in ADDED_TOKENS]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }


def write_tiny_tokenizer(directory: str | Path) -> Path:
    """Write `tokenizer.json` (and a matching `tokenizer_config.json`) into `directory`; returns the json's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    path.write_text(json.dumps(tiny_tokenizer_json(), ensure_ascii=False, indent=1), encoding="utf-8")
    config = {"backend": "tokenizers", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "model_max_length": 8192, "tokenizer_class": "TokenizersBackend"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path
