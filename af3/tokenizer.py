"""Text -> token ids -> text: the byte-level BPE of a checkpoint's `tokenizer.json` (Qwen2's for AF3).

Encoding, in the order HF `tokenizers` applies it:
  1. added tokens (`<|im_start|>`, `<sound>`, ...) are cut out of the raw text first, longest match
     at the leftmost position;
  2. every other stretch of text is normalized (NFC for AF3);
  3. the pre-tokenizer splits it into words with a regex, and each word's UTF-8 bytes are written
     with GPT-2's printable stand-in characters (byte 0x20 ' ' -> 'Ġ', 0x0A '\\n' -> 'Ċ');
  4. BPE merges the word's characters pairwise, lowest merge rank first, and the pieces are looked
     up in the vocabulary. A per-word cache makes repeated words free.
Decoding maps every token back to its bytes and reads them as UTF-8.

Only the features AF3's tokenizer uses (and a few close relatives) are implemented; a tokenizer.json
asking for anything else is refused with a ValueError rather than tokenised differently from HF.
"""

from __future__ import annotations

import heapq
import json
import operator
import unicodedata
from collections.abc import Iterable
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any

import regex

from af3.chat import IM_END
from af3.jsonfile import parse_json

# The split pattern HF's ByteLevel pre-tokenizer uses when `use_regex` is true (GPT-2's).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Qwen2's (AF3's) Split pattern.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")
_CACHE_LIMIT = 100_000  # words; the cache is emptied when it grows past this, so memory stays bounded
# A split regex from a tokenizer.json may backtrack catastrophically ((a|aa)+$ on 40 a's and a b):
# matching one text may take this long plus this much per character before it is refused. The
# patterns of GPT-2 and Qwen2 match in linear time and run without the timeout, which costs the
# `regex` module 3x on every match.
REGEX_TIMEOUT_S = 1.0
REGEX_TIMEOUT_PER_CHAR_S = 1e-6
_LINEAR_PATTERNS = frozenset({GPT2_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN})

# Unicode fidelity. HF tokenizers matches its split regex with Oniguruma, whose Unicode tables are
# older (15.x) than those of the `regex` module (17.0). These code points are unassigned there, so
# HF's \p{L} / \p{N} do not match them, while ours would (e.g. "\U0001df79's": HF splits "'" and
# "s", the newer tables "'s"). They are the only difference over all 1 112 064 code points
# (17 480 of them, measured against tokenizers 0.23.3 with AF3's pattern and GPT-2's). af3 matches
# HF: text holding one is split with each such character standing in as an unassigned one.
HF_UNASSIGNED = (
    (0x558, 0x558), (0x58b, 0x58c), (0x88f, 0x88f), (0xc5c, 0xc5c), (0xcdc, 0xcdc), (0x208f, 0x208f),
    (0x209d, 0x209f), (0xa7ce, 0xa7cf), (0xa7d2, 0xa7d2), (0xa7d4, 0xa7d4), (0xa7dd, 0xa7dd),
    (0xa7e2, 0xa7e2), (0xa7f1, 0xa7f1), (0xab6c, 0xab6d), (0x107bb, 0x107bf), (0x10940, 0x10959),
    (0x10ec5, 0x10ec7), (0x10ed9, 0x10eee), (0x11b0a, 0x11b0a), (0x11db0, 0x11ddb), (0x11de0, 0x11de9),
    (0x11df1, 0x11df1), (0x1246f, 0x1246f), (0x12475, 0x1247f), (0x12550, 0x12686), (0x16ea0, 0x16eb8),
    (0x16ebb, 0x16ed3), (0x16ff2, 0x16ff6), (0x187f8, 0x187ff), (0x18cd6, 0x18cda), (0x18d09, 0x18d20),
    (0x18d80, 0x18df2), (0x18e00, 0x19191), (0x191a0, 0x191d2), (0x1b123, 0x1b128), (0x1b168, 0x1b168),
    (0x1d6a6, 0x1d6a6), (0x1df1f, 0x1df24), (0x1df2b, 0x1df81), (0x1df90, 0x1df96), (0x1dfcd, 0x1dfff),
    (0x1e6c0, 0x1e6de), (0x1e6e0, 0x1e6e2), (0x1e6e4, 0x1e6e5), (0x1e6e7, 0x1e6ed), (0x1e6f0, 0x1e6f4),
    (0x1e6fe, 0x1e6ff), (0x2b73a, 0x2b73f), (0x2b81e, 0x2b81e), (0x2cea2, 0x2cead), (0x323b0, 0x33479),
    (0x3d000, 0x3fc3f),
)
_HF_UNASSIGNED = regex.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in HF_UNASSIGNED) + "]")
_UNASSIGNED_STAND_IN = "\U0010fffe"  # a noncharacter: unassigned in every version, so no class of the pattern
_ADDED_END = ""  # key of a trie node that ends an added token (every other key is one character)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, so every byte string is a visible word.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...) are
    moved to U+0100 onwards in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


# AF3's pad and eos tokens, as its tokenizer_config.json names them: a reply ends with its ChatML turn.
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", IM_END


class Tokenizer:
    """A byte-level BPE tokenizer read from a HF `tokenizer.json`.

    `pad_token` / `eos_token` name tokens of the vocabulary (None for none); AF3's
    `tokenizer_config.json` uses `<|endoftext|>` and `<|im_end|>`.
    """

    def __init__(self, spec: dict[str, Any], *, pad_token: str | None = PAD_TOKEN,
                 eos_token: str | None = EOS_TOKEN, source: str = "tokenizer.json") -> None:
        if not isinstance(spec, dict):
            raise TypeError(f"{source}: expected a JSON object, got {type(spec).__name__}")
        self._source = source
        for key in ("truncation", "padding"):
            if spec.get(key) is not None:
                raise ValueError(f"{source}: '{key}' is set ({spec[key]!r}); af3's Tokenizer never truncates or "
                                 f"pads inside encode, set it to null")
        self._normal_forms = self._read_normalizer(spec.get("normalizer"))
        self._split_patterns = self._read_pre_tokenizer(spec.get("pre_tokenizer"))
        self._read_decoder(spec.get("decoder"))
        self._read_post_processor(spec.get("post_processor"))
        self._read_model(spec.get("model"))
        self._read_added_tokens(spec.get("added_tokens") or [])

        byte_char = bytes_to_unicode()
        missing = [c for c in byte_char.values() if c not in self._vocab]
        if missing:
            raise ValueError(f"{source}: the BPE vocabulary lacks {len(missing)} of the 256 byte tokens "
                             f"(e.g. {missing[0]!r}); a byte-level tokenizer needs all of them")
        # str.translate table: a UTF-8 byte (read as a Latin-1 character) -> its printable stand-in.
        self._to_stand_in = dict(byte_char)
        self._from_stand_in = {c: b for b, c in byte_char.items()}
        self._token_bytes: dict[int, bytes] = {}  # id -> bytes, filled lazily by decode
        self._cache: dict[str, tuple[int, ...]] = {}

        self.pad_token_id = self._named_token(pad_token, "pad_token")
        self.eos_token_id = self._named_token(eos_token, "eos_token")
        self.pad_token, self.eos_token = pad_token, eos_token

    @classmethod
    def from_file(cls, path: str | Path, pad_token: str | None = PAD_TOKEN,
                  eos_token: str | None = EOS_TOKEN) -> Tokenizer:
        """Read a HF `tokenizer.json` (or a directory holding one)."""
        if not isinstance(path, (str, Path)):
            raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        spec = parse_json(path.read_bytes(), str(path))
        return cls(spec, pad_token=pad_token, eos_token=eos_token, source=str(path))

    # ---- reading tokenizer.json ----------------------------------------------------------------

    def _unsupported(self, what: str, value: Any) -> ValueError:
        return ValueError(f"{self._source}: unsupported {what}: {json.dumps(value)[:300]}; af3's Tokenizer "
                          f"implements byte-level BPE as in Qwen2/AF3 and refuses rather than mis-tokenise")

    def _read_normalizer(self, spec: Any) -> list[str]:
        if spec is None:
            return []
        if not isinstance(spec, dict):
            raise self._unsupported("normalizer", spec)
        steps = spec.get("normalizers") if spec.get("type") == "Sequence" else [spec]
        if not isinstance(steps, list) or any(not isinstance(s, dict) or s.get("type") not in _NORMALIZERS
                                              for s in steps):
            raise self._unsupported("normalizer (only NFC/NFD/NFKC/NFKD and Sequences of them)", spec)
        return [s["type"] for s in steps]

    def _read_pre_tokenizer(self, spec: Any) -> list[regex.Pattern]:
        if not isinstance(spec, dict):
            raise self._unsupported("pre_tokenizer (a ByteLevel one is required)", spec)
        steps = spec.get("pretokenizers") if spec.get("type") == "Sequence" else [spec]
        if not isinstance(steps, list) or not steps or not isinstance(steps[-1], dict) \
                or steps[-1].get("type") != "ByteLevel":
            raise self._unsupported("pre_tokenizer (it must end in ByteLevel)", spec)
        patterns = []
        for step in steps[:-1]:
            if not isinstance(step, dict) or step.get("type") != "Split" or step.get("behavior") != "Isolated" or step.get("invert"):
                raise self._unsupported("pre_tokenizer step (only Split with behavior Isolated, invert false)",
                                        step)
            pattern = step.get("pattern") or {}
            if isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str):
                try:
                    patterns.append(regex.compile(pattern["Regex"]))
                except regex.error as e:
                    raise ValueError(f"{self._source}: the Split regex {pattern['Regex']!r} does not compile "
                                     f"({e})") from None
            elif isinstance(pattern, dict) and isinstance(pattern.get("String"), str):
                patterns.append(regex.compile(regex.escape(pattern["String"])))
            else:
                raise self._unsupported("Split pattern", pattern)
        byte_level = steps[-1]
        if byte_level.get("add_prefix_space"):
            raise self._unsupported("ByteLevel pre_tokenizer with add_prefix_space", byte_level)
        if byte_level.get("use_regex", True):
            patterns.append(regex.compile(GPT2_SPLIT_PATTERN))
        return patterns

    def _read_decoder(self, spec: Any) -> None:
        if not isinstance(spec, dict) or spec.get("type") != "ByteLevel":
            raise self._unsupported("decoder (only ByteLevel)", spec)

    def _read_post_processor(self, spec: Any) -> None:
        """Accept only post-processors that add no ids, so add_special_tokens changes nothing.

        ByteLevel only trims offsets. transformers 5 writes a TemplateProcessing whose templates
        are just the text (`$A`, and `$A $B` for pairs) when the tokenizer adds no bos/eos; one
        that adds tokens (e.g. add_bos_token) is refused by name rather than silently ignored.
        """
        if spec is None:
            return
        steps = spec.get("processors") if isinstance(spec, dict) and spec.get("type") == "Sequence" else [spec]
        if not isinstance(steps, list):
            raise self._unsupported("post_processor", spec)
        for step in steps:
            if not isinstance(step, dict) or step.get("type") not in ("ByteLevel", "TemplateProcessing"):
                raise self._unsupported("post_processor (only null, ByteLevel, or a TemplateProcessing that "
                                        "adds no tokens)", spec)
            if step["type"] == "TemplateProcessing":
                self._check_template(step)

    def _check_template(self, spec: dict) -> None:
        added = []
        for key, want in (("single", ["A"]), ("pair", ["A", "B"])):
            pieces = spec.get(key)
            if not isinstance(pieces, list) or not all(isinstance(p, dict) and len(p) == 1 for p in pieces):
                raise self._unsupported(f"TemplateProcessing {key} template", pieces)
            added += [p["SpecialToken"].get("id") for p in pieces
                      if "SpecialToken" in p and isinstance(p["SpecialToken"], dict)]
            sequences = [p["Sequence"].get("id") for p in pieces if isinstance(p.get("Sequence"), dict)]
            if not added and sequences != want:
                raise self._unsupported(f"TemplateProcessing {key} template", pieces)
        if added:
            raise ValueError(f"{self._source}: the post_processor adds the special tokens {sorted(set(added))} "
                             f"around every text ({json.dumps(spec['single'])[:200]}); af3's Tokenizer adds no "
                             "tokens in encode. Remove them from the TemplateProcessing (transformers: "
                             "add_bos_token / add_eos_token false) and write them in the prompt instead")

    def _read_model(self, spec: Any) -> None:
        if not isinstance(spec, dict) or spec.get("type") != "BPE":
            raise self._unsupported("model (only BPE)", spec)
        for key, ok in (("dropout", (None, 0, 0.0)), ("continuing_subword_prefix", (None, "")),
                        ("end_of_word_suffix", (None, "")), ("byte_fallback", (None, False))):
            if spec.get(key) not in ok:
                raise self._unsupported(f"BPE option {key}", spec[key])
        vocab = spec.get("vocab")
        if not isinstance(vocab, dict):
            raise self._unsupported("BPE vocab (expected an object token -> id)", type(vocab).__name__)
        ids_ok = set(map(type, vocab.values())) <= {int} and (not vocab or min(vocab.values()) >= 0)
        bad_id = None if ids_ok else next(t for t, i in vocab.items() if type(i) is not int or i < 0)
        if bad_id is not None:
            raise ValueError(f"{self._source}: vocabulary token {bad_id!r} has id {vocab[bad_id]!r}; ids are "
                             "non-negative integers")
        self._vocab: dict[str, int] = vocab
        self._ignore_merges = bool(spec.get("ignore_merges", False))
        merges = spec.get("merges") or []
        if not isinstance(merges, list):
            raise ValueError(f"{self._source}: BPE merges must be a list, got {type(merges).__name__}")  # noqa: TRY004 (file content)
        if merges and isinstance(merges[0], str):  # older files write each merge as "a b"
            merges = [m.split(" ") for m in merges]
        pairs_ok = set(map(type, merges)) <= {list} and set(map(len, merges)) <= {2}  # C-speed scan of 151k
        bad = None if pairs_ok else next(m for m in merges if not isinstance(m, list) or len(m) != 2)
        if bad is not None:
            raise ValueError(f"{self._source}: malformed merge {bad!r}; expected a pair of tokens")
        # Rank = position in the list; built from the end so a repeated merge keeps its first rank, as in HF.
        # (That every merge's tokens are in the vocabulary is checked when a word first uses it, which
        # keeps loading the 151k merges fast.)
        self._ranks: dict[tuple[str, str], int] = dict(zip(map(tuple, reversed(merges)),
                                                           range(len(merges) - 1, -1, -1)))

    def _read_added_tokens(self, tokens: list[dict[str, Any]]) -> None:
        self._added: dict[str, int] = {}
        self._special_ids: set[int] = set()
        if not isinstance(tokens, list):
            raise ValueError(f"{self._source}: added_tokens must be a list, got {type(tokens).__name__}")  # noqa: TRY004 (file content)
        for token in tokens:
            if not isinstance(token, dict) or not isinstance(token.get("content"), str) or not token["content"] \
                    or type(token.get("id")) is not int or token["id"] < 0:
                raise ValueError(f"{self._source}: malformed added token {json.dumps(token)[:200]}; expected "
                                 "{'id': <int>, 'content': <non-empty str>, ...}")
            for flag in ("lstrip", "rstrip", "single_word", "normalized"):
                if token.get(flag):
                    raise self._unsupported(f"added token option {flag}", token)
            content, token_id = token["content"], token["id"]
            self._added[content] = token_id
            if token.get("special"):
                self._special_ids.add(token_id)
        # A trie of the added tokens, and a pattern that finds where one may start: matching costs the
        # length of the match at each candidate position, however many tokens there are (one
        # alternation of 300 000 took 19 s to compile and 9 s to run over 10 000 characters).
        self._added_trie: dict[str, Any] = {}
        for content, token_id in self._added.items():
            node = self._added_trie
            for c in content:
                node = node.setdefault(c, {})
            node[_ADDED_END] = token_id
        firsts = "".join(sorted(self._added_trie))
        self._added_starts = regex.compile(f"[{regex.escape(firsts, special_only=False)}]") if firsts else None
        self._id_to_token: dict[int, str] = {i: t for t, i in self._vocab.items()}
        self._id_to_token.update({i: t for t, i in self._added.items()})
        self._token_to_id = {**self._vocab, **self._added}

    def _named_token(self, token: str | None, name: str) -> int | None:
        if token is None:
            return None
        if not isinstance(token, str):
            raise TypeError(f"{name} must be a str or None, got {type(token).__name__}")
        if token not in self._token_to_id:
            raise ValueError(f"{name} {token!r} is not a token of {self._source}")
        return self._token_to_id[token]

    # ---- public surface ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids, added tokens included (HF's `len(tokenizer)`)."""
        return len(self._id_to_token)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the added tokens flagged `special` (what `skip_special_tokens` drops), sorted."""
        return sorted(self._special_ids)

    @property
    def added_tokens(self) -> dict[str, int]:
        """The added tokens (`<|im_start|>`, `<sound>`, ...) and their ids."""
        return dict(self._added)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Added tokens written in the text (e.g. `<sound>`) become their ids.

        `add_special_tokens` is accepted for HF compatibility: post-processors that add tokens are
        refused when the file is read, so it adds nothing either way.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        start = 0
        for begin, end, token_id in self._find_added(text):
            if begin > start:
                self._encode_ordinary(text[start:begin], ids)
            ids.append(token_id)
            start = end
        if start < len(text):
            self._encode_ordinary(text[start:], ids)
        return ids

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Bytes that are not valid UTF-8 (e.g. half a character) become U+FFFD, as in HF.

        Ids the tokenizer does not have (the unused rows of a padded embedding, which a model can
        still emit) are skipped, as HF's tokenizers do."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> bytes:
        """The raw UTF-8 bytes of `ids`; for streaming, where a character may span several tokens."""
        out = bytearray()
        for i in self._as_id_list(ids, known_only=False):
            if i not in self._id_to_token or skip_special_tokens and i in self._special_ids:
                continue
            piece = self._token_bytes.get(i)
            if piece is None:
                piece = self._token_bytes[i] = self._bytes_of(i)
            out += piece
        return bytes(out)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """Id of a token string (vocabulary form, e.g. 'Ġthe'), or a list of ids for a list."""
        if isinstance(tokens, str):
            if tokens not in self._token_to_id:
                raise ValueError(f"token {tokens!r} is not in the vocabulary of {self._source}")
            return self._token_to_id[tokens]
        if not isinstance(tokens, (list, tuple)):
            raise TypeError(f"tokens must be a str or a list of str, got {type(tokens).__name__}")
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Token string of an id, or a list of token strings for a list of ids."""
        if isinstance(ids, int) or (hasattr(ids, "ndim") and ids.ndim == 0):
            return self._id_to_token[self._check_id(ids)]
        return [self._id_to_token[i] for i in self._as_id_list(ids)]

    # ---- internals -----------------------------------------------------------------------------

    def _find_added(self, text: str) -> Iterable[tuple[int, int, int]]:
        """(start, end, id) of the added tokens in `text`: at the leftmost position where one starts,
        the longest one there (HF's rule), then on from its end."""
        if self._added_starts is None:
            return
        trie, resume = self._added_trie, 0
        for candidate in self._added_starts.finditer(text):
            begin = candidate.start()
            if begin < resume:
                continue  # inside the token just found
            node, longest, i = trie, None, begin
            while i < len(text) and (node := node.get(text[i])) is not None:
                i += 1
                if _ADDED_END in node:
                    longest = (i, node[_ADDED_END])
            if longest is not None:
                yield begin, longest[0], longest[1]
                resume = longest[0]

    def _encode_ordinary(self, text: str, ids: list[int]) -> None:
        """Append the ids of text that holds no added token."""
        for form in self._normal_forms:
            text = unicodedata.normalize(form, text)
        start = len(ids)
        if not self._encode_words(self._split(text), ids):
            # A character HF's regex engine does not know (see HF_UNASSIGNED): split again with each
            # such character standing in as the unassigned code point it is there; same cuts, real text.
            del ids[start:]
            cuts = accumulate(map(len, self._split(_HF_UNASSIGNED.sub(_UNASSIGNED_STAND_IN, text))), initial=0)
            self._encode_words([text[a:b] for a, b in pairwise(cuts)], ids, split_as_hf=True)

    def _split(self, text: str) -> list[str]:
        words = [text]
        for pattern in self._split_patterns:
            words = [piece for word in words for piece in _split_isolated(pattern, word, self._source)]
        return words

    def _encode_words(self, words: list[str], ids: list[int], split_as_hf: bool = False) -> bool:
        """Append the ids of `words`; False (and stop) at a word holding an HF_UNASSIGNED character
        unless the words were `split_as_hf`. Such words are never cached, so every cached word is
        free of them and only uncached words need the check."""
        cache = self._cache
        for word in words:
            word_ids = cache.get(word)
            if word_ids is None:
                if not word.isascii() and _HF_UNASSIGNED.search(word):
                    if not split_as_hf:
                        return False
                    ids.extend(self._encode_word(word))
                    continue
                word_ids = self._encode_word(word)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[word] = word_ids
            ids.extend(word_ids)
        return True

    def _encode_word(self, word: str) -> tuple[int, ...]:
        # UTF-8 bytes -> one Latin-1 char per byte -> printable stand-ins, all in C.
        try:
            utf8 = word.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text holds a lone surrogate {word[e.start]!r} (in {word!r}), which has no UTF-8 "
                             f"form; fix how the text was decoded (e.g. errors='surrogateescape')") from None
        chars = utf8.decode("latin-1").translate(self._to_stand_in)
        vocab = self._vocab
        if self._ignore_merges and chars in vocab:
            return (vocab[chars],)
        parts = self._bpe(chars)
        try:
            return tuple(vocab[p] for p in parts)
        except KeyError:
            missing = next(p for p in parts if p not in vocab)
            raise ValueError(f"{self._source}: BPE made the piece {missing!r}, which is not in the vocabulary "
                             f"(a merge or byte token is missing from the file)") from None

    def _bpe(self, chars: str) -> list[str]:
        """Merge adjacent pieces, always the pair with the lowest merge rank (leftmost first), until
        none applies.

        As HF tokenizers does it: a heap of (rank, position) over the candidate pairs and a linked
        list of pieces, so a word of n characters costs O(n log n), not O(n^2) (a 64 000-letter
        "word" of base64 or unspaced CJK took 34 s with rescans). Entries made stale by an earlier
        merge are skipped when they come up.
        """
        ranks = self._ranks
        parts: list[str | None] = list(chars)
        if len(parts) < 2:
            return parts
        heap = [(r, i) for i, pair in enumerate(pairwise(parts)) if (r := ranks.get(pair)) is not None]
        if not heap:
            return parts
        heapq.heapify(heap)
        following = [*range(1, len(parts)), -1]  # index of the next live piece, -1 at the end
        preceding = list(range(-1, len(parts) - 1))
        while heap:
            rank, i = heapq.heappop(heap)
            j = following[i]
            left = parts[i]
            if left is None or j < 0 or ranks.get((left, parts[j])) != rank:
                continue  # stale: one of the two pieces has been merged since this entry was made
            merged = parts[i] = left + parts[j]
            parts[j] = None
            k = following[i] = following[j]
            if k >= 0:
                preceding[k] = i
                if (r := ranks.get((merged, parts[k]))) is not None:
                    heapq.heappush(heap, (r, i))
            h = preceding[i]
            if h >= 0 and (r := ranks.get((parts[h], merged))) is not None:
                heapq.heappush(heap, (r, h))
        return [p for p in parts if p is not None]

    def _bytes_of(self, token_id: int) -> bytes:
        token = self._id_to_token[self._check_id(token_id)]
        # HF's ByteLevel decoder: a token made only of stand-in characters gives their bytes; any
        # other token (an added token such as "<|im_end|>" whose characters are not all stand-ins)
        # gives its own UTF-8.
        back = self._from_stand_in
        if all(c in back for c in token):
            return bytes(back[c] for c in token)
        return token.encode("utf-8")

    def _check_id(self, token_id: Any) -> int:
        token_id = self._check_index(token_id)
        if token_id not in self._id_to_token:
            raise ValueError(f"token id {token_id} is not in the vocabulary of {self._source} "
                             f"({self.vocab_size} ids); a model with a padded embedding can emit ids the "
                             f"tokenizer does not have (decode skips them)")
        return token_id

    @staticmethod
    def _check_index(token_id: Any) -> int:
        """A non-negative int token id (any id, known or not)."""
        try:
            token_id = operator.index(token_id)
        except TypeError:
            hint = "; decode each row of a batch separately" if isinstance(token_id, (list, tuple)) else ""
            raise TypeError(f"token ids must be integers, got {type(token_id).__name__}{hint}") from None
        if token_id < 0:
            raise ValueError(f"token id {token_id} is negative; ids are >= 0")
        return token_id

    def _as_id_list(self, ids: Iterable[int] | int, known_only: bool = True) -> list[int]:
        """`ids` as a list of ints; `known_only` refuses ids outside the vocabulary, else only negative ones."""
        if hasattr(ids, "tolist"):  # torch / numpy arrays
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TypeError(f"ids must be an int or a sequence of ints, got {type(ids).__name__}")
        known = self._id_to_token
        if known_only:
            return [i if type(i) is int and i in known else self._check_id(i) for i in ids]
        return [i if type(i) is int and i >= 0 else self._check_index(i) for i in ids]


def _split_isolated(pattern: regex.Pattern, text: str, source: str = "tokenizer.json") -> list[str]:
    """HF's Split(behavior=Isolated): every match is a word and so is every gap between matches."""
    if pattern.pattern in _LINEAR_PATTERNS:
        return _split_isolated_within(pattern, text, None)
    timeout = REGEX_TIMEOUT_S + REGEX_TIMEOUT_PER_CHAR_S * len(text)
    try:
        return _split_isolated_within(pattern, text, timeout)
    except TimeoutError:
        raise ValueError(f"{source}: the pre-tokenizer regex {pattern.pattern!r} took more than {timeout:.1f} s on "
                         f"a text of {len(text)} characters (it backtracks catastrophically); fix the pattern") from None


def _split_isolated_within(pattern: regex.Pattern, text: str, timeout: float | None) -> list[str]:
    if not pattern.groups:
        words = pattern.findall(text, timeout=timeout)
        if sum(map(len, words)) == len(text):  # the usual case: the pattern covers the whole text
            return [w for w in words if w]
    words, start = [], 0
    for match in pattern.finditer(text, timeout=timeout):
        if match.start() > start:
            words.append(text[start:match.start()])
        if match.end() > match.start():
            words.append(match.group())
        start = match.end()
    if start < len(text):
        words.append(text[start:])
    return words
