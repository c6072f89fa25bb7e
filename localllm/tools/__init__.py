"""Tool calling, reasoning and structured output: tools and tool messages into the model's own
chat template (or a documented generic format), the model's reasoning and tool-call syntax parsed
back while it streams, and GBNF grammars from JSON Schemas (forced calls,
`response_format: json_schema`)."""

from localllm.tools.formats import TemplateCaps, ToolFormat, ToolSyntax, detect_format, tool_syntax
from localllm.tools.output import OutputParser, ReasoningSplitter, split_reasoning
from localllm.tools.parser import (
    ContentDelta,
    ParsedOutput,
    ReasoningDelta,
    ToolCallDelta,
    ToolCallParser,
    parse_output,
)
from localllm.tools.reasoning import ReasoningFormat
from localllm.tools.render import render_prompt
from localllm.tools.request import ToolUse
from localllm.tools.schema import GrammarBuilder, json_schema_grammar
from localllm.tools.spec import (
    Tool,
    ToolCall,
    ToolChoice,
    check_messages,
    parse_tool_choice,
    parse_tools,
)

__all__ = [
    "ContentDelta",
    "GrammarBuilder",
    "OutputParser",
    "ParsedOutput",
    "ReasoningDelta",
    "ReasoningFormat",
    "ReasoningSplitter",
    "TemplateCaps",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "ToolChoice",
    "ToolFormat",
    "ToolSyntax",
    "ToolUse",
    "check_messages",
    "detect_format",
    "json_schema_grammar",
    "parse_output",
    "parse_tool_choice",
    "parse_tools",
    "render_prompt",
    "split_reasoning",
    "tool_syntax",
]
