"""The ``jnnex`` console script: takes hold of Ctrl-C before JAX is imported, then runs :func:`jnnex.cli.main`.

Importing JAX takes a second or so, and an interrupt landing inside a C extension's initialisation surfaces as an
unrelated ``ImportError`` with two tracebacks. Here a first Ctrl-C during the imports is only recorded (the imports
finish, then the command exits with 130 and one line), as a Ctrl-C at any later moment lets the work in flight finish
(:func:`jnnex.train.ctrl_c_guard`); a second one raises at once.
"""

import signal
import sys


def main() -> int:
    pressed = []

    def record(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a process started with SIGINT ignored keeps it so
    if not ignored:
        signal.signal(signal.SIGINT, record)
    from jnnex.cli import main as cli_main

    if not ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if pressed:
        print("jnnex: interrupted", file=sys.stderr)
        return 130
    return cli_main()
