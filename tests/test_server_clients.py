"""The server through the clients people already use, each called the way its own docs show, on 127.0.0.1 with the
tiny checkpoint: the openai client (chat tool calls forced, named and auto, follow-ups, system messages, null fields,
GET /v1/models/{id}, the Responses API whole and streamed), instructor (TOOLS and JSON modes, and their re-asks),
pydantic-ai (tool, prompted and native output), langchain-openai (with_structured_output) and openai-agents (its
default, the Responses API: text, structured output, a function tool, streaming). Each rule of docs/SERVER.md's
"Clients" section has a run here."""

import asyncio
import json
from typing import Literal

import instructor
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from test_server import IMAGES, KEY, MODEL, Server, call, data_url

CAT = data_url(IMAGES / "chelsea.jpg")
# "caption es" on gray.png ends by itself after 37 tokens on the tiny checkpoint (greedy): an answer that completes.
GRAY = data_url(IMAGES / "gray.png")
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


class Animal(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a closed object, so that the tiny model's answers end
    kind: Literal["cat", "dog"]
    count: int = Field(ge=0, le=9)


class Found(BaseModel):
    model_config = ConfigDict(extra="forbid")
    found: bool


ANIMAL = {"type": "function", "function": {"name": "animal", "description": "The animal in the picture",
                                           "parameters": Animal.model_json_schema()}}
FOUND = {"type": "function", "function": {"name": "found", "parameters": Found.model_json_schema()}}
MODELS = {"animal": Animal, "found": Found}


def user(text, *images):
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": i}} for i in images),
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def server():
    s = Server(MODEL, "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat(client, messages, **kw):
    return client.chat.completions.create(model=str(MODEL), messages=messages, **kw)


def text_of(client, messages, **kw) -> str:
    return chat(client, messages, **kw).choices[0].message.content


def streamed_call(client, messages, **kw):
    """(id, name, arguments, content, finish_reason) of a streamed choice, its tool call's deltas joined."""
    id = name = None
    arguments, content, finish = "", "", None
    for chunk in chat(client, messages, stream=True, **kw):
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            assert delta.index == 0
            id, name = delta.id or id, (delta.function.name if delta.function else None) or name
            arguments += (delta.function.arguments if delta.function else None) or ""
        content += choice.delta.content or ""
        finish = choice.finish_reason or finish
    return id, name, arguments, content, finish


# Tool calls.

@pytest.mark.parametrize("tools, choice, names", [
    ([ANIMAL], "required", {"animal"}),
    ([ANIMAL, FOUND], {"type": "function", "function": {"name": "found"}}, {"found"}),
    ([ANIMAL, FOUND], "required", {"animal", "found"}),
], ids=["required-one-tool", "named", "required-among-two"])
def test_a_forced_call_is_a_tool_call_inside_its_schema(client, tools, choice, names):
    r = chat(client, [user("caption en", CAT)], tools=tools, tool_choice=choice)
    message, finish = r.choices[0].message, r.choices[0].finish_reason
    assert finish == "tool_calls" and message.content is None and len(message.tool_calls) == 1
    call_ = message.tool_calls[0]
    assert call_.type == "function" and call_.id.startswith("call_") and call_.function.name in names
    MODELS[call_.function.name].model_validate_json(call_.function.arguments)  # the grammar kept it inside
    id, name, arguments, content, finish = streamed_call(client, [user("caption en", CAT)], tools=tools,
                                                         tool_choice=choice)
    assert (name, arguments, content, finish) == (call_.function.name, call_.function.arguments, "", "tool_calls")
    assert id.startswith("call_")


def test_auto_and_none_are_answered_in_text(client):
    plain = chat(client, [user("caption es", GRAY)]).choices[0]
    for choice in ("auto", "none", None):
        r = chat(client, [user("caption es", GRAY)], tools=[ANIMAL, FOUND], tool_choice=choice).choices[0]
        assert (r.message.content, r.message.tool_calls, r.finish_reason) == (plain.message.content, None, "stop")


def test_a_call_cut_by_max_tokens(client):
    whole = chat(client, [user("caption en", CAT)], tools=[ANIMAL], tool_choice="required").choices[0]
    cut = chat(client, [user("caption en", CAT)], tools=[ANIMAL], tool_choice="required", max_tokens=3).choices[0]
    # One function: its arguments so far, as OpenAI gives a call cut by max_tokens.
    assert cut.finish_reason == "length"
    assert whole.message.tool_calls[0].function.arguments.startswith(cut.message.tool_calls[0].function.arguments)
    # A choice among several that never named its function is no call: its text comes as it is.
    cut = chat(client, [user("caption en", CAT)], tools=[ANIMAL, FOUND], tool_choice="required", max_tokens=3)
    message = cut.choices[0].message
    assert cut.choices[0].finish_reason == "length" and message.tool_calls is None and message.content.startswith("{")
    _, name, _, content, finish = streamed_call(client, [user("caption en", CAT)], tools=[ANIMAL, FOUND],
                                                tool_choice="required", max_tokens=3)
    assert (name, content, finish) == (None, message.content, "length")


def test_tool_results_may_follow_the_user_message(client):
    first = chat(client, [user("caption es", GRAY)], tools=[ANIMAL], tool_choice="required").choices[0].message
    assert first.tool_calls
    conversation = [user("caption es", GRAY), first.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "two cats"}]
    again = chat(client, conversation, tools=[ANIMAL], tool_choice="required").choices[0].message
    assert again.tool_calls[0].function.arguments == first.tool_calls[0].function.arguments
    assert text_of(client, conversation, tools=[ANIMAL]) == text_of(client, [user("caption es", GRAY)])


BAD_TOOLS = [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [ANIMAL], "tool_choice": {"type": "function", "function": {"name": "found"}}}, "tool_choice",
     "not among the tools"),
    ({"tools": [ANIMAL], "tool_choice": "always"}, "tool_choice", 'tool_choice must be "none"'),
    ({"tools": ANIMAL, "tool_choice": "required"}, "tools", "must be a list"),
    ({"tools": [ANIMAL] * 129}, "tools", "at most 128"),
    ({"tools": [{"type": "web_search"}]}, "tools", "only function tools"),
    ({"tools": [ANIMAL, ANIMAL]}, "tools", "two tools are named 'animal'"),
    ({"tools": [{"type": "function", "function": {"name": "an animal"}}]}, "tools", "letters, digits"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": "{}"}}]}, "tools", "JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}], "tool_choice": "required"},
     "tools", "bad json schema"),
    ({"tools": [ANIMAL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "its own constraint"),
    ({"functions": [ANIMAL["function"]], "function_call": {"name": "animal"}}, "functions", "send tools"),
]


@pytest.mark.parametrize("changes, param, words", BAD_TOOLS, ids=[f"{b[1]}-{b[2]}" for b in BAD_TOOLS])
def test_bad_tools_are_a_400_naming_the_field(server, changes, param, words):
    body = {"model": str(MODEL), "max_tokens": 4, "messages": [user("caption en", CAT)], **changes}
    status, reply = call(server.url + "/v1/chat/completions", body, AUTH)
    assert (status, reply["error"]["param"]) == (400, param) and words in reply["error"]["message"], reply
    assert call(server.url + "/v1/chat/completions", {**body, "tools": None, "tool_choice": None, "functions": None,
                                                      "function_call": None, "response_format": None}, AUTH)[0] == 200


# Conversations.

def test_follow_ups_keep_the_conversations_image(client):
    # The prompt is the last user message; the images those of the latest user message that has any.
    alone = text_of(client, [user("answer en what is it?", CAT)], max_tokens=8)
    assert text_of(client, [user("caption en", CAT), {"role": "assistant", "content": "a cat"},
                            user("answer en what is it?")], max_tokens=8) == alone
    assert text_of(client, [user("caption en", CAT), {"role": "assistant", "content": "a cat"},
                            user("caption es", GRAY), {"role": "assistant", "content": "gris"},
                            user("caption es")]) == text_of(client, [user("caption es", GRAY)])


def test_system_and_developer_messages_are_no_part_of_the_prompt(client):
    told = [{"role": "system", "content": "You are a helpful assistant."}, user("caption es", GRAY),
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]}]
    assert text_of(client, told) == text_of(client, [user("caption es", GRAY)])


def test_a_schema_in_the_instructions_shapes_a_json_object(client):
    schema = json.dumps(Animal.model_json_schema(), indent=2)
    told = [{"role": "system", "content": f"Answer with JSON that matches this json_schema:\n\n    {schema}\n\nOnly"
                                          " the JSON."}, user("caption en", CAT)]
    Animal.model_validate_json(text_of(client, told, response_format={"type": "json_object"}))
    # An example object is no schema: the answer is any JSON object, as without the message.
    example = [{"role": "system", "content": 'For example:\n{"type": "cat"}'}, user("caption en", CAT)]
    assert text_of(client, example, response_format={"type": "json_object"}, max_tokens=12) == text_of(
        client, [user("caption en", CAT)], response_format={"type": "json_object"}, max_tokens=12)


def test_a_schema_is_read_as_clients_write_it_within_bounds(monkeypatch):
    from mlx_paligemma import limits
    from mlx_paligemma.server.messages import SCHEMA_TRIES, schema_in

    schema = Animal.model_json_schema()
    pretty = "Match the following json_schema:\n\n            " + json.dumps(schema, indent=2) + "\n\nOnly JSON."
    assert schema_in(["Be brief.", pretty]) == schema  # instructor's JSON mode
    assert schema_in([f"Always respond with a JSON object that's compatible with this schema:\n\n{json.dumps(schema)}"
                      "\n\nDon't include any text"]) == schema  # pydantic-ai's PromptedOutput
    assert schema_in(['{"type": "cat"}\n' * (SCHEMA_TRIES - 1) + json.dumps(schema)]) == schema
    assert schema_in(['{"type": "cat"}\n' * SCHEMA_TRIES + json.dumps(schema)]) is None  # tries are bounded
    monkeypatch.setattr(limits, "LIMITS", limits.Limits(max_constraint_bytes=len(json.dumps(schema)) // 8))
    assert schema_in([json.dumps(schema)]) is None  # so is what each try reads


@pytest.mark.parametrize("messages, words", [
    ([user("caption en", CAT), {"role": "assistant", "content": "a cat"}], "not a chat model"),
    ([user("caption en", CAT), {"role": "robot", "content": "beep"}], "has role 'robot'"),
    ([{"role": "system", "content": "Be brief."}], "not a chat model"),
    ([{"role": "tool", "content": "2"}], "there is no user message"),
    ([{"role": "system", "content": 5}, user("caption en", CAT)], "system or developer message's content"),
    ([user("caption en", "ftp://127.0.0.1/x.jpg"), {"role": "assistant", "content": "a cat"}, user("caption en")],
     "only data:, http and https"),
], ids=["assistant-last", "unknown-role", "system-only", "tool-only", "system-not-text", "bad-earlier-image"])
def test_conversations_refused(server, messages, words):
    status, reply = call(server.url + "/v1/chat/completions", {"model": "m", "messages": messages}, AUTH)
    assert (status, reply["error"]["param"]) == (400, "messages") and words in reply["error"]["message"], reply


# Null fields, models by id.

def test_json_null_means_not_given(server, client):
    fields = ["max_completion_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "top_logprobs",
              "response_format", "tools", "tool_choice", "stream", "stream_options", "logit_bias", "user",
              "frequency_penalty", "presence_penalty", "top_k", "min_p", "repetition_penalty", "num_beams", "best_of",
              "length_penalty", "early_stopping", "regex", "choices", "constrain", "objects", "min_score",
              "parallel_tool_calls", "metadata", "functions", "function_call"]
    body = {"model": None, "messages": [user("caption en", CAT)], "max_tokens": 3, **dict.fromkeys(fields)}
    status, reply = call(server.url + "/v1/chat/completions", body, AUTH)
    assert status == 200, reply
    assert reply["usage"]["completion_tokens"] == 3
    assert reply["choices"][0]["message"]["content"] == text_of(client, [user("caption en", CAT)], max_tokens=3)


def test_models_by_id(server, client):
    served = client.models.retrieve(str(MODEL))
    assert (served.id, served.object, served.owned_by) == (str(MODEL), "model", "mlx-paligemma")
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("paligemma-28b")
    error = e.value.body
    assert error["param"] == "model" and "'paligemma-28b'" in error["message"] and str(MODEL) in error["message"]
    assert call(server.url + f"/v1/models/{MODEL}")[0] == 401  # behind the key as /v1/models


# The Responses API.

def said(text, *images):
    return [{"role": "user", "content": [*({"type": "input_image", "image_url": i} for i in images),
                                         {"type": "input_text", "text": text}]}]


def respond(client, input, **kw):
    return client.responses.create(model=str(MODEL), input=input, **kw)


def test_responses_answer_as_chat_completions_do(client):
    whole = chat(client, [user("caption es", GRAY)])
    r = respond(client, said("caption es", GRAY), instructions="Be brief.")  # instructions: a system message
    assert (r.status, r.output_text, r.incomplete_details) == ("completed", whole.choices[0].message.content, None)
    assert r.id.startswith("resp_") and len(r.output) == 1 and r.output[0].type == "message"
    usage = r.usage
    assert (usage.input_tokens, usage.output_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    cut = respond(client, said("caption en", CAT), max_output_tokens=5)
    assert (cut.status, cut.incomplete_details.reason, cut.usage.output_tokens) == ("incomplete", "max_output_tokens", 5)
    assert cut.output_text == text_of(client, [user("caption en", CAT)], max_tokens=5)
    # log-probabilities, as chat gives them
    r = respond(client, said("caption en", CAT), max_output_tokens=5, include=["message.output_text.logprobs"],
                top_logprobs=2)
    given = chat(client, [user("caption en", CAT)], max_tokens=5, logprobs=True, top_logprobs=2)
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in r.output[0].content[0].logprobs] == [
        (e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in given.choices[0].logprobs.content]


def test_responses_stream_in_the_specifications_order(client):
    events = list(respond(client, said("caption es", GRAY), stream=True))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 1 and kinds == ["response.created", "response.in_progress", "response.output_item.added",
                                    "response.content_part.added", *["response.output_text.delta"] * deltas,
                                    "response.output_text.done", "response.content_part.done",
                                    "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[deltas + 4].text  # response.output_text.done
    assert events[-1].response.output_text == text == respond(client, said("caption es", GRAY)).output_text
    assert events[-1].response.usage.output_tokens == 37
    cut = [e.type for e in respond(client, said("caption en", CAT), max_output_tokens=3, stream=True)]
    assert cut[-1] == "response.incomplete"


def test_responses_structured_output_and_function_calls(client):
    form = {"format": {"type": "json_schema", "name": "animal", "schema": Animal.model_json_schema(), "strict": True}}
    Animal.model_validate_json(respond(client, said("caption en", CAT), text=form).output_text)
    tool = {"type": "function", "name": "animal", "parameters": Animal.model_json_schema(), "strict": True}
    found = {"type": "function", "name": "found", "parameters": Found.model_json_schema()}
    for tools, choice in (([tool], "required"), ([tool, found], {"type": "function", "name": "animal"}),
                          ([found, tool], "required")):
        r = respond(client, said("caption en", CAT), tools=tools, tool_choice=choice)
        (item,) = r.output
        assert (r.status, item.type, item.status) == ("completed", "function_call", "completed")
        assert item.call_id.startswith("call_")
        MODELS[item.name].model_validate_json(item.arguments)
        events = list(respond(client, said("caption en", CAT), tools=tools, tool_choice=choice, stream=True))
        kinds = [e.type for e in events]
        deltas = kinds.count("response.function_call_arguments.delta")
        assert deltas >= 1 and kinds == ["response.created", "response.in_progress", "response.output_item.added",
                                         *["response.function_call_arguments.delta"] * deltas,
                                         "response.function_call_arguments.done", "response.output_item.done",
                                         "response.completed"]
        done = events[-3]
        assert (done.name, done.arguments) == (item.name, item.arguments)
        assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == item.arguments
    # A turn after the call, its output given back: answered in text ("auto").
    follow = said("caption es", GRAY) + [{"type": "function_call", "call_id": item.call_id, "name": item.name,
                                         "arguments": item.arguments},
                                        {"type": "function_call_output", "call_id": item.call_id, "output": "2"}]
    assert respond(client, follow, tools=[tool]).output_text == text_of(client, [user("caption es", GRAY)])


BAD_RESPONSES = [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "keeps no responses"),
    ({"store": True}, "store", "keeps no responses"),
    ({"conversation": "conv_1"}, "conversation", "keeps no responses"),
    ({"messages": [user("caption en", CAT)]}, "messages", "the Responses API's is input"),
    ({"max_tokens": 3}, "max_tokens", "max_output_tokens"),
    ({"max_output_tokens": 5000}, "max_output_tokens", "limit of 1024"),
    ({"input": "caption en"}, "input", "needs an image"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "'item_reference' is not served"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input", "input_file"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, "input", "file_id"),
    ({"text": {"format": {"type": "json_schema", "name": "a"}}}, "text", "needs \"schema\""),
    ({"tools": [{"type": "web_search"}]}, "tools", "only function tools"),
    ({"tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "not among the tools"),
    ({"instructions": ["Be brief."]}, "instructions", "must be a string"),
]


@pytest.mark.parametrize("changes, param, words", BAD_RESPONSES, ids=[b[1] for b in BAD_RESPONSES])
def test_bad_responses_requests_name_their_field(server, changes, param, words):
    body = {"model": str(MODEL), "input": said("caption en", CAT), "max_output_tokens": 3, **changes}
    status, reply = call(server.url + "/v1/responses", body, AUTH)
    assert (status, reply["error"]["param"]) == (400, param) and words in reply["error"]["message"], reply


def test_responses_null_means_not_given(server):
    fields = ["instructions", "text", "tools", "tool_choice", "include", "top_logprobs", "temperature", "top_p",
              "previous_response_id", "store", "conversation", "prompt", "background", "stream", "metadata", "user",
              "parallel_tool_calls", "reasoning", "truncation"]
    body = {"model": None, "input": said("caption en", CAT), "max_output_tokens": 3, **dict.fromkeys(fields)}
    status, reply = call(server.url + "/v1/responses", body, AUTH)
    assert status == 200 and reply["usage"]["output_tokens"] == 3, reply


# Clients as their docs show them.

def test_instructor_tools_and_json_modes(server):
    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON):
        client = instructor.from_openai(openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0),
                                        mode=mode)
        assert isinstance(client.chat.completions.create(model=str(MODEL), response_model=Animal,
                                                         messages=[user("caption en", CAT)]), Animal)
        seen = []

        class Picky(Animal):  # refuses its first answer: instructor asks again, in a longer conversation
            @field_validator("count")
            @classmethod
            def once(cls, count):
                seen.append(count)
                if len(seen) == 1:
                    raise ValueError("count again")
                return count

        assert isinstance(client.chat.completions.create(model=str(MODEL), response_model=Picky, max_retries=2,
                                                         messages=[user("caption en", CAT)]), Picky)
        assert len(seen) == 2, mode


def test_pydantic_ai_outputs(server):
    from pydantic_ai import Agent, BinaryContent, NativeOutput, PromptedOutput
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=server.url + "/v1", api_key=KEY)
    prompt = ["caption en", BinaryContent(data=(IMAGES / "chelsea.jpg").read_bytes(), media_type="image/jpeg")]
    for kind in (OpenAIChatModel, OpenAIResponsesModel):
        # A tool call (its default), the schema in the instructions with a JSON object, response_format json_schema.
        for output in (Animal, PromptedOutput(Animal), NativeOutput(Animal)):
            agent = Agent(kind(str(MODEL), provider=provider), output_type=output)
            assert isinstance(agent.run_sync(prompt).output, Animal), (kind, output)


def test_langchain_openai(server, client):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key=KEY, model=str(MODEL), max_retries=0)
    asked = [HumanMessage(content=user("caption en", CAT)["content"])]
    for method in ("function_calling", "json_schema"):
        assert isinstance(llm.with_structured_output(Animal, method=method).invoke(asked), Animal), method
    assert llm.invoke([HumanMessage(content=user("caption es", GRAY)["content"])]).content == text_of(
        client, [user("caption es", GRAY)])


def test_openai_agents_on_the_responses_api(server, client):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # its traces would go to OpenAI

    def responses_model():  # an async client of its own for each event loop
        return OpenAIResponsesModel(model=str(MODEL), openai_client=openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key=KEY, max_retries=0))

    model = responses_model()
    gray, cat = said("caption es", GRAY), said("caption en", CAT)
    expected = text_of(client, [user("caption es", GRAY)])
    assert Runner.run_sync(Agent(name="captioner", instructions="Caption the picture.", model=model),
                           gray).final_output == expected
    assert isinstance(Runner.run_sync(Agent(name="counter", model=model, output_type=Animal), cat).final_output,
                      Animal)
    calls = []

    @function_tool
    def count_animals(kind: Literal["cat", "dog"]) -> int:
        """How many animals of this kind the picture shows."""
        calls.append(kind)
        return 2

    # A required tool call, its output sent back, then (tool_choice reset to auto) the answer in text.
    run = Runner.run_sync(Agent(name="tools", model=model, tools=[count_animals],
                                model_settings=ModelSettings(tool_choice="required")), gray)
    assert len(calls) == 1 and run.final_output == expected

    async def streamed():
        run = Runner.run_streamed(Agent(name="counter", model=responses_model(), output_type=Animal), cat)
        kinds = [event.type async for event in run.stream_events()]
        return run.final_output, kinds

    output, kinds = asyncio.run(streamed())
    assert isinstance(output, Animal) and "raw_response_event" in kinds
