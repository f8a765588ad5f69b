"""A real writer process for crash tests: creates (or resumes) a store and writes its pending units.

usage: python writer_proc.py STORE [--units 0,1] [--kill UNIT:STAGE] [--slow SECONDS]
--kill sends SIGKILL to itself when unit UNIT reaches STAGE (delete, level:NAME, samples, commit).
Prints one line per unit: "<unit> committed" or "<unit> skipped".
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fcache import store as fstore  # noqa: E402
from helpers import make_manifest, unit_payload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--units", default="")
    ap.add_argument("--kill", default="")
    ap.add_argument("--slow", type=float, default=0.0)
    args = ap.parse_args()
    m, keys = make_manifest(n=14, shard_size=4, input_size=64)
    writer = fstore.create(args.store, m, keys)
    todo = writer.pending()
    if args.units:
        wanted = {int(u) for u in args.units.split(",")}
        todo = [u for u in writer.units if u.index in wanted]
    for unit in todo:

        def hook(stage: str, unit=unit) -> None:
            if args.slow:
                time.sleep(args.slow)
            if args.kill == f"{unit.index}:{stage}":
                os.kill(os.getpid(), signal.SIGKILL)

        feats, status, geometry, errors = unit_payload(m, unit)
        rec = writer.write_unit(unit, feats, status, geometry, errors=errors, hook=hook)
        print(f"{unit.index} {'committed' if rec else 'skipped'}", flush=True)
    writer.finalize()


if __name__ == "__main__":
    main()
