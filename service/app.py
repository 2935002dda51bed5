"""The FastAPI application: lifespan-held registry, error handlers, the request intake, routers."""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import playground
from service.errors import install_error_handlers
from service.intake import RequestIntake
from service.metrics import ServiceMetrics, refresh_process_state
from service.registry import ModelRegistry
from service.remeasure import remeasure_when_idle
from service.routes import docs, engine_proxy, gallery, health, image2image, jobs, repository, stream, style, v1, v2
from service.settings import Settings

ENGINE_LINK = "link.sock"  # in settings.engine_dir: the front↔engine item link (service/engine.py)
ENGINE_HTTP = "http.sock"  # the engine's own HTTP: what fronts forward (service/routes/engine_proxy.py)


def build_registry(settings: Settings, metrics: ServiceMetrics) -> ModelRegistry:
    if settings.role == "front":
        from service.front import FrontRegistry

        return FrontRegistry(settings, metrics, settings.engine_dir / ENGINE_LINK, settings.workers)
    return ModelRegistry(settings, metrics)


def report_loading(task: asyncio.Task, registry: ModelRegistry) -> None:
    """The log line that ends start-up: every entry's state, or why loading itself failed."""
    log = logging.getLogger("ganserve")
    if task.cancelled():
        return
    if (error := task.exception()) is not None:
        log.error("loading failed: %s", error, exc_info=error)
    else:
        log.info("loaded: %s", {m.entry.label: m.state for m in registry.all_models()})


def create_app(settings: Settings | None = None, serve_while_loading: bool = True) -> FastAPI:
    """`serve_while_loading`: the server answers (/health/live at once, 503 for models still
    loading) before its models are loaded; False for a `--workers` front started in place of one
    that died, which starts serving (and so listening: service/worker_process.py) only once it
    mirrors the engine's loaded models, so that it never answers 503 beside ready fronts."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = build_registry(settings, ServiceMetrics())
        app.state.registry = registry
        registry.discover()
        link = None
        if settings.role == "engine":  # the fronts may connect while the models load
            from service.engine import EngineLink

            link = EngineLink(registry, settings.engine_dir / ENGINE_LINK)
            await link.start()
        beating = None
        if settings.role in ("front", "engine"):
            from service.heartbeats import HEARTBEATS_FILE, HeartbeatTable, keep_beating

            # first, so that a replacement front mirroring the engine's models below is watched too (the
            # engine once its models loaded: what a load does is not a hang)
            beating = asyncio.create_task(keep_beating(HeartbeatTable(settings.engine_dir / HEARTBEATS_FILE), settings.worker_slot,
                                                       after=registry.loaded_event if settings.role == "engine" else None), name="heartbeat")
        if settings.role == "front":
            import httpx

            app.state.engine_http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(settings.engine_dir / ENGINE_HTTP)),
                                                      base_url="http://engine")
        # load and warm in the background: the server answers /health/* at once, ready only after
        loading = asyncio.create_task(registry.load_all())
        if not serve_while_loading:
            await asyncio.shield(loading)
        loading.add_done_callback(lambda task: report_loading(task, registry))
        polling = asyncio.create_task(registry.poll_repository(settings.repository_poll_s)) if settings.repository_poll_s > 0 else None
        remeasuring = (asyncio.create_task(remeasure_when_idle(registry), name="remeasure-when-idle")
                       if settings.remeasure_idle_s > 0 and settings.role != "front" else None)
        gauging = asyncio.create_task(refresh_process_state(registry), name="process-gauges")
        resident = asyncio.create_task(registry.keep_resident_figure_current(), name="resident-memory") if settings.role != "front" else None
        try:
            yield
        finally:
            for task in (loading, polling, remeasuring, gauging, beating, resident):
                if task is not None and not task.done():
                    task.cancel()
            await registry.drain()
            if link is not None:
                await link.close()
            if settings.role == "front":
                await app.state.engine_http.aclose()

    # no redirect from a path with a trailing slash: Starlette's 307 names the host the client's Host
    # header names (`Location: http://evil.example/…`), which a cache in front would keep
    app = FastAPI(title="ganserve", version="1.0", lifespan=lifespan, redirect_slashes=False, docs_url=None, redoc_url=None,  # docs: routes/docs.py
                  description="Batched GAN inference: generation, latent tools, translation and super-resolution, with KServe v2 tensor endpoints.")
    install_error_handlers(app)
    allowed_hosts = () if settings.role == "engine" else settings.allowed_hosts  # (an engine's requests are its fronts', checked there)
    json_routes = [route for router in (v1.router, style.router) for route in router.routes if getattr(route, "json_body_only", False)]
    job_router = engine_proxy.router if settings.role == "front" else jobs.router  # (a front forwards projections to the engine)
    upload_routes = [route for router in (image2image.router, v2.router, job_router) for route in router.routes
                     if getattr(getattr(route, "endpoint", None), "checked_on_headers", None)]
    app.add_middleware(RequestIntake, max_body_bytes=settings.max_body_bytes, body_timeout_s=settings.body_timeout_s,
                       max_json_body_bytes=settings.max_json_body_bytes, json_routes=json_routes, upload_routes=upload_routes,
                       trusted_origins=settings.trusted_origins, allowed_hosts=allowed_hosts)
    app.add_middleware(stream.WebSocketRoutesOnly, trusted_origins=settings.trusted_origins, allowed_hosts=allowed_hosts)
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(style.router)
    if settings.role == "front":  # jobs and model control live in the engine process
        app.include_router(engine_proxy.router)
    else:
        app.include_router(jobs.router)
        app.include_router(repository.router)
    app.include_router(image2image.router)
    app.include_router(stream.router)
    app.include_router(v2.router)
    app.include_router(gallery.router)
    app.include_router(playground.router)
    app.mount("/static", playground.PageFiles(directory=playground.STATIC), name="static")
    app.include_router(docs.router)
    app.mount(docs.ASSETS_PATH, docs.ASSETS, name="docs-assets")

    return app
