"""Drives a running `mistralrs-server --adapter-provider dnd` with the real `openai` client.

    python openai_client.py BASE_URL e2e  BASE_PROMPT EXPECTED_BASE_TEXT EXPECTED_TOP5 \
        EXPECTED_A1_TEXT EXPECTED_A2_TEXT OUTSIDE_DIR
    python openai_client.py BASE_URL load BUDGET_BYTES
    python openai_client.py BASE_URL abstain TRAINED_SYSTEM_PROMPT
    python openai_client.py BASE_URL concurrent MODEL_NAME

Exits non-zero (an AssertionError with a message) when the server misbehaves; prints a JSON
summary of what it measured on success.
"""

import concurrent.futures as cf
import hashlib
import io
import json
import math
import re
import sys
import tarfile
import urllib.error
import urllib.request

import openai

BASE, MODE = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=600)
MODEL = sys.argv[3] if MODE in ("concurrent", "scoring") else "tiny-qwen2"


def no_fffd(text):
    return text.replace("\ufffd", "")


def dnd(resp):
    return resp.model_extra["dnd"]


def chat(system, user="Hello there", max_tokens=8, **extra):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    return client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=max_tokens, temperature=0, **extra
    )


def metrics():
    text = urllib.request.urlopen(BASE + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(dnd_[a-z_]+) ([0-9.e+]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def requests_total():
    """`dnd_http_requests_total` by (endpoint, status)."""
    text = urllib.request.urlopen(BASE + "/metrics", timeout=30).read().decode()
    pattern = r'^dnd_http_requests_total\{endpoint="([^"]*)",status="([0-9]+)"\} ([0-9]+)$'
    return {(m.group(1), int(m.group(2))): int(m.group(3))
            for m in (re.match(pattern, line) for line in text.splitlines()) if m}


def http(method, path, body=None):
    req = urllib.request.Request(
        BASE + path,
        method=method,
        data=None if body is None else body.encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def expect_error(status, code, fn):
    try:
        fn()
    except openai.APIStatusError as e:
        assert e.status_code == status, (code, e.status_code, e.response.text)
        assert e.body["code"] == code if "code" in e.body else e.body["error"]["code"] == code, e.body
        return
    raise AssertionError(f"expected {status} {code}, the request succeeded")


def conformance(base_prompt, expected_base, expected_top):
    """Logprobs, response formats, usage chunks and refusals, as OpenAI clients expect them."""
    # Completion logprobs (legacy shape) of the base model's first token: transformers' values.
    lp = client.completions.create(model=MODEL, prompt=base_prompt, max_tokens=8, temperature=0,
                                   logprobs=5, extra_body={"dnd": {"base": True}})
    assert lp.choices[0].text == expected_base, lp.choices[0].text
    got = lp.choices[0].logprobs
    assert len(got.tokens) == len(got.token_logprobs) == len(got.top_logprobs) == len(got.text_offset)
    # The legacy shape keys alternatives by text: tokens that decode alike share one key.
    want = {}
    for text, v in expected_top:
        want.setdefault(text, v)
    first = got.top_logprobs[0]
    assert first.keys() == want.keys(), (first, want)
    assert all(abs(first[t] - want[t]) < 2e-3 for t in want), (first, want)
    assert abs(got.token_logprobs[0] - expected_top[0][1]) < 2e-3, (got.token_logprobs, expected_top)
    offsets = [0]
    for t in got.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert got.text_offset == offsets, (got.text_offset, offsets)
    # Chat logprobs: greedy picks the likeliest alternative; natural logs of a distribution.
    c = chat("", max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"dnd": {"base": True}})
    content = c.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 3 for e in content), content
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and tops[0] <= 0, tops
        assert abs(e.logprob - tops[0]) < 1e-5 and e.token == e.top_logprobs[0].token, e
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-4, tops
    # Streamed chat: per-chunk logprobs in OpenAI's shape, then a usage chunk when asked.
    chunks = list(client.chat.completions.create(
        model=MODEL, stream=True, max_tokens=6, temperature=0, logprobs=True,
        stream_options={"include_usage": True}, extra_body={"dnd": {"base": True}},
        messages=[{"role": "user", "content": "Hello there"}]))
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens > 0, chunks[-1]
    assert all(ch.usage is None for ch in chunks[:-1])
    streamed = [e.logprob for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert len(streamed) == chunks[-1].usage.completion_tokens, (streamed, chunks[-1].usage)
    # response_format: replies follow the schema (the engine constrains decoding).
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = chat("", max_tokens=24, extra_body={"dnd": {"base": True}}, response_format={
        "type": "json_schema", "json_schema": {"name": "flag", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool), r.choices[0].message
    # What clients send by default is accepted: nulls, an empty logit_bias (LangChain's OpenAI
    # class), a previous reply sent back with its null fields and a participant name.
    ok = client.chat.completions.create(
        model=MODEL, max_tokens=2, temperature=0, logit_bias={}, extra_body={"seed": None, "dnd": {"base": True}},
        messages=[{"role": "user", "content": "Hi", "name": "ann"},
                  {"role": "assistant", "content": "Hello", "tool_calls": None, "refusal": None},
                  {"role": "user", "content": "Again"}])
    assert ok.choices[0].message.content is not None
    # Parameters the server cannot honour are refused, not ignored.
    expect_error(400, "unsupported_parameter", lambda: chat("", logit_bias={"1": 5}))
    expect_error(400, "unsupported_parameter", lambda: chat("", extra_body={"store": True}))
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    expect_error(400, "unsupported_parameter", lambda: chat("", tools=[tool]))
    expect_error(400, "unsupported_parameter", lambda: client.chat.completions.create(
        model=MODEL, temperature=0.5, seed=3, max_tokens=2, messages=[{"role": "user", "content": "x"}]))
    for bad in ([{"role": "wizard", "content": "x"}], [{"role": "user", "content": None}]):
        expect_error(400, "invalid_request", lambda: client.chat.completions.create(
            model=MODEL, messages=bad, max_tokens=2))
    status, _, body = http("PUT", "/v1/chat/completions", "{}")
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed", (status, body)
    status, _, body = http("POST", "/v1/completions", json.dumps({"prompt": "x" * (3 << 20)}))
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large", (status, body[:200])


def named(base_prompt, expected_a1):
    """Adapters served under a name (`--lora a1=...`, `--dnd-preset yesno=...`), chosen by `model`."""
    listed = {m.id: m.model_extra.get("dnd") for m in client.models.list().data}
    assert listed.get("a1") == {"kind": "peft"} and listed.get("yesno") == {"kind": "preset"}, listed
    # The golden PEFT adapter answers as transformers+peft does with it.
    r = client.completions.create(model="a1", prompt=base_prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected_a1, (r.choices[0].text, expected_a1)
    assert dnd(r)["name"] == "a1" and dnd(r)["source"] == "loaded" and r.model == "a1", (dnd(r), r.model)
    again = client.completions.create(model="a1", prompt=base_prompt, max_tokens=8, temperature=0)
    assert again.choices[0].text == expected_a1 and dnd(again)["source"] == "cached", dnd(again)
    status, _, body = http("GET", "/v1/adapters/" + dnd(r)["adapter"])
    assert json.loads(body)["name"] == "a1", body
    # A preset is the adapter its prompts generate.
    p = client.completions.create(model="yesno", prompt=base_prompt, max_tokens=8, temperature=0)
    same = client.completions.create(model=MODEL, prompt=base_prompt, max_tokens=8, temperature=0,
                                     extra_body={"dnd": {"prompts": ["Is grass green?", "Is snow hot?"]}})
    assert dnd(p)["adapter"] == dnd(same)["adapter"] and dnd(p)["name"] == "yesno", (dnd(p), dnd(same))
    expect_error(400, "conflicting_dnd_fields", lambda: client.completions.create(
        model="a1", prompt="x", max_tokens=2, extra_body={"dnd": {"base": True}}))


def runtime(base_prompt, expected_a1, expected_a2, outside):
    """Named adapters loaded and unloaded while the server runs (vLLM's endpoints), from
    folders under --adapter-root only."""
    def post(path, **body):
        status, _, raw = http("POST", path, json.dumps(body))
        return status, json.loads(raw)

    status, body = post("/v1/load_lora_adapter", lora_name="a2", lora_path="adapter2")
    assert status == 200 and body["loaded"], body
    listed = {m.id: m.model_extra.get("dnd") for m in client.models.list().data}
    assert listed.get("a2") == {"kind": "peft"}, listed
    # The loaded folder answers as transformers+peft does with it.
    r = client.completions.create(model="a2", prompt=base_prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected_a2, (r.choices[0].text, expected_a2)
    assert dnd(r)["name"] == "a2" and dnd(r)["source"] == "loaded", dnd(r)
    refused = [
        ({"lora_name": "a2", "lora_path": "adapter1"}, 409, "adapter_exists"),
        ({"lora_name": "a3", "lora_path": outside}, 400, "adapter_path_outside_root"),
        ({"lora_name": "a3", "lora_path": "../outside"}, 400, "adapter_path_outside_root"),
        ({"lora_name": "a3", "lora_path": "escape"}, 400, "adapter_path_outside_root"),
        ({"lora_name": "a3", "lora_path": "pickle"}, 400, "invalid_adapter"),
        ({"lora_name": "a3", "lora_path": "nowhere"}, 404, "adapter_path_not_found"),
        ({"lora_name": "a3"}, 400, "invalid_request"),
        ({"lora_name": "a3", "lora_path": "adapter2", "lora_int_id": 3}, 400, "unsupported_parameter"),
        ({"lora_name": "tiny-qwen2", "lora_path": "adapter2"}, 400, "invalid_adapter"),
    ]
    for req, want_status, want_code in refused:
        status, body = post("/v1/load_lora_adapter", **req)
        assert (status, body["error"]["code"]) == (want_status, want_code), (req, status, body)
    # Replaced in place: the same name now answers with the other folder's weights.
    status, body = post("/v1/load_lora_adapter", lora_name="a2", lora_path="adapter1",
                        load_inplace=True)
    assert status == 200, body
    r = client.completions.create(model="a2", prompt=base_prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected_a1, (r.choices[0].text, expected_a1)
    status, body = post("/v1/unload_lora_adapter", lora_name="a2")
    assert status == 200 and body["unloaded"], body
    # Gone: a request naming it is refused, not answered by another model.
    expect_error(404, "model_not_found", lambda: client.completions.create(
        model="a2", prompt="x", max_tokens=2))
    assert "a2" not in {m.id for m in client.models.list().data}
    status, body = post("/v1/unload_lora_adapter", lora_name="a2")
    assert (status, body["error"]["code"]) == (404, "adapter_not_found"), body
    expect_error(404, "model_not_found", lambda: client.completions.create(
        model="tiny-qwen3", prompt="x", max_tokens=2))
    assert client.completions.create(model="default", prompt="x", max_tokens=2).choices


def langchain(a, expected_base_chat):
    """LangChain's ChatOpenAI, a client no one here wrote, with its own default payload: the same
    adapter answer as the openai client for the same conversation, streamed or not, with
    logprobs, and a named adapter / the base model chosen through `model` alone."""
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    def llm(model=MODEL, **kw):
        return ChatOpenAI(base_url=BASE + "/v1", api_key="unused", model=model, temperature=0,
                          max_tokens=8, max_retries=0, timeout=600, **kw)

    msgs = [SystemMessage("You answer science questions with A, B, C or D."), HumanMessage("Hello there")]
    r = llm().invoke(msgs)
    assert r.content == a.choices[0].message.content, (r.content, a.choices[0].message.content)
    assert r.response_metadata["finish_reason"] in ("stop", "length"), r.response_metadata
    streamed = "".join(c.content for c in llm().stream(msgs))
    assert no_fffd(streamed) == no_fffd(r.content), (streamed, r.content)
    lp = llm(logprobs=True, top_logprobs=2).invoke(msgs).response_metadata["logprobs"]["content"]
    assert lp and all(t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 for t in lp), lp
    # `model` names the named adapter `a1` (a PEFT folder) or, with `dnd.base`, the base model.
    named_a1 = llm("a1").invoke([HumanMessage("Hello there")])
    assert named_a1.response_metadata["model_name"] == "a1", named_a1.response_metadata
    base = llm(extra_body={"dnd": {"base": True}}).invoke([HumanMessage("Hello there")])
    assert base.content == expected_base_chat, (base.content, expected_base_chat)
    return {"langchain": r.content}


def scored_variants(golden):
    """(model, extra_body, expected prompt logprobs) of the base model and the named adapter a1."""
    return [(MODEL, {"dnd": {"base": True}}, golden["base"]), ("a1", {}, golden["adapter1"])]


def prompt_error(got, want, what, tol):
    """Echoed prompt logprobs `got` (None first) against `want` (positions 1..): the largest
    absolute difference, which must be below `tol`."""
    assert got[0] is None and len(got) == len(want) + 1, (what, got, want)
    worst = max(abs(g - w) for g, w in zip(got[1:], want))
    assert worst < tol, (what, worst, got, want)
    return worst


def prompt_scoring(golden):
    """What lm-evaluation-harness does to score a continuation: the tokenizer endpoints, then
    `echo` with `logprobs` on a token prompt. The prompt's logprobs must be transformers' (and
    transformers+peft's under the named adapter a1), from log_softmax of the golden logits."""
    ids = golden["ids"]
    counted = requests_total()
    status, _, body = http("POST", "/tokenize", json.dumps({"prompt": golden["prompt"],
                                                            "add_special_tokens": False}))
    assert status == 200 and json.loads(body)["tokens"] == ids, (status, body)
    status, _, body = http("POST", "/detokenize", json.dumps({"tokens": ids}))
    assert status == 200 and json.loads(body)["prompt"] == golden["prompt"], (status, body)
    status, _, body = http("GET", "/tokenizer_info")
    assert status == 200 and json.loads(body)["eos_token"] == "<|im_end|>", (status, body)
    status, _, body = http("POST", "/detokenize", json.dumps({"tokens": [ids[0], 10 ** 6]}))
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_token_id", body
    # Every route's answers are counted under its path (vLLM's and our dashboards read them).
    now = requests_total()
    for key, n in [(("/tokenize", 200), 1), (("/detokenize", 200), 1), (("/detokenize", 400), 1),
                   (("/tokenizer_info", 200), 1)]:
        assert now.get(key, 0) - counted.get(key, 0) == n, (key, counted, now)

    def close(got, want, what):
        prompt_error(got, want, what, 1e-3)

    for model, extra, want in scored_variants(golden):
        # lm-eval's payload: max_tokens 1, logprobs 1, echo, the prompt as token ids.
        r = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0,
                                      logprobs=1, echo=True, extra_body=extra)
        lp = r.choices[0].logprobs
        close(lp.token_logprobs[:-1], want, model)
        assert r.choices[0].text.startswith(golden["prompt"]), r.choices[0].text
        assert len(lp.tokens) == len(ids) + 1 and len(lp.top_logprobs) == len(ids) + 1, lp
        # is_greedy as lm-eval reads it: each token against the best of its top_logprobs.
        assert all(max(t.values()) >= g - 1e-6 for g, t in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]))
        # Nothing generated (max_tokens 0): the prompt alone, scored the same.
        z = client.completions.create(model=model, prompt=golden["prompt"], max_tokens=0,
                                      temperature=0, logprobs=2, echo=True, extra_body=extra)
        assert z.choices[0].text == golden["prompt"], z.choices[0].text
        close(z.choices[0].logprobs.token_logprobs, want, f"{model}, text prompt")
        # Two alternatives each and the prompt's own token, as OpenAI lists the chosen token
        # (fewer where they coincide or two byte tokens read as the same text, U+FFFD).
        zl = z.choices[0].logprobs
        tops = zl.top_logprobs[1:]
        assert all(1 <= len(t) <= 3 for t in tops) and any(len(t) == 3 for t in tops), tops
        assert all(t[tok] == lp for tok, lp, t in zip(zl.tokens[1:], zl.token_logprobs[1:], tops))
        # `logprobs: 0`: the chosen tokens alone, prompt and generated.
        zero = client.completions.create(model=model, prompt=golden["prompt"], max_tokens=2,
                                         temperature=0, logprobs=0, echo=True,
                                         extra_body=extra).choices[0].logprobs
        assert len(zero.tokens) == len(zero.top_logprobs) and zero.top_logprobs[0] is None, zero
        assert all(t == {tok: lp} for tok, lp, t in
                   zip(zero.tokens[1:], zero.token_logprobs[1:], zero.top_logprobs[1:])), zero
    # Streamed: a first chunk with the prompt and its logprobs, then the generated tokens,
    # whose text offsets continue after the prompt; together the non-streamed answer.
    whole = client.completions.create(model="a1", prompt=ids, max_tokens=4, temperature=0,
                                      logprobs=1, echo=True)
    chunks = list(client.completions.create(model="a1", prompt=ids, max_tokens=4, temperature=0,
                                            logprobs=1, echo=True, stream=True))
    assert chunks[0].choices[0].text == golden["prompt"], chunks[0]
    # One completion, one id, as the non-streamed form has.
    assert len({c.id for c in chunks}) == 1, [c.id for c in chunks]
    close(chunks[0].choices[0].logprobs.token_logprobs, golden["adapter1"], "streamed prompt")
    assert chunks[0].model_extra["dnd"]["name"] == "a1", chunks[0].model_extra
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert no_fffd(text) == no_fffd(whole.choices[0].text), (text, whole.choices[0].text)
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs
               for o in c.choices[0].logprobs.text_offset]
    assert offsets[len(ids)] == len(golden["prompt"]), offsets
    # The same scoring twice in a row (the second finds the prompt in the prefix cache) and
    # next to generation requests of the same length: the same logprobs, no engine failure.
    import concurrent.futures as cf
    def score():
        return client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0,
                                         logprobs=1, echo=True,
                                         extra_body={"dnd": {"base": True}}).choices[0].logprobs
    def generate():
        return client.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0,
                                         extra_body={"dnd": {"base": True}}).choices[0].text
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(score if i % 2 else generate) for i in range(12)]
        results = [f.result() for f in futures]
    for lp in results[1::2]:
        close(lp.token_logprobs[:-1], golden["base"], "concurrent")
    return {"prompt_logprobs": "ok"}


def scoring(golden, tol):
    """Prompt logprobs (lm-eval's loglikelihood payload) on the base model and under the named
    adapter a1: within `tol` of transformers(+peft)'s, from log_softmax of the golden logits."""
    worst = {}
    for model, extra, want in scored_variants(golden):
        r = client.completions.create(model=model, prompt=golden["ids"], max_tokens=1,
                                      temperature=0, logprobs=1, echo=True, extra_body=extra)
        worst[model] = prompt_error(r.choices[0].logprobs.token_logprobs[:-1], want, model, tol)
    # The adapter changes the scores: a1 is not the base model under another name.
    assert max(abs(b - a) for b, a in zip(golden["base"], golden["adapter1"])) > 10 * tol
    if "adapter_bytes" in golden:
        # Only a1 has been served: the cache holds its bytes in the dtype asked for.
        resident = metrics()["dnd_adapter_bytes_resident"]
        assert resident == golden["adapter_bytes"], (resident, golden["adapter_bytes"])
    return {"worst_abs_error": worst}


def e2e(base_prompt, expected_base, expected_top, expected_a1, expected_a2, outside, golden):
    summary = {}
    named(base_prompt, expected_a1)
    runtime(base_prompt, expected_a1, expected_a2, outside)
    summary.update(prompt_scoring(golden))
    # Two system prompts: two adapters, each generated once.
    a = chat("You answer science questions with A, B, C or D.")
    b = chat("You translate English sentences into French.")
    assert dnd(a)["source"] == "generated" and dnd(b)["source"] == "generated", (dnd(a), dnd(b))
    assert dnd(a)["adapter"] != dnd(b)["adapter"]
    summary["texts"] = [a.choices[0].message.content, b.choices[0].message.content]
    base_chat = chat("", extra_body={"dnd": {"base": True}}).choices[0].message.content
    summary.update(langchain(a, base_chat))
    # The same system prompt again: a cache hit, the same answer.
    a2 = chat("You answer science questions with A, B, C or D.")
    assert dnd(a2) == {**dnd(a), "source": "cached", "generation_ms": None}, dnd(a2)
    assert a2.choices[0].message.content == a.choices[0].message.content, (
        a2.choices[0].message.content, a.choices[0].message.content)
    # Other whitespace around it: the same adapter (the model still sees the text as sent).
    a3 = chat("  You answer science questions with A, B, C or D.\r\n")
    assert dnd(a3)["adapter"] == dnd(a)["adapter"] and dnd(a3)["source"] == "cached", dnd(a3)
    # Headers name the adapter too.
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "system", "content": "You translate English sentences into French."},
                  {"role": "user", "content": "Hello there"}],
        max_tokens=8, temperature=0)
    assert raw.headers["x-dnd-adapter"] == dnd(b)["adapter"], dict(raw.headers)
    assert raw.headers["x-dnd-adapter-source"] == "cached"
    # Routing: the answer reports its condition's routing key, which a client computes from
    # the system prompt alone (README "Routing across replicas"); a wrong x-dnd-key is refused.
    french = [{"role": "system", "content": "You translate English sentences into French."},
              {"role": "user", "content": "Hello there"}]
    route = hashlib.sha256(french[0]["content"].encode() + b"\0").hexdigest()[:32]
    assert raw.headers["x-dnd-route-key"] == route, dict(raw.headers)
    assert dnd(raw.parse())["route_key"] == route
    keyed = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=french, max_tokens=2, temperature=0,
        extra_headers={"x-dnd-key": route})
    assert keyed.headers["x-dnd-adapter-source"] == "cached", dict(keyed.headers)
    expect_error(400, "dnd_key_mismatch", lambda: client.chat.completions.create(
        model=MODEL, messages=french, max_tokens=2, extra_headers={"x-dnd-key": "0" * 32}))
    # Streaming gives the same text, and the first chunk says which adapter served it.
    stream = client.chat.completions.create(
        model=MODEL, stream=True, max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "You answer science questions with A, B, C or D."},
                  {"role": "user", "content": "Hello there"}])
    chunks = list(stream)
    assert chunks[0].model_extra["dnd"]["adapter"] == dnd(a)["adapter"]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The tiny model's byte-level vocabulary can emit bytes that are not valid UTF-8: the whole
    # answer shows them as U+FFFD, mistral.rs's incremental decoding while streaming may skip
    # them (and then sends no final chunk with a finish_reason: an upstream quirk).
    assert no_fffd(streamed) == no_fffd(a.choices[0].message.content), (
        streamed, a.choices[0].message.content)
    # Opting out gives the base model: the transformers reference's greedy continuation.
    base = client.completions.create(model=MODEL, prompt=base_prompt, max_tokens=8,
                                     temperature=0, extra_body={"dnd": {"base": True}})
    assert dnd(base) == {"adapter": None, "source": "base", "generation_ms": None}
    raw_base = client.completions.with_raw_response.create(
        model=MODEL, prompt=base_prompt, max_tokens=1, extra_body={"dnd": {"base": True}})
    assert raw_base.headers["x-dnd-route-key"] == "none", dict(raw_base.headers)
    assert base.choices[0].text == expected_base, (base.choices[0].text, expected_base)
    conformance(base_prompt, expected_base, expected_top)
    # The same prompt with explicit condition prompts is specialised (and says so).
    spec = client.completions.create(model=MODEL, prompt=base_prompt, max_tokens=8,
                                     temperature=0,
                                     extra_body={"dnd": {"prompts": ["Is the sky blue?",
                                                                     "Is fire cold?"]}})
    assert dnd(spec)["source"] == "generated"
    summary["base_vs_adapter"] = [base.choices[0].text, spec.choices[0].text]
    assert spec.choices[0].text != base.choices[0].text, summary["base_vs_adapter"]
    # Streaming completions work too.
    sc = list(client.completions.create(model=MODEL, prompt=base_prompt, max_tokens=8,
                                        temperature=0, stream=True,
                                        extra_body={"dnd": {"base": True}}))
    assert no_fffd("".join(c.choices[0].text for c in sc if c.choices)) == no_fffd(expected_base)
    # A cached adapter can be named by key.
    again = client.completions.create(model=MODEL, prompt=base_prompt, max_tokens=8,
                                      temperature=0,
                                      extra_body={"dnd": {"adapter": dnd(spec)["adapter"]}})
    assert again.choices[0].text == spec.choices[0].text and dnd(again)["source"] == "cached"

    # Bad input: OpenAI-style errors with stable codes.
    expect_error(404, "adapter_not_found", lambda: client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"dnd": {"adapter": "f" * 32}}))
    expect_error(400, "blank_prompt", lambda: client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"dnd": {"prompts": ["ok", "  "]}}))
    expect_error(400, "too_many_prompts", lambda: client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"dnd": {"prompts": ["p"] * 5}}))
    expect_error(400, "prompt_too_long", lambda: chat("x" * 5000))
    expect_error(400, "no_prompts", lambda: client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"dnd": {"prompts": []}}))
    expect_error(400, "conflicting_dnd_fields", lambda: client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"dnd": {"base": True, "prompts": ["p"]}}))
    status, _, body = http("POST", "/v1/chat/completions", '{"messages": [')
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json", body
    status, _, body = http("POST", "/v1/chat/completions", '{"model": "m"}')
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_request", body
    # The server still serves everyone after the errors.
    assert chat("You translate English sentences into French.").choices[0].message.content \
        == b.choices[0].message.content

    # Adapter endpoints: list, inspect, export as a PEFT archive, evict.
    status, _, body = http("GET", "/v1/adapters")
    listing = json.loads(body)
    keys = {e["id"] for e in listing["data"]}
    assert {dnd(a)["adapter"], dnd(b)["adapter"], dnd(spec)["adapter"]} <= keys, listing
    assert all(e["bytes"] > 0 and not e["in_use"] for e in listing["data"])
    hits = {e["id"]: e["hits"] for e in listing["data"]}
    assert hits[dnd(a)["adapter"]] >= 2, hits
    status, _, body = http("GET", "/v1/adapters/" + dnd(spec)["adapter"])
    assert json.loads(body)["prompts"] == ["Is fire cold?", "Is the sky blue?"], body
    status, headers, body = http("GET", f"/v1/adapters/{dnd(spec)['adapter']}/peft")
    assert status == 200 and headers["content-type"] == "application/x-tar"
    names = tarfile.open(fileobj=io.BytesIO(body)).getnames()
    key = dnd(spec)["adapter"]
    assert f"{key}/adapter_config.json" in names and f"{key}/adapter_model.safetensors" in names, names
    # Concurrent exports of one key each get the whole archive (each writes its own folder).
    def weights(tar_bytes):
        t = tarfile.open(fileobj=io.BytesIO(tar_bytes))
        return t.extractfile(f"{key}/adapter_model.safetensors").read()
    with cf.ThreadPoolExecutor(6) as pool:
        exports = list(pool.map(lambda _: http("GET", f"/v1/adapters/{key}/peft"), range(6)))
    assert all(s == 200 for s, _, _ in exports), [s for s, _, _ in exports]
    assert len({weights(b) for _, _, b in exports} | {weights(body)}) == 1
    status, _, body = http("DELETE", "/v1/adapters/" + key)
    assert status == 200 and json.loads(body)["deleted"], body
    status, _, body = http("DELETE", "/v1/adapters/" + key)
    assert status == 404 and json.loads(body)["error"]["code"] == "adapter_not_found"
    m = metrics()
    assert m["dnd_adapter_cache_hits_total"] >= 4 and m["dnd_adapter_cache_misses_total"] >= 3, m
    assert m["dnd_adapter_generation_seconds_count"] == m["dnd_adapter_cache_misses_total"], m
    assert m["dnd_adapter_bytes_resident"] <= m["dnd_adapter_bytes_budget"], m
    return summary


def load(budget, host_budget):
    # Without --adapter-root, runtime loading is refused.
    status, _, body = http("POST", "/v1/load_lora_adapter", json.dumps({"lora_name": "x", "lora_path": "y"}))
    assert (status, json.loads(body)["error"]["code"]) == (403, "runtime_loading_disabled"), body
    topics = ["algebra", "poetry", "chemistry", "football", "cooking", "law", "astronomy",
              "music theory", "gardening", "medicine", "chess", "geology", "finance",
              "knitting", "robotics", "mythology"]
    sets = [[f"Answer this {t} question.", f"{t.upper()}!!! {i * 7919 % 1000}"] for i, t in
            enumerate(topics)]

    def ask(i):
        r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=24,
                                      temperature=0, extra_body={"dnd": {"prompts": sets[i]}})
        sources.append(dnd(r)["source"])
        return i, r.choices[0].text, dnd(r)["adapter"]

    sources = []
    # Each prompt set alone first: its own adapter's output.
    reference = {i: ask(i)[1:] for i in range(16)}
    before = metrics()
    jobs = [i % 16 for i in range(64)]
    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(ask, jobs, timeout=900))
    assert len(results) == 64
    wrong = [(i, t, reference[i][0]) for i, t, k in results if (t, k) != reference[i]]
    assert not wrong, f"answers that are not their own adapter's: {wrong[:5]}"
    after = metrics()
    assert after["dnd_adapter_cache_evictions_total"] > before["dnd_adapter_cache_evictions_total"]
    assert after["dnd_adapter_bytes_resident_peak"] <= budget, after
    assert after["dnd_adapter_bytes_budget"] == budget, after
    assert after["dnd_adapter_generation_failures_total"] == 0
    assert after["dnd_adapter_cache_busy_total"] == 0
    # Evicted adapters went to host memory and came back from there (answering as their own
    # adapter, checked above), within the tier's budget.
    assert set(sources) <= {"generated", "joined", "cached", "restored"}, set(sources)
    assert after["dnd_adapter_host_restores_total"] > 0 and "restored" in sources, after
    assert after["dnd_adapter_host_bytes"] <= after["dnd_adapter_host_bytes_budget"] == host_budget
    assert after["dnd_adapter_host_offloads_total"] > 0, after
    # The adapter list shows both tiers: the host entries after the device ones.
    status, _, body = http("GET", "/v1/adapters")
    listed = json.loads(body)
    tiers = [a["tier"] for a in listed["data"]]
    assert status == 200 and "host" in tiers and tiers == sorted(tiers), tiers
    assert tiers.count("device") <= 4 and listed["host_bytes"] <= listed["host_budget_bytes"], listed
    host_key = next(a["id"] for a in listed["data"] if a["tier"] == "host")
    status, _, body = http("GET", f"/v1/adapters/{host_key}")
    assert status == 200 and json.loads(body)["tier"] == "host", body
    distinct = len({t for t, _ in reference.values()})
    # The check above only tells adapters apart when their outputs differ.
    assert distinct >= 12, f"only {distinct} distinct outputs over 16 prompt sets"
    return {"distinct_outputs": distinct, "evictions": after["dnd_adapter_cache_evictions_total"],
            "restores": after["dnd_adapter_host_restores_total"],
            "peak_bytes": after["dnd_adapter_bytes_resident_peak"], "budget": budget}


def abstain(trained):
    # A paraphrase of a trained instruction gets an adapter; ordinary chat (far from every
    # trained condition) gets the base model, says so, and answers exactly as the base does.
    near = chat(trained.replace("two", "both"))
    assert dnd(near)["source"] == "generated", dnd(near)
    far = chat("You are a helpful assistant.", "Write a haiku about autumn.")
    d = dnd(far)
    assert d["source"] == "abstained" and d["adapter"] is None, d
    assert d["distance"] > 0.5 and d["nearest"].startswith("sum:"), d
    base = chat("You are a helpful assistant.", "Write a haiku about autumn.", extra_body={"dnd": {"base": True}})
    assert far.choices[0].message.content == base.choices[0].message.content
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "You are a helpful assistant."},
                               {"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
    assert raw.headers["x-dnd-adapter-source"] == "abstained", raw.headers
    # Semantic reuse (--dnd-reuse-distance 0.3): another paraphrase gets the cached adapter
    # of the first, and the same reply as a request naming that adapter by key.
    again = chat(trained.replace("reply with", "answer with"))
    r = dnd(again)
    assert r["source"] == "similar" and r["adapter"] == dnd(near)["adapter"], r
    assert 0 < r["distance"] <= 0.3, r
    by_key = chat(trained.replace("reply with", "answer with"),
                  extra_body={"dnd": {"adapter": dnd(near)["adapter"]}})
    assert by_key.choices[0].message.content == again.choices[0].message.content
    return {"near": dnd(near)["source"], "far_distance": d["distance"], "reuse_distance": r["distance"]}


def concurrent():
    # Greedy replies must not depend on what else is running: requests sharing a system prompt
    # (the prefix a prefix cache would reuse), half on the base model and half with the
    # system prompt's adapter, asked all at once on a fresh server, then one at a time, then
    # all at once again.
    system = "Label the sentiment of the text: [positive] or [negative]."
    things = ["show", "hotel", "game", "book", "album", "meal", "trip", "film", "service", "song"]
    words = ["brilliant", "terrible", "lovely", "horrible", "charming", "awful"]
    jobs = [(f"The {t} was {words[i % len(words)]}{'.' * (1 + i % 3)}", i % 2 == 0)
            for i, t in enumerate(things)]

    def ask(job):
        user, base = job
        extra = {"extra_body": {"dnd": {"base": True}}} if base else {}
        r = chat(system, user, max_tokens=16, **extra)
        assert (dnd(r)["source"] == "base") == base, dnd(r)
        return r.choices[0].message.content

    # Fewer clients than requests, so that later requests start while earlier ones decode.
    with cf.ThreadPoolExecutor(4) as pool:
        first = list(pool.map(ask, jobs, timeout=900))
    alone = [ask(j) for j in jobs]
    with cf.ThreadPoolExecutor(4) as pool:
        again = list(pool.map(ask, jobs, timeout=900))
    differ = [(j[0], a, f, g) for j, a, f, g in zip(jobs, alone, first, again) if not a == f == g]
    assert not differ, f"replies that change with concurrency (prompt, alone, concurrent, again): {differ}"
    return {"requests": 3 * len(jobs), "distinct_replies": len(set(alone))}


if MODE == "e2e":
    print(json.dumps(e2e(sys.argv[3], sys.argv[4], json.loads(sys.argv[5]), *sys.argv[6:9],
                         json.loads(sys.argv[9]))))
elif MODE == "load":
    print(json.dumps(load(float(sys.argv[3]), float(sys.argv[4]))))
elif MODE == "abstain":
    print(json.dumps(abstain(sys.argv[3])))
elif MODE == "scoring":
    print(json.dumps(scoring(json.loads(sys.argv[4]), float(sys.argv[5]))))
elif MODE == "concurrent":
    print(json.dumps(concurrent()))
else:
    raise SystemExit(f"unknown mode {MODE}")
