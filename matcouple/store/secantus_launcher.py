"""Entry point of the embedded database process: SecantusDB with matcouple's fixes.

Run as ``python -m matcouple.store.secantus_launcher [--commit-sync fsync|none]
[secantusd-py flags]``; it is what ``matcouple db start`` spawns. Apart from
``--commit-sync`` (see :func:`secantus_compat.set_commit_method`) the flags are
SecantusDB's own.
"""

from __future__ import annotations

import logging
import sys

from matcouple.store import secantus_compat


def main(argv: list[str] | None = None) -> int:
    import argparse

    from secantus.cli import main as secantus_main

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--commit-sync", choices=secantus_compat.COMMIT_METHODS,
                        default="fsync")
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not secantus_compat.set_commit_method(ours.commit_sync):
        logging.getLogger("matcouple").warning(
            "commit sync %s not available for this SecantusDB; using fsync", ours.commit_sync)
    patched = secantus_compat.apply()
    logging.getLogger("matcouple").warning(
        "matcouple compatibility layer for SecantusDB: %s",
        "active (findAndModify _id narrowing, ordered claims, index catalog cache, "
        "unchanged index entries kept, catalog-derived answers memoised)"
        if patched else "not needed for this version",
    )
    return secantus_main(rest)


if __name__ == "__main__":
    sys.exit(main())
