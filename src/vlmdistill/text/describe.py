"""Write one-sentence visual descriptions of class names with any OpenAI-compatible chat LLM.

The paper (Sec. 5) enriches each class prompt with one ChatGPT sentence: "a photo of {name} . {description}".
This module asks an LLM behind a chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp server) for
those sentences. Runs over thousands of classes meet rate limits, flaky servers and Ctrl-C, so requests
are retried with backoff, run with bounded concurrency, and every answer is appended to a JSONL cache at
once: a re-run asks only for what is still missing.

The API key never leaves the request: a server that echoes the Authorization header in an error body
(or an answer) has the key replaced by ``***`` before anything is returned, logged or written.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import closing, suppress
from dataclasses import dataclass, field
from email.message import Message
from email.utils import parsedate_to_datetime
from pathlib import Path

from vlmdistill.errors import VlmdistillError
from vlmdistill.io import atomic_write_text
from vlmdistill.text.answer_cache import AnswerCache

log = logging.getLogger(__name__)

PROMPT_VARIANTS: dict[str, str] = {
    "paper": "Use a single sentence to describe the appearance and shape of {cls}. "
    "Only describe the shape and appearance.",
    "succinct": "Use a single sentence to broadly describe the appearance and shape of {cls}. "
    "Don't give too much details. Only describe the shape and appearance.",
    "detailed": "Use a single sentence and short, simple, descriptive phrases to describe "
    "the detailed appearance and detailed shape of {cls}.",
    "distinct": "Use a single sentence to describe the unique, distinctive appearance and shape of {cls}. "
    "Only describe the unique, distinctive shape and appearance.",
}

# A server may ask for long pauses; waiting longer than this stalls a worker for little gain.
MAX_RETRY_AFTER_S = 60.0
MAX_BACKOFF_S = 60.0
# Statuses that mean the next try may succeed (rate limit, overload, server-side timeout or conflict).
_RETRYABLE_STATUS = frozenset({408, 409, 429})
# Statuses that say the endpoint itself is wrong (key, permission, URL or model): every class would fail.
_ENDPOINT_WIDE_STATUS = frozenset({401, 403, 404})
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_QUOTES = "\"'`“”‘’«»"


class DescribeError(VlmdistillError, ValueError):
    """A describe request that cannot be served as given (prompt, concurrency, missing descriptions)."""


@dataclass
class LLMEndpoint:
    """Where and how to ask: an OpenAI-compatible base URL such as "http://localhost:8000/v1"."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60
    temperature: float = 0.0
    max_tokens: int = 120

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def headers(self) -> dict[str, str]:
        """Read the key at request time, so a key exported later still counts; local servers need none."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def redact(self, text: str) -> str:
        """``text`` with the API key, wherever a server echoed it, replaced by ``***``."""
        key = os.environ.get(self.api_key_env)
        return text.replace(key, "***") if key else text


@dataclass
class DescribeResult:
    """Descriptions in input order, plus what failed and which prompts CLIP's tokenizer would truncate."""

    descriptions: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    too_long: dict[str, int] = field(default_factory=dict)
    requests_made: int = 0
    cache_hits: int = 0


def resolve_prompt(prompt: str) -> tuple[str, str]:
    """Return (prompt_id, instruction) for a variant name or a custom instruction containing "{cls}".

    A custom instruction is identified by a hash of its text so the cache never mixes two instructions.
    """
    if prompt in PROMPT_VARIANTS:
        return prompt, PROMPT_VARIANTS[prompt]
    if "{cls}" not in prompt:
        raise DescribeError(
            f"prompt must be one of {sorted(PROMPT_VARIANTS)} or an instruction containing '{{cls}}', got {prompt!r}"
        )
    return "custom-" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16], prompt


def clean_description(text: str) -> str:
    """Reduce an answer to one line: drop reasoning blocks, collapse whitespace, strip wrapping quotes."""
    text = " ".join(_THINK_BLOCK.sub(" ", text).split())
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


class _Retryable(Exception):
    """A failure the next attempt may not meet; carries the server's Retry-After when it gave one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure that retrying cannot fix; endpoint_wide when every other class would meet it too."""

    def __init__(self, message: str, endpoint_wide: bool) -> None:
        super().__init__(message)
        self.endpoint_wide = endpoint_wide


def _request_once(endpoint: LLMEndpoint, prompt_text: str) -> str:
    """Send one chat-completions request and return the cleaned answer."""
    body = {
        "model": endpoint.model,
        "messages": [{"role": "user", "content": prompt_text}],
        "temperature": endpoint.temperature,
        "max_tokens": endpoint.max_tokens,
    }
    request = urllib.request.Request(
        endpoint.url, data=json.dumps(body).encode("utf-8"), headers=endpoint.headers(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=endpoint.timeout_s) as response:
            raw = response.read()
    except urllib.error.HTTPError as err:
        raise _classify_http_error(err, endpoint) from err
    except (OSError, http.client.HTTPException) as err:
        raise _Retryable(f"cannot reach {endpoint.url}: {err!r}") from err
    return _parse_answer(raw)


def _parse_answer(raw: bytes) -> str:
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError) as err:
        raise _Retryable(f"malformed response: {raw[:200]!r}") from err
    if not isinstance(content, str):
        raise _Retryable(f"answer content is not text: {content!r:.200}")
    text = clean_description(content)
    if not text:
        raise _Retryable("empty answer")
    return text


def _classify_http_error(err: urllib.error.HTTPError, endpoint: LLMEndpoint) -> Exception:
    detail = _error_detail(err)
    if err.code in _RETRYABLE_STATUS or err.code >= 500:
        return _Retryable(f"HTTP {err.code}: {detail}", _retry_after(err.headers))
    message = f"HTTP {err.code} from {endpoint.url}: {detail}"
    if err.code == 401:
        state = "set" if os.environ.get(endpoint.api_key_env) else "not set"
        message += f" (the API key is read from the environment variable {endpoint.api_key_env}: {state})"
    elif err.code == 404:
        message += f" (check base_url and that the server serves model {endpoint.model!r})"
    return _Fatal(message, endpoint_wide=err.code in _ENDPOINT_WIDE_STATUS)


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The server's own error message when it sent OpenAI-style JSON, else the start of the body."""
    try:
        raw = err.read()
    except (OSError, http.client.HTTPException):
        return err.reason or "no body"
    finally:
        err.close()
    with suppress(ValueError, LookupError, TypeError, AttributeError):
        return str(json.loads(raw)["error"]["message"])
    return raw[:300].decode("utf-8", "replace").strip() or str(err.reason)


def _retry_after(headers: Message | None) -> float | None:
    """Seconds the server asked us to wait (delta-seconds or HTTP date), capped at MAX_RETRY_AFTER_S."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


@dataclass
class _Outcome:
    name: str
    description: str | None
    error: str | None
    attempts: int


class _Asker:
    """Asks for one class with retries; shared by worker threads, all stopped together by stop()."""

    def __init__(self, endpoint: LLMEndpoint, instruction: str, max_retries: int, backoff_s: float) -> None:
        self.endpoint = endpoint
        self.instruction = instruction
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._stop = threading.Event()
        self._stop_reason = ""

    def stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def __call__(self, name: str) -> _Outcome:
        prompt_text = self.instruction.replace("{cls}", name)
        redact = self.endpoint.redact
        error = ""
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                prefix = f"{error}; then " if error else ""
                return _Outcome(name, None, f"{prefix}not asked: {self._stop_reason}", attempt)
            try:
                return _Outcome(name, redact(_request_once(self.endpoint, prompt_text)), None, attempt + 1)
            except _Fatal as err:
                if err.endpoint_wide:
                    self.stop(f"the endpoint rejected an earlier request: {redact(str(err))}")
                return _Outcome(name, None, redact(str(err)), attempt + 1)
            except _Retryable as err:
                error = redact(str(err))
                if attempt < self.max_retries:
                    self._stop.wait(self._delay(attempt, err.retry_after))
        attempts = self.max_retries + 1
        return _Outcome(name, None, f"gave up after {attempts} attempts: {error}", attempts)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter so workers hit by the same 429 don't retry in lockstep."""
        base = retry_after if retry_after is not None else min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)
        return base + random.uniform(0.0, 0.1 * max(base, self.backoff_s))


def describe_classes(
    names: list[str],
    endpoint: LLMEndpoint,
    *,
    prompt: str = "paper",
    cache_path: Path,
    concurrency: int = 4,
    max_retries: int = 5,
    backoff_s: float = 1.0,
    count_tokens: Callable[[str], int] | None = None,
    context_length: int = 77,
    template: str = "a photo of {name} . {description}",
    progress: Callable[[int, int], None] | None = None,
) -> DescribeResult:
    """Ask the LLM for one description per class, reusing and extending the cache at cache_path.

    Classes that still fail after max_retries retries land in result.failed; nothing raises for them, so
    the caller decides whether a partial result is acceptable. count_tokens, when given, should count the
    way the text encoder's tokenizer does (special tokens included) to flag prompts it would truncate.
    progress(done, total) is called from this thread after each class is settled.
    """
    if concurrency < 1:
        raise DescribeError(f"concurrency must be at least 1, got {concurrency}")
    prompt_id, instruction = resolve_prompt(prompt)
    unique = list(dict.fromkeys(names))
    cache = AnswerCache(Path(cache_path))
    cached = cache.load(prompt_id, endpoint.model)
    found = {name: cached[name] for name in unique if name in cached}
    todo = [name for name in unique if name not in found]
    result = DescribeResult(cache_hits=len(found))
    if todo:
        asking = closing(_ask_all(todo, endpoint, instruction, concurrency, max_retries, backoff_s))
        cache.repair()
        with asking as outcomes:
            for done, outcome in enumerate(outcomes, len(found) + 1):
                result.requests_made += outcome.attempts
                if outcome.description is None:
                    log.info("no description for %r: %s", outcome.name, outcome.error)
                    result.failed[outcome.name] = outcome.error or "unknown error"
                else:
                    found[outcome.name] = outcome.description
                    cache.add({
                        "name": outcome.name,
                        "prompt_id": prompt_id,
                        "model": endpoint.model,
                        "base_url": endpoint.redact(endpoint.base_url),
                        "description": outcome.description,
                    })
                if progress is not None:
                    progress(done, len(unique))
    result.descriptions = {name: found[name] for name in unique if name in found}
    result.failed = {name: result.failed[name] for name in unique if name in result.failed}
    if count_tokens is not None:
        result.too_long = _too_long(result.descriptions, count_tokens, context_length, template)
    return result


def _ask_all(
    names: list[str],
    endpoint: LLMEndpoint,
    instruction: str,
    concurrency: int,
    max_retries: int,
    backoff_s: float,
) -> Iterator[_Outcome]:
    """Yield outcomes as they arrive; the pool size bounds requests in flight. Closing stops all workers."""
    asker = _Asker(endpoint, instruction, max_retries, backoff_s)
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="describe")
    try:
        futures = [executor.submit(asker, name) for name in names]
        for future in as_completed(futures):
            yield future.result()
    finally:
        asker.stop("the run was interrupted")
        executor.shutdown(wait=True, cancel_futures=True)


def _too_long(
    descriptions: Mapping[str, str], count_tokens: Callable[[str], int], context_length: int, template: str
) -> dict[str, int]:
    counts = {name: count_tokens(template.format(name=name, description=text)) for name, text in descriptions.items()}
    return {name: count for name, count in counts.items() if count > context_length}


def write_descriptions(result_or_mapping: DescribeResult | Mapping[str, str], out: Path) -> None:
    """Write {class name: description} as UTF-8 JSON, atomically so a crash never leaves half a file."""
    mapping = _as_mapping(result_or_mapping)
    atomic_write_text(Path(out), json.dumps(dict(mapping), ensure_ascii=False, indent=2) + "\n")


def write_chatgpt_txt(names: Sequence[str], descriptions: DescribeResult | Mapping[str, str], out: Path) -> None:
    """Write the paper's chatgpt.txt, line i describing class i; refuse if any class lacks a description."""
    mapping = _as_mapping(descriptions)
    lines = {name: clean_description(mapping.get(name, "")) for name in names}
    missing = [name for name, line in lines.items() if not line]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DescribeError(f"no description for {len(missing)} of {len(lines)} classes: {shown}")
    atomic_write_text(Path(out), "".join(lines[name] + "\n" for name in names))


def _as_mapping(value: DescribeResult | Mapping[str, str]) -> Mapping[str, str]:
    return value.descriptions if isinstance(value, DescribeResult) else value

