"""Request dependencies: the database session (one transaction) and the caller."""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from controller.api.errors import ApiError
from controller.security import Role, lookup_api_token

if TYPE_CHECKING:
    from controller.runtime import Runtime


def runtime(request: Request) -> "Runtime":
    rt: Runtime = request.app.state.runtime
    return rt


def _db(request: Request) -> Iterator[Session]:
    """One transaction per request: committed when the route returns, else rolled back."""
    with runtime(request).session_factory() as session:
        yield session
        session.commit()


Db = Annotated[Session, Depends(_db, scope="function")]
Rt = Annotated["Runtime", Depends(runtime)]

_bearer = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    name: str
    role: Role
    remote: str | None


def require(role: Role) -> Callable[..., Principal]:
    """A dependency that admits callers with at least ``role``."""

    def check(request: Request, session: Db,
              creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
        if creds is None or creds.scheme.lower() != "bearer":
            raise ApiError(401, "unauthorized", "missing bearer token: pass --token or set "
                           "EDGEFLEET_TOKEN")
        token = lookup_api_token(session, creds.credentials)
        if token is None:
            raise ApiError(401, "unauthorized", "unknown or revoked token")
        have = Role.parse(token.role)
        if have < role:
            raise ApiError(403, "forbidden",
                           f"this needs the {role.name.lower()} role; the token is {token.role}")
        remote = request.client.host if request.client else None
        return Principal(name=token.name, role=have, remote=remote)

    return check


Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
