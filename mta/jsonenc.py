"""JSON text without ``json.dumps``'s set-up on every call: an encoder built once.

``json.dumps`` with any option besides the defaults builds a ``JSONEncoder`` and then a C
encoder for every value it encodes; for a short log or accounting line that set-up costs
more than the encoding. The output is the same bytes (the same C encoder does the work).
"""

from __future__ import annotations

import json
import json.encoder
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["encoder"]


def encoder(*, ensure_ascii: bool = True, separators: tuple[str, str] = (", ", ": "),
            default: Callable[[Any], Any] | None = None) -> Callable[[Any], str]:
    """``lambda obj: json.dumps(obj, ensure_ascii=..., separators=..., default=...)``,
    with the same output and errors (a circular structure raises ValueError)."""
    python = json.JSONEncoder(ensure_ascii=ensure_ascii, separators=separators,
                              default=default)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator in this Python: json's own pure-Python path
        return python.encode
    item_separator, key_separator = separators
    strings = json.encoder.encode_basestring_ascii if ensure_ascii \
        else json.encoder.encode_basestring
    # The C encoder keeps the containers it is inside in ``markers`` (circular references):
    # one per thread (every thread logs: the loop, the spool writer, workers), so a line
    # half encoded in one (while ``default`` runs Python code) is not another's state.
    local = threading.local()

    def dumps(obj: Any) -> str:
        try:
            markers, encode = local.state
        except AttributeError:
            markers = {}
            encode = make(markers, python.default, strings, None, key_separator,
                          item_separator, False, False, True)
            local.state = (markers, encode)
        if markers:
            return python.encode(obj)  # re-entered from ``default`` in this thread
        try:
            return "".join(encode(obj, 0))
        except BaseException:
            markers.clear()  # an error part-way leaves the containers it was inside
            raise

    return dumps
