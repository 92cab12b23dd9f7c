"""Kill -9 trials: a server killed 20 times (more if a resume must be remade) during
unseeded sampled jobs (n > 1), at each moment in turn: before any commit, just after the
first, mid-job (seeded), after the end, and each time again in the resume that follows.

After every trial the jobs finish, and every sequence of every job has its routing
exactly once, its texts, and texts of the generation whose routing is stored: the
generated tokens the routing rows were forwarded with equal the start of the stored
completion's token ids, and the completion text is those ids decoded. Unseeded sampling
makes a rerun draw other tokens, so texts of another generation would not match.

Proof against: the planted model's ground-truth routing (each stored row), and the
tokenizer's own decoding (each text).
"""

from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from capture_server.specimens.planted import planted_topk
from capture_server.store import open_store
from tests.api.conftest import Server, start_server, stop_server

LANES = 2  # servers killed side by side: a restart is mostly imports, on one core
KILLS = int(os.environ.get("MOETRACE_KILL_TRIALS", "20"))
"""Kills in all, half mid-job and half in the resume that follows."""
SEED = 18
PROMPTS, SAMPLES, MAX_TOKENS = 32, 4, 40
MODEL = "qwen3_moe-planted"
SERVER_ENV = {
    "MOETRACE_CONCURRENCY": "4",  # prompts run 4 at a time: commits come steadily
    # a commit every 0.25 s, not 2 s: on a fast machine a whole job (or its resume) fit
    # in one 2-second commit, so no kill could land between commits
    "MOETRACE_COMMIT_INTERVAL": "0.25",
    # The engine's worker runs in its engine-core process (vLLM's one-process executor)
    # instead of a third process: a restart imports vLLM twice, not three times (about
    # 21 s instead of 31 s here). A kill -9 takes the whole process group either way.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    # a hard crash of any server process (not the test's kills) leaves its stacks in
    # the life's log
    "PYTHONFAULTHANDLER": "1",
}
TOTAL = PROMPTS * SAMPLES
MID_JOB = TOTAL // 3
"""Committed sequences a mid-job kill waits for, at most: a commit holds what finished
since the last one (texts reach the writer every 0.5 s), so the job is still unfinished."""


def _submit(server: Server, serial: int) -> str:
    body = {
        "kind": "rollout",
        "model": MODEL,
        "prompts": [{"prompt": f"the cell divides {serial} {i}"} for i in range(PROMPTS)],
        "sampling": {
            "n": SAMPLES,
            "max_tokens": MAX_TOKENS,
            "temperature": 1.0,
            "ignore_eos": True,  # no special token in a completion: text == decode(ids)
        },
    }
    reply = server.client.post("/v1/jobs", json=body)
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def _kill(server: Server) -> None:
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=30)


def _committed(server: Server, job_id: str) -> int:
    return server.client.get(f"/v1/jobs/{job_id}/sequences").json()["count"]


def _wait_for_commits(server: Server, job_id: str, target: int) -> None:
    deadline = time.monotonic() + 120
    while _committed(server, job_id) < target:
        assert time.monotonic() < deadline, "the job stopped committing"
        time.sleep(0.05)


MOMENTS = (
    "before any commit",
    "in the resume",
    "just after the first commit",
    "in the resume",
    "mid-job",
    "in the resume",
    "after the end",
    "mid-job",
    "in the resume",
    "mid-job",
)
"""What each kill of a lane lands in, in turn. "In the resume" follows the restart after
the kill before it (`_kill_in_resume`)."""

RESUME_TRIES = 3
"""A resume can end before the lane looks (a whole job takes a few seconds here); the
lane then makes another by a mid-job kill, this many times at most."""


def _resuming(server: Server, jobs: list[str]) -> int | None:
    """Sequences the lane's newest job has committed, if it is resuming; else None."""
    if not jobs or server.client.get(f"/v1/jobs/{jobs[-1]}").json()["state"] != "running":
        return None
    committed = _committed(server, jobs[-1])
    return committed if committed < TOTAL else None


def _kill_in_resume(server: Server, job: str, committed: int, rng: random.Random) -> dict:
    """Kill a resuming job that has `committed` sequences, after a seeded number more.
    Sequences end in waves (those started together end together), so a commit can jump
    by a wave: the lane waits only while at least half the job is left, and for at most
    a third of what is left, so some waves remain when the kill lands."""
    left = TOTAL - committed
    if left >= TOTAL // 2:
        _wait_for_commits(server, job, committed + rng.randint(0, left // 3))
    committed = _committed(server, job)
    _kill(server)
    return {"moment": "in the resume", "committed": committed}


def _kill_at(server: Server, jobs: list[str], moment: str, rng: random.Random) -> dict:
    """Bring the lane's newest job to `moment` (submitting a new one where the moment
    needs it), kill the server, and say what the kill interrupted."""
    state = server.client.get(f"/v1/jobs/{jobs[-1]}").json()["state"] if jobs else "done"
    fresh = moment in ("before any commit", "just after the first commit") or (
        moment == "mid-job" and state == "running" and _committed(server, jobs[-1]) >= MID_JOB
    )
    if fresh or state != "running":
        jobs.append(_submit(server, len(jobs)))
    job = jobs[-1]
    if moment == "just after the first commit":
        _wait_for_commits(server, job, 1)
    elif moment == "mid-job":  # few enough that a commit or two more leaves it unfinished
        now = _committed(server, job)
        _wait_for_commits(server, job, now + rng.randint(1, max(1, MID_JOB - now)))
    elif moment == "after the end":
        server.wait_job(job, timeout=300)
    committed = _committed(server, job)
    _kill(server)
    return {"moment": moment, "committed": committed}


def _lane(model: Path, root: Path, rng: random.Random) -> tuple[list[str], list[dict]]:
    """Kill a server `KILLS // LANES` times at the `MOMENTS` in turn, restarting it after
    each; returns the jobs and what each kill interrupted."""
    data = root / "data"
    start = lambda k: start_server([model], data, root / f"life{k}.log", SERVER_ENV)  # noqa: E731
    server = start(0)
    jobs: list[str] = []
    kills: list[dict] = []
    for trial in range(KILLS // LANES):
        moment = MOMENTS[trial % len(MOMENTS)]
        if moment == "in the resume":
            committed = _resuming(server, jobs)
            for _ in range(RESUME_TRIES):
                if committed is not None:
                    break
                kills.append(_kill_at(server, jobs, "mid-job", rng))
                server = start(len(kills))
                committed = _resuming(server, jobs)
            assert committed is not None, f"no resume to kill in {RESUME_TRIES} tries"
            kills.append(_kill_in_resume(server, jobs[-1], committed, rng))
        else:
            kills.append(_kill_at(server, jobs, moment, rng))
        server = start(len(kills))
    try:
        for job_id in jobs:
            assert server.wait_job(job_id, timeout=300)["state"] == "done"
        return [server.client.get(f"/v1/jobs/{j}").json()["store"] for j in jobs], kills
    finally:
        stop_server(server)


def _check_store(path: str, tokenizer) -> None:
    store = open_store(path)
    index = store.index
    keys = list(zip(index["request_id"].to_list(), index["sample_index"].to_list(), strict=True))
    expected = {(f"p{i}", s) for i in range(PROMPTS) for s in range(SAMPLES)}
    assert len(keys) == len(set(keys)), f"{path}: a sequence stored twice"
    assert set(keys) == expected, f"{path}: missing {sorted(expected - set(keys))[:5]}"
    for row in index.iter_rows(named=True):
        where = f"{path} {row['request_id']}/{row['sample_index']}"
        assert row["completion_text"] is not None, f"{where}: no texts"
        ids = list(row["completion_token_ids"])
        assert row["generated_len"] == len(ids) == MAX_TOKENS, where
        arrays = store.sequence(row["sequence_id"], ("token_ids", "topk_ids"))
        forwarded = arrays["token_ids"][row["prompt_len"] :]
        assert list(forwarded) == ids[: len(forwarded)] and len(forwarded) == len(ids) - 1, (
            f"{where}: texts of another generation than the routing"
        )
        # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 character
        decoded, text = tokenizer.decode(ids, skip_special_tokens=True), row["completion_text"]
        assert decoded.startswith(text) and set(decoded[len(text) :]) <= {"\ufffd"}, where
        for layer in range(arrays["topk_ids"].shape[1]):
            np.testing.assert_array_equal(
                arrays["topk_ids"][:, layer], planted_topk(arrays["token_ids"], layer)
            )


@pytest.mark.slow
def test_kill_trials_leave_every_sequence_once_with_its_own_texts(specimen, tmp_path):
    from transformers import AutoTokenizer

    model = specimen("qwen3_moe", planted=True)
    rngs = [random.Random(SEED * 100 + lane) for lane in range(LANES)]
    with ThreadPoolExecutor(LANES) as pool:
        lanes = list(
            pool.map(
                lambda k: _lane(model, tmp_path / f"lane{k}", rngs[k]),
                range(LANES),
            )
        )
    kills = [k for _, lane_kills in lanes for k in lane_kills]
    assert len(kills) >= KILLS // LANES * LANES  # extra mid-job kills remake a resume
    # the trials must have hit what they are about; a kill "in the resume" was made in a
    # job the restarted server was running, unfinished (`_resuming`)
    hit = {
        "before any commit": lambda k: k["committed"] == 0,
        "just after the first commit": lambda k: 0 < k["committed"] < TOTAL,
        "mid-job": lambda k: 0 < k["committed"] < TOTAL,
        "in the resume": lambda k: k["committed"] < TOTAL,
        "after the end": lambda k: k["committed"] == TOTAL,
    }
    for moment, landed in hit.items():
        trials = [k for k in kills if k["moment"] == moment]
        missed = [k for k in trials if not landed(k)]
        assert trials and not missed, (moment, missed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    for stores, _ in lanes:
        for path in stores:
            _check_store(path, tokenizer)
