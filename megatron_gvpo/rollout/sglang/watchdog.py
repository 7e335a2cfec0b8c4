"""Keep an SGLang server from outliving the trainer that started it.

We start each server in its own session so that :func:`server.terminate` can stop its whole
process group; the price is that a trainer killed with SIGKILL (OOM killer, ``scancel`` after the
grace period) leaves its servers running and holding their GPUs. ``PR_SET_PDEATHSIG`` on the
server does not fix this here: it fires when the *thread* that forked exits, and servers are
restarted from rollout threads. So the server runs under this small parent instead::

    python .../rollout/sglang/watchdog.py <trainer pid> -- <sglang command...>

It starts the command in its own process group (the session's), mirrors its exit code, and
SIGKILLs the group once it is reparented, i.e. the trainer is gone. SGLang's own scheduler and detokenizer
processes die with their parent (``kill_itself_when_parent_died``, sglang 0.5.23
``srt/utils/common.py:3432``, called from ``srt/managers/scheduler.py:6269`` and
``detokenizer_manager.py:550``), and they share the group in any case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: watchdog.py PID -- COMMAND...", file=sys.stderr)
        return 2
    trainer = int(argv[0])
    try:
        child = subprocess.Popen(argv[2:])
    except OSError as e:
        print(f"cannot start the server: {e}", file=sys.stderr)  # lands in the server log
        return 127
    # SIGTERM/SIGINT to us alone (not the group) reach the server as well.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    while True:
        code = child.poll()
        if code is not None:
            return code if code >= 0 else 128 - code
        if os.getppid() != trainer:  # reparented: the trainer is gone
            os.killpg(os.getpgid(0), signal.SIGKILL)  # the server's tree and us
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
