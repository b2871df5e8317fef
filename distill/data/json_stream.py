"""Decode a JSON object whose large arrays are handed over one element at a time instead of being built.

`json.loads` of an instances file with tens of millions of annotations builds one dict per annotation before
anything can be kept compactly (about 0.7 KB each: some 16 GB for Objects365's 25 M boxes, per process).
Here the top level is walked with the standard decoder's `raw_decode`, each element of a streamed array is
decoded alone and given to a callback, and only the other members are returned. What is accepted, and the
messages of `json.JSONDecodeError`, are those of `json.loads`.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

_SPACE = re.compile(r"[ \t\n\r]*")
_SEPARATOR = re.compile(r"[ \t\n\r]*([,\]])([ \t\n\r]*)")
_decode = json.JSONDecoder().raw_decode


class StreamedArray(int):
    """Stands in the result for a streamed array: its number of elements."""


def _skip(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()


def _expect(text: str, pos: int, allowed: str, message: str) -> str:
    char = text[pos:pos + 1]
    if not char or char not in allowed:
        raise json.JSONDecodeError(message, text, pos)
    return char


def stream_object(text: str, streamed: dict[str, Callable[[Any], None]]) -> Any:
    """The document `text` decoded; at the top level of an object, an array under a key of `streamed` goes to
    that key's callback element by element and appears in the result as a `StreamedArray`. A document that is
    not an object is decoded whole."""
    pos = _skip(text, 0)
    if text[pos:pos + 1] != "{":
        return json.loads(text)
    members: dict[str, Any] = {}
    pos = _skip(text, pos + 1)
    if text[pos:pos + 1] != "}":
        while True:
            _expect(text, pos, '"', "Expecting property name enclosed in double quotes")
            key, pos = _decode(text, pos)
            pos = _skip(text, pos)
            _expect(text, pos, ":", "Expecting ':' delimiter")
            pos = _skip(text, pos + 1)
            if key in streamed and text[pos:pos + 1] == "[":
                if key in members:  # a second copy would add to what the callback already has
                    raise json.JSONDecodeError(f"Duplicate key {key!r}", text, pos)
                members[key], pos = _stream_array(text, pos, streamed[key])
            else:
                members[key], pos = _decode(text, pos)
            pos = _skip(text, pos)
            if _expect(text, pos, ",}", "Expecting ',' delimiter") == "}":
                break
            pos = _skip(text, pos + 1)
    end = _skip(text, pos + 1)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return members


def _stream_array(text: str, pos: int, callback: Callable[[Any], None]) -> tuple[StreamedArray, int]:
    """Elements of the array at `pos` to `callback`; (their number, the position after the array)."""
    count, pos = 0, _skip(text, pos + 1)
    if text[pos:pos + 1] == "]":
        return StreamedArray(0), pos + 1
    decode, separator = _decode, _SEPARATOR.match  # one regex match per element: this loop is the load time
    while True:
        value, pos = decode(text, pos)
        callback(value)
        count += 1
        found = separator(text, pos)
        if found is None:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, _skip(text, pos))
        if found.group(1) == "]":
            return StreamedArray(count), pos + len(found.group(0)) - len(found.group(2))
        pos = found.end()
