"""Worker processes that never outlive the process that started them.

A worker orphaned by a SIGKILL of its parent goes on writing (a preprocessing shard that races the rerun)
or holding memory (a DataLoader worker). On Linux the kernel can send the child SIGKILL when its parent
thread ends (PR_SET_PDEATHSIG); a parent that died before the child asked is caught by getppid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Call first thing in a worker: it is killed when the process `parent_pid` (its parent) ends."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
