"""Every ```python block of README.md runs as-is against what `make demo` leaves, so the docs cannot rot.

The blocks name `af3-checkpoint` and `speech.wav`; `make demo` builds both in .demo/ and the
README says to run the blocks from there. This test calls the demo's own build code
(examples/demo.py `build`) into a temporary folder and runs every block in it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.DOTALL)


def demo_module():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return demo_module().build(tmp_path_factory.mktemp("readme") / ".demo")


def test_readme_says_where_make_demo_leaves_its_files():
    demo = demo_module()
    assert (demo.DEMO.name, demo.AF3_NAME, demo.WAV_NAME) == (".demo", "af3-checkpoint", "speech.wav")
    assert "`.demo/af3-checkpoint`" in TEXT and "`.demo/speech.wav`" in TEXT and "cd .demo" in TEXT
    for block in BLOCKS:  # the names the blocks use are the ones the demo leaves
        for name in re.findall(r'"([\w.-]+\.wav|af3-[\w-]+)"', block):
            assert name in ("speech.wav", "af3-checkpoint"), name


def test_readme_has_the_usage_patterns():
    assert len(BLOCKS) >= 7
    head = TEXT[:TEXT.index("## ", TEXT.index("\n") + 1)]
    assert "make demo" in head and "make test" in head
    for needle in ("apply_transcription_request", "output_labels", "think=True", "start_chat", "weights_convert"):
        assert needle in TEXT


def test_readme_links_stay_in_the_repository():
    # A clone has only the repository: relative links must name files in it; web links are fine.
    targets = re.findall(r"\]\(([^)\s]+)\)", TEXT)
    assert targets and "../shared" not in TEXT and "DESIGN.md" not in TEXT  # the design notes are in README
    for target in targets:
        if re.match(r"https?://", target):
            continue
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"README.md links to {target}, not in the repository"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = compile(BLOCKS[index], f"README.md python block {index}", "exec")
        exec(code, {"__name__": "__readme__"})  # noqa: S102 -- running the README's code is the point
    assert out.getvalue(), "every README block prints something"
