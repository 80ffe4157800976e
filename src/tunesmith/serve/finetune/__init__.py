"""Fine-tuning from the server, as OpenAI's files and fine-tuning jobs API: uploaded files (`files`), jobs and
their events (`store`), what a job request means as a training config (`request`), the trainer's process
(`process`), what its run says (`progress`) and the `Runner` that trains each job and serves the result live.
Not generation jobs: those are serve/jobs.py.

Training from the server writes files and runs long processes on its machine, so it is on only with an API key,
and `--fine-tuning off` turns it off on a server others can reach; `runner_for` says which."""

from __future__ import annotations

from .runner import JobError, Runner, fine_tuned_name

__all__ = ["JobError", "Runner", "fine_tuned_name", "runner_for"]


def runner_for(engine, settings, lock) -> tuple[Runner | None, str | None]:
    """(the Runner, None) when the settings allow fine-tuning, else (None, the sentence that says why not and
    how to turn it on). The Runner opens its state directory but starts nothing until `start()`."""
    if not settings.fine_tuning:
        return None, "Fine-tuning is turned off on this server (tunesmith serve --fine-tuning off)."
    if settings.api_key is None:
        return None, ("Fine-tuning needs an API key, since it trains and keeps files on the server's machine: "
                      "start the server with --api-key-file FILE (or $TUNESMITH_API_KEY) and send "
                      "'Authorization: Bearer KEY'.")
    if settings.state_dir is None:
        return None, ("Fine-tuning needs a directory for its files and jobs: start the server with --state-dir "
                      "DIR (ServeSettings.state_dir in Python).")
    return Runner(settings.state_dir, engine, lock, max_jobs=settings.max_train_jobs), None
