"""Log set-up for every edgefleet process: text for people, JSON lines for collectors.

JSON lines carry ``ts`` (UTC, ms), ``level``, ``logger``, ``process`` (the process
role: controller, ingest, agent...), ``pid``, ``msg`` and, for an exception, ``exc``.
Nothing here filters secrets: code never logs them in the first place.
"""

import json
import logging
import sys
from datetime import UTC, datetime

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "process": self._role,
               "pid": record.process, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str | int, fmt: str = "text", *, role: str) -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text`` or ``json``)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s %(name)s[{role}]: %(message)s"))
    logging.basicConfig(level=level if isinstance(level, int) else level.upper(),
                        handlers=[handler], force=True)
