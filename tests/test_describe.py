"""Tests for LLM class descriptions against a scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vlmdistill.text import describe
from vlmdistill.text.describe import (
    PROMPT_VARIANTS,
    DescribeResult,
    LLMEndpoint,
    clean_description,
    describe_classes,
    resolve_prompt,
    write_chatgpt_txt,
    write_descriptions,
)

NAMES = ["goldfish", "tabby cat", "fire truck", "daisy", "acoustic guitar"]
FAST = {"max_retries": 3, "backoff_s": 0.001}


@dataclass
class Reply:
    """One scripted server response; body None means a normal answer for the class asked about."""

    status: int = 200
    body: bytes | dict | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    echo_auth: bool = False  # the body repeats the request's Authorization header, as a careless server may


def answer(content: object) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


def description_of(name: str) -> str:
    return f"A {name} has a distinctive shape."


class FakeLLM:
    """Serves chat completions; per class, replays its scripted replies in order, then answers normally."""

    def __init__(self, names: list[str]) -> None:
        self.names = sorted(names, key=len, reverse=True)
        self.script: dict[str, list[Reply] | Reply] = {}
        self.delay_s = 0.0
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.handle_error = lambda request, address: None  # clients that timed out hang up on us
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def endpoint(self, **kwargs: object) -> LLMEndpoint:
        return LLMEndpoint(base_url=self.base_url, model="fake-model", **kwargs)

    def asked(self, name: str) -> int:
        return sum(request["name"] == name for request in self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _reply_for(self, name: str, attempt: int) -> Reply:
        scripted = self.script.get(name, [])
        if isinstance(scripted, Reply):
            return scripted
        return scripted[attempt] if attempt < len(scripted) else Reply(delay_s=self.delay_s)

    def _record(self, path: str, headers: dict[str, str], body: dict) -> tuple[str, int]:
        content = body["messages"][0]["content"]
        name = next((n for n in self.names if n in content), "")
        with self._lock:
            attempt = sum(request["name"] == name for request in self.requests)
            self.requests.append({"path": path, "headers": headers, "body": body, "name": name})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return name, attempt

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name, attempt = fake._record(self.path, dict(self.headers), body)
                self.counted = True
                try:
                    self._send(fake._reply_for(name, attempt), name)
                finally:
                    self._done()

            def _done(self) -> None:
                """Leave the in-flight count before the client can see the reply, so it may send the next one."""
                if self.counted:
                    self.counted = False
                    with fake._lock:
                        fake.in_flight -= 1

            def _send(self, reply: Reply, name: str) -> None:
                time.sleep(reply.delay_s)
                body = answer(f' "{description_of(name)}\n" ') if reply.body is None else reply.body
                if reply.echo_auth:
                    echoed = f"bad request with Authorization: {self.headers.get('Authorization')}"
                    body = answer(echoed) if reply.status == 200 else {"error": {"message": echoed}}
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(reply.status)
                for key, value in {"Content-Type": "application/json", **reply.headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self._done()
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = FakeLLM(NAMES)
    yield server
    server.close()


def cache_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_answers_come_back_cleaned_and_in_input_order(fake: FakeLLM, tmp_path: Path) -> None:
    result = describe_classes(NAMES, fake.endpoint(), cache_path=tmp_path / "cache.jsonl", **FAST)
    assert list(result.descriptions) == NAMES
    assert result.descriptions["tabby cat"] == "A tabby cat has a distinctive shape."
    assert (result.failed, result.too_long, result.requests_made, result.cache_hits) == ({}, {}, 5, 0)
    records = cache_records(tmp_path / "cache.jsonl")
    assert sorted(r["name"] for r in records) == sorted(NAMES)
    assert records[0].keys() == {"name", "prompt_id", "model", "base_url", "description"}
    assert {(r["prompt_id"], r["model"]) for r in records} == {("paper", "fake-model")}


def test_exact_paper_prompt_and_request_fields_reach_the_server(fake: FakeLLM, tmp_path: Path) -> None:
    endpoint = fake.endpoint(temperature=0.3, max_tokens=50)
    describe_classes(["goldfish"], endpoint, cache_path=tmp_path / "c.jsonl", **FAST)
    (request,) = fake.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["body"] == {
        "model": "fake-model",
        "messages": [
            {
                "role": "user",
                "content": "Use a single sentence to describe the appearance and shape "
                "of goldfish. Only describe the shape and appearance.",
            }
        ],
        "temperature": 0.3,
        "max_tokens": 50,
    }


@pytest.mark.parametrize(
    "bad_reply",
    [
        Reply(status=429, headers={"Retry-After": "0"}),
        Reply(status=500, body=b"upstream exploded"),
        Reply(status=503, body={"error": {"message": "overloaded"}}),
        Reply(delay_s=0.6),
        Reply(body=b'{"choices": [{"message": {"content": "A gold'),
        Reply(body={"choices": []}),
        Reply(body=answer(None)),
        Reply(body=answer("  \n ")),
    ],
    ids=["429", "500", "503", "slower-than-timeout", "malformed-json", "no-choices", "null-content", "blank"],
)
def test_transient_failures_are_retried(fake: FakeLLM, tmp_path: Path, bad_reply: Reply) -> None:
    fake.script["daisy"] = [bad_reply]
    result = describe_classes(NAMES, fake.endpoint(timeout_s=0.2), cache_path=tmp_path / "c.jsonl", **FAST)
    assert result.failed == {}
    assert result.descriptions["daisy"] == description_of("daisy")
    assert fake.asked("daisy") == 2
    assert result.requests_made == len(NAMES) + 1


def test_retry_after_is_respected_and_capped(fake: FakeLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.script["daisy"] = [Reply(status=429, headers={"Retry-After": "0.3"})]
    start = time.monotonic()
    describe_classes(["daisy"], fake.endpoint(), cache_path=tmp_path / "a.jsonl", **FAST)
    assert time.monotonic() - start >= 0.3

    monkeypatch.setattr(describe, "MAX_RETRY_AFTER_S", 0.01)
    fake.script["goldfish"] = [Reply(status=429, headers={"Retry-After": "3600"})]
    start = time.monotonic()
    result = describe_classes(["goldfish"], fake.endpoint(), cache_path=tmp_path / "b.jsonl", **FAST)
    assert time.monotonic() - start < 1.0
    assert list(result.descriptions) == ["goldfish"]


def test_class_failing_every_attempt_is_reported_not_faked(fake: FakeLLM, tmp_path: Path) -> None:
    fake.script["fire truck"] = Reply(status=500, body={"error": {"message": "model crashed"}})
    cache = tmp_path / "c.jsonl"
    result = describe_classes(NAMES, fake.endpoint(), cache_path=cache, **FAST)
    assert list(result.failed) == ["fire truck"]
    assert "gave up after 4 attempts" in result.failed["fire truck"]
    assert "model crashed" in result.failed["fire truck"]
    assert list(result.descriptions) == [n for n in NAMES if n != "fire truck"]
    assert fake.asked("fire truck") == 4
    assert "fire truck" not in {r["name"] for r in cache_records(cache)}


def test_bad_request_fails_that_class_at_once(fake: FakeLLM, tmp_path: Path) -> None:
    fake.script["daisy"] = Reply(status=400, body={"error": {"message": "content filtered"}})
    result = describe_classes(NAMES, fake.endpoint(), cache_path=tmp_path / "c.jsonl", **FAST)
    assert list(result.failed) == ["daisy"]
    assert "HTTP 400" in result.failed["daisy"] and "content filtered" in result.failed["daisy"]
    assert fake.asked("daisy") == 1
    assert len(result.descriptions) == len(NAMES) - 1


def test_unauthorized_stops_the_run_and_names_the_key_variable(fake: FakeLLM, tmp_path: Path) -> None:
    for name in NAMES:
        fake.script[name] = Reply(status=401, body={"error": {"message": "Incorrect API key"}})
    endpoint = fake.endpoint(api_key_env="MY_LLM_KEY")
    result = describe_classes(NAMES, endpoint, cache_path=tmp_path / "c.jsonl", concurrency=1, **FAST)
    assert result.descriptions == {}
    assert list(result.failed) == NAMES
    assert all("MY_LLM_KEY" in error and "not set" in error for error in result.failed.values())
    assert "Incorrect API key" in result.failed["goldfish"]
    assert result.requests_made == len(fake.requests) == 1


def test_api_key_echoed_by_the_server_is_never_shown_or_written(
    fake: FakeLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-secret-0123456789"
    caplog.set_level(logging.DEBUG, logger="vlmdistill")
    monkeypatch.setenv("OPENAI_API_KEY", key)
    fake.script["goldfish"] = Reply(status=400, echo_auth=True)
    fake.script["daisy"] = Reply(status=500, echo_auth=True)
    fake.script["tabby cat"] = Reply(status=200, echo_auth=True)
    cache = tmp_path / "c.jsonl"
    result = describe_classes(NAMES, fake.endpoint(), cache_path=cache, concurrency=1, **FAST)
    assert fake.requests[0]["headers"]["Authorization"] == f"Bearer {key}"  # the server did see it
    assert set(result.failed) == {"goldfish", "daisy"}
    assert "Bearer ***" in result.failed["goldfish"] and "Bearer ***" in result.failed["daisy"]
    assert result.descriptions["tabby cat"].endswith("Bearer ***")
    write_descriptions(result, tmp_path / "d.json")
    written = cache.read_text() + (tmp_path / "d.json").read_text() + repr(result) + caplog.text
    assert key not in written and "***" in caplog.text


def test_unreachable_endpoint_fails_every_class_after_retries(tmp_path: Path) -> None:
    endpoint = LLMEndpoint(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=1)
    result = describe_classes(["goldfish", "daisy"], endpoint, cache_path=tmp_path / "c.jsonl", **FAST)
    assert list(result.failed) == ["goldfish", "daisy"]
    assert "cannot reach" in result.failed["daisy"]
    assert result.requests_made == 8


def test_requests_in_flight_never_exceed_concurrency(fake: FakeLLM, tmp_path: Path) -> None:
    names = [f"class {i:02d}" for i in range(12)]
    fake.names = names
    fake.delay_s = 0.05
    result = describe_classes(names, fake.endpoint(), cache_path=tmp_path / "c.jsonl", concurrency=3, **FAST)
    assert len(result.descriptions) == 12
    assert fake.max_in_flight == 3


def test_second_run_is_served_from_cache(fake: FakeLLM, tmp_path: Path) -> None:
    cache = tmp_path / "c.jsonl"
    first = describe_classes(NAMES, fake.endpoint(), cache_path=cache, **FAST)
    fake.requests.clear()
    second = describe_classes(NAMES, fake.endpoint(), cache_path=cache, **FAST)
    assert fake.requests == []
    assert second.descriptions == first.descriptions
    assert list(second.descriptions) == NAMES
    assert (second.requests_made, second.cache_hits) == (0, len(NAMES))


def test_cache_is_keyed_by_prompt_and_model(fake: FakeLLM, tmp_path: Path) -> None:
    cache = tmp_path / "c.jsonl"
    describe_classes(["daisy"], fake.endpoint(), cache_path=cache, **FAST)
    describe_classes(["daisy"], fake.endpoint(), prompt="succinct", cache_path=cache, **FAST)
    other_model = LLMEndpoint(base_url=fake.base_url, model="other-model")
    describe_classes(["daisy"], other_model, cache_path=cache, **FAST)
    assert fake.asked("daisy") == 3
    assert "broadly describe" in fake.requests[1]["body"]["messages"][0]["content"]


def test_killed_run_resumes_with_only_the_missing_classes(fake: FakeLLM, tmp_path: Path) -> None:
    cache = tmp_path / "c.jsonl"
    done = [{"name": n, "prompt_id": "paper", "model": "fake-model", "description": f"cached {n}"} for n in NAMES[:2]]
    truncated = json.dumps({"name": NAMES[2], "prompt_id": "paper", "model": "fake-model", "description": "half"})[:30]
    cache.write_text("".join(json.dumps(r) + "\n" for r in done) + truncated, encoding="utf-8")
    progress: list[tuple[int, int]] = []
    result = describe_classes(NAMES, fake.endpoint(), cache_path=cache, progress=lambda *p: progress.append(p), **FAST)
    assert sorted(r["name"] for r in fake.requests) == sorted(NAMES[2:])
    assert (result.cache_hits, result.requests_made) == (2, 3)
    assert result.descriptions["goldfish"] == "cached goldfish"
    assert list(result.descriptions) == NAMES
    assert sorted(r["name"] for r in cache_records(cache)) == sorted(NAMES)
    assert progress == [(3, 5), (4, 5), (5, 5)]


@pytest.mark.parametrize("key", [None, "sk-test-123"])
def test_authorization_header_sent_iff_key_is_set(
    fake: FakeLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str | None
) -> None:
    if key is not None:
        monkeypatch.setenv("OPENAI_API_KEY", key)
    describe_classes(["daisy"], fake.endpoint(), cache_path=tmp_path / "c.jsonl", **FAST)
    headers = {k.lower(): v for k, v in fake.requests[0]["headers"].items()}
    assert headers.get("authorization") == (None if key is None else f"Bearer {key}")


def test_custom_instruction_is_sent_and_cached_under_its_hash(fake: FakeLLM, tmp_path: Path) -> None:
    cache = tmp_path / "c.jsonl"
    instruction = "Describe {cls} in one sentence: colours {and} textures."
    describe_classes(["daisy"], fake.endpoint(), prompt=instruction, cache_path=cache, **FAST)
    sent = fake.requests[0]["body"]["messages"][0]["content"]
    assert sent == "Describe daisy in one sentence: colours {and} textures."
    assert cache_records(cache)[0]["prompt_id"] == resolve_prompt(instruction)[0]
    assert resolve_prompt(instruction)[0].startswith("custom-")


def test_prompt_must_be_a_variant_or_contain_cls() -> None:
    assert resolve_prompt("distinct") == ("distinct", PROMPT_VARIANTS["distinct"])
    with pytest.raises(ValueError, match="paper"):
        resolve_prompt("describe the thing")


def test_token_check_flags_prompts_clip_would_truncate(fake: FakeLLM, tmp_path: Path) -> None:
    fake.script["acoustic guitar"] = [Reply(body=answer("A guitar " + "with strings " * 40))]
    result = describe_classes(
        NAMES,
        fake.endpoint(),
        cache_path=tmp_path / "c.jsonl",
        count_tokens=lambda text: len(text.split()) + 2,
        context_length=20,
        **FAST,
    )
    assert list(result.too_long) == ["acoustic guitar"]
    assert result.too_long["acoustic guitar"] == 8 + 80 + 2  # "a photo of acoustic guitar . A guitar" + 40 x 2


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ('  "A small, orange fish\n with   fins."  ', "A small, orange fish with fins."),
        ("“A round flower.”", "A round flower."),
        ("<think>\nhmm, daisies...\n</think>\nA white flower.", "A white flower."),
        ('A "so-called" red truck.', 'A "so-called" red truck.'),
        (" \n ", ""),
    ],
)
def test_clean_description(raw: str, clean: str) -> None:
    assert clean_description(raw) == clean


def test_write_descriptions_writes_utf8_json_atomically(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "descriptions.json"
    write_descriptions(DescribeResult(descriptions={"crème brûlée": "A golden dessert."}), out)
    assert json.loads(out.read_text(encoding="utf-8")) == {"crème brûlée": "A golden dessert."}
    assert "crème" in out.read_text(encoding="utf-8")
    write_descriptions({"a": "b"}, out)
    assert json.loads(out.read_text(encoding="utf-8")) == {"a": "b"}
    assert [p.name for p in out.parent.iterdir()] == ["descriptions.json"]


def test_write_chatgpt_txt_is_line_aligned_and_refuses_gaps(tmp_path: Path) -> None:
    out = tmp_path / "chatgpt.txt"
    write_chatgpt_txt(["b", "a"], {"a": "About a.", "b": "About\nb."}, out)
    assert out.read_text(encoding="utf-8").splitlines() == ["About b.", "About a."]
    with pytest.raises(ValueError, match=r"2 of 3 classes: 'c', 'd'"):
        write_chatgpt_txt(["a", "c", "d"], {"a": "About a.", "d": "  "}, tmp_path / "other.txt")
    assert not (tmp_path / "other.txt").exists()


def test_cli_prints_one_line_per_failed_class(fake: FakeLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from vlmdistill.cli import app

    monkeypatch.setenv("OPENAI_API_KEY", "k")
    fake.script["goldfish"] = Reply(status=400)
    labels = tmp_path / "names.txt"
    labels.write_text("\n".join(NAMES) + "\n")
    res = CliRunner().invoke(app, ["describe", str(labels), "--out", str(tmp_path / "d.json"), "--base-url",
                                   fake.base_url, "--model", "fake-model", "--retries", "1"])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if "goldfish" in line]
    assert len(lines) == 1 and lines[0].startswith("failed goldfish"), res.output
