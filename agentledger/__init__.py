"""agentledger: cost governance for multi-agent LLM systems.

Subpackages: schemas (wire formats), producers (the in-agent shim), stream_processors (faust
budget enforcement), sinks (ClickHouse history), deploy (the local stack). Importing this
package has no side effects.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
