"""`python -m sglora.launch_server`: parse ServerArgs from the command line and start serving.

Bad flags or configs end the process with one line naming the problem and exit status 2; an
interrupt during start-up with 130; a served run with 0 after SIGTERM/SIGINT, 1 if the scheduler
process died (see sglora/server/launch.py).
"""

from __future__ import annotations

import logging
import sys

from sglora.config import ConfigError, ServerArgs


def main(argv: list[str] | None = None) -> int:
    try:
        args = ServerArgs.from_cli(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from sglora.server.launch import launch

    try:
        return launch(args)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the server was up
        print("interrupted during start-up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
