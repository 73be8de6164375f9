"""The stage-1 command line, watched: what ``tests/workshop/test_stage1_processes.py`` starts, alone or under
``accelerate launch``.

    PROBE_LOG=DIR [PROBE_CRASH_AT=N] python stage1_probe.py ARGS...   (ARGS: the trainer's command line)

Each process appends the index of every example it reads to ``DIR/reads-RANK.txt``. With
``PROBE_CRASH_AT``, a process dies (an exception, as a pre-empted job's would) when it is about to read
its N-th example, mid-run, wherever that falls between two checkpoints.
"""

import os
import sys
from pathlib import Path

from llama3vision_min.training import stage1
from llama3vision_min.training.data import LlavaPretrain

read_example = LlavaPretrain.__getitem__
reads = []


def watched(self, index):
    rank = os.environ.get("RANK", "0")
    if len(reads) + 1 == int(os.environ.get("PROBE_CRASH_AT", 0)):
        raise RuntimeError(f"the probe stopped process {rank} at its example {len(reads) + 1}")
    reads.append(index)
    with open(Path(os.environ["PROBE_LOG"]) / f"reads-{rank}.txt", "a") as log:
        log.write(f"{index}\n")
    return read_example(self, index)


LlavaPretrain.__getitem__ = watched
sys.exit(stage1.main(sys.argv[1:]))
