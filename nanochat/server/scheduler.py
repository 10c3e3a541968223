"""The worker pool: one worker thread per engine (one engine per GPU, one on CPU/MPS) over one
bounded FIFO queue of Jobs.

Requests wait in one bounded FIFO queue shared by the workers (full -> QueueFull, answered 429 +
Retry-After). A worker runs the engine off the event loop and hands text to the request's
asyncio.Queue through loop.call_soon_threadsafe. A request's cancel flag is set when the client
disconnects or the request outlives --request-timeout; the worker checks it every step, so a
dropped client frees its rows at once.

How a worker batches depends on what its engine offers and on `batching`:
  - "step" (engines with session()): continuous batching. The worker keeps one decode session
    open; at every step it admits waiting requests while rows are free (their prompts are
    prefilled inside that step), and rows leave as they finish, stop or are cancelled. A
    request never waits for the current batch to drain. Each row samples from its own seed, so
    a seeded request gives the same text whoever it shares the batch with. Single-reply requests
    keep their final KV cache in the engine's prefix store, so the next turn of the same chat
    prefills only what is new.
  - "admission": a worker takes waiting requests only when its batch is empty and decodes them
    until all are done; requests that arrive meanwhile wait for the next batch. Through the
    session (any mix of sampling settings), or for engines with only generate_multi(), up to
    max_batch waiting rows with the same sampling settings.
  - engines with neither, and max_batch 1: one request at a time.
"""

import asyncio
import inspect
import logging
import math
import secrets
import threading
import time
from collections import deque

from nanochat.server.text import ReplyTokens, RowDecoder

logger = logging.getLogger("nanochat.server")


class QueueFull(Exception):
    pass


class Job:
    """One request: n rows sampled from one prompt. The worker thread reports through push();
    the request's coroutine reads the asyncio.Queue. Events:
    ("start", worker_id) ("delta", row, part, text) ("finish", row, reason) ("end", usage) ("error", message)."""

    def __init__(self, prompt, *, n=1, max_tokens, temperature, top_k, top_p=1.0, seed=None, stops=(),
                 timeout=None, request_id=None):
        self.id = request_id or "chatcmpl-" + secrets.token_hex(12)
        self.prompt = list(prompt)
        self.n = n
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.seed = secrets.randbelow(2**31) if seed is None else seed
        self.stops = list(stops)
        self.created = time.monotonic()
        self.deadline = None if not timeout else self.created + timeout
        self.cancel = threading.Event()
        self.lock = threading.Lock()  # orders "count a token" (worker) against stop() (request side)
        self.worker_id = None
        self.started = None
        self.completion_tokens = 0
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = None
        self.events = asyncio.Queue() if self.loop else None

    def stop(self):
        """The request is over (done, client gone, timed out): the worker stops at its next token.
        After this returns no token is added to completion_tokens, so the count can be logged."""
        with self.lock:
            self.cancel.set()

    def push(self, *event):
        if self.loop is None or self.cancel.is_set() and event[0] != "end":
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone (shutdown)
            pass

    def fail(self):
        """The engine failed on this request (the caller logged why). The exception text can hold
        paths and internals: the client gets only the request id to find it in the log."""
        self.push("error", f"Generation failed (request id {self.id}); the details are in the server log.")

    def batch_key(self):
        return (self.temperature, self.top_k, self.top_p)


BATCHING_MODES = ("step", "admission")


class Worker:
    def __init__(self, worker_id, engine, device, batching):
        self.id = worker_id
        self.engine = engine
        self.device = str(device)
        self.busy = False
        self.ready = threading.Event()  # set once the engine is warmed up
        self.requests_served = 0
        self.tokens_generated = 0
        self.batches = 0
        self.max_rows_seen = 0
        self.batch = None  # the StepBatch it decodes (engines with session())
        self.multi = getattr(engine, "generate_multi", None)
        self.multi_params = inspect.signature(self.multi).parameters if self.multi else {}
        self.stepped = hasattr(engine, "session")  # decodes through engine.session() (see _run_steps)
        self.continuous = self.stepped and batching == "step"  # admits requests into a running batch
        generate = getattr(engine, "generate", None)
        self.has_top_p = self.stepped or (generate is not None and "top_p" in inspect.signature(generate).parameters)

    @property
    def rows(self):
        """Rows decoding now (step mode)."""
        return self.batch.rows if self.batch is not None else 0


class WorkerPool:
    """Worker threads over one FIFO queue of Jobs."""

    def __init__(self, engines, tokenizer, devices=None, max_batch=1, max_queue=64, batching="step"):
        if not engines:
            raise ValueError("the worker pool needs at least one engine")
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, not {batching!r}")
        devices = devices or ["cpu"] * len(engines)
        self.workers = [Worker(i, e, d, batching) for i, (e, d) in enumerate(zip(engines, devices))]
        self.tokenizer = tokenizer
        self.specials = {tokenizer.encode_special(s): s for s in tokenizer.get_special_tokens()}
        self.max_batch = max(1, max_batch)
        self.replies = ReplyTokens(tokenizer)  # single replies as generated, for the chat's next turn
        self.max_queue = max_queue
        self.waiting = deque()
        self.running = set()  # jobs being generated, so close() can stop them
        self.cond = threading.Condition()
        self.closed = False
        self.requests_total = 0
        self.requests_rejected = 0
        self.requests_completed = 0
        self.service_time_ewma = None  # seconds per request, for Retry-After
        self.started_at = time.time()
        self.threads = [threading.Thread(target=self._run, args=(w,), name=f"nanochat-worker-{w.id}", daemon=True)
                        for w in self.workers]
        for t in self.threads:
            t.start()

    @property
    def supports_top_p(self):
        return all(w.has_top_p for w in self.workers)

    @property
    def batching(self):
        return self.batching_mode != "off"

    @property
    def batching_mode(self):
        """"step", "admission" or "off": how the workers group requests (see the module docstring)."""
        if self.max_batch > 1 and all(w.continuous for w in self.workers):
            return "step"
        if self.max_batch > 1 and all(w.multi or w.stepped for w in self.workers):
            return "admission"
        return "off"

    @property
    def ready(self):
        """Every worker is alive and has warmed its engine up."""
        return not self.closed and all(t.is_alive() and w.ready.is_set() for t, w in zip(self.threads, self.workers))

    # --- the request side (event loop) ---------------------------------------------------

    def submit(self, job):
        with self.cond:
            if self.closed:
                raise QueueFull("the server is shutting down")
            self.requests_total += 1
            self._drop_cancelled()
            if len(self.waiting) >= self.max_queue + self._free_rows():
                self.requests_rejected += 1
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self.waiting.append(job)
            self.cond.notify()

    def _free_rows(self):
        """Rows that can start decoding within a step (call with self.cond held): an idle worker takes
        a job at once, and a worker batching at every step takes one into each free row."""
        return sum(max(0, self.max_batch - w.rows) if w.continuous else not w.busy for w in self.workers)

    def _drop_cancelled(self):
        """Forget queued jobs whose client left or timed out (call with self.cond held), so they
        hold no queue slot while the workers are busy."""
        if any(job.cancel.is_set() for job in self.waiting):
            self.waiting = deque(job for job in self.waiting if not job.cancel.is_set())

    def retry_after(self):
        """Seconds until a slot is likely free: queue length x recent service time / workers."""
        per = self.service_time_ewma or 1.0
        return max(1, min(60, math.ceil(per * (len(self.waiting) + 1) / len(self.workers))))

    def close(self):
        with self.cond:
            self.closed = True
            for job in list(self.waiting) + list(self.running):
                job.cancel.set()
            self.waiting.clear()
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=5)  # each worker notices the cancel flag within one token

    def stats(self):
        with self.cond:
            self._drop_cancelled()
        busy = sum(w.busy for w in self.workers)
        return {
            "total_workers": len(self.workers),
            "available_workers": len(self.workers) - busy,
            "busy_workers": busy,
            "queue_depth": len(self.waiting),
            "max_queue": self.max_queue,
            "max_batch": self.max_batch,
            "batching": self.batching,
            "batching_mode": self.batching_mode,
            "requests_total": self.requests_total,
            "requests_completed": self.requests_completed,
            "requests_rejected": self.requests_rejected,
            "tokens_generated": sum(w.tokens_generated for w in self.workers),
            "uptime_s": round(time.time() - self.started_at, 1),
            "workers": [{"gpu_id": w.id, "device": w.device, "busy": w.busy, "requests_served": w.requests_served,
                         "tokens_generated": w.tokens_generated, "batches": w.batches, "max_batch_rows": w.max_rows_seen}
                        for w in self.workers],
        }

    # --- the worker side (threads) --------------------------------------------------------

    def _take(self, worker):
        """Block until there is work; -> list of jobs (one, or several to decode together)."""
        with self.cond:
            while True:
                self._drop_cancelled()  # the client left while queued
                if self.waiting or self.closed:
                    break
                self.cond.wait()
            if self.closed:
                return None
            first = self.waiting.popleft()
            jobs = [first]
            if worker.multi and self.max_batch > 1:
                rows = first.n
                for job in list(self.waiting):
                    if rows >= self.max_batch:
                        break
                    if job.cancel.is_set() or job.batch_key() != first.batch_key() or rows + job.n > self.max_batch:
                        continue
                    self.waiting.remove(job)
                    jobs.append(job)
                    rows += job.n
            worker.busy = True
            self.running.update(jobs)
            return jobs

    def _warm(self, worker):
        """Warm the engine up (allocations, compiled kernels) before the worker says it is ready."""
        warmup = getattr(worker.engine, "warmup", None)
        try:
            if warmup is not None:
                warmup()
        except Exception:  # a failed warm-up costs the first request time, not the server
            logger.exception(f"warming up worker {worker.id} failed; serving without it")
        worker.ready.set()

    def _run(self, worker):
        self._warm(worker)
        if worker.stepped:
            return self._run_steps(worker)
        while True:
            jobs = self._take(worker)
            if jobs is None:
                return
            try:
                now = time.monotonic()
                for job in jobs:
                    job.worker_id = worker.id
                    job.started = now
                    job.push("start", worker.id)
                # with batching on, a job of n > 1 rows goes through generate_multi even alone: its
                # rows then sample from seed + i whether or not other jobs joined it (same seed, same text)
                if len(jobs) == 1 and (jobs[0].n == 1 or not (worker.multi and self.max_batch > 1)):
                    self._serve_one(worker, jobs[0])
                else:
                    self._serve_many(worker, jobs)
            except Exception:  # the engine failed: tell every client of this batch, keep serving
                logger.exception(f"generation failed for {' '.join(job.id for job in jobs)}")
                for job in jobs:
                    job.fail()
            finally:
                with self.cond:
                    worker.busy = False
                self._jobs_done(worker, jobs)

    def _rows(self, job):
        return [RowDecoder(self.tokenizer, self.specials, job.max_tokens, job.stops) for _ in range(job.n)]

    @staticmethod
    def _expired(job):
        return job.cancel.is_set() or (job.deadline is not None and time.monotonic() > job.deadline)

    def _deliver(self, worker, job, rows, i, token):
        """Feed one generated token to row i of job, count it, and push the text it releases."""
        row = rows[i]
        with job.lock:
            if row.done or job.cancel.is_set():
                return
            job.completion_tokens += 1
            worker.tokens_generated += 1
            for part, text in row.feed(token):
                job.push("delta", i, part, text)
            if row.done:
                job.push("finish", i, row.finish_reason)

    def _end(self, worker, job, rows):
        for i, row in enumerate(rows):
            if not row.done:
                out = []
                row._finish("length", out)
                for part, text in out:
                    job.push("delta", i, part, text)
                job.push("finish", i, row.finish_reason)
        if job.n == 1:
            self.replies.remember("".join(rows[0].sent), rows[0].tokens)
        # every token was counted as it was delivered (_deliver)
        completion = job.completion_tokens
        job.push("end", {"prompt_tokens": len(job.prompt), "completion_tokens": completion,
                         "total_tokens": len(job.prompt) + completion})

    def _serve_one(self, worker, job):
        if self._expired(job):
            return
        rows = self._rows(job)
        kwargs = dict(num_samples=job.n, max_tokens=job.max_tokens, temperature=job.temperature,
                      top_k=job.top_k or None, seed=job.seed)
        if worker.has_top_p:
            kwargs["top_p"] = job.top_p
        worker.batches += 1
        worker.max_rows_seen = max(worker.max_rows_seen, job.n)
        gen = worker.engine.generate(job.prompt, **kwargs)
        try:
            for column, _masks in gen:
                if self._expired(job):
                    return
                for i, token in enumerate(column[:job.n]):
                    self._deliver(worker, job, rows, i, token)
                if all(r.done for r in rows):
                    break
        finally:
            gen.close()
        self._end(worker, job, rows)

    def _serve_many(self, worker, jobs):
        """Dynamic batching: every row of every job in one generate_multi call."""
        prompts, owners, seeds = [], [], []
        rows = {}
        for job in jobs:
            if self._expired(job):
                continue
            rows[job.id] = self._rows(job)
            for i in range(job.n):
                prompts.append(job.prompt)
                owners.append((job, i))
                seeds.append(job.seed + i)
        if not prompts:
            return
        first = jobs[0]
        kwargs = dict(max_tokens=max(job.max_tokens for job, _ in owners), temperature=first.temperature,
                      top_k=first.top_k or None, seeds=seeds)
        if "top_p" in worker.multi_params:
            kwargs["top_p"] = first.top_p
        worker.batches += 1
        worker.max_rows_seen = max(worker.max_rows_seen, len(prompts))
        live = {job.id: job for job, _ in owners}
        gen = worker.multi(prompts, **kwargs)
        try:
            for column, _masks in gen:
                for r, token in enumerate(column):
                    job, i = owners[r]
                    if token is None or job.id not in live:
                        continue
                    if self._expired(job):
                        del live[job.id]
                        continue
                    self._deliver(worker, job, rows[job.id], i, token)
                for job_id in [j for j, job in live.items() if all(r.done for r in rows[j])]:
                    self._end(worker, live.pop(job_id), rows[job_id])
                if not live:
                    break
        finally:
            gen.close()
        for job_id, job in live.items():
            self._end(worker, job, rows[job_id])

    # --- step-level batching (engines with session()) ------------------------------------------

    def _admit(self, worker, rows_used):
        """Block while the worker has no rows and nothing waits; -> the jobs to start now (FIFO,
        as many as fit in the free rows), or None when the pool closes. A job of more rows than
        max_batch still starts when the worker has nothing else to do. In admission mode jobs
        only join a batch that is starting."""
        with self.cond:
            while True:
                self._drop_cancelled()
                if self.closed or (self.waiting and (rows_used == 0 or worker.continuous)):
                    break
                if rows_used:
                    return []
                worker.busy = False
                self.cond.wait()
            if self.closed:
                return None
            jobs = []
            while self.waiting and (rows_used == 0 or rows_used + self.waiting[0].n <= self.max_batch):
                job = self.waiting.popleft()
                jobs.append(job)
                rows_used += job.n
            worker.busy = True
            self.running.update(jobs)
            return jobs

    def _run_steps(self, worker):
        """Each turn of the loop admits waiting jobs into free rows, retires the jobs whose request
        ended, and decodes every row one token (the new rows' prompts prefilled in that step)."""
        batch = worker.batch = StepBatch(self, worker)
        try:
            while True:
                jobs = self._admit(worker, batch.rows)
                if jobs is None:
                    return
                worker.batches += bool(jobs) and not batch.rows
                for job in jobs:
                    batch.start(job)
                batch.drop_expired()
                if batch.rows:
                    batch.step()
        finally:
            batch.close()
            worker.busy = False

    def _jobs_done(self, worker, jobs):
        """Count `jobs` (started together, or never started) as served, and fold the time they took
        into the service time that Retry-After estimates from."""
        worker.requests_served += len(jobs)
        with self.cond:
            self.running.difference_update(jobs)
            self.requests_completed += len(jobs)
            if jobs[0].started is not None:
                took = time.monotonic() - jobs[0].started
                self.service_time_ewma = took if self.service_time_ewma is None else 0.8 * self.service_time_ewma + 0.2 * took


class StepBatch:
    """The jobs one worker decodes in its engine's session, and which row belongs to which job.
    Lives in the worker's thread (the session is not shared)."""

    def __init__(self, pool, worker):
        self.pool, self.worker = pool, worker
        self.session = None
        self.jobs = {}  # job id -> (job, its RowDecoders, its session row ids)
        self.owner = {}  # session row id -> (job, index of the row in the job)

    @property
    def rows(self):
        return len(self.owner)

    def start(self, job):
        """Add the job's rows to the session (prefilled at the next step). A single reply keeps
        its final KV cache in the engine's prefix store, so the chat's next turn reuses it."""
        if self.pool._expired(job):
            return self.pool._jobs_done(self.worker, [job])
        if self.session is None:
            # no max_rows: the pool bounds the rows itself (a job of more than max_batch rows runs alone)
            self.session = self.worker.engine.session()
        job.worker_id = self.worker.id
        job.started = time.monotonic()
        try:
            row_ids = self.session.add(job.prompt, n=job.n, max_tokens=job.max_tokens, temperature=job.temperature,
                                       top_k=job.top_k or None, top_p=job.top_p, seed=job.seed, keep=job.n == 1)
        except Exception:
            logger.exception(f"could not start {job.id}")
            return self._fail([job])
        job.push("start", self.worker.id)
        self.jobs[job.id] = (job, self.pool._rows(job), list(row_ids))
        self.owner.update({row_id: (job, i) for i, row_id in enumerate(row_ids)})

    def drop_expired(self):
        """Free the rows of jobs whose client left or whose time ran out (they leave before the next step)."""
        for job, _rows, row_ids in list(self.jobs.values()):
            if self.pool._expired(job):
                for row_id in row_ids:
                    if row_id in self.owner:
                        self.session.cancel(row_id)
                self._retire(job, ended=False)

    def step(self):
        """Decode one token for every row and hand each to its job; rows that finished, or hit a
        stop string, leave the session."""
        self.worker.max_rows_seen = max(self.worker.max_rows_seen, self.rows)
        try:
            events = self.session.step()
        except Exception:  # the engine failed: tell every client of this batch, start a new session
            logger.exception(f"generation failed for {' '.join(self.jobs)}")
            return self._fail([job for job, _rows, _ids in self.jobs.values()])
        for row_id, token, _mask, finished in events:
            if row_id not in self.owner:
                continue
            job, i = self.owner[row_id]
            _job, rows, row_ids = self.jobs[job.id]
            self.pool._deliver(self.worker, job, rows, i, token)
            if finished or rows[i].done:
                if not finished:  # a stop string ended it (or the request did): the engine can stop
                    self.session.cancel(row_id)
                del self.owner[row_id]
                if not any(r in self.owner for r in row_ids):
                    self._retire(job, ended=True)

    def _retire(self, job, ended):
        """The job leaves the batch; with ended, its last text and its usage are sent."""
        _job, rows, row_ids = self.jobs.pop(job.id)
        for row_id in row_ids:
            self.owner.pop(row_id, None)
        if ended:
            self.pool._end(self.worker, job, rows)
        self.pool._jobs_done(self.worker, [job])

    def _fail(self, jobs):
        for job in jobs:
            job.fail()
            if job.id in self.jobs:
                self._retire(job, ended=False)
            else:
                self.pool._jobs_done(self.worker, [job])
        if not self.jobs:
            self.close()

    def close(self):
        for job, _rows, _ids in list(self.jobs.values()):
            self._retire(job, ended=False)
        if self.session is not None:
            self.session.close()
            self.session = None
