"""The web page `tunesmith serve` shows at `/` (a chat playground and a runs browser: plain HTML, CSS and ES
modules in `serve/web/`, no build step, nothing fetched from anywhere else) and the small JSON API its runs
browser reads: GET /v1/runs, /v1/runs/{id}, /v1/reports and /v1/reports/{id} over the directory given with
`--runs` (`ServeSettings.runs`).

What lies under --runs is read with care: a file is read only when it is a regular file (a FIFO is never
opened, so nothing blocks on one) that resolves inside its own run's or report's directory (a symbolic link
out of --runs is not followed), and all of it happens on threads of the page's own, at most PAGE_THREADS at a
time, each request given up after READ_TIMEOUT_S (503): a hung mount under --runs holds those threads, never
the ones that parse request bodies, so chat goes on.

The page and its files hold no data, so they are served without the API key (`page_router`); everything the
page shows comes from the API behind the key (`router`), which the page sends like any client. A run or a
report is found by looking its id up among the directories found under `--runs`, never by joining the id to
a path, so no id can name anything outside that directory."""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse

from ... import runs
from ...errors import TunesmithError
from ..errors import APIError

router = APIRouter()
page_router = APIRouter(include_in_schema=False)  # included without the API-key check

WEB = Path(__file__).resolve().parent.parent / "web"
_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
# The page loads only its own files; a report shown in a sandboxed iframe keeps its inline styles and images.
_CSP = ("default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "style-src 'self' 'unsafe-inline'; frame-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'")
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "Content-Security-Policy": _CSP,
            "Referrer-Policy": "no-referrer"}

# compare puts a run at out/<entry>/run, continual at out/<strategy>/<step>/run: a few levels are enough, and
# the bound keeps a --runs pointed at a large tree (a home directory) from walking all of it on every request.
MAX_DEPTH = 4
MAX_DIRS = 5000
MAX_LOG_POINTS = 400  # loss-curve points sent to the page (a long run's log is thinned evenly)
MAX_LOG_BYTES = 20_000_000
MAX_CONFIG_BYTES = 100_000
MAX_JSON_BYTES = 10_000_000  # metrics.json, report.json
MAX_REPORT_BYTES = 50_000_000
PAGE_THREADS = 4  # threads reading --runs at once
READ_TIMEOUT_S = 10.0  # a page request still reading after this is answered 503
REPORT = runs.REPORT_HTML


# -- the page -------------------------------------------------------------------------------------------------

def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)


@page_router.get("/")
async def page():
    return _file(WEB / "index.html")


@page_router.get("/web/{name}")
async def web_file(name: str):
    files = {p.name: p for p in WEB.iterdir() if p.suffix in _TYPES}  # the shipped files, nothing else
    if name not in files:
        raise APIError(404, f"The page has no file {name!r}.", code="not_found", type="not_found_error")
    return _file(files[name])


# -- finding runs and reports -----------------------------------------------------------------------------------

def _root(request: Request) -> Path | None:
    found = request.app.state.settings.runs
    return Path(found).resolve() if found else None


def _walk(root: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """({id: run directory}, {id: report directory}) under `root`; an id is the path relative to `root` (the
    root's own name when it is itself a run). A run is a directory with run.json (finished) or with a training
    log and no run.json yet (training); nothing inside a run is looked at. Hidden directories, checkpoints and
    symbolic links are skipped."""
    found_runs, reports = {}, {}
    stack, seen = [(root, 0)], 0
    while stack and seen < MAX_DIRS:
        directory, depth = stack.pop()
        seen += 1
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        names = {e.name for e in entries}
        rel = directory.relative_to(root).as_posix()
        name = root.name if rel == "." else rel
        if runs.RUN_INFO in names or runs.LOG in names:
            found_runs[name] = directory
            continue
        if REPORT in names:
            reports[name] = directory
        if depth < MAX_DEPTH:
            stack += [(Path(e.path), depth + 1) for e in entries
                      if not e.name.startswith(".") and e.name != runs.CHECKPOINTS and e.is_dir(follow_symlinks=False)]
    return found_runs, reports


def _scalars(metrics) -> dict:
    """The numbers of a metrics dict (a table cell each); nested values (per-label scores) are left out."""
    if not isinstance(metrics, dict):
        return {}
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _mtime(path: Path) -> int:
    try:
        return int(path.stat(follow_symlinks=False).st_mtime)
    except OSError:
        return 0


def _read(path: Path, limit: int) -> bytes | None:
    """A file of a run or report directory, at most `limit` bytes; None unless it is a regular file that
    resolves inside that directory."""
    try:
        return runs.read_regular(path, limit, within=path.parent)
    except (OSError, ValueError):
        return None


def _object(path: Path) -> dict:
    """A JSON file's object; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(_read(path, MAX_JSON_BYTES) or b"null")
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _info(directory: Path) -> runs.RunInfo | None:
    """The run's run.json; None while it trains, and for a run.json the page cannot read (shown unfinished)."""
    try:
        return runs.find_run(directory, within=directory)
    except TunesmithError:
        return None


def _parent(info: runs.RunInfo | None) -> dict | None:
    return info.parent if info is not None and isinstance(info.parent, dict) else None


def _summary(name: str, directory: Path, ids: dict[str, str]) -> dict:
    info, metrics = _info(directory), _object(directory / runs.METRICS)
    finished = info is not None
    return {"id": name, "object": "run", "status": "finished" if finished else "unfinished",
            "task": info and info.task, "method": info and info.method, "base_model": info and info.base_model,
            "peft": info and info.peft, "modified": _mtime(directory / (runs.RUN_INFO if finished else runs.LOG)),
            "before": _scalars(metrics.get("before")), "after": _scalars(metrics.get("after")),
            "parent": _link(_parent(info), ids)}


def _link(entry: dict | None, ids: dict[str, str]) -> dict | None:
    """A lineage entry ({"path", "task", "method", "base_model"}) with the id of its run when it lies under
    --runs (null when it does not: the page shows the path)."""
    if not entry:
        return None
    path = str(entry.get("path") or "")
    return {"id": ids.get(_resolved(path)) if path else None, "path": path, "task": entry.get("task"),
            "method": entry.get("method"), "base_model": entry.get("base_model")}


def _resolved(path: str | Path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return str(path)


def _log(directory: Path) -> list[dict]:
    """The training log's numeric fields, one dict per line (half-written lines skipped), thinned evenly to at
    most MAX_LOG_POINTS lines (the last one always kept)."""
    points = [_scalars(entry) for entry in runs.read_log(directory, max_bytes=MAX_LOG_BYTES, within=directory)
              if isinstance(entry.get("step"), (int, float))]
    if len(points) > MAX_LOG_POINTS:
        stride = len(points) / MAX_LOG_POINTS
        points = [points[int(i * stride)] for i in range(MAX_LOG_POINTS - 1)] + [points[-1]]
    return points


def _text(path: Path, limit: int) -> str | None:
    raw = _read(path, limit)
    return None if raw is None else raw.decode("utf-8", errors="replace")


def _detail(request: Request, name: str) -> dict:
    root = _root(request)
    if root is None:
        raise APIError(404, "This server lists no runs: start it with --runs DIR.", code="runs_not_configured",
                       type="not_found_error")
    found, _ = _walk(root)
    if name not in found:
        raise APIError(404, f"No run {name!r} under {root}.", param="run", code="run_not_found",
                       type="not_found_error")
    directory = found[name]
    ids = {_resolved(p): n for n, p in found.items()}
    info, metrics = _info(directory), _object(directory / runs.METRICS)
    here = _resolved(directory)
    lineage = info.lineage if info is not None and isinstance(info.lineage, list) else []
    parents = {n: (_parent(_info(p)) or {}).get("path") for n, p in found.items()}
    children = sorted(n for n, path in parents.items() if path and _resolved(path) == here)
    served = [model for model, entry in request.app.state.engine.models.items()
              if entry.run and _resolved(entry.run) == here]
    before = metrics.get("before") if isinstance(metrics.get("before"), dict) else {}
    return {**_summary(name, directory, ids), "path": str(directory), "labels": info and info.labels,
            "data": info and info.data, "replay": info and info.replay,
            "regularization": info and info.regularization, "defaults": info and info.defaults,
            "versions": info and info.versions,
            "metrics": {k: _scalars(v) for k, v in metrics.items() if isinstance(v, dict)},
            "before_kind": before.get("before_kind"),  # what "before" scored: the base model, or the parent run
            "lineage": [_link(e, ids) for e in lineage if isinstance(e, dict)], "children": children,
            "served_as": served, "log": _log(directory), "config": _text(directory / runs.CONFIG, MAX_CONFIG_BYTES)}


def _is_file(path: Path) -> bool:
    """A regular file, not a link out of its directory (nothing is opened)."""
    try:
        return os.path.isfile(path) and os.path.commonpath([os.path.realpath(path), str(path.parent)]) == \
            str(path.parent)
    except (OSError, ValueError):
        return False


def _report(name: str, directory: Path) -> dict:
    title = _object(directory / runs.REPORT_JSON).get("title")
    kind = next((k for k, f in runs.REPORT_CONFIGS.items() if _is_file(directory / f)), "report")
    return {"id": name, "object": "report", "kind": kind, "title": title or name,
            "modified": _mtime(directory / REPORT)}


# -- the API ------------------------------------------------------------------------------------------------------

class _PageThreads:
    """The page's file work: each call on a daemon thread of its own, at most PAGE_THREADS at once, given up
    (503) after READ_TIMEOUT_S. Its own threads, not the pool that parses request bodies, so a hung mount
    under --runs stalls the runs view only; daemon threads, so one stuck in the kernel cannot hold the
    process at exit."""

    def __init__(self):
        self.free = threading.BoundedSemaphore(PAGE_THREADS)

    async def __call__(self, fn, *args):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_TIMEOUT_S
        while not self.free.acquire(blocking=False):  # all held: wait for one, without holding the loop
            if loop.time() > deadline:
                raise _too_slow()
            await asyncio.sleep(0.05)
        done = loop.create_future()

        def settle(result, error) -> None:
            if not done.done():  # given up on meanwhile
                done.set_exception(error) if error is not None else done.set_result(result)

        def work() -> None:
            try:
                result, error = fn(*args), None
            except BaseException as err:  # handed to the request, raised there
                result, error = None, err
            finally:
                self.free.release()
            loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=work, name="tunesmith-runs-page", daemon=True).start()
        try:
            return await asyncio.wait_for(done, max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            raise _too_slow() from None


def _too_slow() -> APIError:
    return APIError(503, f"Reading the runs directory took longer than {READ_TIMEOUT_S:g} s (a slow or hung mount "
                    "under --runs?); try again later.", code="runs_unavailable", type="server_error")


def _page_threads(request: Request) -> _PageThreads:
    state = request.app.state
    if getattr(state, "page_threads", None) is None:  # on the event loop: nothing can interleave here
        state.page_threads = _PageThreads()
    return state.page_threads


async def _listing(request: Request, describe) -> dict:
    """{"object": "list", "root", "data"}: `describe(root)` of what lies under --runs, newest first (an empty
    list, root null, when the server was given no --runs)."""
    root = _root(request)
    if root is None:
        return {"object": "list", "root": None, "data": []}
    found = await _page_threads(request)(describe, root)
    return {"object": "list", "root": str(root), "data": sorted(found, key=lambda x: (-x["modified"], x["id"]))}


def _runs(root: Path) -> list[dict]:
    found, _ = _walk(root)
    ids = {_resolved(p): n for n, p in found.items()}
    return [_summary(n, p, ids) for n, p in found.items()]


def _reports(root: Path) -> list[dict]:
    return [_report(n, p) for n, p in _walk(root)[1].items()]


@router.get("/v1/runs")
async def list_runs(request: Request):
    return await _listing(request, _runs)


@router.get("/v1/runs/{name:path}")
async def get_run(request: Request, name: str):
    return await _page_threads(request)(_detail, request, name)


@router.get("/v1/reports")
async def list_reports(request: Request):
    """The compare and continual reports (directories with report.html) under --runs."""
    return await _listing(request, _reports)


@router.get("/v1/reports/{name:path}")
async def get_report(request: Request, name: str):
    """The report's own self-contained report.html; the page shows it in a sandboxed iframe."""
    root = _root(request)

    def html_of() -> str | None:
        found = _walk(root)[1]
        return _text(found[name] / REPORT, MAX_REPORT_BYTES) if name in found else None

    html = await _page_threads(request)(html_of) if root is not None else None
    if html is None:
        raise APIError(404, f"No report {name!r}" + (f" under {root}." if root else ": start the server with "
                                                      "--runs DIR."), param="report", code="report_not_found",
                       type="not_found_error")
    return HTMLResponse(html, headers={"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff",
                                       "Cache-Control": "no-cache"})

