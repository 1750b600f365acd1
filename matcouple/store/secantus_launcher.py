"""Entry point of the embedded database process: SecantusDB with matcouple's fixes.

Run as ``python -m matcouple.store.secantus_launcher [secantusd-py flags]``; it is what
``matcouple db start`` spawns. The flags are SecantusDB's own.
"""

from __future__ import annotations

import logging
import sys

from matcouple.store import secantus_compat


def main(argv: list[str] | None = None) -> int:
    from secantus.cli import main as secantus_main

    patched = secantus_compat.apply()
    logging.getLogger("matcouple").warning(
        "matcouple compatibility layer for SecantusDB: %s",
        "findAndModify _id narrowing active" if patched else "not needed for this version",
    )
    return secantus_main(argv)


if __name__ == "__main__":
    sys.exit(main())
