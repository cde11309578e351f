"""``create_app``: the FastAPI application around one controller Runtime."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from controller.api import dashboard, delivery, errors, models, rollouts
from controller.api.routes import api, probes
from controller.runtime import Runtime
from controller.settings import Settings


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> FastAPI:
    """Build the app; the runtime starts with the app's lifespan and stops with it."""
    rt = runtime or Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt.start()
        try:
            yield
        finally:
            rt.stop()

    app = FastAPI(title="edgefleet controller", version="0.1.0", lifespan=lifespan)
    app.state.runtime = rt
    errors.install(app)
    app.include_router(api)
    app.include_router(models.router)
    app.include_router(delivery.router)
    app.include_router(rollouts.router)
    app.include_router(probes)
    app.include_router(dashboard.router)
    return app
