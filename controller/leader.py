"""Which controller replica enacts scheduled work: the holder of a PostgreSQL advisory lock.

Every replica serves the API and ingests; only the leader runs rollout ticks. The lock is
held by a dedicated connection, so it goes when the process or its connection dies and
another replica takes it at its next attempt. The lock is per schema, so deployments that
share a database in separate schemas do not block each other. SQLite means one
controller: always leader.
"""

import logging

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

LOCK_CLASS = 0x6566_726F  # "efro"; the second key is the schema's hash: one lock per schema


class Leadership:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None
        self.leading = engine.dialect.name != "postgresql"
        self.taken_over = False  # set when the lock was just taken; the caller clears it

    def held(self) -> bool:
        """True if this replica leads now (taking the lock if it is free)."""
        if self._engine.dialect.name != "postgresql":
            return True
        try:
            if self._conn is None:
                self._conn = self._engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT")
            if self.leading:
                self._conn.execute(text("SELECT 1"))  # still connected, so still holding
            else:
                self.leading = bool(self._conn.execute(text(
                    "SELECT pg_try_advisory_lock(:k, hashtext(current_schema()))"),
                    {"k": LOCK_CLASS}).scalar())
                if self.leading:
                    self.taken_over = True
                    log.info("this controller now leads: it enacts rollout ticks")
        except DBAPIError:
            log.warning("lost the database connection that holds leadership; retrying")
            self.release()
        return self.leading

    def release(self) -> None:
        was, self.leading = self.leading, self._engine.dialect.name != "postgresql"
        if self._conn is not None:
            try:
                if was:
                    self._conn.execute(text(
                        "SELECT pg_advisory_unlock(:k, hashtext(current_schema()))"),
                        {"k": LOCK_CLASS})
                self._conn.close()
            except DBAPIError:
                self._conn.invalidate()
            self._conn = None
