"""Names that come from data or config are checked where they enter (issue 12).

Plate, well and site identifiers come from folder names, file names, plate maps, LoadData CSVs, wells
tables and bucket listings; the dataset, feature-set and channel names come from the config.  They all
end up in file names (``tiles/<plate>.npy``), Snakemake wildcards and command lines.  The rules quote
every interpolated value (``:q``, tests/test_security.py), but a name such as ``P1$(touch X)``, ``../x``
or ``-rf`` must still never get that far: it stops here, with one line naming it and where it came from.

The safe pattern is what real instruments and the Cell Painting Gallery write: ASCII letters, digits,
``.``, ``_`` and ``-``, starting with a letter or a digit (so never a hidden file, ``..`` or something a
command takes for an option), at most 128 characters.  Spaces and non-ASCII letters are rejected too:
they are legal file names but break shell scripts, cluster tools and other people's parsers downstream.
"""

from __future__ import annotations

import re

from .errors import ConfigError, DataError

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SAFE_NAME_RULE = (
    "names may hold only ASCII letters, digits, '.', '_' and '-', must start with a letter or a digit "
    "and be at most 128 characters"
)


def is_safe_name(name: object) -> bool:
    """True when ``name`` (a str) matches :data:`SAFE_NAME` in full."""
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None


def _problem(name: str) -> str:
    """What is wrong with an unsafe name, in words."""
    if name == "":
        return "it is empty"
    problems = []
    if len(name) > 128:
        problems.append(f"it is {len(name)} characters long")
    if name[0] in ".-":
        problems.append(f"it starts with {name[0]!r}")
    bad = sorted({c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c)})
    if bad:
        kinds = []
        if any(c.isspace() for c in bad):
            kinds.append("white space")
        if any(ord(c) > 127 for c in bad):
            kinds.append("non-ASCII letters")
        what = f" ({' and '.join(kinds)})" if kinds else ""
        problems.append(f"it contains {', '.join(repr(c) for c in bad)}{what}")
    return "; ".join(problems)


def check_name(name: object, *, kind: str, source: str, fix: str = "", config: bool = False) -> str:
    """Return ``name`` as a str when it is safe, else raise a one-line error.

    ``kind`` says what the name is ("plate name"), ``source`` where it came from ("folder /data/x under
    images.root"), ``fix`` how to repair it.  ``config=True`` raises ConfigError (a config key is at
    fault), else DataError (a file or table is).
    """
    text = str(name)
    if is_safe_name(text):
        return text
    # repr() keeps the message on one line whatever the name holds (newlines, quotes, control bytes)
    message = f"unsafe {kind} {text!r} from {source}: {_problem(text)}; {SAFE_NAME_RULE}"
    if fix:
        message += f"; {fix}"
    raise (ConfigError if config else DataError)(message)


def check_names(names, *, kind: str, source: str, fix: str = "", config: bool = False) -> list[str]:
    """:func:`check_name` over an iterable (each distinct name checked once); returns them as strings."""
    checked = {}
    for name in names:
        key = str(name)
        if key not in checked:
            checked[key] = check_name(key, kind=kind, source=source, fix=fix, config=config)
    return list(checked)


# ----------------------------------------------------------------------------- channel tokens

# What people write for "channel 5": 5, "5", "05", ch5, w5, c5 (Phenix -ch5, ImageXpress _w5, CV7000 C05).
_NUMBERED_CHANNEL = re.compile(r"(?:ch|w|c)?0*(\d{1,3})", re.IGNORECASE)
# A LoadData suffix (FileName_<suffix>) or a channel name captured by a pattern's channel group.
_NAMED_CHANNEL = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


def numbered_channel(token: object) -> str | None:
    """``5``/``"5"``/``"05"``/``ch5``/``w5``/``c5`` → ``"5"``; None when the token is not a channel number."""
    if isinstance(token, bool):
        return None
    match = _NUMBERED_CHANNEL.fullmatch(str(token).strip())
    return str(int(match.group(1))) if match else None


def channel_token(token: object, *, layout: str) -> str | None:
    """The canonical form of a channel token for ``layout``; None when the layout cannot produce it.

    File-name layouts give channel numbers (all numbered forms become the bare number); ``pattern`` may
    also capture names (``DNA``, ``OrigDNA``), kept as written; ``loaddata`` tokens are the CSV's
    ``FileName_<X>`` suffixes, kept as written.
    """
    if layout == "loaddata":
        text = str(token)
        return text if re.fullmatch(r"[A-Za-z0-9_]{1,64}", text) else None
    number = numbered_channel(token)
    if number is not None:
        return number
    if layout == "pattern" and isinstance(token, str) and _NAMED_CHANNEL.fullmatch(token):
        return token
    return None


CHANNEL_FORMS = {
    "phenix": 'the channel number of the file names, as 5, "5", ch5 or w5',
    "imagexpress": 'the channel number of the file names, as 5, "5", w5 or ch5',
    "pattern": 'a channel number (5, "5", ch5, w5) or the name the pattern\'s channel group captures '
    "(letters, digits, '_', '-', starting with a letter)",
    "loaddata": "the LoadData column suffix X of FileName_X/PathName_X (letters, digits, '_')",
}
