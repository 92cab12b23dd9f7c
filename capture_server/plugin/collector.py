"""Turn each step's capture buffers into attributed rows and hand them to sinks.

Runs in the worker after `execute_model` returns. The device-to-host copy of a step
is started right after that step, on a copy stream (`host_copy`), and consumed one step
later, so on a GPU the copy overlaps the next forward; on the CPU it is a plain copy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from capture_server.capture.intervention import Intervention, RoutingShape
from capture_server.capture.options import CaptureOptions
from capture_server.capture.records import ModelMeta, RoutingRows, SequenceEnd
from capture_server.capture.registry import forget_sink, open_sink
from capture_server.capture.sink import RoutingSink
from capture_server.errors import CaptureError, MoetraceError
from capture_server.plugin.batch_state import BatchView, RequestProgress
from capture_server.plugin.buffers import CaptureBuffers
from capture_server.plugin.expert_load import ExpertLoad
from capture_server.plugin.host_copy import HostCopy, PendingCopy
from capture_server.plugin.interventions import refuse_interventions
from capture_server.plugin.layout import stage_layers
from capture_server.plugin.prefix_rows import PrefixRowsError, SlotLayout, SlotRows
from capture_server.plugin.topk_order import in_stored_order
from capture_server.protocol import Annotation, split_sample
from capture_server.store.parts import PartId

logger = logging.getLogger(__name__)

_SUFFIX_LEN = 9  # vLLM appends "-" and 8 random characters to the external request id


def external_request_id(worker_req_id: str) -> str:
    """The caller's request id of a worker-side request id."""
    import vllm.envs as envs

    if envs.VLLM_DISABLE_REQUEST_ID_RANDOMIZATION:
        return worker_req_id
    return worker_req_id[:-_SUFFIX_LEN]


@dataclass(slots=True)
class _RequestState:
    options: CaptureOptions
    key: str
    sample_index: int
    prompt_len: int
    slot: int  # its columns in `RequestProgress`
    prefix_blocks: list[int] | None = None  # KV blocks at its first step (prefix caching)
    prompt_token_ids: list[int] | None = None


@dataclass(slots=True)
class _PendingStep:
    """A step whose host copy is in flight."""

    batch: BatchView
    req_of_row: np.ndarray  # batch position of each copied row
    captured: np.ndarray  # by row of the step: its request is captured
    copy: PendingCopy


def _sequence_key(worker_req_id: str, options: CaptureOptions) -> tuple[str, int]:
    """(sequence key, sample index) of a worker-side request id."""
    sample, parent = split_sample(external_request_id(worker_req_id), options.n)
    return options.sequence or parent, options.sample if options.sample >= 0 else sample


def _as_requested(rows: RoutingRows, options: CaptureOptions, moe_offset: int) -> RoutingRows:
    """The rows with only the optional arrays the request asked for (views, no copy).
    Requests name MoE layers of the whole model; a pipeline stage's rows hold its own,
    from `moe_offset` on."""
    wanted = {h - moe_offset for h in options.hidden_layers}
    if options.logits and wanted >= set(rows.hidden_states):
        return rows
    return replace(
        rows,
        router_logits=rows.router_logits if options.logits else None,
        hidden_states={k: v for k, v in rows.hidden_states.items() if k in wanted},
    )


class StepCollector:
    """Attributes buffer rows to requests and streams them to each request's sink."""

    def __init__(
        self,
        buffers: CaptureBuffers,
        meta: ModelMeta,
        weight_scale: float,
        *,
        routing: RoutingShape,
        interventions: bool = False,
        part: PartId | None = None,
        moe_offset: int = 0,
    ) -> None:
        self.buffers = buffers
        self.part = part  # under data or pipeline parallelism: the store part it writes
        self.moe_offset = moe_offset  # MoE layers of earlier pipeline stages
        self.routing = routing  # what interventions are checked against
        self.interventions = interventions  # the engine applies requests' interventions
        self.meta = meta
        self.weight_scale = weight_scale  # the runner's output scaling, folded into weights
        self.capture_dtype = "float32" if buffers is None else str(buffers.dtype).split(".")[-1]
        """Of captured logits and hidden states (`protocol.engine_config`)."""
        self._requests: dict[str, _RequestState | None] = {}
        self._progress = RequestProgress()
        self._batch: BatchView | None = None  # the last step's, while its requests run
        self.slot_rows: SlotRows | None = None  # with prefix caching (`attach_kv_cache`)
        self._pending: _PendingStep | None = None
        self._host_copy = HostCopy(buffers.ids.device) if buffers is not None else None
        self._proven = False  # every layer has recorded once (see before_step)
        self._armed = False
        self._sinks: dict[str, RoutingSink] = {}
        self._closing: dict[str, RoutingSink] = {}  # committing their last rows
        self._early_texts: dict[str, list[Annotation]] = {}  # for sinks not open yet
        self.sink_errors: dict[str, str] = {}
        device = buffers.ids.device if buffers is not None else torch.device("cpu")
        self._load = ExpertLoad(len(meta.moe_layers), meta.num_experts, device)
        self.stats: dict[str, float] = {
            "steps": 0,
            "rows": 0,
            "preempted": 0,
            "recomputed_rows_dropped": 0,
            "prefix_rows_reused": 0,  # rows of cached prompt positions, read from slots
            "host_seconds": 0.0,  # time spent in after_step: copies, attribution, sinks
            "closed_bytes_written": 0,  # writer totals of stores closed so far
            "closed_sequences_committed": 0,
            "buffer_bytes": 0 if buffers is None else buffers.nbytes(),  # device memory
        }

    # -- called by the model runner wrapper -------------------------------------------

    def attach_kv_cache(self, runner: Any) -> None:
        """With prefix caching on, keep every forwarded row by KV slot, so that cached
        prompt positions get their rows (`prefix_rows`). Called once the runner's KV
        cache is allocated; raises `CaptureError` where that cannot be done."""
        if not runner.cache_config.enable_prefix_caching:
            self.slot_rows = None
            return
        buffers = self.buffers
        layout = SlotLayout(
            num_layers=buffers.ids.shape[0],
            top_k=buffers.ids.shape[2],
            num_experts=buffers.num_experts,
            logits=buffers.logits is not None,
            hidden={layer: buf.shape[1] for layer, buf in buffers.hidden.items()},
            values_dtype=self.capture_dtype,
        )
        self.slot_rows = SlotRows.for_engine(runner.vllm_config, runner.kv_cache_config, layout)

    def before_step(self, scheduler_output: Any) -> None:
        """Until the first step with rows has proven that every MoE layer records, arm
        the proof (`CaptureBuffers.arm_proof`)."""
        if not self._proven and int(scheduler_output.total_num_scheduled_tokens):
            self.buffers.arm_proof()
            self._armed = True

    def _check_proof(self) -> None:
        """Raise if a MoE layer recorded nothing in the armed step: its forward does not
        go through the hooked `select_experts`, and its routing would be missing."""
        self._armed = False
        silent = self.buffers.unrecorded()
        if silent:
            blocks = [self.meta.moe_layers[i] for i in silent]
            raise CaptureError(
                f"moetrace capture: MoE blocks {blocks} recorded no routing in the first "
                "step; their kernel routes without calling select_experts (choose a "
                "modular MoE backend, e.g. --moe-backend triton)"
            )
        self._proven = True

    def after_step(self, runner: Any, scheduler_output: Any) -> None:
        """Start the host copy of this step and finish the previous one."""
        if self._armed:
            self._check_proof()
        start = time.perf_counter()
        finished = list(scheduler_output.finished_req_ids)
        num_tokens = int(scheduler_output.total_num_scheduled_tokens)
        self.stats["steps"] += 1
        self.stats["preempted"] += len(getattr(scheduler_output, "preempted_req_ids", None) or ())
        step = self._start_copy(runner, num_tokens) if num_tokens else None
        self._complete_pending()
        for req_id in finished:
            self._end_request(req_id)
        self._pending = step
        self.stats["host_seconds"] += time.perf_counter() - start

    def flush(
        self, finished_external_ids: list[str] | None = None, sink_urls: list[str] | None = None
    ) -> None:
        """Complete the in-flight step, end the named requests (by external id) and commit
        the named sinks (every sink when None)."""
        self._complete_pending()
        if finished_external_ids:
            wanted = set(finished_external_ids)
            for req_id, state in list(self._requests.items()):
                external = external_request_id(req_id)
                n = 1 if state is None else state.options.n
                if external in wanted or split_sample(external, n)[1] in wanted:
                    self._end_request(req_id)
        for url, sink in self._sinks.items():
            if sink_urls is not None and url not in sink_urls:
                continue
            if url not in self.sink_errors:
                try:
                    sink.flush()
                except (MoetraceError, OSError) as exc:
                    self.sink_errors[url] = str(exc)

    def annotate(self, url: str, annotations: list[Annotation]) -> None:
        """Hand sequences' texts to the store at `url`, which commits each sequence
        awaiting texts together with them. Texts may come before the sequence's last
        rows reach the sink (the caller saw the output first), or before its first: the
        store takes them in any order, and a store not open yet gets them when it opens,
        so no step's host copy is waited for here."""
        if url in self.sink_errors:
            return
        sink = self._sinks.get(url)
        if sink is None:
            self._early_texts.setdefault(url, []).extend(annotations)
            return
        try:
            sink.annotate(annotations)
        except (MoetraceError, OSError) as exc:
            self.sink_errors[url] = str(exc)

    def close_sinks(self, urls: list[str], finished_external_ids: list[str] | None = None) -> None:
        """End the named requests and have the named sinks commit and close (their jobs
        are over), without waiting: `sink_states` tells when they are closed."""
        self.flush(finished_external_ids, sink_urls=[])
        for url in urls:
            self._early_texts.pop(url, None)
            sink = self._sinks.pop(url, None)
            if sink is None:
                continue
            sink.request_close()
            self._closing[url] = sink

    def commit_sinks(self, urls: list[str], finished_external_ids: list[str] | None = None) -> None:
        """End the named requests and ask the named sinks to commit, without waiting:
        the engine steps on while they do, and `sink_states` says ``committing`` until
        they have."""
        self.flush(finished_external_ids, sink_urls=[])
        for url in urls:
            sink = self._sinks.get(url)
            if sink is not None and url not in self.sink_errors:
                try:
                    sink.request_commit()
                except (MoetraceError, OSError) as exc:
                    self.sink_errors[url] = str(exc)

    def sink_states(self, urls: list[str]) -> dict[str, str]:
        """``open``, ``committing``, ``closing``, ``closed`` or ``failed: <error>`` for
        each named sink."""
        states = {}
        for url in urls:
            sink = self._closing.get(url)
            if sink is not None and sink.closed:
                self._finish_closing(url)
            sink = self._sinks.get(url)
            if sink is not None and url not in self.sink_errors and sink.error:
                self.sink_errors[url] = sink.error
            if url in self.sink_errors:
                states[url] = f"failed: {self.sink_errors[url]}"
            elif url in self._closing:
                states[url] = "closing"
            elif sink is None:
                states[url] = "closed"
            else:
                states[url] = "committing" if sink.committing else "open"
        return states

    def _finish_closing(self, url: str) -> None:
        """Wait for a closing sink's writer to stop; keep its error and its totals."""
        sink = self._closing.pop(url)
        try:
            sink.close()
        except (MoetraceError, OSError) as exc:
            self.sink_errors.setdefault(url, str(exc))
        forget_sink(url)
        final = sink.metrics()
        self.stats["closed_bytes_written"] += final.get("bytes_written", 0)
        self.stats["closed_sequences_committed"] += final.get("sequences_committed", 0)

    def sink_metrics(self) -> dict[str, dict[str, float]]:
        """Writer metrics of every open or closing store sink, by URL."""
        sinks = {**self._closing, **self._sinks}
        return {url: m for url, s in sinks.items() if (m := s.metrics())}

    @property
    def expert_load(self) -> np.ndarray:
        """Top-k selections per (MoE layer, expert) over every captured token."""
        return self._load.total()

    # -- internals ----------------------------------------------------------------------

    def _state(self, runner: Any, req_id: str) -> _RequestState | None:
        if req_id not in self._requests:
            cached = runner.requests.get(req_id)
            params = getattr(cached, "sampling_params", None)
            options = CaptureOptions.from_extra_args(getattr(params, "extra_args", None))
            if options is None:
                self._requests[req_id] = None
            else:
                if not self.interventions:
                    refuse_interventions(options)
                key, sample = _sequence_key(req_id, options)
                engine_prompt = int(cached.num_prompt_tokens)
                state = _RequestState(
                    options=options,
                    key=key,
                    sample_index=sample,
                    prompt_len=options.prompt_len if options.prompt_len >= 0 else engine_prompt,
                    slot=self._progress.open(),
                )
                if self.slot_rows is not None:  # its cached blocks, if any, are the first
                    state.prefix_blocks = list(cached.block_ids[self.slot_rows.group])
                    state.prompt_token_ids = cached.prompt_token_ids
                self._requests[req_id] = state
        return self._requests[req_id]

    def _batch_view(self, runner: Any) -> BatchView:
        """The running batch's requests as arrays; the last step's while the batch holds
        the same requests in the same order (every decode step between arrivals and
        departures)."""
        batch = runner.input_batch
        req_ids = batch.req_ids[: batch.num_reqs]
        if self._batch is not None and self._batch.req_ids == req_ids:
            return self._batch
        states = [self._state(runner, r) for r in req_ids]
        self._batch = BatchView.of(req_ids, states)
        return self._batch

    def _start_copy(self, runner: Any, num_tokens: int) -> _PendingStep | None:
        view = self._batch_view(runner)
        # with prefix caching every row is kept by slot: a later captured request may hit
        # KV blocks that an uncaptured one computed, and ask for logits or hidden states
        every_row = self.slot_rows is not None
        if not every_row and not view.captured.any():
            return None
        num_reqs = len(view.req_ids)
        qsl = runner.query_start_loc.np[: num_reqs + 1]
        req_of_row = np.repeat(np.arange(num_reqs), qsl[1:] - qsl[:-1])[:num_tokens]
        captured = view.captured[req_of_row]  # by row
        rows = np.arange(num_tokens) if every_row else np.flatnonzero(captured)

        index = torch.from_numpy(rows).to(self.buffers.ids.device, non_blocking=True)
        want_logits = self.buffers.logits is not None and (every_row or view.want_logits)
        device_arrays = {
            "positions": runner.positions.index_select(0, index),
            "token_ids": runner.input_ids.gpu.index_select(0, index),
            # routing buffers are (layers, tokens, ...); gathered rows-first, as stored
            "ids": self.buffers.ids.transpose(0, 1).index_select(0, index),
            "weights": self.buffers.weights.transpose(0, 1).index_select(0, index),
        }
        ids = device_arrays["ids"]  # the load counts captured rows; those dropped later
        if every_row and not view.all_captured:  # are taken back (`_complete_pending`)
            mine = torch.from_numpy(np.flatnonzero(captured)).to(ids.device, non_blocking=True)
            ids = ids.index_select(0, mine)
        self._load.add(ids)
        if every_row:
            assert self.slot_rows is not None
            table = runner.input_batch.block_table.block_tables[self.slot_rows.group]
            device_arrays["slots"] = table.slot_mapping.gpu.index_select(0, index)
        if want_logits:
            assert self.buffers.logits is not None
            device_arrays["logits"] = self.buffers.logits.transpose(0, 1).index_select(0, index)
        for layer, buf in self.buffers.hidden.items():  # copied only when some request asks
            if every_row or layer + self.moe_offset in view.hidden_layers:
                device_arrays[f"hidden{layer}"] = buf.index_select(0, index)
        return _PendingStep(
            batch=view,
            req_of_row=req_of_row[rows],
            captured=captured,
            copy=self._host_copy.start(device_arrays),
        )

    def _complete_pending(self) -> None:
        step, self._pending = self._pending, None
        if step is None:
            return
        a = step.copy.wait()
        self._normalise(a)
        view, req_of_row = step.batch, step.req_of_row
        if "slots" in a:  # every row of the step, kept by KV slot before any is recalled
            assert self.slot_rows is not None
            self.slot_rows.remember(a.pop("slots"), a)
            if not view.all_captured:  # every row was copied: the mask is by row
                a = {k: v[step.captured] for k, v in a.items()}  # rows on axis 0
                req_of_row = req_of_row[step.captured]
        if not len(req_of_row):
            return
        positions = a["positions"].astype(np.int64, copy=False)

        # Rows come grouped by request (the batch order); work per segment, not per row.
        new_request = np.empty(len(req_of_row), dtype=bool)
        new_request[0] = True
        np.not_equal(req_of_row[1:], req_of_row[:-1], out=new_request[1:])
        seg_start = np.flatnonzero(new_request)
        reqs = req_of_row[seg_start]
        seg_min = np.minimum.reduceat(positions, seg_start)
        seg_max = np.maximum.reduceat(positions, seg_start)
        slots = view.slots[reqs]
        progress = self._progress

        # Drop rows recomputed after preemption: keep positions not captured before.
        keep = positions >= progress.next_position[view.slots[req_of_row]]
        kept = np.add.reduceat(keep, seg_start, dtype=np.int64)
        prefixes: list[tuple[int, RoutingRows]] = []  # rows of cached prompt positions
        if self.slot_rows is not None:
            for i in np.flatnonzero((progress.first_position[slots] < 0) & (seg_min > 0)):
                r, lo = int(reqs[i]), int(seg_min[i])
                prefix = self._recall_prefix(view, r, lo)
                if prefix is not None:
                    prefixes.append((r, prefix))
                    progress.num_rows[slots[i]] += lo
                    seg_min[i] = 0
        progress.advance(slots, seg_min, seg_max, kept)
        num_kept = int(kept.sum())
        self.stats["recomputed_rows_dropped"] += len(keep) - num_kept
        self.stats["rows"] += num_kept
        for r, prefix in prefixes:  # before the step's rows: each sequence's rows in order
            options = view.states[r].options
            part = _as_requested(prefix, options, self.moe_offset)
            self._deliver(options, lambda sink, p=part: sink.write(p))
        if num_kept < len(keep):  # rows recomputed after preemption: counted in `_start_copy`
            self._load.take_back(a["ids"][~keep])
        if not num_kept:
            return
        rows = self._build_rows(a, view, req_of_row, positions, keep)
        # One part per sink (job store): group rows by their request's sink in one sort.
        if len(view.sinks) > 1:  # rows reordered by sink once; each sink's part is a view
            sink_of_row = view.sink_of_req[req_of_row[keep]]
            order = np.argsort(sink_of_row, kind="stable")
            rows = rows.select(order)
            bounds = np.searchsorted(sink_of_row[order], np.arange(len(view.sinks) + 1))
        for s, r in enumerate(view.sinks):
            part = rows if len(view.sinks) == 1 else rows.slice(bounds[s], bounds[s + 1])
            options = view.states[r].options
            part = _as_requested(part, options, self.moe_offset)
            self._deliver(options, lambda sink, p=part: sink.write(p))

    def _recall_prefix(self, view: BatchView, r: int, length: int) -> RoutingRows | None:
        """Rows of the first `length` positions of the request at batch position `r`,
        served from the prefix cache; None (its store failed, loudly) when the slots do
        not hold them."""
        state = view.states[r]
        assert state is not None and self.slot_rows is not None
        assert state.prefix_blocks is not None and state.prompt_token_ids is not None
        try:
            a = self.slot_rows.recall(state.prefix_blocks, state.prompt_token_ids, length)
        except PrefixRowsError as exc:
            url = state.options.sink
            self.sink_errors.setdefault(url, f"{state.key}/{state.sample_index}: {exc}")
            logger.error("moetrace sink %s failed: %s", url, exc)
            return None
        self.stats["prefix_rows_reused"] += length
        req_of_row = np.full(length, r)
        return self._build_rows(a, view, req_of_row, a["positions"], np.ones(length, bool))

    def _normalise(self, a: dict[str, np.ndarray]) -> None:
        """Put a step's host copies (its own arrays, rows on axis 0) in stored form, in
        place and once: the runner's output scaling folded into the weights, each row's
        top-k in the stored order. Rows kept by KV slot are kept in this form, so rows
        recalled from the prefix cache need nothing more."""
        if self.weight_scale != 1.0:
            a["weights"] *= np.float32(self.weight_scale)
        in_stored_order(a["ids"], a["weights"])

    def _build_rows(
        self,
        a: dict[str, np.ndarray],
        view: BatchView,
        req_of_row: np.ndarray,
        positions: np.ndarray,
        keep: np.ndarray,
    ) -> RoutingRows:
        """The `keep` rows of host arrays in stored form (`_normalise`), as views when
        every row is kept."""
        a = a if keep.all() else {k: v[keep] for k, v in a.items()}
        req, positions = req_of_row[keep], positions[keep]
        return RoutingRows(
            request_ids=view.keys[req],
            sample_index=view.samples[req],
            positions=positions,
            token_ids=a["token_ids"].astype(np.int64),
            is_prompt=positions < view.prompt_len[req],
            topk_ids=a["ids"],
            topk_weights=a["weights"],
            router_logits=a.get("logits"),
            hidden_states={int(k[6:]): v for k, v in a.items() if k.startswith("hidden")},
        )

    def _deliver(self, options: CaptureOptions, call: Any) -> None:
        """Run `call(sink)` on the request's sink; a failing sink is reported, not raised.

        A sink error must not stop the engine (other jobs share it): the sink is marked
        failed, its rows are dropped from then on, and the error is kept in
        `sink_errors` for the job to report.
        """
        url = options.sink
        if url in self.sink_errors:
            return
        try:
            if url not in self._sinks:
                if url in self._closing:  # one writer per store: let the old one finish
                    self._finish_closing(url)
                    if url in self.sink_errors:
                        return
                self._check_store_dtypes(options.store)
                sink = open_sink(url, self._stage_store_options(options.store), self.part)
                sink.open(self.meta)
                self._sinks[url] = sink
                early = self._early_texts.pop(url, None)
                if early:
                    sink.annotate(early)
            call(self._sinks[url])
        except (MoetraceError, OSError, ValueError) as exc:
            self.sink_errors[url] = str(exc)
            logger.error("moetrace sink %s failed; its rows are dropped from now on: %s", url, exc)

    def _check_store_dtypes(self, store: dict[str, Any]) -> None:
        """A store may not keep, in float32, values this engine captures in float16:
        they would look exact and are not."""
        if self.capture_dtype == "float32":
            return
        for name in ("logits_dtype", "hidden_dtype"):
            if store.get(name) == "float32":
                raise ValueError(
                    f"{name}: float32 asked for, but this engine captures logits and "
                    f"hidden states in {self.capture_dtype} (capture_dtype in its "
                    "moetrace settings); ask for float16 or use a float32 engine"
                )

    def _stage_store_options(self, store: dict[str, Any]) -> dict[str, Any]:
        """A store's options as this pipeline stage's part keeps them: the hidden layers
        of its own MoE layers, numbered from its first (`store.parts`)."""
        if "hidden_layers" not in store:
            return store
        own = stage_layers(store["hidden_layers"], self.moe_offset, len(self.meta.moe_layers))
        return {**store, "hidden_layers": list(own)}

    def _end_request(self, req_id: str) -> None:
        state = self._requests.pop(req_id, None)
        if state is None:
            return
        self._batch = None  # its slot may be given to the next request
        first_position, num_rows = self._progress.close(state.slot)
        end = SequenceEnd(
            request_id=state.key,
            sample_index=state.sample_index,
            prompt_len=state.prompt_len,
            first_position=max(first_position, 0),
            num_rows=num_rows,
            prompt_index=state.options.prompt_index,
            labels=state.options.labels,
            intervention=Intervention.from_dict(state.options.intervention).key(),
            awaits_texts=state.options.texts,
            sole_sample=state.options.n == 1 and state.options.sample < 0,
        )
        self._deliver(state.options, lambda sink: sink.end_sequence(end))
