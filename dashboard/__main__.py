"""`python -m agentledger.dashboard`: serve the dashboard with Settings() from env."""

from __future__ import annotations

import logging

from agentledger.config import Settings

from .server import serve


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    serve(Settings())


if __name__ == "__main__":
    main()
