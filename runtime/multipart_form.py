"""A ``multipart/form-data`` body read streaming with caps (python-multipart's push parser), never whole first.

:func:`read_form` feeds the request's chunks to ``python_multipart.MultipartParser`` as they arrive and keeps each
part in memory only up to its cap: a file part past ``max_file_bytes``, a text field past ``max_field_bytes``, more
than ``max_files`` files or ``max_fields`` fields, or a body past ``max_body_bytes`` stops the read at once with a
:class:`FormError` naming the part and the cap (HTTP 413 for sizes, 400 for the rest).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.multipart import (
    MultipartParseError,
    MultipartParser,
    MultipartState,
    parse_options_header,
)

logger = logging.getLogger(__name__)

__all__ = ["Form", "FormError", "FormLimits", "boundary_of", "read_form"]


class FormError(Exception):
    """A form the caps or the syntax refuse; ``status`` 400 or 413, ``param`` the part's name if known."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass(frozen=True)
class FormLimits:
    max_files: int
    max_file_bytes: int
    max_fields: int = 64
    max_field_bytes: int = 64 << 10
    max_body_bytes: int = 1 << 30


@dataclass
class Form:
    """The parts of a form: text fields by name (a name given twice keeps the last), files in arrival order as
    ``(field name, bytes)``."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, bytes]] = field(default_factory=list)


def boundary_of(content_type: str | None) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type, or None when it is not one."""
    if not content_type:
        return None
    kind, params = parse_options_header(content_type)
    if kind.lower() != b"multipart/form-data":
        return None
    return params.get(b"boundary") or None


class _Reader:
    """The parser's callbacks: one part at a time, each capped."""

    def __init__(self, limits: FormLimits) -> None:
        self.limits = limits
        self.form = Form()
        self.fields = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._is_file = False
        self._data = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end}

    def part_begin(self) -> None:
        self._headers = {}
        self._data = bytearray()

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field, self._header_value = bytearray(), bytearray()

    def headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name")
        if disposition.lower() != b"form-data" or name is None:
            raise FormError("a part of the form has no 'Content-Disposition: form-data; name=...' header")
        self._name = name.decode("utf-8", "replace")
        self._is_file = b"filename" in options
        if self._is_file:
            if len(self.form.files) >= self.limits.max_files:
                raise FormError(f"{self._name}: more than {self.limits.max_files} files in the form; allowed: at "
                                f"most {self.limits.max_files}", self._name)
        else:
            self.fields += 1
            if self.fields > self.limits.max_fields:
                raise FormError(f"more than {self.limits.max_fields} fields in the form", self._name)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        cap = self.limits.max_file_bytes if self._is_file else self.limits.max_field_bytes
        if len(self._data) > cap:
            what = "file" if self._is_file else "field"
            raise FormError(f"{self._name}: the {what} is over {cap} bytes; allowed: at most {cap}", self._name,
                            413)

    def part_end(self) -> None:
        if self._is_file:
            self.form.files.append((self._name, bytes(self._data)))
            return
        try:
            self.form.fields[self._name] = self._data.decode("utf-8")
        except UnicodeDecodeError:
            raise FormError(f"{self._name}: the field is not UTF-8 text", self._name) from None


async def read_form(chunks: AsyncIterator[bytes], boundary: bytes, limits: FormLimits) -> Form:
    """Parse the body arriving in ``chunks``; raises :class:`FormError` at the first part over a cap, or for a body
    that is not a well-formed form."""
    reader = _Reader(limits)
    try:
        parser = MultipartParser(boundary, reader.callbacks())
    except ValueError as e:
        raise FormError(f"the multipart boundary is not allowed: {e}") from None
    size = 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise FormError(f"the body is over {limits.max_body_bytes} bytes; allowed: at most "
                                f"{limits.max_body_bytes}", None, 413)
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as e:
        raise FormError(f"the body is not a well-formed multipart/form-data form: {e}") from None
    if parser.state != MultipartState.END:  # the closing boundary was never seen
        raise FormError("the multipart/form-data body ended before its closing boundary")
    return reader.form
