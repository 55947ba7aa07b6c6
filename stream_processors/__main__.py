"""`python -m agentledger.stream_processors`: run one processor worker with Settings() from env."""

from __future__ import annotations

import faust

from agentledger.config import Settings

from .app import build_app


def main() -> None:
    settings = Settings()
    # faust creates its data dir on start, but not its parents.
    settings.home.mkdir(parents=True, exist_ok=True)
    app = build_app(settings)
    # faust's Worker installs SIGTERM/SIGINT handlers that stop the app cleanly.
    worker = faust.Worker(app, loglevel=settings.log_level)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
