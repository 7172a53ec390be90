"""Instructions executed, counted by valgrind's callgrind: a measure that other work on a shared machine does not
move (wall and CPU seconds swing by tens of percent there; a count repeats to a fraction of a percent). It counts
work, not waiting, so it complements wall-clock timings on a quiet machine rather than replacing them.

The measuring process runs under `valgrind --tool=callgrind --instr-atstart=no` and turns counting on and off around
the timed work with callgrind's client requests, which three lines of C issue (built here by the system's C compiler
against valgrind's header). Linux with valgrind and a C compiler only.
"""

import ctypes
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

ENV = "COMPARE_CALLGRIND"  # the helper's folder, set for a measuring process that runs under callgrind
HELPER = """#include <valgrind/callgrind.h>
void count_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void count_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT("timed"); }
"""


def prepare(folder: Path) -> None:
    """Build the helper in `folder`, or exit with one line naming what is missing."""
    for tool in ("valgrind", "cc"):
        if shutil.which(tool) is None:
            sys.exit(f"error: --clock instructions needs {tool} on the PATH")
    (folder / "count.c").write_text(HELPER)
    r = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(folder / "libcount.so"), str(folder / "count.c")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["failed"])[-1]
        sys.exit(f"error: cannot build the callgrind helper (are valgrind's headers installed?): {tail}")


def command(folder: Path) -> list:
    """What goes before `python ...` to run a measuring process under callgrind, counting nothing at first."""
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={folder}/count.%p"]


class Counter:
    """In the measuring process: start() and stop() -> instructions executed in between."""

    def __init__(self):
        self.folder = Path(os.environ[ENV])
        self.lib = ctypes.CDLL(str(self.folder / "libcount.so"))

    def start(self) -> None:
        self.lib.count_start()

    def stop(self) -> int:
        self.lib.count_stop()
        dump = self.folder / f"count.{os.getpid()}.1"
        totals = [line for line in dump.read_text().splitlines() if line.startswith("totals:")]
        return int(totals[0].split()[1])


def allow_rlimit_requests() -> None:
    """mlx-lm raises the open-file limit when imported; under valgrind, which keeps the hard limit for itself, that
    request fails and the import with it. The limit is no part of what is measured, so a refused request is let
    pass."""
    setrlimit = resource.setrlimit

    def tolerant(which, limits):
        try:
            setrlimit(which, limits)
        except ValueError:
            pass

    resource.setrlimit = tolerant
