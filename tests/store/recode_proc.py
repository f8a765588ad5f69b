"""A real recode process for crash tests: ``fcache.store.recode.recode`` with one worker, killed at a known point.

usage: python recode_proc.py SRC DST DTYPE [--kill N:STAGE]
--kill sends SIGKILL to itself when the N-th unit this run writes (0-based) reaches STAGE (delete, level:NAME, samples,
commit). Prints the summary as JSON when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

from fcache.store.recode import recode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("dtype")
    ap.add_argument("--kill", default="")
    args = ap.parse_args()
    unit, _, stage = args.kill.partition(":")
    started = [-1]

    def hook(reached: str) -> None:
        if reached == "delete":
            started[0] += 1
        if args.kill and started[0] == int(unit) and reached == stage:
            os.kill(os.getpid(), signal.SIGKILL)

    summary = recode(args.src, args.dst, dtype=args.dtype, workers=1, hook=hook)
    print(json.dumps(summary.to_dict()))


if __name__ == "__main__":
    main()
