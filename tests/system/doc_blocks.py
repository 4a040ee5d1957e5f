"""The blocks of a document marked ``<!-- checked -->``: each ```sh block after the mark,
and the ```text block right after it (the expected output), written as NN.sh and
NN.expected into a directory, for tests/system/test_install.sh to run as written.

    python3 doc_blocks.py DOCUMENT OUT_DIR    prints how many blocks it wrote
    python3 doc_blocks.py --match EXPECTED < OUTPUT
                                              exit 0 when OUTPUT shows EXPECTED
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.DOTALL | re.MULTILINE)
MARK = "<!-- checked -->"


def checked_blocks(text: str) -> list[tuple[str, str]]:
    """``(commands, expected output)`` of each marked block, in order ("" when the
    commands are not followed by a text block)."""
    fences = list(_FENCE.finditer(text))
    blocks: list[tuple[str, str]] = []
    for number, fence in enumerate(fences):
        before = text[: fence.start()].rstrip()
        if fence.group(1) != "sh" or not before.endswith(MARK):
            continue
        expected = ""
        if number + 1 < len(fences):
            following = fences[number + 1]
            between = text[fence.end() : following.start()]
            if following.group(1) == "text" and not between.strip():
                expected = following.group(2)
        blocks.append((fence.group(2), expected))
    return blocks


def shows(expected: str, output: str) -> bool:
    """Whether ``output`` has every line of ``expected`` (but "..." lines, which stand for
    any lines) as whole lines, in order."""
    lines = [line.rstrip() for line in output.splitlines()]
    position = 0
    for wanted in expected.splitlines():
        if wanted.strip() in ("", "..."):
            continue
        try:
            position = lines.index(wanted.rstrip(), position) + 1
        except ValueError:
            return False
    return True


def main(document: str, out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blocks = checked_blocks(Path(document).read_text(encoding="utf-8"))
    for number, (commands, expected) in enumerate(blocks, start=1):
        (out / f"{number:02d}.sh").write_text(commands, encoding="utf-8")
        (out / f"{number:02d}.expected").write_text(expected, encoding="utf-8")
    print(len(blocks))
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--match":
        expected_text = Path(sys.argv[2]).read_text(encoding="utf-8")
        sys.exit(0 if shows(expected_text, sys.stdin.read()) else 1)
    sys.exit(main(*sys.argv[1:]))
