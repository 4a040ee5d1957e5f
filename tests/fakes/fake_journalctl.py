"""A stand-in for journalctl, for tests without systemd: a real program the agent runs.

It answers what the agent asks of the journal (``--unit=<unit> --output=json --no-pager
--quiet --since=@<seconds>``) from the entries in the file ``$FAKE_JOURNAL``, one JSON
object a line, each with ``_SYSTEMD_UNIT``, ``__REALTIME_TIMESTAMP`` (microseconds since
the epoch, a string, as journald writes it) and ``MESSAGE`` (a string, or the bytes as a
list of numbers, as journald gives a message that is not UTF-8). It prints the entries of
that unit from that time on, as journalctl does with ``--output=json``, and appends its
arguments to ``$FAKE_JOURNAL.calls``, one call a line.

``FAKE_JOURNALCTL_FAIL=<message>``: prints the message on stderr and exits 1, as journalctl
does when it cannot open the journal. An option it does not know is refused the same way.
"""

from __future__ import annotations

import json
import os
import sys

KNOWN = ("--unit=", "--output=", "--no-pager", "--quiet", "--since=@")


def main(argv: list[str]) -> int:
    """Answer one call."""
    journal = os.environ["FAKE_JOURNAL"]
    with open(journal + ".calls", "a", encoding="utf-8") as calls:
        calls.write(" ".join(argv) + "\n")
    failure = os.environ.get("FAKE_JOURNALCTL_FAIL")
    if failure:
        sys.stderr.write(failure + "\n")
        return 1
    unit = ""
    since_us = 0
    for argument in argv:
        if not argument.startswith(KNOWN):
            sys.stderr.write(f"journalctl: unrecognized option '{argument}'\n")
            return 1
        if argument.startswith("--unit="):
            unit = argument[len("--unit=") :]
        elif argument.startswith("--since=@"):
            since_us = int(argument[len("--since=@") :]) * 1_000_000
        elif argument.startswith("--output=") and argument != "--output=json":
            sys.stderr.write("journalctl: the stand-in only speaks --output=json\n")
            return 1
    if not os.path.exists(journal):
        return 0
    with open(journal, encoding="utf-8") as entries:
        for line in entries:
            entry = json.loads(line)
            if entry["_SYSTEMD_UNIT"] == unit and int(entry["__REALTIME_TIMESTAMP"]) >= since_us:
                sys.stdout.write(json.dumps(entry) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
