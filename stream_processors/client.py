"""A client of the processor's live state (``GET /state/<scope>``), for the CLI."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from agentledger.config import Settings

__all__ = ["fetch_state"]


def fetch_state(settings: Settings, scope: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """The processor's report for ``scope``; raise RuntimeError saying what went wrong."""
    url = f"http://127.0.0.1:{settings.processor_port}/state/{urllib.parse.quote(scope, safe=':/')}"
    request = urllib.request.Request(url)
    request.add_header("Authorization", f"Bearer {settings.api_token_value()}")
    try:
        # The URL is built above from a fixed http scheme and loopback host.
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            body: Any = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read() or b"{}").get("error", "")
        except (json.JSONDecodeError, AttributeError):
            detail = ""
        raise RuntimeError(f"processor answered {exc.code} for {scope}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(
            f"processor not reachable at 127.0.0.1:{settings.processor_port} ({reason}); "
            "is the stack up? Run `agentledger status`."
        ) from None
    except json.JSONDecodeError:
        raise RuntimeError(f"processor answered non-JSON for {scope}") from None
    if not isinstance(body, dict):
        raise RuntimeError(f"processor answered an unexpected shape for {scope}")
    return body
