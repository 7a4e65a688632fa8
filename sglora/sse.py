"""Reading a server-sent event stream as the spec does (HTML Living Standard, "Parsing an event
stream"): a line ends at CRLF, LF or CR and nowhere else; an empty line ends an event; the
event's data is its `data:` fields joined by LF. The clients here (the soak traffic, the serving
benchmark) read streams through it.

Not httpx's `aiter_lines()` (nor `str.splitlines()`): those also end a line at U+000B, U+000C,
U+001C-U+001E, U+0085, U+2028 and U+2029. JSON escapes the control characters but leaves
U+0085, U+2028 and U+2029 raw inside strings (pydantic's `model_dump_json` does), so a
generated token holding one of them would cut a well-formed event in two.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx

_EOL = re.compile(r"\r\n|\r|\n")


class SSEReader:
    """Feed it decoded text as it arrives; it returns the data of each event completed so far.
    `close()` at the end of the stream returns what was left unfinished: an event cut before its
    closing empty line, or a partial line ("" when the stream ended between events)."""

    def __init__(self) -> None:
        self.buf = ""  # text after the last line end
        self.data: list[str] | None = None  # data fields of the event being read

    def feed(self, text: str) -> list[str]:
        self.buf += text
        return self._lines(final=False)

    def close(self) -> str:
        self._lines(final=True)  # a trailing CR ends its line
        pending = [] if self.data is None else [f"data: {d}" for d in self.data]
        tail = "\n".join(pending + ([self.buf] if self.buf else []))
        self.buf, self.data = "", None
        return tail

    def _lines(self, final: bool) -> list[str]:
        events, start = [], 0
        while (m := _EOL.search(self.buf, start)) is not None:
            if not final and m.group() == "\r" and m.end() == len(self.buf):
                break  # perhaps the first half of a CRLF split between chunks
            line, start = self.buf[start : m.start()], m.end()
            if not line:  # an event ends (one without data fields is not dispatched)
                if self.data is not None:
                    events.append("\n".join(self.data))
                self.data = None
            elif not line.startswith(":"):  # ":" starts a comment
                name, colon, value = line.partition(":")
                if name == "data":
                    value = value[1:] if colon and value.startswith(" ") else value
                    self.data = self.data if self.data is not None else []
                    self.data.append(value)
        self.buf = self.buf[start:]
        return events


async def aiter_sse(r: httpx.Response, reader: SSEReader | None = None) -> AsyncIterator[str]:
    """The data of each complete event of a streamed response. Pass a `reader` to call
    `close()` on it afterwards and see whether the stream ended inside an event."""
    reader = reader or SSEReader()
    async for text in r.aiter_text():
        for data in reader.feed(text):
            yield data
