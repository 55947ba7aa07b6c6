"""Which span or resource attribute fills which CallEvent field (configurable, with defaults).

A source is ``span:<key>`` (the span's own attributes), ``resource:<key>`` (the resource's, such
as ``service.name``) or a bare ``<key>`` (the span's, then the resource's). Each field takes the
first source present. The defaults follow the OpenTelemetry GenAI semantic conventions, the
older names still emitted by many instrumentations (``gen_ai.system``,
``gen_ai.usage.prompt_tokens``) and ``agentledger.*`` attributes an app may set itself. The table
is in otlp/README.md; a YAML file (``AGENTLEDGER_OTLP_MAPPING``) overrides any field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["DEFAULT_PROVIDERS", "AttributeMapping", "MappingError", "load_mapping"]

Sources = list[str]

# gen_ai.provider.name / gen_ai.system values -> genai-prices provider ids. A value not listed
# is used as it is (openai, anthropic, mistral, groq, deepseek, cohere ... are the same there).
DEFAULT_PROVIDERS: dict[str, str] = {
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "az.ai.openai": "azure",
    "az.ai.inference": "azure",
    "aws.bedrock": "aws",
    "gcp.gen_ai": "google",
    "gcp.vertex_ai": "google",
    "gcp.gemini": "google",
    "vertex_ai": "google",
    "gemini": "google",
    "mistral_ai": "mistral",
    "x_ai": "x-ai",
    "xai": "x-ai",
}


class MappingError(ValueError):
    """A mapping file that cannot be used; the message names the field."""


class AttributeMapping(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    agent_id: Sources = Field(
        default=["gen_ai.agent.id", "gen_ai.agent.name", "resource:service.name"]
    )
    agent_id_fallback: str = Field(
        default="unknown_service", description="when no agent_id source is present"
    )
    pool: Sources = Field(default=["agentledger.pool", "resource:service.name"])
    workflow_id: Sources = Field(default=["agentledger.workflow_id", "gen_ai.conversation.id"])
    task_type: Sources = Field(default=["agentledger.task_type"])
    task_id: Sources = Field(default=["agentledger.task_id"])
    provider: Sources = Field(default=["gen_ai.provider.name", "gen_ai.system"])
    requested_model: Sources = Field(default=["gen_ai.request.model"])
    used_model: Sources = Field(default=["gen_ai.response.model"])
    input_tokens: Sources = Field(
        default=["gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"]
    )
    output_tokens: Sources = Field(
        default=["gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"]
    )
    cached_input_tokens: Sources = Field(
        default=[
            "gen_ai.usage.cache_read.input_tokens",
            "gen_ai.usage.cache_read_input_tokens",
        ]
    )
    reasoning_tokens: Sources = Field(
        default=["gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens"]
    )
    error_type: Sources = Field(default=["error.type"])
    operation: Sources = Field(default=["gen_ai.operation.name"])
    model_operations: list[str] = Field(
        default=["chat", "text_completion", "generate_content", "embeddings"],
        description="operations that are one model call; other GenAI operations (invoke_agent, "
        "execute_tool, create_agent) are ignored so an agent span's rolled-up usage never "
        "counts its calls twice",
    )
    providers: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PROVIDERS))
    input_includes_cached: bool = Field(
        default=True,
        description="the input token count already includes the cached ones (the semantic "
        "conventions' rule); false adds the cached count to it",
    )

    @field_validator(
        "agent_id",
        "pool",
        "workflow_id",
        "task_type",
        "task_id",
        "provider",
        "requested_model",
        "used_model",
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "reasoning_tokens",
        "error_type",
        "operation",
    )
    @classmethod
    def _sources(cls, sources: Sources) -> Sources:
        for source in sources:
            where, _, key = source.rpartition(":") if ":" in source else ("", "", source)
            if where not in ("", "span", "resource") or not key:
                raise ValueError(
                    f"source {source!r} must be 'span:<key>', 'resource:<key>' or '<key>'"
                )
        return sources

    def lookup(
        self, sources: Sources, span: dict[str, Any], resource: dict[str, Any]
    ) -> tuple[str, Any] | None:
        """(the attribute key, its value) of the first source present."""
        for source in sources:
            if source.startswith("span:"):
                key = source[5:]
                if key in span:
                    return key, span[key]
            elif source.startswith("resource:"):
                key = source[9:]
                if key in resource:
                    return key, resource[key]
            elif source in span:
                return source, span[source]
            elif source in resource:
                return source, resource[source]
        return None


def load_mapping(path: Path | None) -> AttributeMapping:
    """The defaults, overridden field by field by the YAML file at ``path``."""
    if path is None:
        return AttributeMapping()
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MappingError(f"{path}: cannot read the OTLP attribute mapping: {exc}") from exc
    if raw is None:
        return AttributeMapping()
    if not isinstance(raw, dict):
        raise MappingError(f"{path}: must be a mapping of CallEvent field -> list of sources")
    try:
        return AttributeMapping(**raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise MappingError(f"{path}: {problems}") from exc
