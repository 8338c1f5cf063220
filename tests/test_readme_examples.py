"""Every example of README.md and docs/*.md marked runnable works as pasted against `bash scripts/run.sh`.

A block is marked by an HTML comment on the line before its fence (docs/contributing.md explains the marks):
`<!-- runnable -->` runs on its own; `<!-- runnable: in the walk-through's shell -->` runs after the first lines of
the README's walk-through (up to its first blank line), which define `B`, `K` and `pick`. The server is started
the way run.sh starts it (scripts/embedded.py run, a fresh data directory, a free port); each block runs from the
clone's directory with `127.0.0.1:8181` changed to that port, 8282 (the embedding example's second port) to another
free one and `.data/` to the data directory. A block fails when it exits non-zero or when the answers it prints
(lines that are JSON envelopes) do not have the `code` and `msg` of the `# {"code":...}` comments shown in it.
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import ROOT, free_port
from test_run_script import RunCommand

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!-- runnable(?::\s*(?P<kind>[^>]*?))?\s*-->$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
LANGUAGES = {"sh": "bash", "bash": "bash", "python": "python", "js": "node", "javascript": "node"}
AFTER_WALK_THROUGH = "in the walk-through's shell"
BLOCK_TIMEOUT = 120  # seconds a block may take (the embedding example starts a second server)
# the npm packages the JavaScript examples may require, at the versions they were written against
NPM_VERSIONS = {"crypto-js": "4.2.0", "http-message-signatures": "1.0.6", "standardwebhooks": "1.1.1"}
# answer comments: `# {"code":200,...}` in shell and Python, `// {"code":200,...}` in JavaScript
ANSWER_COMMENT = re.compile(r'^\s*(?:#|//) (\{"code":.*)$')
ANSWER_LINE = re.compile(r'^(\{"code":.*)$')
CODE_MSG = re.compile(r'^\{"code":(-?\d+),"msg":"((?:[^"\\]|\\.)*)"')


@dataclass
class Block:
    document: pathlib.Path
    line: int  # of the opening fence, 1-based
    language: str  # bash, python or node
    kind: str  # "" or AFTER_WALK_THROUGH
    code: str

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"


def marked_blocks(path: pathlib.Path) -> list[Block]:
    """The fenced blocks of one Markdown file whose previous line is a runnable mark."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        mark = MARK.match(lines[i].strip())
        if mark and i + 1 < len(lines) and FENCE.match(lines[i + 1]):
            lang = FENCE.match(lines[i + 1]).group("lang")
            assert lang in LANGUAGES, f"{path.name}:{i + 2}: a runnable block needs sh, bash, python or js, not {lang!r}"
            kind = (mark.group("kind") or "").strip()
            assert kind in ("", AFTER_WALK_THROUGH), f"{path.name}:{i + 1}: unknown mark {lines[i]!r}"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(path, i + 2, LANGUAGES[lang], kind, "\n".join(lines[i + 2:end]) + "\n"))
            i = end
        i += 1
    return blocks


BLOCKS = [block for document in DOCUMENTS for block in marked_blocks(document)]


def walk_through_prelude() -> str:
    """The first lines of the README's walk-through, up to its first blank line (B, K, pick)."""
    readme = ROOT / "README.md"
    section = readme.read_text()[readme.read_text().index("## Try it with curl"):]
    walk = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return walk.split("\n\n", 1)[0] + "\n"


def expected_answers(code: str) -> list[tuple[int, str | None]]:
    """(code, msg) of each answer comment of a block, in order; msg None when the comment does not show it."""
    answers = []
    for line in code.splitlines():
        comment = ANSWER_COMMENT.match(line)
        if comment:
            shown = CODE_MSG.match(comment.group(1)) or re.match(r'^\{"code":(-?\d+)()', comment.group(1))
            answers.append((int(shown.group(1)), shown.group(2) or None))
    return answers


def printed_answers(output: str) -> list[tuple[int, str]]:
    answers = []
    for line in output.splitlines():
        if ANSWER_LINE.match(line.strip()):
            try:
                envelope = json.loads(line)
            except ValueError:
                continue
            answers.append((envelope["code"], envelope["msg"]))
    return answers


def test_the_documentation_marks_examples_in_each_language_and_kind():
    """The marks are found (a renamed mark or fence would silently test nothing)."""
    names = {block.document.name for block in BLOCKS}
    assert {"README.md", "signing.md", "embedding.md"} <= names, names
    assert {block.language for block in BLOCKS} == {"bash", "python", "node"}
    assert {block.kind for block in BLOCKS} == {"", AFTER_WALK_THROUGH}
    assert sum(1 for block in BLOCKS if expected_answers(block.code)) >= 8
    assert "K()" in walk_through_prelude() and "pick()" in walk_through_prelude()


def test_answer_comments_are_compared_by_code_and_msg():
    code = '# {"code":200,"msg":"success","data":{"post_id":1}}\n// {"code":10006,"msg":"find data failed"}\n' \
           '# {"code":200,"msg":"success","data":{"post_list":[...]}}\n# {"code":400,...}\n# not an answer\n'
    assert expected_answers(code) == [(200, "success"), (10006, "find data failed"), (200, "success"), (400, None)]
    output = '{"code":200,"msg":"success","data":null}\n: keep-alive\ndata: {"id":"1"}\n{"code":7,"msg":"x"}\n'
    assert printed_answers(output) == [(200, "success"), (7, "x")]


@pytest.fixture(scope="module")
def served(workdir):
    """The server, started as run.sh starts it, on a data directory of its own."""
    run_dir = workdir / "readme-examples"
    run_dir.mkdir()
    command = RunCommand(run_dir / "data").start()
    try:
        asyncio.run(command.wait_ready())
        yield command
    finally:
        command.stop()


@pytest.fixture(scope="module")
def node_modules(workdir):
    """A directory with the npm packages the JavaScript examples require (skips when they cannot be had)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the JavaScript examples are not run")
    wanted = sorted({name for block in BLOCKS if block.language == "node"
                     for name in re.findall(r"""require\(['"]([^'"./][^'"]*)['"]\)""", block.code)
                     if not name.startswith("node:")})
    unknown = set(wanted) - set(NPM_VERSIONS)
    assert not unknown, f"add a version for {unknown} to NPM_VERSIONS"
    target = workdir / "readme-npm"
    target.mkdir(exist_ok=True)
    if wanted:
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: cannot install " + ", ".join(wanted))
        try:
            done = subprocess.run(
                ["npm", "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(target),
                 *(f"{name}@{NPM_VERSIONS[name]}" for name in wanted)],
                capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pytest.skip("the npm registry did not answer within 240 s: the JavaScript examples are not run")
        if done.returncode != 0:
            pytest.skip("npm could not install " + ", ".join(wanted) + " (is the npm registry reachable?): "
                        + (done.stderr.strip().splitlines() or ["no output"])[-1])
    return target / "node_modules"


def pasted(code: str, served: RunCommand, second_port: int) -> str:
    """The block as a user on this server would paste it: this server's port, data directory, spare port."""
    return (code.replace("127.0.0.1:8181", f"127.0.0.1:{served.port}")
                .replace("localhost:8181", f"localhost:{served.port}")
                .replace("8282", str(second_port))
                .replace(".data/", f"{served.data}/"))


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_the_example_runs_as_pasted(block: Block, served: RunCommand, request):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    code = pasted(block.code, served, free_port())
    if block.language == "bash":
        if block.kind == AFTER_WALK_THROUGH:
            code = pasted(walk_through_prelude(), served, 0) + code
        argv = ["bash", "-e", "-c", code]
    elif block.language == "python":
        argv = [sys.executable, "-c", code]
    else:
        env["NODE_PATH"] = str(request.getfixturevalue("node_modules"))
        argv = ["node", "-e", code]
    done = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=BLOCK_TIMEOUT, stdin=subprocess.DEVNULL)  # one stream: answers in order
    assert done.returncode == 0, f"{block.name} exited {done.returncode}:\n{done.stdout}"
    shown = expected_answers(block.code)
    if shown:
        got = printed_answers(done.stdout)
        assert [code for code, _ in got] == [code for code, _ in shown], f"{block.name}:\n{done.stdout}"
        for (_, msg), (_, shown_msg) in zip(got, shown):
            assert shown_msg is None or msg == shown_msg, f"{block.name}:\n{done.stdout}"
