"""Multipart form parsing for the server: in memory only, with limits, and errors that name the field.

Starlette's own form parser spools uploads over 1 MB to a temporary file on disk and decodes text that is not
UTF-8 as Latin-1 without a word. Neither is acceptable for radiographs from a hospital: here every part is held
in memory, a part over its limit stops the upload there (it is never read to the end), and text must be UTF-8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header


class FormError(Exception):
    """A request the client must fix: HTTP status, the field at fault and what is wrong with it."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


@dataclass
class Upload:
    """One uploaded file. `filename` is kept for the suffix only: it may carry PHI, so it is never logged."""

    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass
class Form:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: list[Upload] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(len(f.data) for f in self.files) + sum(len(v) for vs in self.fields.values() for v in vs)

    def one(self, name: str) -> str | None:
        """The single value of a text field (None when absent); a repeated field is an error."""
        values = self.fields.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise FormError(422, name, f"given {len(values)} times; give it once")
        return values[0]


class _Collector:
    """python-multipart callbacks that build a Form and enforce the limits while the bytes arrive."""

    def __init__(self, max_file_bytes: int, max_text_bytes: int, max_files: int, max_fields: int):
        self.max_file_bytes, self.max_text_bytes = max_file_bytes, max_text_bytes
        self.max_files, self.max_fields = max_files, max_fields
        self.form = Form()
        self._n_fields = 0
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._filename: str | None = None
        self._buf = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}

    def on_part_begin(self) -> None:
        self._headers, self._buf, self._name, self._filename = {}, bytearray(), "", None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise FormError(400, "multipart", "a part has no name in its Content-Disposition header")
        try:
            self._name = options[b"name"].decode("utf-8")
        except UnicodeDecodeError:
            raise FormError(400, "multipart", "a field name is not valid UTF-8") from None
        if b"filename" in options:
            self._filename = options[b"filename"].decode("utf-8", errors="replace")
            if len(self.form.files) >= self.max_files:
                raise FormError(422, self._name, f"too many files: at most {self.max_files} per request")
        else:
            self._n_fields += 1
            if self._n_fields > self.max_fields:
                raise FormError(422, self._name, f"too many form fields: at most {self.max_fields}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        limit = self.max_file_bytes if self._filename is not None else self.max_text_bytes
        if len(self._buf) + (end - start) > limit:
            what = "file" if self._filename is not None else "text field"
            raise FormError(413, self._name, f"{what} larger than the limit of {_human(limit)}")
        self._buf += data[start:end]

    def on_part_end(self) -> None:
        if self._filename is not None:
            ctype = self._headers.get(b"content-type", b"application/octet-stream").decode("latin-1")
            self.form.files.append(Upload(self._name, self._filename, ctype, bytes(self._buf)))
            return
        try:
            text = bytes(self._buf).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormError(422, self._name, f"not valid UTF-8 text (byte {exc.start})") from None
        self.form.fields.setdefault(self._name, []).append(text)


def _human(n: int) -> str:
    return f"{n / 2**20:g} MB" if n >= 2**20 else f"{n / 2**10:g} KB" if n >= 2**10 else f"{n} bytes"


async def parse_form(content_type: str | None, stream, max_file_bytes: int, max_text_bytes: int,
                     max_files: int, max_fields: int = 32) -> Form:
    """Read a multipart/form-data body from an async byte stream into memory, enforcing every limit."""
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data":
        raise FormError(415, "content-type", "send the study as multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise FormError(400, "content-type", "multipart/form-data without a boundary")
    collector = _Collector(max_file_bytes, max_text_bytes, max_files, max_fields)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except FormError:
        raise
    except Exception:  # python-multipart's own errors for malformed bodies
        raise FormError(400, "multipart", "malformed multipart body") from None
    return collector.form
