"""The engine: text streaming helpers, chat templates, and the scheduler on the real model."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from localllm.engine import (
    ChatTemplate,
    EngineConfig,
    FinishEvent,
    GenerationRequest,
    SamplingParams,
    TextEvent,
    memory_summary,
)
from localllm.engine.grammar import check_grammar, json_object_grammar
from localllm.engine.text import StopMatcher, Utf8Stream
from localllm.errors import (
    CancelledError,
    ChatTemplateError,
    ContextLengthExceededError,
    QueueFullError,
    RequestError,
)
from localllm.tools import json_schema_grammar

GREEDY = SamplingParams(temperature=0)


# ---------------------------------------------------------------------------- pure helpers


def test_utf8_stream_waits_for_the_rest_of_a_character() -> None:
    data = "a🦙é".encode()
    stream = Utf8Stream()
    out = [stream.feed(data[i : i + 1]) for i in range(len(data))]
    assert out[0] == "a"
    assert out[1:4] == ["", "", ""]  # three of the llama's four bytes: nothing yet
    assert out[4] == "🦙"
    assert "".join(out) + stream.flush() == "a🦙é"


def test_utf8_stream_flushes_an_incomplete_character_as_replacement() -> None:
    stream = Utf8Stream()
    assert stream.feed("🦙".encode()[:2]) == ""
    assert stream.flush() == "\ufffd"


def test_stop_matcher_holds_back_a_possible_stop_and_never_emits_it() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.push("hello ST") == ("hello ", False)  # "ST" might start "STOP"
    assert matcher.push("OP and more") == ("", True)
    assert matcher.push("later") == ("", True)
    assert matcher.flush() == ""


def test_stop_matcher_releases_held_text_that_turned_out_harmless() -> None:
    matcher = StopMatcher(["\n\n", "END"])
    assert matcher.push("a\n") == ("a", False)
    assert matcher.push("b E") == ("\nb ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.flush() == "EN"


def test_stop_matcher_picks_the_earliest_stop() -> None:
    matcher = StopMatcher(["world", "lo"])
    assert matcher.push("hello world") == ("hel", True)


def test_stop_matcher_without_stops_passes_everything() -> None:
    matcher = StopMatcher([])
    assert matcher.push("abc") == ("abc", False)


def test_gemma_fallback_template_uses_gemma_turns_and_folds_the_system_prompt() -> None:
    template = ChatTemplate.for_model(None, "gemma3", bos_token="<bos>", eos_token="<eos>")
    prompt = template.render(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "More"},
        ]
    )
    assert prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nMore<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert prompt.count("<bos>") == 1


def test_gemma_fallback_refuses_non_alternating_roles() -> None:
    template = ChatTemplate.for_model(None, "gemma3", bos_token="<bos>", eos_token="<eos>")
    with pytest.raises(ChatTemplateError, match="alternate"):
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_unknown_architecture_falls_back_to_chatml() -> None:
    template = ChatTemplate.for_model(None, "mystery", bos_token="", eos_token="")
    prompt = template.render([{"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_the_models_own_template_wins_and_gets_hf_globals() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}{{ strftime_now('%Y') | length }}"
    )
    template = ChatTemplate.for_model(source, "gemma3", bos_token="<s>", eos_token="</s>")
    assert template.render([{"role": "user", "content": "x"}]) == "<s>[user]x[assistant]4"


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ cycler.__init__.__globals__.os.popen('touch /tmp/localllm-pwned').read() }}",
        "{{ messages.append({'role': 'user'}) }}",
        "{{ raise_exception('nope') }}",
        "{% for %}",
    ],
)
def test_hostile_or_broken_templates_raise_a_clean_error(source: str) -> None:
    with pytest.raises(ChatTemplateError):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_memory_summary_reads_llama_cpp_buffer_lines() -> None:
    log = [
        "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB",
        "llama_context:        CPU  output buffer size =     4.00 MiB",
        "llama_kv_cache:        CPU KV buffer size =    12.00 MiB",
        "llama_kv_cache: size =   12.00 MiB (  1024 cells,   3 layers,  4/4 seqs), K (f16): 6 MiB",
        "llama_kv_cache: size =   60.00 MiB (  1024 cells,  15 layers,  4/4 seqs), K (f16): 30 MiB",
        "sched_reserve:        CPU compute buffer size =   514.50 MiB",
    ]
    assert memory_summary(log) == {
        "model_mib": 235.16,
        "output_mib": 4.0,
        "kv_cache_mib": 72.0,
        "compute_mib": 514.5,
    }


def test_engine_config_splits_the_context_over_slots() -> None:
    config = EngineConfig(model_path=__file__, n_ctx=4096, n_parallel=4)  # type: ignore[arg-type]
    assert config.n_ctx_slot == 1024
    with pytest.raises(ValueError):
        EngineConfig(model_path=__file__, n_ctx=32, n_parallel=4)  # type: ignore[arg-type]


def test_json_schema_grammar_is_gbnf_with_a_root() -> None:
    grammar = json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert re.search(r"^root\s+::=", grammar, re.M)
    assert re.search(r"^root\s+::= object$", json_object_grammar(), re.M)
    assert 'ws ::= | " "' in json_object_grammar()  # no runaway newlines


def test_long_strings_are_a_bounded_repetition_not_nested_groups() -> None:
    grammar = json_schema_grammar({"type": "string", "maxLength": 100_000})
    check_grammar(grammar)  # within the engine's limits
    assert max(len(m) for m in re.findall(r"\(+", grammar)) < 20  # no 100000-deep nesting


@pytest.mark.parametrize(
    ("grammar", "limit"),
    [
        ("root ::= " + '"x" ' * 20_000, "65536"),
        ("root ::= " + "(" * 65 + '"x"' + ")" * 65, "nests 65"),
        ('root ::= "x"{0,100001}', "100001"),
    ],
)
def test_grammars_beyond_the_limits_are_refused_naming_them(grammar: str, limit: str) -> None:
    with pytest.raises(RequestError, match=limit):
        check_grammar(grammar)


def test_grammar_limits_look_past_literals_and_classes() -> None:
    check_grammar('root ::= "((((((((" [(]{3} "{0,99999999}" # ((((( {0,999999999}\n')


def test_render_parts_marks_message_text_even_when_trimmed() -> None:
    template = ChatTemplate.for_model(None, "gemma3", bos_token="<bos>", eos_token="<eos>")
    messages = [{"role": "user", "content": "  say <start_of_turn>  "}]
    assert template.render_parts(messages) == [
        ("<bos><start_of_turn>user\n", False),
        ("say <start_of_turn>", True),
        ("<end_of_turn>\n<start_of_turn>model\n", False),
    ]
    shouting = ChatTemplate("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    assert shouting.render_parts(messages) is None  # transformed: the caller refuses


def test_a_template_may_not_build_huge_values_or_run_long() -> None:
    with pytest.raises(ChatTemplateError, match="characters"):
        ChatTemplate("{{ 'ab' * 10**9 }}").render([])
    with pytest.raises(ChatTemplateError, match="characters"):
        ChatTemplate(
            "{% for i in range(99999) %}{{ 'x' * 999 }}{% endfor %}", max_chars=10**6
        ).render([])
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match="longer than 0.5 s"):
        ChatTemplate(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            timeout_s=0.5,
        ).render([])
    assert time.monotonic() - started < 2


# ---------------------------------------------------------------------------- real model


def _wait(predicate: Any, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.model
def test_load_log_and_memory_are_captured(engine: Any) -> None:
    assert any("llama_kv_cache: size =" in line for line in engine.load_log)
    assert any("compute buffer size" in line for line in engine.load_log)
    assert engine.memory["model_mib"] > 200
    assert engine.memory["kv_cache_mib"] > 0


@pytest.mark.model
def test_greedy_generation_is_text_with_usage(engine: Any) -> None:
    result = engine.generate("The capital of France is", max_tokens=8, temperature=0)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 8
    assert result.usage.prompt_tokens == len(engine.tokenize("The capital of France is"))
    assert result.text.strip()


@pytest.mark.model
def test_stop_string_ends_generation_without_emitting_it(engine: Any) -> None:
    full = engine.generate("The capital of France is", max_tokens=16, temperature=0).text
    words = full.split()
    assert len(words) >= 4, full
    stop = words[2]
    cut = engine.generate("The capital of France is", max_tokens=16, temperature=0, stop=[stop])
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert cut.text == full[: full.index(stop)]


@pytest.mark.model
def test_real_token_pieces_split_a_character_and_stream_reassembles_it(engine: Any) -> None:
    tokens = engine.tokenize("🦙", add_special=False)
    pieces = [engine.backend.token_bytes(t) for t in tokens]
    assert b"".join(pieces) == "🦙".encode()
    stream = Utf8Stream()
    assert "".join(stream.feed(p) for p in pieces) == "🦙"
    assert engine.detokenize(tokens) == "🦙"


@pytest.mark.model
def test_same_seed_gives_the_same_text(engine: Any) -> None:
    request = GenerationRequest(
        prompt="Tell me a story about a dragon.",
        max_tokens=16,
        sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234),
    )
    engine.submit(request).result()  # the prompt is cached from here on: same batch shapes
    first = engine.submit(request).result()
    second = engine.submit(request).result()
    other = engine.submit(
        GenerationRequest(
            prompt=request.prompt,
            max_tokens=16,
            sampling=SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=99),
        )
    ).result()
    assert first.text == second.text
    assert other.text != first.text


@pytest.mark.model
def test_second_turn_reuses_the_cached_prefix(engine: Any) -> None:
    first_prompt = "Here is a long shared preamble about llamas and alpacas in the Andes. " * 3
    first = engine.submit(GenerationRequest(prompt=first_prompt, max_tokens=4, sampling=GREEDY))
    done = first.result()
    second = engine.submit(
        GenerationRequest(prompt=first_prompt + "And now a question?", max_tokens=4)
    ).result()
    assert done.usage.prompt_tokens > 30
    assert second.usage.cached_tokens >= done.usage.prompt_tokens - 1


@pytest.mark.model
def test_prompt_longer_than_a_slot_is_refused(engine: Any) -> None:
    with pytest.raises(ContextLengthExceededError):
        engine.submit(GenerationRequest(prompt="word " * 600))
    with pytest.raises(ContextLengthExceededError):
        engine.submit(GenerationRequest(prompt="short", max_tokens=engine.n_ctx_slot))
    with pytest.raises(RequestError):
        engine.submit(GenerationRequest(prompt=(10**9,)))


@pytest.mark.model
def test_without_max_tokens_generation_runs_to_the_cap_or_the_slot_end(engine: Any) -> None:
    cap = engine.config.max_tokens_default
    assert engine._max_new_tokens(10, None) == min(engine.n_ctx_slot - 10, cap)
    assert engine._max_new_tokens(engine.n_ctx_slot - 5, None) == 5


@pytest.mark.model
def test_cancel_frees_the_slot_within_a_step(engine: Any) -> None:
    handle = engine.submit(GenerationRequest(prompt="Once upon a time", max_tokens=200))
    events = iter(handle)
    first = next(events)
    assert isinstance(first, TextEvent)
    assert engine.stats().busy_slots == 1
    handle.cancel()
    assert _wait(lambda: engine.stats().busy_slots == 0)
    with pytest.raises(CancelledError):
        for _ in events:
            pass


@pytest.mark.model
def test_queue_full_beyond_slots_plus_queue(engine: Any) -> None:
    slots, queue = engine.config.n_parallel, engine.config.queue_size
    handles = [
        engine.submit(GenerationRequest(prompt=f"Story number {i}:", max_tokens=200))
        for i in range(slots + queue)
    ]
    try:
        with pytest.raises(QueueFullError) as info:
            engine.submit(GenerationRequest(prompt="one too many", max_tokens=4))
        assert info.value.retry_after_s >= 1
    finally:
        for handle in handles:
            handle.cancel()
    assert _wait(lambda: engine.stats().busy_slots == 0 and engine.stats().queue_length == 0)


@pytest.mark.model
def test_batched_streams_all_progress_together(engine: Any) -> None:
    import threading

    handles = [
        engine.submit(GenerationRequest(prompt=f"List {i}:", max_tokens=12, sampling=GREEDY))
        for i in range(4)
    ]
    first_text_at: dict[int, float] = {}
    finished_at: dict[int, float] = {}

    def read(i: int) -> None:
        for event in handles[i]:
            now = time.monotonic()
            if isinstance(event, TextEvent) and event.text:
                first_text_at.setdefault(i, now)
            elif isinstance(event, FinishEvent):
                finished_at[i] = now
                first_text_at.setdefault(i, now)

    readers = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=60)
    assert len(finished_at) == 4
    # Every stream had output before any stream finished: they were decoded together.
    assert max(first_text_at.values()) < min(finished_at.values())
    assert engine.stats().busy_slots == 0


@pytest.mark.model
def test_logprobs_come_from_the_raw_distribution(engine: Any) -> None:
    result = engine.submit(
        GenerationRequest(prompt="The sky is", max_tokens=4, logprobs=3, sampling=GREEDY)
    ).result()
    assert len(result.logprobs) == 4
    for item in result.logprobs:
        assert item.logprob <= 0
        assert len(item.top) == 3
        assert [t.logprob for t in item.top] == sorted((t.logprob for t in item.top), reverse=True)
        assert item.top[0].token_bytes == item.token_bytes  # greedy picks the most likely


CAT_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.model
def test_json_schema_grammar_output_parses_and_matches(engine: Any) -> None:
    prompt = engine.apply_chat_template(
        [{"role": "user", "content": "Describe a cat as JSON with name and age."}]
    )
    result = engine.submit(
        GenerationRequest(
            prompt=prompt,
            max_tokens=48,
            add_special=False,
            sampling=SamplingParams(
                temperature=0.7, seed=3, grammar=json_schema_grammar(CAT_SCHEMA)
            ),
        )
    ).result()
    assert result.finish_reason == "stop", result.text
    value = json.loads(result.text)
    assert set(value) == {"name", "age"}
    assert isinstance(value["age"], int)


@pytest.mark.model
def test_json_object_grammar_constrains_the_output(engine: Any) -> None:
    # The 270M model rambles inside objects, so only the constraint itself is checked here.
    result = engine.submit(
        GenerationRequest(
            prompt="Hello there",
            max_tokens=6,
            sampling=SamplingParams(temperature=1.0, seed=5, grammar=json_object_grammar()),
        )
    ).result()
    assert result.text.lstrip().startswith("{")
