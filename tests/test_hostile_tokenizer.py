"""Hostile text and tokenizer.json files: long words, backtracking regexes, huge added-token lists,
characters newer than HF's Unicode tables. Ids are checked against HF tokenizers throughout."""

from __future__ import annotations

import base64
import json
import random
import string

import pytest
import regex

import af3.tokenizer
from af3.tokenizer import HF_UNASSIGNED, Tokenizer
from tests.tiny_tokenizer import tiny_tokenizer_json

hf_tokenizers = pytest.importorskip("tokenizers", reason="HF tokenizers (the reference) is not installed")


@pytest.fixture(scope="module")
def real(shared_tokenizer_dir):
    return Tokenizer.from_file(shared_tokenizer_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def real_hf(shared_tokenizer_dir):
    return hf_tokenizers.Tokenizer.from_file(str(shared_tokenizer_dir / "tokenizer.json"))


def hf_ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


# ---- BPE in O(n log n) -----------------------------------------------------------------------


def _long_words() -> dict[str, str]:
    rng = random.Random(0)
    return {
        "letters": "".join(rng.choices(string.ascii_letters, k=20_000)),
        "base64": base64.b64encode(rng.randbytes(15_000)).decode(),
        "cjk": "".join(chr(rng.randrange(0x4E00, 0x9FA6)) for _ in range(6_000)),
        "one letter": "a" * 20_000,
        "digits and marks": "".join(rng.choices("0123456789.,-", k=10_000)),
    }


@pytest.mark.parametrize("kind", list(_long_words()))
def test_long_words_match_hf(real, real_hf, kind: str) -> None:
    word = _long_words()[kind]
    assert real.encode(word) == hf_ids(real_hf, word)


class _CountingRanks(dict):
    """The merge ranks, counting how often BPE looks a pair up."""

    lookups = 0

    def get(self, key, default=None):
        _CountingRanks.lookups += 1
        return super().get(key, default)


def test_bpe_work_grows_like_n_log_n_not_n_squared(shared_tokenizer_dir) -> None:
    tok = Tokenizer.from_file(shared_tokenizer_dir / "tokenizer.json")
    tok._ranks = _CountingRanks(tok._ranks)
    counts = {}
    for n in (2_000, 16_000):
        word = "".join(random.Random(n).choices(string.ascii_letters, k=n))
        _CountingRanks.lookups = 0
        tok.encode(word)
        counts[n] = _CountingRanks.lookups
    # Rescanning the word after every merge looked pairs up ~n^2 / 4 times (64x from 2k to 16k letters).
    assert counts[16_000] < 12 * counts[2_000], counts
    assert counts[16_000] < 10 * 16_000, counts


# ---- regex time ------------------------------------------------------------------------------


def _spec_with_split(pattern: str) -> dict:
    spec = tiny_tokenizer_json()
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    return spec


def test_a_catastrophic_split_regex_is_stopped_and_named(monkeypatch) -> None:
    monkeypatch.setattr(af3.tokenizer, "REGEX_TIMEOUT_S", 0.2)
    tok = Tokenizer(_spec_with_split("(a|aa)+$"), source="evil/tokenizer.json")
    assert tok.encode("aaa") == tok.encode("aaa")  # harmless text is fine
    with pytest.raises(ValueError, match=r"evil/tokenizer\.json: the pre-tokenizer regex '\(a\|aa\)\+\$' took more "
                                         r"than 0\.2 s on a text of 41 characters"):
        tok.encode("a" * 40 + "b")


# ---- many added tokens -----------------------------------------------------------------------


def _with_added(contents: list[str]) -> dict:
    spec = tiny_tokenizer_json()
    base = len(spec["model"]["vocab"])  # ids follow the vocabulary's, as HF numbers them
    spec["added_tokens"] = [{"id": base + i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, c in enumerate(contents)]
    return spec


def test_added_tokens_take_the_leftmost_longest_match_as_hf(tmp_path) -> None:
    rng = random.Random(1)
    vocab = tiny_tokenizer_json()["model"]["vocab"]  # (HF gives a vocabulary token its vocabulary id)
    contents = [c for c in dict.fromkeys(["ab", "abc", "bcd", "<x>", "<x>y", "x", "天", "天天", "<", "|>"]
                                         + ["".join(rng.choices("abc天y<>|", k=rng.randint(1, 6))) for _ in range(2_000)])
                if c not in vocab]
    spec = _with_added(contents)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    ours, hf = Tokenizer(spec, pad_token=None, eos_token=None), hf_tokenizers.Tokenizer.from_file(str(path))
    for _ in range(200):
        text = "".join(rng.choices("abcd天y<>| é", k=rng.randint(0, 60)))
        assert ours.encode(text) == hf_ids(hf, text), text


def test_loading_many_added_tokens_compiles_nothing_their_size(monkeypatch) -> None:
    contents = [f"<tok{i}>" for i in range(300_000)]
    spec = _with_added(contents)
    compiled = []
    original = regex.compile

    def spy(pattern, *args, **kwargs):
        compiled.append(len(pattern))
        return original(pattern, *args, **kwargs)

    monkeypatch.setattr(regex, "compile", spy)
    tok = Tokenizer(spec, pad_token=None, eos_token=None)
    assert max(compiled) < 1000  # one alternation of all of them was 2.7 M characters
    text = "x <tok299999> y <tok1> <tok" * 500
    ids = tok.encode(text)
    base = len(spec["model"]["vocab"])
    assert ids.count(base + 299_999) == 500 and ids.count(base + 1) == 500


# ---- Unicode tables --------------------------------------------------------------------------


def test_characters_newer_than_hfs_tables_split_as_in_hf(real, real_hf) -> None:
    assert real.encode("\U0001df79's") == hf_ids(real_hf, "\U0001df79's")  # the issue's example: ' + s
    samples = sorted({c for a, b in HF_UNASSIGNED for c in (a, (a + b) // 2, b, a - 1, b + 1)})
    for c in samples:
        for text in (f"x{chr(c)}'s", f"{chr(c)}{chr(c)}1 a{chr(c)}", f" {chr(c)}\n"):
            assert real.encode(text) == hf_ids(real_hf, text), (hex(c), text)


def test_everywhere_else_the_split_is_hfs(real, real_hf) -> None:
    # Every 11th code point of all planes and every 7th of HF_UNASSIGNED, each as "x<c>'s\n".
    cps = [c for c in range(0, 0x110000, 11) if not 0xD800 <= c <= 0xDFFF]
    cps += [c for a, b in HF_UNASSIGNED for c in range(a, b + 1, 7)]
    probes = [f"x{chr(c)}'s\n" for c in cps]
    theirs = [e.ids for e in real_hf.encode_batch(probes, add_special_tokens=False)]
    ours = [real.encode(p) for p in probes]
    assert [hex(c) for c, a, b in zip(cps, ours, theirs) if a != b] == []
