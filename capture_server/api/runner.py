"""vLLM async engines with capture on, and the execution of jobs on them.

The engines' workers write routing straight into each job's store (the plugin's store
sink); this process submits requests, tracks progress and hands each sequence's texts to
the worker, which commits them together with its routing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from capture_server.api.config import Settings
from capture_server.api.engine_args import build_engine_args
from capture_server.api.files import PromptFiles
from capture_server.api.jobs_db import JobsDB
from capture_server.api.schemas import JobCreate, PromptItem
from capture_server.api.writer_states import WriterStates
from capture_server.capture.active import require_active
from capture_server.capture.scoring import split_nll, token_nll
from capture_server.errors import JobsDatabaseError
from capture_server.protocol import (
    Annotation,
    close_rpc,
    forwarded_positions,
    job_sequence_key,
    merged_sink_states,
    sink_error,
    sink_states_rpc,
    stats_rpc,
    writer_stats,
)

logger = logging.getLogger("moetrace.service")


class Engines:
    """One `AsyncLLM` per served model, named by the checkpoint directory's name."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engines: dict[str, Any] = {}
        self.paths: dict[str, str] = {}
        self.routing: dict[str, dict[str, Any]] = {}
        """Per engine, the routing facts its workers report (`protocol.stats_rpc`):
        what interventions are checked against."""

    def engine_args(self, path: str) -> Any:
        """vLLM's `AsyncEngineArgs` of the model at `path` (`api.engine_args`)."""
        from vllm.platforms import current_platform

        argv = self.settings.engine_argv(path)
        cpu = current_platform.is_cpu()
        return build_engine_args(
            path,
            argv,
            self.settings.hidden_layers,
            cpu=cpu,
            interventions=self.settings.interventions,
            capture_dtype=self.settings.capture_dtype,
        )

    def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        for path in self.settings.models:
            name = self.settings.model_name(path)
            args = self.engine_args(path)
            logger.info(
                "starting engine %s from %s (hidden layers %s; engine flags %s)",
                name,
                path,
                self.settings.hidden_layers,
                " ".join(self.settings.engine_argv(path)) or "vLLM's defaults",
            )
            self.engines[name] = AsyncLLM.from_engine_args(args)
            self.paths[name] = path

    async def verify_capture(self) -> None:
        """Refuse to serve unless every worker of every engine captures
        (`capture.active.require_active`)."""
        for name, engine in self.engines.items():
            try:
                stats: list[dict[str, Any]] | BaseException = await stats_rpc().run(engine)
            except Exception as exc:
                stats = exc
            require_active(stats, name)
            assert not isinstance(stats, BaseException)
            self.routing[name] = writer_stats(stats)["routing"]

    def shutdown(self) -> None:
        for engine in self.engines.values():
            engine.shutdown()
        self.engines.clear()


class JobRunner:
    """Runs jobs as asyncio tasks; resumes unfinished ones after a restart."""

    def __init__(
        self, settings: Settings, db: JobsDB, engines: Engines, files: PromptFiles
    ) -> None:
        self.settings = settings
        self.files = files
        self.db = db
        self.engines = engines
        self.tasks: dict[str, asyncio.Task] = {}
        self.cancelled: set[str] = set()
        self.tokens_generated = 0
        self.writer_states: dict[str, WriterStates] = {}
        """Per model: one poller of its worker's store writers for all jobs."""
        self.unrecorded: dict[str, dict[str, Any]] = {}
        """Fields of jobs the database could not take (a full disk): served from here
        (`view`) and written when it can take them again (`keep_records`)."""

    def record(self, job_id: str, **fields: Any) -> str | None:
        """Write a job's fields (with any it could not write before); on a database
        error keep them for `view` and `keep_records`, and return the error."""
        fields = {**self.unrecorded.pop(job_id, {}), **fields}
        try:
            self.db.update(job_id, **fields)
        except JobsDatabaseError as exc:
            self.unrecorded[job_id] = fields
            logger.error("job %s: its record cannot be written: %s", job_id, exc)
            return str(exc)
        return None

    def view(self, job: dict[str, Any]) -> dict[str, Any]:
        """A job's record as the database has it, with the fields it could not take."""
        return {**job, **self.unrecorded.get(job["id"], {})}

    async def keep_records(self, every: float) -> None:
        """Write the fields the database could not take, once it can (runs for the
        server's lifetime)."""
        while True:
            await asyncio.sleep(every)
            for job_id in list(self.unrecorded):
                try:
                    self.db.update(job_id, **self.unrecorded[job_id])
                except JobsDatabaseError:
                    break  # still failing: try again later
                self.unrecorded.pop(job_id, None)
                logger.info("job %s: its record is written again", job_id)

    def store_path(self, job_id: str) -> str:
        """Where a job's store lives: under the data dir, or under `store_root` (an
        object-store URL such as ``s3://bucket/stores``). Job ids are generated, so a
        client cannot steer the path."""
        if self.settings.store_root:
            return f"{self.settings.store_root.rstrip('/')}/{job_id}"
        return str((self.settings.data_dir / "stores" / job_id).resolve())

    def submit(self, job_id: str) -> None:
        task = asyncio.create_task(self._run(job_id))
        task.add_done_callback(lambda t: self._finished(job_id, t))
        self.tasks[job_id] = task

    def _finished(self, job_id: str, task: asyncio.Task) -> None:
        """A job whose task raised is failed with the error, never left 'running'; one
        cancelled before it started is cancelled."""
        if task.cancelled():
            self.db.finish_interrupted_cancels(job_id)
            return
        if task.exception() is None:
            return
        exc = task.exception()
        logger.error("job %s failed: %s", job_id, exc, exc_info=exc)
        job = self.view(self.db.get(job_id) or {"id": job_id, "errors": []})
        self.record(job_id, state="failed", errors=[*job["errors"], f"{type(exc).__name__}: {exc}"])

    async def wait_ended(self, job_id: str, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a job's task to end (its final state is
        recorded by then); True when it ended, False for a job with no task here."""
        task = self.tasks.get(job_id)
        if task is None:
            return False
        await asyncio.wait({task}, timeout=timeout)  # never cancels the job
        return task.done()

    def resume_unfinished(self) -> int:
        """Resume queued and running jobs; cancels cut short by a restart are final."""
        self.db.finish_interrupted_cancels()
        jobs = self.db.unfinished()
        for job in jobs:
            logger.info("resuming job %s", job["id"])
            self.submit(job["id"])
        return len(jobs)

    def cancel(self, job_id: str) -> bool:
        """Cancel a job's task, once: the task then commits and closes the store and
        records ``cancelled`` (shielded, so nothing interrupts that)."""
        task = self.tasks.get(job_id)
        if task is None or task.done() or job_id in self.cancelled:
            return False
        self.cancelled.add(job_id)
        task.cancel()
        return True

    async def _run(self, job_id: str) -> None:
        job = self.db.get(job_id)
        assert job is not None
        request = JobCreate(**job["request"])
        prompts = request.prompts or self.files.load(request.prompts_file)
        engine = self.engines.engines[request.model]
        if request.model not in self.writer_states:
            self.writer_states[request.model] = WriterStates(engine)
        writers = self.writer_states[request.model]
        store = self.store_path(job_id)
        n = 1 if request.kind != "rollout" else request.sampling.n
        rows = expected_rows(request, prompts)
        todo = _missing_samples(len(prompts), n, _committed_keys(store))
        progress = {
            "done": len(prompts) * n - sum(len(samples) for _, samples in todo),
            "failed": 0,
            "tokens": 0,
            "errors": [],
            "last": 0.0,
        }
        started = time.monotonic()
        if not self.db.start(job_id, sequences_done=progress["done"]):
            self.db.finish_interrupted_cancels(job_id)  # cancelled before it ran
            return
        tokenizer = engine.get_tokenizer()
        limit = asyncio.Semaphore(self.settings.concurrency)
        request_ids: list[str] = []
        texts: list[Annotation] = []
        db_failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def send_texts() -> None:
            if texts:
                batch = texts[:]
                texts.clear()
                await writers.annotate(store, batch)

        async def report(force: bool = False) -> None:
            """Progress to the database; texts to the store's writer, which commits each
            sequence together with its texts (`CaptureOptions.texts`)."""
            now = time.monotonic()
            if not force and now - progress["last"] <= 0.5:
                return
            progress["last"] = now
            await send_texts()
            error = self.record(
                job_id,
                sequences_done=progress["done"],
                sequences_failed=progress["failed"],
                tokens_done=progress["tokens"],
                errors=progress["errors"][-50:],
                tokens_per_s=progress["tokens"] / max(now - started, 1e-9),
            )
            if error and not db_failed.done():  # a job whose record stalls is ended
                db_failed.set_result(error)

        async def one(i: int, item: PromptItem, samples: list[int]) -> None:
            """All of a prompt's samples as one request, or the missing ones of a
            resumed prompt one request each, recorded under their own sample index."""
            whole = len(samples) == n
            calls = (
                [(f"{job_id}-p{i}", None)]
                if whole
                else [(f"{job_id}-p{i}-s{s}", s) for s in samples]
            )
            for rid, sample in calls:
                async with limit:
                    try:
                        prompt, params, prompt_len = self._request(
                            request, i, item, tokenizer, store, sample, rows
                        )
                        request_ids.append(rid)
                        final = None
                        async for out in engine.generate(prompt, params, rid):
                            final = out
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # one bad prompt fails its samples, not the job
                        progress["failed"] += n if whole else 1
                        progress["errors"].append(f"prompt {i}: {exc}")
                        await report()
                        continue
                assert final is not None
                texts.extend(self._texts(request, i, item, final, sample, prompt_len))
                generated = sum(len(c.token_ids) for c in final.outputs)
                progress["tokens"] += generated
                self.tokens_generated += generated
                progress["done"] += len(final.outputs)
                await report()

        cancelled = stopped = False
        work = asyncio.gather(*(one(i, prompts[i], samples) for i, samples in todo))
        watcher = asyncio.ensure_future(writers.failure(store))
        try:
            await asyncio.wait({work, watcher, db_failed}, return_when=asyncio.FIRST_COMPLETED)
            # the store or the job's record failed: generating on is wasted
            stopped = watcher.done() or db_failed.done()
            if stopped:
                work.cancel()
            await asyncio.gather(work, return_exceptions=True)
        except asyncio.CancelledError:
            cancelled = True
            work.cancel()
            work.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        watcher.cancel()

        async def finish() -> None:
            """Abort what is left, hand over the last texts, commit and close the store,
            record the final state and how many sequences the store committed."""
            if cancelled or stopped:
                await engine.abort(request_ids)
            state = "cancelled" if cancelled else "done"
            await send_texts()  # before the close that commits them
            store_error = await writers.close(store, request_ids)
            if store_error:
                state = "failed"
                progress["errors"].append(f"store: {store_error}")
            if db_failed.done():
                state = "failed"
                progress["errors"].append(db_failed.result())
            if state == "done" and progress["done"] == 0 and progress["failed"]:
                state = "failed"
            if state == "done" and request.kind == "experiment":
                error = self._write_result(job_id, request, store)
                if error:
                    state = "failed"
                    progress["errors"].append(error)
            if store_error or cancelled:  # what is in the store, not what was generated
                progress["done"] = len(_committed_keys(store))
            await report(force=True)
            if state == "done" and (self.db.get(job_id) or {}).get("state") == "cancelling":
                state = "cancelled"  # a cancel accepted while the job was ending is final
            self.record(job_id, state=state)

        ending = asyncio.ensure_future(finish())
        while not ending.done():  # a later cancel of this task must not cut the ending short
            try:
                await asyncio.shield(ending)
            except asyncio.CancelledError:
                continue
        ending.result()

    def _write_result(self, job_id: str, request: JobCreate, store: str) -> str | None:
        """Tabulate a finished experiment job from its store; the error, if any."""
        from capture_server.api.experiment_jobs import result_path, result_table
        from capture_server.store import open_store

        try:
            table = result_table(request, open_store(store).index)
            path = result_path(self.settings.data_dir, job_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            table.write_parquet(partial)
            partial.replace(path)  # whole or absent
        except Exception as exc:  # the job fails with the reason; its store stays
            logger.exception("job %s: experiment table", job_id)
            return f"experiment: {type(exc).__name__}: {exc}"
        return None

    @staticmethod
    def _texts(
        request: JobCreate,
        i: int,
        item: PromptItem,
        final: Any,
        sample: int | None,
        prompt_len: int,
    ) -> list[Annotation]:
        """The texts of a finished request's samples, keyed as the worker keys their
        routing (`sample`: the recorded index of a single resumed sample); a scored
        text's per-token NLL when the job asked for it (`JobCreate.nll`)."""
        rollout = request.kind == "rollout"
        nll = None if rollout else token_nll(final)
        prompt_nll, completion_nll = (None, None) if nll is None else split_nll(nll, prompt_len)
        return [
            Annotation(
                request_id=job_sequence_key(i),
                sample_index=c.index if sample is None else sample,
                completion_text=c.text if rollout else item.completion,
                finish_reason=(c.finish_reason or "") if rollout else "scored",
                generated_len=len(c.token_ids) if rollout else 0,
                completion_token_ids=list(c.token_ids) if rollout else [],
                positions=forwarded_positions(len(final.prompt_token_ids), len(c.token_ids)),
                prompt_nll=prompt_nll,
                completion_nll=completion_nll,
            )
            for c in final.outputs
        ]

    def _request(
        self,
        request: JobCreate,
        i: int,
        item: PromptItem,
        tokenizer: Any,
        store: str,
        sample: int | None = None,
        rows: int = 0,
    ) -> tuple[Any, Any, int]:
        """The engine prompt, sampling parameters and prompt length of prompt `i`: all
        its samples, or with `sample` the one sample of that index (a seeded job gets
        the seed vLLM gives that sample, `seed + sample`, so the rerun draws what the
        lost sample drew). A score job's prompt is followed by its completion. `rows`:
        about how many rows the job's store will hold (`expected_rows`)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if item.prompt_token_ids is not None:
            prompt_ids = list(item.prompt_token_ids)
        else:
            text = item.prompt
            if item.messages is not None or request.chat_template:
                messages = item.messages or [{"role": "user", "content": item.prompt or ""}]
                text = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        s = request.sampling
        n = 1 if request.kind != "rollout" else s.n
        options = request.capture.options(store, job_sequence_key(i), i, item.labels, n)
        intervention = item.intervention or request.intervention or {}
        options = replace(
            options,
            texts=True,
            intervention=intervention,
            store={**options.store, "expected_rows": rows},
        )
        if request.kind != "rollout":  # score and experiment jobs teacher-force
            completion = (
                list(item.completion_token_ids)
                if item.completion_token_ids is not None
                else tokenizer.encode(item.completion or "", add_special_tokens=False)
            )
            options = replace(options, prompt_len=len(prompt_ids))
            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                prompt_logprobs=0 if request.nll else None,
                extra_args=options.to_extra_args(),
            )
            return TokensPrompt(prompt_token_ids=prompt_ids + completion), params, len(prompt_ids)
        seed = s.seed
        if sample is not None:
            options = replace(options, n=1, sample=sample)
            seed = None if s.seed is None else s.seed + sample
        params = SamplingParams(
            n=1 if sample is not None else s.n,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=seed,
            ignore_eos=s.ignore_eos,
            stop=s.stop,
            extra_args=options.to_extra_args(),
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output holding all n samples
        )
        return TokensPrompt(prompt_token_ids=prompt_ids), params, len(prompt_ids)


CHARS_PER_TOKEN = 4  # a rough count for text not tokenized yet


def expected_rows(request: JobCreate, prompts: list[PromptItem]) -> int:
    """About how many token rows a job's store will hold, so that its chunks fit the
    job (`StoreOptions.expected_rows`): each prompt's tokens (text counted at
    `CHARS_PER_TOKEN` characters a token) and completion, and for rollouts n x
    max_tokens. Only the chunk size follows from it."""

    def tokens(ids: list[int] | None, *texts: str | None) -> int:
        if ids is not None:
            return len(ids)
        return sum(len(t or "") for t in texts) // CHARS_PER_TOKEN + 1

    rows = 0
    for item in prompts:
        messages = [m.get("content", "") for m in item.messages or []]
        rows += tokens(item.prompt_token_ids, item.prompt, *messages)
        if item.completion is not None or item.completion_token_ids is not None:
            rows += tokens(item.completion_token_ids, item.completion)
    if request.kind == "rollout":
        rows += len(prompts) * request.sampling.n * request.sampling.max_tokens
    return rows


async def sink_state(engine: Any, store: str) -> str:
    """``open``, ``committing``, ``closing``, ``closed`` or ``failed: <error>``: a
    store's writer in the engine's worker."""
    return merged_sink_states(await sink_states_rpc([store]).run(engine), [store])[store]


async def close_store(engine: Any, store: str, request_ids: list[str]) -> str | None:
    """End a job's requests in the worker and wait until its store is committed and
    closed, polling so the engine never blocks on the commit. Returns the store's error."""
    await close_rpc([store], request_ids).run(engine)
    while (state := await sink_state(engine, store)) == "closing":
        await asyncio.sleep(0.02)
    return sink_error(state)


def _missing_samples(
    prompts: int, n: int, committed: set[tuple[str, int]]
) -> list[tuple[int, list[int]]]:
    """(prompt index, samples not committed) of every prompt with samples to run."""
    todo = []
    for i in range(prompts):
        missing = [s for s in range(n) if (job_sequence_key(i), s) not in committed]
        if missing:
            todo.append((i, missing))
    return todo


def _committed_keys(store: str) -> set[tuple[str, int]]:
    """(sequence key, sample) pairs already committed in a job's store (resume)."""
    from capture_server.errors import StoreError
    from capture_server.store import open_store

    try:
        index = open_store(store).index
    except StoreError:
        return set()
    return set(zip(index["request_id"].to_list(), index["sample_index"].to_list(), strict=True))
