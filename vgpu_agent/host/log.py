"""Logging setup: structured journald entries under systemd, readable lines on stderr otherwise.

Structured fields convention. Any logging call may carry journal fields::

    logger.warning("XID 79 on %s", gpu_uuid,
                   extra={"fields": {"GPU_UUID": gpu_uuid, "XID": 79, "VGPU_EVENT": "xid"}})

or, shorter, with upper-cased keyword names::

    log_event(logger, logging.WARNING, f"XID 79 on {gpu_uuid}",
              gpu_uuid=gpu_uuid, xid=79, vgpu_event="xid")

In the journal each becomes a field of the entry (``journalctl GPU_UUID=GPU-...`` finds it);
on stderr they are appended to the line as ``KEY=value``. Names are normalised to what
journald accepts (see vgpu_agent.host.systemd.journal_field_name); None values are left out.
A traceback (``exc_info``) goes to the journal in its own TRACEBACK field, not in MESSAGE.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, Mapping, Optional, TextIO, get_args

from vgpu_agent.host.systemd import SYSLOG_IDENTIFIER, Journal, journal_field_name, under_systemd
from vgpu_agent.model.errors import ConfigError

#: The config's log levels (``agent.log_level``), defined here so the config imports the
#: logging layer and not the other way round.
LogLevel = Literal["debug", "info", "warning", "error"]

#: The ``extra`` key whose mapping holds a record's structured fields.
FIELDS_KEY = "fields"

#: The config's level names (agent.log_level), each the name of a logging level.
_LEVELS: dict[str, int] = {
    name: int(logging.getLevelName(name.upper())) for name in get_args(LogLevel)
}

# Handlers we install carry this name prefix, so a second setup replaces them.
_HANDLER_NAME_PREFIX = "vgpu-agent."


def parse_level(level: str) -> int:
    """The logging level for a config name such as ``"info"``; ConfigError if unknown."""
    try:
        return _LEVELS[level.strip().lower()]
    except KeyError:
        allowed = ", ".join(_LEVELS)
        raise ConfigError(
            f"setting the log level: unknown level {level!r}; use one of {allowed}"
        ) from None


def syslog_priority(levelno: int) -> int:
    """The syslog priority (0 emergency .. 7 debug) journald stores for a logging level."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """The structured fields a record carries, with journal-valid names and string values."""
    raw = getattr(record, FIELDS_KEY, None)
    if not isinstance(raw, Mapping):
        return {}
    fields: dict[str, str] = {}
    for name, value in raw.items():
        if value is None or not isinstance(name, str):
            continue
        try:
            fields[journal_field_name(name)] = str(value)
        except ValueError:
            continue
    return fields


def log_event(logger: logging.Logger, level: int, message: str, **fields: object) -> None:
    """Log ``message`` with ``fields`` as structured fields, names upper-cased.

    The record points at the caller (file, line, function), not at this helper.
    """
    if not logger.isEnabledFor(level):
        return
    caller = sys._getframe(1)
    record = logger.makeRecord(
        logger.name,
        level,
        caller.f_code.co_filename,
        caller.f_lineno,
        message,
        (),
        None,
        func=caller.f_code.co_name,
        extra={FIELDS_KEY: {name.upper(): value for name, value in fields.items()}},
    )
    logger.handle(record)


class JournalHandler(logging.Handler):
    """Writes each record as one structured journald entry.

    Fields: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, CODE_FILE, CODE_LINE, CODE_FUNC, LOGGER,
    THREAD_NAME, the record's own fields (see FIELDS_KEY), and TRACEBACK / STACK when
    the record has them. An entry journald does not take goes to ``fallback`` instead.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        fallback: Optional[logging.Handler] = None,
        identifier: str = SYSLOG_IDENTIFIER,
    ) -> None:
        super().__init__()
        self.journal = journal
        self.fallback = fallback
        self.identifier = identifier
        self._exception_formatter = logging.Formatter()

    def entry_fields(self, record: logging.LogRecord) -> dict[str, str]:
        """Every field but MESSAGE and PRIORITY for ``record``."""
        fields = record_fields(record)
        # Ours last: a record's extra fields cannot disguise where it came from.
        fields.update(
            SYSLOG_IDENTIFIER=self.identifier,
            CODE_FILE=record.pathname,
            CODE_LINE=str(record.lineno),
            CODE_FUNC=record.funcName,
            LOGGER=record.name,
            THREAD_NAME=str(record.threadName),
        )
        if record.exc_info:
            fields["TRACEBACK"] = self._exception_formatter.formatException(record.exc_info)
        elif record.exc_text:
            fields["TRACEBACK"] = record.exc_text
        if record.stack_info:
            fields["STACK"] = record.stack_info
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        """Send ``record`` to journald, or to the fallback if journald does not take it."""
        try:
            sent = self.journal.send(
                record.getMessage(), syslog_priority(record.levelno), self.entry_fields(record)
            )
        except Exception:  # logging must never take the agent down
            self.handleError(record)
            return
        if not sent and self.fallback is not None:
            self.fallback.handle(record)

    def close(self) -> None:
        """Close the journal socket."""
        self.journal.close()
        super().close()


class FieldsFormatter(logging.Formatter):
    """Formats a record as text with its structured fields appended as ``KEY=value``.

    With ``syslog_prefix`` each line starts with ``<priority>``, which systemd reads
    when stderr is connected to the journal as a stream.
    """

    def __init__(self, fmt: str, *, syslog_prefix: bool = False) -> None:
        super().__init__(fmt)
        self.syslog_prefix = syslog_prefix

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        """The message line with the fields appended."""
        line = super().formatMessage(record)
        fields = record_fields(record)
        if fields:
            line += " " + " ".join(f"{name}={_quote(value)}" for name, value in fields.items())
        return line

    def format(self, record: logging.LogRecord) -> str:
        """The formatted record, every line prefixed with its priority if asked."""
        text = super().format(record)
        if not self.syslog_prefix:
            return text
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


def _quote(value: str) -> str:
    # Quote only when needed, so grepping for GPU_UUID=GPU-... keeps working.
    if value and not any(char.isspace() or char in "\"'=\\" for char in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def stderr_handler(
    stream: Optional[TextIO] = None, *, journal_stream: bool = False
) -> logging.Handler:
    """A handler writing readable lines to ``stream`` (default: stderr).

    With ``journal_stream`` (stderr goes to the journal, as under systemd) the journal
    adds time and process itself, so lines carry only a priority prefix, the logger
    name and the message.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if journal_stream:
        handler.setFormatter(FieldsFormatter("%(name)s: %(message)s", syslog_prefix=True))
    else:
        handler.setFormatter(FieldsFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    return handler


def setup_logging(
    level: str,
    environ: Mapping[str, str],
    *,
    journal: Optional[Journal] = None,
    stream: Optional[TextIO] = None,
) -> None:
    """Send the root logger's records to journald under systemd, to stderr otherwise.

    journald is used when ``environ`` says we run under systemd and the journal socket
    exists; entries it refuses fall back to stderr. ``journal`` and ``stream`` are for
    tests and default to the system journal and stderr. Calling this again replaces the
    handlers it installed before (and closes them); other handlers are left alone.
    Raises ConfigError for an unknown level.
    """
    levelno = parse_level(level)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if (handler.name or "").startswith(_HANDLER_NAME_PREFIX):
            root.removeHandler(handler)
            handler.close()
    systemd = under_systemd(environ)
    journal = journal if journal is not None else Journal()
    fallback = stderr_handler(stream, journal_stream=systemd)
    installed: logging.Handler
    if systemd and journal.available:
        installed = JournalHandler(journal, fallback=fallback)
        installed.set_name(_HANDLER_NAME_PREFIX + "journal")
    else:
        journal.close()
        installed = fallback
        installed.set_name(_HANDLER_NAME_PREFIX + "stderr")
    root.addHandler(installed)
    root.setLevel(levelno)


def set_level(level: str) -> None:
    """Change the root logger's level (on reload); ConfigError for an unknown level."""
    logging.getLogger().setLevel(parse_level(level))
