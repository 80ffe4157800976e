"""Fine-tuning jobs from request to served model. `Runner.create` validates a request into a training config
and queues the job; a loop on the server's event loop starts queued jobs (at most `max_jobs` at a time), each
as its own `tunesmith train` process, turns its run's log.jsonl into events every POLL_S, and when it ends
serves the run live as `ft:BASE:SUFFIX:JOBID` (or records why it failed). Every change is written to the
JobStore at once, so a restarted server knows each job's state: a job it finds `running` was interrupted (kill
-9, a crash, a stop); its trainer is gone or killed, and the job is resumed from its run's last complete
checkpoint (`tunesmith train --resume`), or started again when none was complete, at most MAX_RESTARTS times,
then failed with the reason. Finished jobs' models are loaded again at start."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import yaml
from starlette.concurrency import run_in_threadpool

from ... import runs
from ...config import TrainConfig
from ..adapters import NameTaken, ServeError, base_name, check_name, register
from ..backends import BACKENDS
from . import process, progress
from .files import FileStore
from .request import JobRefused, JobRequest, job_override, train_config
from .store import DONE, Job, JobStore, new_id

log = logging.getLogger(__name__)
POLL_S = 0.5  # how often a running job's log and process are looked at
STOP_GRACE_S = 10.0  # a cancelled or stopped trainer gets this long after SIGTERM before SIGKILL
MAX_RESTARTS = 2  # server restarts a job survives (a job that brings its server down must not do so forever)
ORGANIZATION = "org-tunesmith"


class JobError(ServeError):
    """A request about a job that cannot be done: `status` is the HTTP answer, `param` the field to fix."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def fine_tuned_name(base: str, suffix: str | None, jid: str) -> str:
    """OpenAI's `ft:BASE:SUFFIX:ID` (an empty SUFFIX when none), BASE the base model's last path part."""
    return f"ft:{Path(base).name or base}:{suffix or ''}:{jid}"


class Runner:
    def __init__(self, root: str | Path, engine, lock: asyncio.Lock, *, max_jobs: int = 1):
        self.root = Path(root).resolve()  # trainers run in the server's directory; their paths are absolute
        self.files, self.store = FileStore(self.root / "files"), JobStore(self.root / "jobs.sqlite")
        self.engine, self.lock, self.max_jobs = engine, lock, max_jobs
        self.procs = {}  # job id -> its training process (subprocess.Popen), while it runs
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def job_dir(self, jid: str) -> Path:
        return self.root / "jobs" / jid  # config.yaml, output.log (the trainer's), run/

    # -- the server's life ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._wake, self._stopping = asyncio.Event(), False
        for job in self.store.jobs("running", "validating_files"):
            await self._recover(job)
        for job in self.store.jobs("succeeded"):
            await self._serve_again(job)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop and the trainers; their jobs stay `running`, so the next start resumes them."""
        self._stopping = True
        if self._task is not None:
            self._wake.set()
            await self._task
        for jid, proc in self.procs.items():
            self.store.event(jid, "The server is stopping: training is interrupted and resumes when it starts "
                                  "again.", level="warn")
            await run_in_threadpool(process.end, proc, STOP_GRACE_S)
        self.procs = {}
        self.store.close()

    async def _recover(self, job: Job) -> None:
        """A job an earlier server left `running` (or validating): finished, resumed, restarted or failed."""
        await run_in_threadpool(process.kill_leftover, job.notes.get("pid"), self.job_dir(job.id) / "config.yaml")
        run_dir = self.job_dir(job.id) / "run"
        if job.status == "validating_files":
            return self._fail(job, "The server stopped while validating this job; create it again.", "server_stopped")
        if runs.is_complete(run_dir):  # trained; the server stopped before it was served
            return await self._finished(job, 0)
        restarts = job.notes.get("restarts", 0)
        if restarts >= MAX_RESTARTS:
            return self._fail(job, f"The server stopped while this job was training, {restarts + 1} times; create "
                                   f"the job again (its output: {self.job_dir(job.id) / 'output.log'}).",
                              "server_stopped")
        done = runs.complete_checkpoints(run_dir / runs.CHECKPOINTS)
        job.notes.update(restarts=restarts + 1, resume=bool(done), pid=None)
        if not done:  # the log starts again too: report its steps again
            job.notes.update(loss_step=0, eval_step=0, trained=False)
        job.record["status"] = "queued"
        self.store.event(job.id, "The server stopped while this job was training; it resumes from "
                                 f"{done[-1].name}." if done else "The server stopped while this job was training, "
                                 "before its first checkpoint; it starts again.", level="warn")
        self.store.save(job)

    async def _serve_again(self, job: Job) -> None:
        name = job.record["fine_tuned_model"]
        if name in self.engine.models:
            return
        try:
            await self._serve(name, self.job_dir(job.id) / "run")
        except ServeError as err:
            log.warning("fine-tuned model %s is not served: %s", name, err)
            self.store.event(job.id, f"{name} could not be served again after a restart: {err}", level="warn")

    # -- requests -------------------------------------------------------------------------------------------

    def get(self, jid: str) -> Job:
        job = self.store.get(jid)
        if job is None:
            raise JobError(404, f"No fine-tuning job found with id {jid!r}.", "fine_tuning_job_id", "not_found")
        return job

    def _file(self, fid: str | None, param: str) -> Path | None:
        path = self.files.path(fid) if fid is not None else None
        if fid is not None and path is None:
            raise JobError(400, f"invalid {param}: {fid} (no such file; upload it with POST /v1/files).", param,
                           "invalid_file")
        return path

    def create(self, body: JobRequest) -> dict:
        """The new job, validated: `queued`, or `failed` with the reason when its config cannot be built."""
        base = base_name(self.engine)
        if body.model not in (base, Path(base).name):
            raise JobError(400, f"The model {body.model!r} cannot be fine-tuned here: this server fine-tunes the "
                                f"model it serves, {base!r}.", "model", "model_not_available")
        train, valid = self._file(body.training_file, "training_file"), self._file(body.validation_file,
                                                                                   "validation_file")
        try:
            job_override(body)
        except JobRefused as err:
            raise JobError(400, err.message, err.param, err.code) from None
        jid, now = new_id("ftjob"), int(time.time())
        job = Job({"object": "fine_tuning.job", "id": jid, "created_at": now, "error": None,
                   "fine_tuned_model": None, "finished_at": None, "estimated_finish": None,
                   "hyperparameters": body.settings.model_dump(exclude={"beta"}), "method": body.method_record(),
                   "model": body.model, "organization_id": ORGANIZATION, "result_files": [], "seed": body.seed,
                   "status": "validating_files", "trained_tokens": None, "training_file": body.training_file,
                   "validation_file": body.validation_file, "integrations": [], "metadata": body.metadata,
                   "user_provided_suffix": body.suffix,
                   "tunesmith": {"config": body.tunesmith or {}, "run": str(self.job_dir(jid) / "run")}},
                  {"restarts": 0})
        self.store.add(job)
        self.store.event(jid, f"Created fine-tuning job: {jid}")
        self.store.event(jid, f"Validating training file: {body.training_file}"
                              + (f" and validation file: {body.validation_file}" if valid else ""))
        try:
            config = self._config(body, base, train, valid, self.job_dir(jid))
        except JobRefused as err:
            self._fail(job, err.message, err.code, err.param)
            return job.record
        job.record["seed"] = config.get("seed", TrainConfig.model_fields["seed"].default)
        job.notes["total_steps"] = config["max_steps"] if config.get("max_steps", 0) > 0 else None
        job.record["status"] = "queued"
        self.store.event(jid, "Files validated, moving job to queued state")
        self.store.save(job)
        if self._wake is not None:
            self._wake.set()
        return job.record

    def _config(self, body: JobRequest, base: str, train: Path, valid: Path | None, directory: Path) -> dict:
        """The job's training config, written to its directory; JobRefused when it cannot be."""
        template = getattr(self.engine, "chat_template", None)
        config = train_config(body, model=base, train=train, valid=valid, output_dir=directory / "run",
                              chat_template=None if template == getattr(self.engine.tokenizer, "chat_template",
                                                                        None) else template,
                              parameters=self._base_parameters)
        for fid, param in ((body.training_file, "training_file"), (body.validation_file, "validation_file")):
            kind = (self.files.data(fid) or {}).get("kind") if fid else None
            if body.kind == "supervised" and kind not in (None, "chat", "completion"):
                raise JobRefused(f"{param} {fid} holds {kind} records; supervised fine-tuning trains on chat or "
                                 "completion records.", param, "invalid_file")
            if body.kind == "dpo" and kind not in (None, "preference"):
                raise JobRefused(f"{param} {fid} holds {kind} records; dpo trains on preference pairs (prompt, "
                                 "chosen, rejected; or OpenAI's input, preferred_output, non_preferred_output).",
                                 param, "invalid_file")
        directory.mkdir(parents=True, exist_ok=True)
        runs.write_text(directory / "config.yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        return config

    def _base_parameters(self) -> int | None:
        module = self.engine.models[base_name(self.engine)].module
        parameters = getattr(module, "parameters", None)  # a torch module; not the llama-cpp backend's
        return sum(p.numel() for p in parameters()) if parameters is not None else None

    def cancel(self, jid: str) -> dict:
        job = self.get(jid)
        if job.status in DONE:
            raise JobError(400, f"Job {jid} has already {job.status}: only a queued or running job can be "
                                "cancelled.", "fine_tuning_job_id", "invalid_job_status")
        if (proc := self.procs.get(jid)) is not None:
            process.signal_group(proc.pid, signal.SIGTERM)  # then SIGKILL after STOP_GRACE_S (_tick)
            job.notes["cancelled_at"] = time.time()
        job.record.update(status="cancelled", finished_at=int(time.time()))
        self.store.event(jid, "The job was cancelled")
        self.store.save(job)
        return job.record

    def checkpoints(self, jid: str) -> list[dict]:
        job = self.get(jid)
        name = job.record["fine_tuned_model"] or fine_tuned_name(job.record["model"],
                                                                 job.record["user_provided_suffix"], jid)
        return progress.checkpoints(jid, self.job_dir(jid) / "run", name, finished=job.status == "succeeded")

    # -- the loop -------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._tick()
            except Exception:  # a bug in one job's handling must not stop every other job
                log.exception("fine-tuning runner")
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def _tick(self) -> None:
        for jid, proc in list(self.procs.items()):
            job = self.store.get(jid)
            if job.status != "cancelled":
                self._follow(job)
            if proc.poll() is None:
                if time.time() - job.notes.get("cancelled_at", time.time()) > STOP_GRACE_S:
                    process.signal_group(proc.pid, signal.SIGKILL)  # a cancelled trainer that ignored SIGTERM
                continue
            del self.procs[jid]
            await self._finished(job, proc.returncode)
        for job in reversed(self.store.jobs("queued")):  # oldest first
            if len(self.procs) >= self.max_jobs or self._stopping:
                break
            self._launch(job)

    def _launch(self, job: Job) -> None:
        directory, resume = self.job_dir(job.id), job.notes.get("resume", False)
        try:
            proc = process.start(directory / "config.yaml", directory / "output.log", resume=resume)
        except OSError as err:
            return self._fail(job, f"The training process could not start: {err}", "training_failed")
        self.procs[job.id] = proc
        job.notes["pid"] = proc.pid
        job.record["status"] = "running"
        self.store.event(job.id, "Fine-tuning job resumed" if resume else "Fine-tuning job started")
        self.store.save(job)

    def _follow(self, job: Job) -> None:
        """Events for what the run logged since the last look."""
        entries = runs.read_log(self.job_dir(job.id) / "run")
        for event in progress.log_events(entries, job.notes, job.notes.get("total_steps")):
            self.store.event(job.id, **event)
        self.store.save(job)

    async def _finished(self, job: Job, returncode: int) -> None:
        """The job's trainer ended: its run served as the fine-tuned model, or the job failed with its reason."""
        if job.status == "cancelled":
            return
        directory = self.job_dir(job.id)
        self._follow(job)
        if returncode != 0 or not runs.is_complete(directory / "run"):
            return self._fail(job, progress.failure_reason(directory / "output.log", returncode), "training_failed")
        if (event := progress.metrics_event(directory / "run")) is not None:
            self.store.event(job.id, **event)
        name = fine_tuned_name(job.record["model"], job.record["user_provided_suffix"], job.id)
        try:
            await self._serve(name, directory / "run")
        except ServeError as err:
            return self._fail(job, f"The run trained but cannot be served: {err}", "load_failed")
        job.record.update(status="succeeded", fine_tuned_model=name, finished_at=int(time.time()),
                          trained_tokens=progress.trained_tokens(directory / "run"))
        self.store.event(job.id, f"New fine-tuned model created: {name}")
        self.store.event(job.id, "The job has successfully completed")
        self.store.save(job)

    async def _serve(self, name: str, run: Path) -> None:
        """Load the run and serve it as `name` (one load at a time, with the server's own loads)."""
        async with self.lock:
            try:
                check_name(self.engine, name)
            except NameTaken as err:
                raise ServeError(str(err)) from None
            served = await run_in_threadpool(BACKENDS[self.engine.backend].load_served, self.engine, name, str(run))
            register(self.engine, name, served)

    def _fail(self, job: Job, message: str, code: str, param: str | None = None) -> None:
        job.record.update(status="failed", finished_at=int(time.time()),
                          error={"code": code, "message": message, "param": param})
        self.store.event(job.id, f"The job failed: {message}", level="error")
        self.store.save(job)
