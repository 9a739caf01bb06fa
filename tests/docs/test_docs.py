"""The README and the pages under docs/: every internal link resolves (files and #anchors), no
machine paths, and the shell blocks marked ``<!-- runnable -->`` run against a real server and
print what the page shows under them (ids, numbers and times aside).

``python tests/docs/test_docs.py URL PAGE.md`` runs one page's runnable blocks against a running
server and prints each block's output, to paste under it.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = "<!-- runnable -->"
QUICKSTART_URL = "http://127.0.0.1:8000"  # what the pages' blocks assume; the test swaps in its own


def fenced_blocks(text: str) -> list[dict]:
    """Top-level ``` blocks in order: ``{"info", "body", "runnable"}``; ``runnable`` when the line
    before the fence (blank lines skipped) is the marker."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            info, body, j = lines[i][3:].strip(), [], i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                body.append(lines[j])
                j += 1
            before = [ln for ln in lines[:i] if ln.strip()]
            blocks.append({"info": info, "body": "\n".join(body) + "\n",
                           "runnable": bool(before) and before[-1].strip() == RUNNABLE})
            i = j
        i += 1
    return blocks


def runnable_blocks(text: str) -> list[tuple[str, str | None]]:
    """``(bash code, the text block right after it or None)`` for every runnable block."""
    blocks = fenced_blocks(text)
    out = []
    for k, b in enumerate(blocks):
        if b["runnable"] and b["info"] == "bash":
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            out.append((b["body"], nxt["body"] if nxt and nxt["info"] == "text" else None))
    return out


def _prose(text: str) -> str:
    """The page without fenced blocks and inline code (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    h = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: outside links
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_internal_links_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_machine_paths(page):
    assert not re.findall(r"/work/\S*", page.read_text())


def test_link_checker_catches_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "b.md").write_text("# Only heading\n")
    page = tmp_path / "a.md"
    page.write_text("[x](b.md#only-heading) [y](c.md) [z](b.md#nowhere) `[q](not-a-link.md)`\n"
                    "```\n[w](inside-a-block.md)\n```\n")
    assert broken_links(page) == ["c.md: no such file", "b.md#nowhere: no heading #nowhere in b.md"]


def test_runnable_blocks_pair_code_with_the_output_below_it():
    text = (f"{RUNNABLE}\n```bash\necho hi\n```\n\n```text\nhi\n```\n"
            "```bash\necho skipped\n```\n"
            f"{RUNNABLE}\n\n```bash\necho no output shown\n```\nprose\n")
    assert runnable_blocks(text) == [("echo hi\n", "hi\n"), ("echo no output shown\n", None)]


def normalized(output: str) -> list[str]:
    """Lines with job ids and every number replaced, so runs compare by their shape."""
    lines = [re.sub(r"\b[0-9a-f]{32}\b", "ID", ln.rstrip()) for ln in output.strip().splitlines()]
    return [re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", ln) for ln in lines]


def run_page(page: Path, url: str, timeout: float = 600) -> list[str]:
    """Runs the page's runnable blocks in one bash session (later blocks use earlier variables),
    from the repository root, against ``url`` -> each block's stdout."""
    sep = "@@block-end@@"
    script = "".join(code.replace(QUICKSTART_URL, url) + f"\necho {sep}\n"
                     for code, _ in runnable_blocks(page.read_text()))
    try:
        done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # show what the blocks printed so far
        raise AssertionError(f"blocks still running after {timeout} s; printed:\n{e.stdout}") from None
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split(sep + "\n")[:-1]


@pytest.fixture(scope="module")
def server_url():
    from tests.helpers.server import start_server, stop_server

    proc, url = start_server()
    yield url
    stop_server(proc)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["README.md", "docs/guide.md"])
def test_runnable_blocks_print_what_the_page_shows(name, server_url):
    if not (ROOT / ".venv/bin/python").exists():
        pytest.skip("the blocks call .venv/bin/python: run make setup")
    page = ROOT / name
    blocks = runnable_blocks(page.read_text())
    assert blocks, f"{name} marks no block runnable"
    outputs = run_page(page, server_url)
    assert len(outputs) == len(blocks)
    for (code, shown), got in zip(blocks, outputs):
        if shown is not None:
            assert normalized(got) == normalized(shown), f"{name}, block:\n{code}\nprinted:\n{got}"


if __name__ == "__main__":
    for out in run_page(ROOT / sys.argv[2], sys.argv[1]):
        print(out + "-" * 40)
