"""Processor: prompts + audio -> the model's inputs, as HF's AudioFlamingo3Processor makes them.

    text "...<sound>..."  ─ tokenize ─ expand each <sound> to its clip's token count ─ pad ─> input_ids, attention_mask
    audio (paths, URLs, arrays, tensors) ─ load_audio ─ 30 s windows ─ log-mel ─> input_features, input_features_mask

A clip of n samples expands to `af3.windows.audio_token_count(n)` `<sound>` tokens (750 per full
30 s window); the model later swaps each of them for one projected audio frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from af3.audio import load_audio
from af3.chat import (
    IM_END,
    IM_START,
    conversation_audio,
    is_conversation,
    render_conversation,
)
from af3.config import is_int, is_integer, is_real
from af3.frontend import N_MELS
from af3.mel import extract_features
from af3.windows import (
    check_gives_a_token,
    mel_length,
    window_ranges,
    window_token_count,
)

if TYPE_CHECKING:
    from af3.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label value the loss skips (torch.nn.functional.cross_entropy's default)
DEFAULT_TRANSCRIPTION_PROMPT = "Transcribe the input speech."
# How AF3 frames a transcription, e.g. `The spoken content of the audio is "hello".`
TRANSCRIPTION_PREFIXES = (
    "The spoken content of the audio is",
    "The transcription of the audio is",
    "The content of the input audio is",
)


class BatchFeature(dict):
    """The processor's output: a dict of tensors, also readable as attributes (`inputs.input_ids`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no {name!r}; it holds {sorted(self)}") from None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BatchFeature:
        """Move every tensor to `device`; cast only the floating-point ones to `dtype`. Returns self."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {e}") from None
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                self[key] = value.to(device=device, dtype=cast)
        return self


class Processor:
    """Turns prompts and audio into model inputs, with the same names and values as HF's processor.

    `tokenizer` is an `af3.tokenizer.Tokenizer` (anything with its `encode`/`decode`/`pad_token_id`
    will do); `num_mel_bins` is the encoder's (`AudioConfig.num_mel_bins`); `max_length` (the text model's context,
    or None for no check) turns a prompt that could not fit into a ValueError here rather than a
    failure deep inside the model.
    """

    def __init__(self, tokenizer: Tokenizer, num_mel_bins: int = N_MELS, audio_token: str = "<sound>",
                 max_length: int | None = None,
                 default_transcription_prompt: str = DEFAULT_TRANSCRIPTION_PROMPT) -> None:
        if not is_int(num_mel_bins):
            raise TypeError(f"num_mel_bins must be a positive int, got {num_mel_bins!r}")
        if num_mel_bins <= 0:
            raise ValueError(f"num_mel_bins must be a positive int, got {num_mel_bins}")
        if not isinstance(audio_token, str) or not audio_token:
            raise TypeError(f"audio_token must be a non-empty string, got {audio_token!r}")
        if max_length is not None and (not is_int(max_length) or max_length <= 0):
            raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
        ids = tokenizer.encode(audio_token)
        if len(ids) != 1:
            raise ValueError(f"audio_token {audio_token!r} is not a single token of this tokenizer "
                             f"(it encodes to {ids}); it must be one of the tokenizer's added tokens")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; the processor pads batches with it")
        self.tokenizer = tokenizer
        self.num_mel_bins = num_mel_bins
        self.audio_token = audio_token
        self.audio_token_id: int = ids[0]
        self.max_length = max_length
        self.default_transcription_prompt = default_transcription_prompt

    # ---- prompts + audio -> tensors ----------------------------------------------------------

    def __call__(self, text: str | Sequence[str], audio: Any = None, output_labels: bool | str = False,
                 padding_side: str = "left", sampling_rate: int | None = None) -> BatchFeature:
        """Tokenize `text`, expand its `<sound>` placeholders, and compute the audio features.

        `text` is one prompt or a list. `audio` is None, one clip per prompt, or a list of clips per
        prompt (None or [] for a prompt without audio); a clip is a path, an http(s) URL, encoded
        bytes, or a numpy array / torch tensor of samples at `sampling_rate` (default 16 kHz).
        Placeholders of a prompt, in order:
          - one `<sound>` per clip: each expands to that clip's token count;
          - a prompt with exactly one clip may instead carry one `<sound>` per 30 s window;
          - a prompt with clips but no `<sound>` gets all their tokens put in front of its text;
          - anything else is a ValueError naming the prompt and both counts.
        A clip too short to give even one token (320 samples or fewer; HF's processor would drop it
        silently) is a ValueError.
        `output_labels`: False (none), True (as HF makes them: the token ids, with IGNORE_INDEX
        (-100) at audio tokens and at every pad-token id, padding included), or "assistant"
        (the same, but also IGNORE_INDEX everywhere outside assistant turns: only the tokens an
        assistant wrote, and the `<|im_end|>` closing each turn, are learned; the usual fine-tuning
        choice; a token that holds both the header's newline and the reply's first characters
        counts as reply). Returns `input_ids`, `attention_mask`, and with audio `input_features` (float32,
        (total_windows, n_mels, n_frames)) and `input_features_mask`, plus `labels` when asked.
        """
        texts = _as_texts(text)
        if output_labels not in (False, True, "assistant"):
            raise ValueError(f"output_labels must be False, True or 'assistant', got {output_labels!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        clips = self._load_clips(audio, len(texts), sampling_rate)

        rows = [self._expand(i, t, c) for i, (t, c) in enumerate(zip(texts, clips))]
        if self.max_length is not None:
            for i, ids in enumerate(rows):
                if len(ids) > self.max_length:
                    raise ValueError(f"sample {i}: the prompt is {len(ids)} tokens (audio included) but the "
                                     f"text model's context is {self.max_length} tokens; shorten the text "
                                     "or the audio")

        input_ids, attention_mask = self._pad(rows, padding_side)
        out = BatchFeature(input_ids=input_ids, attention_mask=attention_mask)
        flat = [clip for sample in clips for clip in sample]
        if flat:
            # load_audio has checked every clip for NaN/inf already. Warns when a clip is truncated.
            features = extract_features(flat, self.num_mel_bins, check_finite=False)
            out["input_features"] = features.input_features
            out["input_features_mask"] = features.input_features_mask
        if output_labels:
            labels = input_ids.clone()
            labels[input_ids == self.audio_token_id] = IGNORE_INDEX
            labels[input_ids == self.tokenizer.pad_token_id] = IGNORE_INDEX  # as HF: padding and any pad id
            if output_labels == "assistant":
                keep, _ = self._pad([self._assistant_positions(ids) for ids in rows], padding_side, 0)
                labels[keep == 0] = IGNORE_INDEX
            out["labels"] = labels
        return out

    def _load_clips(self, audio: Any, n_texts: int, sampling_rate: int | None) -> list[list[torch.Tensor]]:
        """Per prompt, its clips as 1-D float32 16 kHz tensors."""
        if audio is None:
            return [[] for _ in range(n_texts)]
        if isinstance(audio, (list, tuple)) and audio and all(is_real(x) for x in audio):
            raise TypeError(f"audio is a list of {len(audio)} numbers; pass a clip's samples as a numpy array or "
                            "a torch tensor (a list holds one clip, or a list of clips, per text)")
        if not isinstance(audio, (list, tuple)):
            if n_texts != 1:
                raise TypeError(f"got {n_texts} texts but a single {type(audio).__name__} as audio; "
                                "pass a list with one clip (or a list of clips) per text")
            audio = [audio]
        if len(audio) != n_texts:
            raise ValueError(f"got {n_texts} text(s) but {len(audio)} audio entries; they must match 1:1 "
                             "(for several clips in one text, give that text a list of clips)")
        clips = []
        for i, entry in enumerate(audio):
            entry = [] if entry is None else entry if isinstance(entry, (list, tuple)) else [entry]
            clips.append([_load(source, sampling_rate, f"clip {j} of sample {i}") for j, source in enumerate(entry)])
        return clips

    def _window_tokens(self, clip: torch.Tensor) -> list[int]:
        """<sound> tokens of each of a clip's 30 s windows."""
        return [window_token_count(mel_length(end - start)) for start, end in window_ranges(clip.shape[0])]

    def _expand(self, index: int, text: str, clips: list[torch.Tensor]) -> list[int]:
        """Token ids of one prompt, each `<sound>` repeated as many times as its audio has tokens."""
        ids = self.tokenizer.encode(text)
        # `<sound>` is an added token, so it encodes alone whatever surrounds it: expanding it in
        # the ids gives the same result as expanding it in the text, without re-tokenizing.
        found = ids.count(self.audio_token_id)
        for j, clip in enumerate(clips):
            check_gives_a_token(clip.shape[0], f"clip {j} of sample {index}")
        per_clip = [self._window_tokens(clip) for clip in clips]
        if not clips:
            if found:
                raise ValueError(f"sample {index}: found {found} placeholders but no audio was given")
            return ids
        if found == 0:
            return [self.audio_token_id] * sum(map(sum, per_clip)) + ids
        if found == len(clips):
            counts = [sum(windows) for windows in per_clip]
        elif len(clips) == 1 and found == len(per_clip[0]):
            counts = per_clip[0]
        elif len(clips) == 1:
            raise ValueError(f"sample {index}: found {found} placeholders but audio was split into "
                             f"{len(per_clip[0])} window(s); use one {self.audio_token} for the clip, one "
                             "per 30 s window, or none")
        else:
            raise ValueError(f"sample {index}: found {found} placeholders but {len(clips)} audio clips "
                             f"were given; use one {self.audio_token} per clip, or none")
        expanded: list[int] = []
        counts_iter = iter(counts)
        for token in ids:
            if token == self.audio_token_id:
                expanded.extend([token] * next(counts_iter))
            else:
                expanded.append(token)
        return expanded

    def _pad(self, rows: list[list[int]], padding_side: str,
             value: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows -> (B, T) int64 padded with `value` (default: the pad token), and the (B, T) attention mask."""
        longest = max(len(r) for r in rows)
        value = self.tokenizer.pad_token_id if value is None else value
        ids = torch.full((len(rows), longest), value, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            cols = slice(longest - len(row), longest) if padding_side == "left" else slice(0, len(row))
            ids[i, cols] = torch.tensor(row, dtype=torch.long)
            mask[i, cols] = 1
        return ids, mask

    def _assistant_positions(self, ids: list[int]) -> list[int]:
        """1 where a token belongs to an assistant turn's content or its closing <|im_end|>, else 0."""
        im_start, im_end = self._chat_token_id(IM_START), self._chat_token_id(IM_END)
        keep = [0] * len(ids)
        p = 0
        while p < len(ids):
            if ids[p] != im_start:
                p += 1
                continue
            # The header is the role and a newline; read tokens until the newline shows up.
            q, header = p + 1, ""
            while q < len(ids) and "\n" not in header and ids[q] not in (im_start, im_end):
                header = self.tokenizer.decode(ids[p + 1: q + 1])
                q += 1
            role, newline, rest = header.partition("\n")
            if role != "assistant" or not newline:
                p = q
                continue
            start = q - 1 if rest else q  # a token that holds the newline and content too counts as content
            end = q
            while end < len(ids) and ids[end] != im_end:
                end += 1
            for k in range(start, min(end + 1, len(ids))):  # content and its <|im_end|>
                keep[k] = 1
            p = end + 1
        return keep

    def _chat_token_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token)
        if len(ids) != 1:
            raise ValueError(f"output_labels='assistant' needs {token!r} to be one token of the tokenizer, "
                             f"but it encodes to {ids}")
        return ids[0]

    # ---- conversations -----------------------------------------------------------------------

    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], tokenize: bool = True,
                            add_generation_prompt: bool = True, return_dict: bool = True,
                            output_labels: bool | str = False, padding_side: str = "left",
                            sampling_rate: int | None = None) -> BatchFeature | torch.Tensor | str | list[str]:
        """Render one conversation (a list of messages) or a list of them, and process the result.

        Messages are `{"role", "content"}`; content is a string or a list of `{"type": "text",
        "text"}` and `{"type": "audio", "audio" | "path" | "url"}` items (see af3.chat). Audio
        items are loaded with af3.audio.load_audio. Unlike HF's template, which emits one <sound>
        per message, ours emits one per audio item, so a message may hold several clips.
        `tokenize=False` returns the prompt string (a list for a list of conversations);
        `return_dict=False` returns only `input_ids`. Note the defaults differ from HF's
        (there: tokenize=False, add_generation_prompt=False, return_dict=False).
        """
        for name, flag in (("tokenize", tokenize), ("add_generation_prompt", add_generation_prompt),
                           ("return_dict", return_dict)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        batched = not is_conversation(conversation)
        if batched and not isinstance(conversation, (list, tuple)):
            raise TypeError("conversation must be a list of messages or a non-empty list of conversations, "
                            f"got {conversation!r:.80}")
        if not conversation:
            raise ValueError("conversation is empty: give a list of messages, or a list of conversations")
        conversations = conversation if batched else [conversation]
        prompts, audio = [], []
        for i, c in enumerate(conversations):
            try:
                prompts.append(render_conversation(c, add_generation_prompt=add_generation_prompt,
                                                   audio_token=self.audio_token))
                audio.append(conversation_audio(c))
            except (TypeError, ValueError) as e:
                if not batched:
                    raise
                raise type(e)(f"conversation {i}: {e}") from e  # say which one of the batch
        if not tokenize:
            return prompts if batched else prompts[0]
        out = self(prompts, audio=audio if any(audio) else None, output_labels=output_labels,
                   padding_side=padding_side, sampling_rate=sampling_rate)
        return out if return_dict else out["input_ids"]

    def apply_transcription_request(self, audio: Any, prompt: str | Sequence[str | None] | None = None,
                                    sampling_rate: int | None = None) -> BatchFeature:
        """Inputs that ask for a transcription of each clip (one clip, or a list of them).

        `prompt` defaults to "Transcribe the input speech."; a list gives one prompt per clip
        (None entries take the default).
        """
        clips = list(audio) if isinstance(audio, (list, tuple)) else [audio]
        if not clips:
            raise ValueError("audio is empty: give at least one clip to transcribe")
        for i, c in enumerate(clips):
            if c is None:
                raise TypeError(f"audio clip {i} is None; give a path, an http(s) URL, bytes or an array")
        if prompt is None or isinstance(prompt, str):
            prompts = [prompt or self.default_transcription_prompt] * len(clips)
        elif isinstance(prompt, (list, tuple)):
            if len(prompt) != len(clips):
                raise ValueError(f"got {len(prompt)} prompt(s) for {len(clips)} audio clip(s); give one "
                                 "prompt, or one per clip")
            for i, p in enumerate(prompt):
                if p is not None and not isinstance(p, str):
                    raise TypeError(f"prompt {i} must be a string or None, got {type(p).__name__}")
            prompts = [self.default_transcription_prompt if p is None else p for p in prompt]
        else:
            raise TypeError(f"prompt must be a string, a list of strings, or None, got {type(prompt).__name__}")
        conversations = [[{"role": "user", "content": [{"type": "text", "text": p},
                                                       {"type": "audio", "audio": clip}]}]
                         for p, clip in zip(prompts, clips)]
        return self.apply_chat_template(conversations, sampling_rate=sampling_rate)

    # ---- ids -> text -------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False,
               strip_prefix: bool = False) -> str | list[str]:
        """Token ids -> text: one sequence gives a string, a batch (2-D) gives a list of strings.

        `strip_prefix` removes AF3's transcription framing (see `strip_transcription_prefix`).
        """
        if is_integer(ids) or \
                isinstance(ids, (torch.Tensor, np.ndarray)) and ids.ndim == 0:
            ids = [int(ids)]  # one token id, as HF's decode takes it
        rows = _as_id_rows(ids)
        if rows is None:
            return self._decode_one(_as_id_list(ids), skip_special_tokens, strip_prefix)
        return [self._decode_one(r, skip_special_tokens, strip_prefix) for r in rows]

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     strip_prefix: bool = False) -> list[str]:
        """A batch of token-id sequences (2-D tensor or list of lists) -> one string each."""
        if isinstance(sequences, (list, tuple)) and not sequences:
            return []  # an empty batch, as HF
        rows = _as_id_rows(sequences)
        if rows is None:
            raise ValueError("batch_decode takes a batch of sequences (2-D); use decode for one sequence")
        return [self._decode_one(r, skip_special_tokens, strip_prefix) for r in rows]

    def _decode_one(self, ids: list[int], skip_special_tokens: bool, strip_prefix: bool) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return strip_transcription_prefix(text) if strip_prefix else text


def strip_transcription_prefix(text: str) -> str:
    """Remove AF3's framing from a transcription: a known prefix, one trailing period, one pair of quotes.

    `The spoken content of the audio is "Hello there".` -> `Hello there`. Text without the framing
    comes back stripped of surrounding whitespace and otherwise unchanged.
    """
    text = text.strip()
    for prefix in TRANSCRIPTION_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
            break
    if text.endswith("."):
        text = text[:-1].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    return text


def _as_texts(text: Any) -> list[str]:
    if isinstance(text, str):
        return [text]
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
    if not text:
        raise ValueError("text is an empty list: give at least one prompt")
    for i, t in enumerate(text):
        if not isinstance(t, str):
            raise TypeError(f"text[{i}] must be a string, got {type(t).__name__}")
    return list(text)


def _load(source: Any, sampling_rate: int | None, where: str) -> torch.Tensor:
    try:
        return load_audio(source, sampling_rate)
    except (TypeError, ValueError, FileNotFoundError) as e:  # say which clip of which sample it was
        try:
            named = type(e)(f"{where}: {e}")
        except TypeError:  # an error type whose constructor takes other arguments: keep it as it is
            raise e from None
        raise named from e


def _as_id_list(ids: Any) -> list[int]:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim != 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise TypeError(f"token ids must be a list of ints or a tensor, got {type(ids).__name__}")
    for i, t in enumerate(ids):
        if not is_integer(t):
            raise TypeError(f"token id {i} must be an int, got {type(t).__name__}")
    return [int(t) for t in ids]


def _as_id_rows(ids: Any) -> list[list[int]] | None:
    """A batch of id sequences as lists, or None when `ids` is a single sequence."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim == 2:
            return [_as_id_list(row) for row in ids]
        if ids.ndim == 1:
            return None
        raise ValueError(f"token ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
    if isinstance(ids, (list, tuple)) and ids and all(isinstance(r, (list, tuple, torch.Tensor, np.ndarray))
                                                     for r in ids):
        return [_as_id_list(r) for r in ids]
    return None
