"""User-facing errors: one line, naming the YAML key path or the file, exit code 2."""


class UserError(Exception):
    """Bad input from the user (suite, profile, record, checkpoint). The CLI prints
    ``error: <message>`` on one line and exits with code 2."""

    exit_code = 2


class FileError(UserError):
    """A UserError about one file, whose message already starts with that file's path (so
    callers do not prefix another path, e.g. the suite's, in front of it)."""


def did_you_mean(name: str, choices) -> str:
    import difflib

    choices = sorted(choices)
    name = name if len(name) <= 200 else name[:199] + "…"   # the user's text, quoted back bounded
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown name '{name}'{hint} (known: {', '.join(choices)})"
