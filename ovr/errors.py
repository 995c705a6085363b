"""The one exception type for problems the user can fix (bad input, missing files, foreign models)."""


class OvrError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with code 2."""


def read_parsed(path, parse, parse_errors: tuple, *, missing: str, invalid: str):
    """`parse` of a UTF-8 text file; a missing file raises OvrError(missing), an unreadable one
    OvrError(f"{invalid}: <the parser's message>")."""
    if not path.is_file():
        raise OvrError(missing)
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (*parse_errors, UnicodeDecodeError) as e:
        raise OvrError(f"{invalid}: {e}") from None
