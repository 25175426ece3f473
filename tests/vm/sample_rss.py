"""Run inside a test guest beside collect: its resident anonymous memory, sampled until it exits.

One long-lived process rather than a shell loop of greps and sleeps, whose forks would
allocate and free page tables all through the capture. Standard library only.
Usage: ``python sample_rss.py PID OUT``: appends one ``RssAnon:`` line per sample to OUT.
"""

from __future__ import annotations

import sys
import time

#: Seconds between samples.
INTERVAL = 0.2


def main(pid: str, out: str) -> None:
    with open(out, "a") as sink:
        while True:
            try:
                with open(f"/proc/{pid}/status") as fh:
                    status = fh.read()
            except OSError:
                return  # collect has exited
            for line in status.splitlines():
                if line.startswith("RssAnon:"):
                    sink.write(line + "\n")
                    sink.flush()
            time.sleep(INTERVAL)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
