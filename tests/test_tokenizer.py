"""af3.tokenizer: known answers, HF `tokenizers` parity, round trips and clear refusals.

The core tests use the tiny tokenizer from tests/tiny_tokenizer.py or small hand-made specs; the
real AF3 tokenizer (../shared) adds parity on a varied corpus and DESIGN.md's known answer.
"""

from __future__ import annotations

import copy
import json
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from af3.streaming import TextStreamer
from af3.tokenizer import Tokenizer, bytes_to_unicode
from tests.tiny_tokenizer import (
    ADDED_TOKENS,
    TINY_AUDIO_TOKEN_ID,
    TINY_EOS_TOKEN_ID,
    TINY_PAD_TOKEN_ID,
    TINY_TOKEN_IDS,
    TINY_VOCAB_SIZE,
    tiny_tokenizer_json,
    write_tiny_tokenizer,
)

try:
    import tokenizers as hf_tokenizers
except ImportError:  # the parity tests below need it; everything else runs without
    hf_tokenizers = None
needs_hf = pytest.mark.skipif(hf_tokenizers is None, reason="HF tokenizers (the reference) is not installed")

# Text of every kind the issue lists: scripts, emoji (incl. ZWJ sequences and flags), combining marks
# that NFC composes, code, digit runs, whitespace runs, CRLF, odd Unicode spaces, added tokens in text.
CORPUS = [
    "Hello world, it's a test. I'll be there; we've done it! THEY'RE HERE, 'S 'Ll",
    "Grüße aus München: Straße, Äpfel, Öl und Übermut.",
    "我们今天去公园散步，天气很好。音频里有人在说话吗？",
    "مرحبا بالعالم، كيف حالك؟ هذا اختبار.",
    "Привет, мир! Как дела? Ёжик в тумане.",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs, ❤️ heart, 🇩🇪🇯🇵 flags",
    "e\u0301 cafe\u0301 A\u030a n\u0303 \u1e9b\u0323 Ω \u212b",  # NFC composes / replaces these
    "def f(x):\n\treturn x ** 2  # comment\r\n\r\nclass A: pass\n",
    "1234567890123456789012345 3.14159 1,000,000 007",
    "   \t\t\n\n\n  x  \r\n\r\n  \n",
    " " * 17 + "end",
    "\u00a0nbsp\u2003em\u3000ideo \u0085nel\u2028ls\u180emvs\u200bzw",
    "a<|im_end|>b<sound><sound>c<|endoftext|> d <|im_start|>user\n",
    "<tool_call>{\"name\": \"f\"}</tool_call><|fim_prefix|>x<|fim_suffix|>",
    "\x00\x01\x7f control \x1b[0m",
    "ǅ Ⅻ ½ ² ﬁ ＡＢＣ",
    "<sound",  # half an added token is ordinary text
    "",
]

DESIGN_PROMPT = ("<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n"
                 "<sound>Transcribe the input speech.<|im_end|>\n<|im_start|>assistant\n")
DESIGN_IDS = [151644, 8948, 198, 16141, 279, 4755, 13, 151645, 198, 151644, 872, 198, 151669, 3167, 3114, 279,
              1946, 8806, 13, 151645, 198, 151644, 77091, 198]

BYTE = bytes_to_unicode()


def _byte_spec(merges: list[list[str]], added: list[tuple[str, bool]] = (), **model) -> dict:
    """A minimal tokenizer.json: the 256 byte tokens, the given merges, the given added tokens."""
    spec = tiny_tokenizer_json()
    vocab = {BYTE[b]: b for b in range(256)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    spec["model"].update(vocab=vocab, merges=merges, **model)
    spec["added_tokens"] = [{"id": len(vocab) + i, "content": c, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": special}
                            for i, (c, special) in enumerate(added)]
    return spec


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    return tok.convert_ids_to_tokens(tok.encode(text))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return Tokenizer.from_file(tiny_path)


@pytest.fixture(scope="module")
def real(shared_tokenizer_dir):
    return Tokenizer.from_file(shared_tokenizer_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def real_hf(shared_tokenizer_dir):
    if hf_tokenizers is None:
        pytest.skip("HF tokenizers (the reference) is not installed")
    return hf_tokenizers.Tokenizer.from_file(str(shared_tokenizer_dir / "tokenizer.json"))


# ---- the tiny tokenizer helper ------------------------------------------------------------------

def test_tiny_tokenizer_is_deterministic_and_matches_its_constants(tmp_path, tiny_path, tiny):
    again = write_tiny_tokenizer(tmp_path / "again")
    assert again.read_bytes() == tiny_path.read_bytes()
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())["pad_token"] == "<|endoftext|>"
    assert tiny.vocab_size == 256 + 300 + len(ADDED_TOKENS) == 583
    assert tiny.vocab_size <= TINY_VOCAB_SIZE and TINY_VOCAB_SIZE % 100 == 0
    assert tiny.convert_tokens_to_ids("<sound>") == TINY_AUDIO_TOKEN_ID
    assert (tiny.pad_token_id, tiny.eos_token_id) == (TINY_PAD_TOKEN_ID, TINY_EOS_TOKEN_ID)
    assert tiny.encode("<sound>") == [TINY_AUDIO_TOKEN_ID]
    # Merges were learned from English: common words are single tokens.
    assert _pieces(tiny, " the sound") == ["Ġthe", "Ġsound"]


@needs_hf
def test_tiny_tokenizer_loads_in_hf(tiny_path, tiny):
    hf = hf_tokenizers.Tokenizer.from_file(str(tiny_path))
    assert hf.get_vocab_size(with_added_tokens=True) == tiny.vocab_size
    assert hf.token_to_id("<sound>") == TINY_AUDIO_TOKEN_ID


# ---- known answers on hand-made specs -----------------------------------------------------------

def test_bpe_applies_merges_by_rank_not_by_position():
    ab_first = Tokenizer(_byte_spec([["a", "b"], ["b", "c"]]), pad_token=None, eos_token=None)
    bc_first = Tokenizer(_byte_spec([["b", "c"], ["a", "b"]]), pad_token=None, eos_token=None)
    assert _pieces(ab_first, "abc") == ["ab", "c"]
    assert _pieces(bc_first, "abc") == ["a", "bc"]
    # Merged pieces merge further, and every occurrence of a pair is merged left to right.
    deep = Tokenizer(_byte_spec([["a", "a"], ["aa", "aa"], ["aa", "a"]]), pad_token=None, eos_token=None)
    assert _pieces(deep, "aaaaa") == ["aaaa", "a"]
    assert _pieces(deep, "aaa") == ["aaa"]
    # Words are split before BPE: no merge crosses the space.
    assert _pieces(ab_first, "a bc") == ["a", "Ġ", "bc"]


def test_merges_written_as_strings_give_the_same_ids():
    as_lists = _byte_spec([["a", "b"], ["ab", "c"], ["Ġ", "ab"]])
    as_strings = copy.deepcopy(as_lists)
    as_strings["model"]["merges"] = [" ".join(m) for m in as_lists["model"]["merges"]]
    text = "abc ab cab"
    assert Tokenizer(as_lists, pad_token=None, eos_token=None).encode(text) == \
        Tokenizer(as_strings, pad_token=None, eos_token=None).encode(text)


def test_ignore_merges_takes_whole_words_from_the_vocabulary():
    spec = _byte_spec([["a", "b"]])
    spec["model"]["vocab"]["abc"] = len(spec["model"]["vocab"])
    spec["added_tokens"] = []
    assert _pieces(Tokenizer(spec, pad_token=None, eos_token=None), "abc") == ["ab", "c"]
    spec["model"]["ignore_merges"] = True
    assert _pieces(Tokenizer(spec, pad_token=None, eos_token=None), "abc") == ["abc"]


def test_added_tokens_take_the_longest_match_from_the_raw_text():
    spec = _byte_spec([["a", "b"]], added=[("<s>", True), ("<s>x", True), ("é", False)])
    tok = Tokenizer(spec, pad_token="<s>", eos_token=None)
    assert _pieces(tok, "<s>xab<s>y") == ["<s>x", "ab", "<s>", "y"]
    # Added tokens are matched before NFC: a decomposed é is ordinary text, a composed one the token.
    assert _pieces(tok, "\u00e9") == ["é"]
    assert _pieces(tok, "e\u0301") == ["Ã", "©"]  # NFC makes it é, whose UTF-8 bytes are C3 A9


def test_skip_special_tokens_drops_only_tokens_flagged_special(tiny):
    ids = tiny.encode("<|im_start|>user\n<tool_call>hi</tool_call><|im_end|>")
    assert tiny.decode(ids) == "<|im_start|>user\n<tool_call>hi</tool_call><|im_end|>"
    assert tiny.decode(ids, skip_special_tokens=True) == "user\n<tool_call>hi</tool_call>"
    special = {c for c, s in ADDED_TOKENS if s}
    assert tiny.all_special_ids == sorted(tiny.convert_tokens_to_ids(sorted(special)))
    assert tiny.convert_tokens_to_ids("<tool_call>") not in tiny.all_special_ids


def test_decode_accepts_tensors_and_single_ids_and_keeps_split_characters_as_bytes(tiny):
    ids = tiny.encode(" the é")
    assert tiny.decode(torch.tensor(ids)) == " the é"
    assert tiny.decode(ids[0]) == " the"
    assert tiny.convert_ids_to_tokens(torch.tensor(ids[0])) == "Ġthe"
    # é is two byte tokens; streaming must see the bytes, and decode shows half a character as U+FFFD.
    assert tiny.convert_ids_to_tokens(ids[-2:]) == ["Ã", "©"]
    assert tiny.decode_bytes(ids[-2:-1]) == b"\xc3"
    assert tiny.decode(ids[:-1]) == " the \ufffd"
    assert tiny.decode_bytes(ids) == " the é".encode()


def test_encode_is_stable_across_the_word_cache(tiny):
    text = "the sound of the sound of the river " * 3
    first = tiny.encode(text)
    assert tiny.encode(text) == first
    assert tiny.decode(first) == text


@given(st.text(max_size=60))
@settings(max_examples=150, deadline=None)
def test_tiny_round_trip(text):
    tok = _TINY_FOR_HYPOTHESIS
    ids = tok.encode(text.replace("<", "["))  # no added tokens
    assert tok.decode(ids) == unicodedata.normalize("NFC", text.replace("<", "["))


_TINY_FOR_HYPOTHESIS = Tokenizer(tiny_tokenizer_json())


# ---- post-processors and ids the tokenizer lacks, as transformers 5 writes / generation emits -------

# What `save_pretrained` of transformers 5 writes for AF3's tokenizer (no bos/eos added).
NO_OP_TEMPLATE = {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                  "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                  "special_tokens": {}}


def _adding_template(first: str, last: str) -> dict:
    ids = {c: TINY_TOKEN_IDS[c] for c in (first, last)}
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": first, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": last, "type_id": 0}}],
            "pair": NO_OP_TEMPLATE["pair"],
            "special_tokens": {c: {"id": c, "ids": [i], "tokens": [c]} for c, i in ids.items()}}


@needs_hf
@pytest.mark.parametrize("post_processor", [
    NO_OP_TEMPLATE,
    {"type": "Sequence", "processors": [{"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                         "use_regex": True}, NO_OP_TEMPLATE]},
], ids=["template", "sequence"])
def test_template_post_processor_that_adds_nothing_loads_and_matches_hf(post_processor):
    spec = _with("post_processor", post_processor)
    ours, hf = Tokenizer(spec), hf_tokenizers.Tokenizer.from_str(json.dumps(spec))
    for text in CORPUS[:6]:
        for add in (True, False):
            assert ours.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add).ids


@needs_hf
def test_template_post_processor_that_adds_tokens_is_refused_naming_them():
    spec = _with("post_processor", _adding_template("<|im_start|>", "<|im_end|>"))
    hf = hf_tokenizers.Tokenizer.from_str(json.dumps(spec))
    plain = hf.encode("hello", add_special_tokens=False).ids
    # HF puts the two tokens around every text; af3 would not, so it refuses the file by name.
    assert hf.encode("hello", add_special_tokens=True).ids == [TINY_TOKEN_IDS["<|im_start|>"], *plain,
                                                                TINY_TOKEN_IDS["<|im_end|>"]]
    with pytest.raises(ValueError, match=r"adds the special tokens \['<\|im_end\|>', '<\|im_start\|>'\]"):
        Tokenizer(spec)


@needs_hf
def test_decode_skips_ids_the_tokenizer_lacks_as_hf_does(tiny, tiny_path):
    hf = hf_tokenizers.Tokenizer.from_file(str(tiny_path))
    known = tiny.encode("The sound of rain <|im_end|>")
    # 583..599: the unused rows of the tiny model's padded embedding (600 rows, 583 ids).
    ids = [known[0], 583, *known[1:3], 599, 596, *known[3:]]
    for skip in (False, True):
        assert tiny.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert tiny.decode(ids, skip_special_tokens=skip) == tiny.decode(known, skip_special_tokens=skip)
    assert tiny.decode(torch.tensor([596, 597])) == hf.decode([596, 597]) == ""
    pieces = []
    streamer = TextStreamer(tiny, on_text=pieces.append)
    for i in ids:  # one id per step, as generate hands them over
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(pieces) == hf.decode(ids, skip_special_tokens=True)


# ---- parity with HF tokenizers on the tiny tokenizer and its variants ---------------------------

def _gpt2_style(spec: dict) -> dict:
    """The same vocabulary behind a plain ByteLevel pre-tokenizer (GPT-2's regex) and no normalizer."""
    spec = copy.deepcopy(spec)
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                              "use_regex": True}
    return spec


@needs_hf
@pytest.mark.parametrize("variant", ["qwen2", "gpt2"])
def test_tiny_parity_with_hf(variant):
    spec = tiny_tokenizer_json() if variant == "qwen2" else _gpt2_style(tiny_tokenizer_json())
    ours = Tokenizer(spec)
    hf = hf_tokenizers.Tokenizer.from_str(json.dumps(spec))
    for text in CORPUS:
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == hf.encode(text, add_special_tokens=True).ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text


# ---- the real AF3 tokenizer ---------------------------------------------------------------------

def test_real_known_answer_for_the_design_prompt(real):
    assert real.encode(DESIGN_PROMPT) == DESIGN_IDS
    assert real.decode(DESIGN_IDS) == DESIGN_PROMPT
    assert real.convert_ids_to_tokens(DESIGN_IDS[3:7]) == ["Answer", "Ġthe", "Ġquestions", "."]
    assert (real.pad_token_id, real.eos_token_id) == (151643, 151645)
    assert real.convert_tokens_to_ids(["<sound>", "<|im_start|>"]) == [151669, 151644]
    assert real.vocab_size == 151670


def test_real_parity_with_hf_on_the_corpus(real, real_hf):
    for text in CORPUS:
        ids = real.encode(text)
        assert ids == real_hf.encode(text, add_special_tokens=False).ids, text
        assert real.decode(ids) == real_hf.decode(ids, skip_special_tokens=False), text
        assert real.decode(ids, skip_special_tokens=True) == real_hf.decode(ids, skip_special_tokens=True), text
    assert real.encode(" ".join(CORPUS)) == real_hf.encode(" ".join(CORPUS), add_special_tokens=False).ids
    assert real.vocab_size == real_hf.get_vocab_size(with_added_tokens=True)
    hf_special = {t.content for t in real_hf.get_added_tokens_decoder().values() if t.special}
    assert real.all_special_ids == sorted(real.convert_tokens_to_ids(sorted(hf_special)))


def test_real_decode_of_arbitrary_ids_matches_hf(real, real_hf):
    # Ids the model might emit in any order, including ones that cut characters in half.
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, real.vocab_size, (30,), generator=g).tolist()
        assert real.decode(ids) == real_hf.decode(ids, skip_special_tokens=False)
        assert real.decode(ids, skip_special_tokens=True) == real_hf.decode(ids, skip_special_tokens=True)


@given(text=st.text(max_size=80))
@settings(max_examples=120, deadline=None)
def test_real_round_trip_and_parity(real, real_hf, text):
    text = text.replace("<", "[")  # no added tokens
    ids = real.encode(text)
    assert real.decode(ids) == unicodedata.normalize("NFC", text)
    assert ids == real_hf.encode(text, add_special_tokens=False).ids


# ---- errors -------------------------------------------------------------------------------------

def _with(path: str, value) -> dict:
    spec = tiny_tokenizer_json()
    *parents, key = path.split(".")
    node = spec
    for p in parents:
        node = node[p] if not p.isdigit() else node[int(p)]
    node[int(key) if key.isdigit() else key] = value
    return spec


@pytest.mark.parametrize("spec", [
    _with("normalizer", {"type": "Lowercase"}),
    _with("normalizer", {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Strip"}]}),
    _with("pre_tokenizer", {"type": "Metaspace", "replacement": "▁"}),
    _with("pre_tokenizer.pretokenizers.0.behavior", "MergedWithPrevious"),
    _with("pre_tokenizer.pretokenizers.0.invert", True),
    _with("pre_tokenizer.pretokenizers.1.add_prefix_space", True),
    _with("decoder", {"type": "Metaspace"}),
    _with("post_processor", {"type": "TemplateProcessing", "single": [], "pair": [], "special_tokens": {}}),
    _with("model.type", "WordPiece"),
    _with("model.dropout", 0.1),
    _with("model.byte_fallback", True),
    _with("model.continuing_subword_prefix", "##"),
    _with("added_tokens.0.lstrip", True),
    _with("added_tokens.26.normalized", True),
    _with("truncation", {"max_length": 8}),
], ids=lambda s: "")
def test_unsupported_features_are_refused(spec):
    with pytest.raises(ValueError, match="unsupported|never truncates"):
        Tokenizer(spec)


@pytest.mark.parametrize("spec, match", [
    (_with("added_tokens.0", "<x>"), "malformed added token"),  # was an AttributeError
    (_with("added_tokens.0.content", None), "malformed added token"),  # was a KeyError without content
    (_with("added_tokens.0.id", "556"), "malformed added token"),
    (_with("added_tokens", {"<x>": 5}), "added_tokens must be a list"),
    (_with("model.vocab.Ġ", "x"), "vocabulary token 'Ġ' has id 'x'"),
    (_with("model.merges", {"a": "b"}), "BPE merges must be a list"),  # was a KeyError
    (_with("pre_tokenizer.pretokenizers.0.pattern", {"Regex": "("}), r"the Split regex '\(' does not compile"),
], ids=lambda s: "" if isinstance(s, dict) else s)
def test_malformed_tokenizer_json_is_a_value_error(spec, match):
    with pytest.raises(ValueError, match=match):
        Tokenizer(spec)


def test_broken_files_and_bad_inputs_raise_clear_errors(tmp_path, tiny, tiny_path):
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"latin1\.json: not valid JSON \('utf-8' codec"):
        Tokenizer.from_file(tmp_path / "latin1.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        Tokenizer.from_file(tmp_path / "bad.json")
    assert Tokenizer.from_file(tiny_path.parent).encode("the") == tiny.encode("the")  # a directory works
    with pytest.raises(TypeError, match="path"):
        Tokenizer.from_file(3)
    with pytest.raises(ValueError, match="pad_token '<pad>' is not a token"):
        Tokenizer.from_file(tiny_path, pad_token="<pad>")
    with pytest.raises(ValueError, match="lacks 1 of the 256 byte tokens"):
        spec = tiny_tokenizer_json()
        del spec["model"]["vocab"]["Ġ"]
        Tokenizer(spec)
    with pytest.raises(ValueError, match="malformed merge"):
        Tokenizer(_with("model.merges", [["a", "b", "c"]]))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(_with("model.merges", [["x", "y"]])).encode("xy")  # "xy" is not a token
    with pytest.raises(ValueError, match="lone surrogate '\\\\udc80'"):
        tiny.encode("ab\udc80c")
    with pytest.raises(TypeError, match="text must be a str"):
        tiny.encode(b"bytes")
    with pytest.raises(ValueError, match="token id 583 is not in the vocabulary"):
        tiny.convert_ids_to_tokens([1, 583])
    with pytest.raises(ValueError, match="token id -1 is negative"):
        tiny.decode([1, -1])
    with pytest.raises(ValueError, match="token id -1 is negative"):
        tiny.convert_ids_to_tokens(-1)
    with pytest.raises(TypeError, match="decode each row"):
        tiny.decode([[1, 2], [3, 4]])
    with pytest.raises(TypeError, match="ids must be"):
        tiny.decode("the")
    with pytest.raises(ValueError, match="'Ġzebra' is not in the vocabulary"):
        tiny.convert_tokens_to_ids("Ġzebra")
    with pytest.raises(TypeError, match="tokens must be"):
        tiny.convert_tokens_to_ids(5)
