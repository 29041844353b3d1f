"""Stand-in checker functions for VerifierPool tests (a light module: spawned workers import it)."""

import time


def hang_forever(args):
    time.sleep(3600)


def hang_on_marker(args):
    """1.0 at once, except for the completion "hang", which never returns."""
    if args[0] == "hang":
        time.sleep(3600)
    return 1.0
