"""`qprep extract` that kills itself with SIGKILL at a chosen point, for tests/test_crash_points.py.

Usage: python crash_run.py POINT:K qprep-extract-arguments...
POINT names a moment of the driver's work; the process dies at the K-th time it gets there:
  row        a tower-stage row reached the writer (other videos are still decoding or encoding)
  array      a token array of a shard was written and fsync'd (the shard's manifest not yet)
  manifest   a shard's new manifest was written to its temporary file (not yet renamed)
  renamed    a shard's manifest was renamed into place (the commit), before the directory fsync
             and the removal of the shard's old arrays
  committed  a shard's commit returned
  none       never: the run completes
The patches wrap qprep's own functions, so the process runs qprep's real code up to that moment.
"""

from __future__ import annotations

import os
import signal
import sys


def die_at(k: int):
    seen = [0]

    def hit():
        seen[0] += 1
        if seen[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)

    return hit


def after(function, hit, when=lambda *args, **kwargs: True):
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        if when(*args, **kwargs):
            hit()
        return result

    return wrapper


def install(point: str, k: int) -> None:
    import qprep.store.layout as layout
    from qprep.extraction.writer import ShardWriter

    hit = die_at(k)
    if point == "row":
        add = ShardWriter.add
        ShardWriter.add = lambda self, *args: (hit(), add(self, *args))[1]
    elif point == "array":
        layout.Store._write_array = after(layout.Store._write_array, hit)
    elif point == "manifest":
        layout.pq.write_table = after(layout.pq.write_table, hit)
    elif point == "renamed":
        os.replace = after(os.replace, hit, when=lambda src, dst: str(dst).endswith(".parquet"))
    elif point == "committed":
        layout.Store.commit_shard = after(layout.Store.commit_shard, hit)
    elif point != "none":
        raise SystemExit(f"unknown point {point}")


if __name__ == "__main__":
    point, k = sys.argv[1].split(":")
    install(point, int(k))
    from qprep.cli import main

    main(sys.argv[2:])
