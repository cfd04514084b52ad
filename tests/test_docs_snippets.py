"""Every fenced snippet of README.md and docs/*.md runs as written, so the docs cannot drift.

- ```python blocks are executed (CPU, small sizes), each in a fresh namespace. A snippet may use,
  without defining them, the names a server already holds at that point: ``PLACEHOLDERS`` below
  (``num_blocks``, ``prompt``, ``allocator``, ``cache``, ...), built only when the snippet reads one it
  did not define. Modules are never placeholders: a snippet must import what it uses.
- Commands of ```bash / ```console blocks that start with ``kvpool `` (``$ kvpool `` in a console
  block) run through the CLI and must exit 0.
- A block opts out only with a visible marker on the line before its fence,
  ``<!-- no-test: reason -->`` (a GPU, a multi-process launch); the reason shows as the skip reason.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST = re.compile(r"<!--\s*no-test:\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    opt_out: str | None  # the reason of a preceding <!-- no-test: reason -->

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of one Markdown file, in order."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NO_TEST.search(before)
        blocks.append(Block(path, i + 1, m.group(1).lower(), "\n".join(lines[i + 1:end]),
                            marker.group(1) if marker else None))
        i = end + 1
    return blocks


def all_blocks(langs: tuple[str, ...]) -> list[Block]:
    return [b for path in DOCS for b in fenced_blocks(path) if b.lang in langs]


def kvpool_commands(block: Block) -> list[str]:
    """The ``kvpool ...`` command lines of a bash/console block (``\\`` continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", block.code)
    prefix = "$ " if block.lang == "console" else ""
    return [line.strip()[len(prefix):] for line in joined.splitlines()
            if line.strip().startswith(prefix + "kvpool ")]


# ----------------------------------------------------------------- placeholders
def _cache(ns):
    from kvpool import PagedKVCache
    from kvpool.demo.model import tiny_llama_config

    return PagedKVCache.for_shard(tiny_llama_config(), ns["num_blocks"], ns["block_size"], 0, 1, ns["device"])


def _new_kv(ns):
    def new_kv(batch):  # stands in for the model: K and V of the batch's new tokens
        cache = ns["cache"]
        shape = (batch.slot_mapping.numel(), *cache.k_caches[0].shape[2:])
        return torch.randn(shape, dtype=cache.dtype), torch.randn(shape, dtype=cache.dtype)
    return new_kv


PROMPT = list(range(100, 140))  # 40 tokens: 2 full blocks of 16 and 8 more
PLACEHOLDERS = {  # name -> factory(namespace): what a server holds when the snippet runs
    "num_blocks": lambda ns: 8,
    "block_size": lambda ns: 16,
    "device": lambda ns: "cpu",
    "rank": lambda ns: 0,
    "i": lambda ns: 0,  # a layer index
    "layer": lambda ns: 0,
    "n": lambda ns: 3,  # blocks to allocate
    "n_needed": lambda ns: 3,  # blocks the prompt needs
    "prompt": lambda ns: list(PROMPT),
    "prompt_ids": lambda ns: list(PROMPT),
    "prompt_token_ids": lambda ns: list(PROMPT),
    "seq_id": lambda ns: 0,
    "child_id": lambda ns: 1,
    "running_ids": lambda ns: [0],
    "allocator": lambda ns: __import__("kvpool").BlockAllocator(ns["num_blocks"], block_size=ns["block_size"]),
    "cache": _cache,
    "new_kv": _new_kv,
}


class SnippetNamespace(dict):
    """Globals of one snippet: a placeholder is built the first time the snippet reads it undefined."""

    def __missing__(self, name):
        if name not in PLACEHOLDERS:
            raise KeyError(name)
        self[name] = PLACEHOLDERS[name](self)
        return self[name]


def run_python_block(block: Block) -> dict:
    ns = SnippetNamespace(__name__="__doc_snippet__")
    try:
        exec(compile(block.code, block.id, "exec"), ns)
    finally:
        for value in list(ns.values()):  # a snippet that started a metrics server: stop it
            if hasattr(value, "shutdown") and hasattr(value, "server_port"):
                value.shutdown()
                value.server_close()
    return ns


# ----------------------------------------------------------------- tests
PYTHON_BLOCKS = all_blocks(("python",))
CLI_BLOCKS = [b for b in all_blocks(("bash", "console", "sh", "shell")) if kvpool_commands(b)]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_snippet_runs(block):
    if block.opt_out:
        pytest.skip(f"{block.id} opts out: {block.opt_out}")
    run_python_block(block)


@pytest.mark.parametrize("block", CLI_BLOCKS, ids=[b.id for b in CLI_BLOCKS])
def test_cli_snippet_exits_0(block, tmp_path):
    if block.opt_out:
        pytest.skip(f"{block.id} opts out: {block.opt_out}")
    for command in kvpool_commands(block):
        args = shlex.split(command)[1:]
        proc = subprocess.run([sys.executable, "-c", "import sys; from kvpool.cli import main; sys.exit(main())",
                               *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{block.id}: {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"


def test_the_docs_have_snippets_and_few_opt_outs():
    # the collector itself: a broken fence regex would make every test above vanish silently
    assert len(PYTHON_BLOCKS) >= 6 and len(CLI_BLOCKS) >= 3
    opted_out = [b.id for b in PYTHON_BLOCKS + CLI_BLOCKS if b.opt_out]
    assert len(opted_out) <= 3, f"opt-outs are for GPU / multi-process snippets only: {opted_out}"


def test_a_snippet_must_import_its_modules():
    block = Block(ROOT / "README.md", 0, "python", "a = np.zeros(3)", None)
    with pytest.raises(NameError, match="'np' is not defined"):
        run_python_block(block)


def test_json_workload_key_is_documented_with_its_condition():
    # `kvpool plan --json` emits "workload" only for a target workload (--batch and --seq-len)
    for path in (ROOT / "README.md", ROOT / "docs" / "planner.md"):
        text = " ".join(path.read_text().split())
        for sentence in re.findall(r"`--json` prints[^.]*\.", text):
            if "`workload`" in sentence:
                assert "--batch" in sentence, f"{path.name}: {sentence}"
