"""The load behind every hot-swap test: threads asking one model, unary and streamed in turn,
recording which version answered each request (or what went wrong)."""

from __future__ import annotations

import threading
import time
from typing import Any

import openai


class SwapLoad:
    """Keeps ``threads`` clients asking ``model`` until :meth:`stop`.

    Attributes:
        answers: ``(wall-clock time, x-forgeline-model-version)`` of every answer, in order.
        errors: every exception a request raised (a failed request is the finding).
    """

    def __init__(
        self, base_url: str, model: str, messages: list[dict[str, str]], *, max_tokens: int, threads: int
    ) -> None:
        self.client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=60)
        self.model, self.messages, self.max_tokens = model, messages, max_tokens
        self.answers: list[tuple[float, str]] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ask, args=(i,)) for i in range(threads)]

    @property
    def versions(self) -> list[str]:
        """The version of every answer, in order."""
        return [version for _, version in list(self.answers)]

    def __enter__(self) -> SwapLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def wait_for(self, version: str, *, within: float = 30.0, recent: int = 4) -> bool:
        """Whether ``version`` answered one of the last ``recent`` requests within ``within`` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if version in self.versions[-recent:]:
                return True
            time.sleep(0.05)
        return False

    def _ask(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                if (worker + n) % 2:
                    raw = self.client.chat.completions.with_raw_response.create(
                        model=self.model, messages=self.messages, max_tokens=self.max_tokens, temperature=0
                    )
                    assert raw.parse().choices[0].finish_reason in ("length", "stop")
                    self.answers.append((time.time(), raw.headers["x-forgeline-model-version"]))
                else:
                    with self.client.chat.completions.with_streaming_response.create(
                        model=self.model, messages=self.messages, max_tokens=self.max_tokens, temperature=0, stream=True
                    ) as response:
                        lines = [line for line in response.iter_lines() if line]
                        assert lines[-1] == "data: [DONE]" and '"error"' not in "".join(lines)
                        self.answers.append((time.time(), response.headers["x-forgeline-model-version"]))
            except BaseException as exc:  # noqa: BLE001 - every failure is the finding
                self.errors.append(exc)
