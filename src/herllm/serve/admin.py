"""Admin routes (an admin token): roll back the serving version, forget a user, export."""

import json
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from herllm.memory.knowledge import Scope
from herllm.serve import schemas as S
from herllm.serve.auth import Principal
from herllm.serve.errors import ApiError


def forget_weights(deps, forgotten: list[str]) -> dict | None:
    """Take forgotten facts out of the adapter where a consolidation absorbed them (a rollback
    and a new consolidation of the rest, as a new version the server then swaps to). The
    learner started by `serve --learn` is stopped for it (it would publish its own weights
    next) and started again on the new version."""
    from herllm.memory.knowledge.consolidate_run import forget_run
    from herllm.memory.knowledge.forget import absorbed_into
    from herllm.serve.versions import LOAD_LOCK

    if not absorbed_into(deps.store, forgotten):
        return None
    learner = deps.learner
    if learner is not None:
        learner.stop()
    try:
        with LOAD_LOCK:  # a model load beside the version watcher's must not overlap it
            res, path = forget_run(deps.versions.run_dir, forgotten)
    finally:
        if learner is not None:
            learner.restart()
    deps.versions.refresh()
    return {"rolled_back": res.rolled_back, "version": path.name if path else None,
            "consolidated_again": [r.entry for r in res.redone if r.accepted]}  # fmt: skip


def check_run_free(run_dir) -> None:
    """409 when a process this server did not start (a `herllm adapt` on the same run) holds
    the run: the facts could be erased but not their trace in the weights."""
    from herllm.errors import UserError
    from herllm.run.lock import WRITER_FIX, RunLock

    try:
        RunLock(run_dir, WRITER_FIX).acquire().release()
    except UserError as exc:
        raise ApiError(409, str(exc), code="run_in_use") from None


def register(app: FastAPI, deps, admin) -> None:
    from herllm.serve.routes import parse

    @app.post("/v1/admin/rollback")
    async def rollback(
        request: Request, _who: Annotated[Principal, Depends(admin)]
    ) -> JSONResponse:
        """Serve an earlier version (it stays pinned until `latest`)."""
        req = await parse(request, S.RollbackRequest)
        try:
            serving = await run_in_threadpool(deps.versions.pin, req.version)
        except KeyError:
            raise ApiError(404, f"no version {req.version!r}; GET /v1/models lists them "
                           "(or give latest)", param="version", code="not_found") from None  # fmt: skip
        return JSONResponse({"serving": serving, "pinned": deps.versions.pinned()})

    @app.post("/v1/admin/forget")
    async def forget(request: Request, _who: Annotated[Principal, Depends(admin)]) -> JSONResponse:
        """Erase a user's exchanges from the log and their facts from the knowledge store."""
        body = json.loads(await request.body() or b"{}")
        user = body.get("user") if isinstance(body, dict) else None
        if not isinstance(user, str) or not user:
            raise ApiError(400, 'give the user to forget: {"user": NAME}', param="user")
        if deps.learner is None and deps.versions is not None:
            check_run_free(deps.versions.run_dir)  # before anything is erased
        rows = await run_in_threadpool(deps.log.forget_user, user)
        items = deps.store.list(Scope("user", user)) if deps.store is not None else []
        forgotten = [v for item in items for v in deps.store.forget(item.id, actor="admin")]
        weights = await run_in_threadpool(forget_weights, deps, forgotten) if forgotten else None
        return JSONResponse({"user": user, "exchanges_deleted": rows,
                             "facts_forgotten": len(items), "weights": weights})  # fmt: skip

    @app.get("/v1/admin/export")
    def export(_who: Annotated[Principal, Depends(admin)], user: str | None = None) -> Response:
        lines = "".join(json.dumps(r) + "\n" for r in deps.log.rows(user))
        return Response(lines, media_type="application/x-ndjson")
