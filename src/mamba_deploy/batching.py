"""Continuous batching: requests that arrive at different times decode together.

A Mamba sequence's whole context is its fixed-size state, so joining a running batch is a copy
of rows (`Runner.gather_states`), and leaving it is another; there is no KV cache to page.
Batch-1 decoding is bound by reading the weights once per step, so a step for 8 rows costs
little more than a step for 1: concurrent requests share the weight reads instead of queueing.

One loop owns the runner (`Scheduler.run`, in a thread of its own or, for the server, in the
thread that calls `serve_forever`). Each turn it
1. drops the rows of requests whose caller gave up (`Job.cancel`);
2. admits the waiting requests whose rows fit beside the running ones under `max_rows`, oldest
   first (first come, first served; with nothing running the oldest is admitted whatever its
   size), and feeds their prompts as one left-padded batch, one piece of `prefill_chunk`
   positions per turn, so running rows keep decoding between pieces; once fed, they join the
   running batch (if that batch fails, each is fed again alone, so that one request's failure
   is not its neighbours'). A request joins the group only while the group's padded positions
   (rows x longest prompt) stay within `MAX_PAD_WASTE` times its real prompt tokens; one that
   would break that (a 20-token prompt beside a 2000-token one, either way round) ends the
   group and leads the next, so order is kept. Beside a group being fed, a second one is
   admitted if it goes in one piece (`MAX_PREFILLS`), and each turn feeds one piece to the group
   with the fewest positions left, so a short prompt admitted while a long one is still going in
   does not wait for the long one's last piece (yet the oldest group is passed over at most
   `MAX_OVERTAKES` turns in a row);
3. samples one token for every running row, each request with its own sampling settings and
   each row with its own seeded generator (`generation.Rows` and `row_generators`, as
   `generate` does), hands the tokens to the requests' own threads, and removes the rows of
   requests that finished;
4. steps the remaining rows in one `runner.step`.

A request decodes what `generate` would give it alone, up to the rounding of a batched step
(a different batch can change the last bits of a MatMul, and so a near tie in greedy decoding).
Runners that cannot gather states (`can_gather_states` False) run one request at a time.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
import traceback

import torch

from .errors import ContextLengthError, MambaDeployError
from .generation import Generation, check_prefill_chunk, left_pad, prefill_pieces, prepare_request


class SchedulerClosed(MambaDeployError):
    """The scheduler stopped (the server is shutting down) before the request finished."""


class Job:
    """One request in the scheduler. Its caller's thread follows it with `follow`; the worker
    thread talks to it only through the event queue and the cancel flag."""

    def __init__(self, req, stream: bool = True):
        self.req, self.stream = req, stream
        self.rows = req.rows()
        self.events: queue.SimpleQueue = queue.SimpleQueue()  # ("token", row, id) | ("done", Generation) | ("error", exc)
        self.cancelled = threading.Event()
        self.steps = 0  # tokens sampled per row so far
        self.alone = False  # its prompts are fed in a batch of their own (a shared one failed)

    def __len__(self) -> int:
        return len(self.rows)

    def cancel(self) -> None:
        """The caller gave up: the worker drops this request's rows at its next turn."""
        self.cancelled.set()

    def follow(self, on_token=None, check=None, poll: float = 0.05) -> Generation:
        """In the caller's thread: `on_token(row, id)` for each token as it comes, `check()`
        before each and every `poll` seconds while waiting (it raises to give up, which cancels
        the request); -> the Generation, or raises the request's error."""
        try:
            while True:
                try:
                    ev = self.events.get(timeout=poll)
                except queue.Empty:
                    if check is not None:
                        check()
                    continue
                if ev[0] == "done":
                    return ev[1]
                if ev[0] == "error":
                    raise ev[1]
                if check is not None:
                    check()
                if on_token is not None:
                    on_token(ev[1], ev[2])
        except BaseException:
            self.cancel()
            raise

    # -- worker side
    def _finish(self) -> None:
        try:
            self.events.put(("done", self.rows.result(self.req.as_text)))
        except Exception as e:  # noqa: BLE001  (a decode error is this request's alone)
            self.events.put(("error", e))

    def _fail(self, exc: BaseException) -> None:
        # the locals of the worker's frames in its traceback (a prefill's or step's state) would live
        # as long as the error, until the caller takes it: llama.cpp's sequences of a failed prefill
        # were not free for the next request, whose new_state rebuilt the context under running ones
        traceback.clear_frames(exc.__traceback__)
        self.events.put(("error", exc))


CLOSED = "the server is shutting down; send the request again to a running server"

# A prefill group's padded positions (rows x its longest prompt) may be at most this many times
# its real prompt tokens: at most a third of the positions it computes are padding. Prefill on
# CPU costs about rows x length (130m Mamba1 shapes, 1 thread: 1x128 0.39 s, 2x128 0.71 s), so padding
# is paid in full, by the group and by the running rows that wait between its pieces. Below 2
# on purpose: a pair of prompts wastes under half whatever their lengths (2L / (L + s) < 2), so
# 2 would still pad a 20-token prompt to a 2000-token one; 1.5 lets a pair go together when the
# shorter has at least a third of the longer's tokens, and similar lengths (a chat's) group freely.
MAX_PAD_WASTE = 1.5


def _pads_little(jobs: list[Job]) -> bool:
    """Whether these requests' prompts, left-padded to the longest, stay within MAX_PAD_WASTE."""
    lengths = [len(p) for job in jobs for p in job.req.ids_list]
    return len(lengths) * max(lengths) <= MAX_PAD_WASTE * sum(lengths)


# Prefill groups fed at once: a group whose prompts take several pieces (a long prompt, pieces of
# prefill_chunk) would otherwise hold every later request back until its last piece; a second
# group is admitted beside it when it goes in one piece, and fed first (fewer positions left).
# Only such a group: a long one admitted beside another long one would split the long prompts
# that would otherwise be prefilled together (ONNX Runtime's prefill gains most from rows).
MAX_PREFILLS = 2
# Turns in a row a newer group may be fed before the oldest one being fed: with a short request
# arriving at every decode step, each was fed first and a long prompt waited until they stopped.
MAX_OVERTAKES = 2


class _Prefill:
    """Requests admitted together, their prompts fed as one left-padded batch."""

    def __init__(self, jobs: list[Job], pieces, length: int):
        self.jobs, self.pieces, self.length = jobs, pieces, length  # length: positions to feed
        self.done = 0  # positions fed so far

    @property
    def rows(self) -> int:
        return sum(len(j) for j in self.jobs)


class Scheduler:
    """The model's loop and its queue. `submit` from any thread; `close` once.

    thread=True runs the loop in a thread of its own. thread=False leaves it to the caller's
    `run()`: the server runs it in the thread that calls `serve_forever`, usually the one that
    loaded the model. torch and llama.cpp keep one OpenMP thread team per calling thread, and
    on a 2-core machine a second team (the loading thread's, then the loop's) made each decode
    step 40-70 % slower (torch: 1.0 -> 1.65 s for 64 tokens of a 130m Mamba1)."""

    def __init__(self, runner, max_rows: int = 16, prefill_chunk: int | None = None, thread: bool = True):
        check_prefill_chunk(prefill_chunk)
        self.runner, self.prefill_chunk = runner, prefill_chunk
        self.batching = runner.can_gather_states
        # a request is admitted when the running rows and its own fit under max_rows; llama.cpp
        # grows its context for them now (growing it later would invalidate running sequences)
        cap = runner.reserve_rows(max_rows) if self.batching else max_rows
        self.max_rows = max(1, min(max_rows, cap))
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []  # in the order of their rows in self.state
        self.prefilling: list[_Prefill] = []  # groups being fed, in the order admitted
        self._overtaken = 0  # turns in a row the oldest group being fed was passed over for a newer one
        self.state = self.logits = None  # the running rows' state and next-token logits (rows, V)
        self.batch_sizes: collections.Counter = collections.Counter()  # rows per step taken (for tests, stats)
        self.seconds: collections.Counter = collections.Counter()  # time per phase (prefill, gather, sample, step)
        self.closed = self._stopping = False
        self._cv = threading.Condition()
        self._idle = threading.Event()  # set while no run() is looping
        self._idle.set()
        self.thread = None
        self.loop_thread: threading.Thread | None = None  # the thread of the latest run() (self.thread, or the caller's)
        if thread:
            self.thread = threading.Thread(target=self.run, name="mamba-deploy-scheduler", daemon=True)
            self.thread.start()

    def submit(self, prompts, stream: bool = True, **kw) -> Job:
        """generate's keyword arguments (not on_token / prefill_chunk); checked and tokenized here,
        in the caller's thread, so a bad request raises before it queues. stream=False: no token
        events (`follow` then only waits for the result)."""
        job = Job(prepare_request(self.runner, prompts, **kw), stream)
        self._check_positions(job.req)
        with self._cv:
            if self.closed:
                raise SchedulerClosed(CLOSED)
            self.waiting.append(job)
            self._cv.notify()
        return job

    def _check_positions(self, req) -> None:
        """ContextLengthError (a ShapeError: the client's 400) for a request that would run past the
        runner's max_positions (llama.cpp's n_ctx) while decoding: there it failed the batched step,
        and so every request decoding beside it, halfway through their streams."""
        limit = getattr(self.runner, "max_positions", None)  # duck-typed runners may lack it
        if not isinstance(limit, int):
            return
        longest = max(len(p) for p in req.ids_list) + req.max_new_tokens
        if longest > limit:
            name = getattr(self.runner, "max_positions_name", "the backend's max_positions")
            raise ContextLengthError(f"a prompt of {longest - req.max_new_tokens} tokens with max_tokens "
                                     f"{req.max_new_tokens} would pass {name}={limit}; lower max_tokens or shorten "
                                     "the prompt")

    def stats(self) -> dict:
        with self._cv:
            groups = list(self.prefilling)  # a copy: the loop changes the list (outside the lock)
            return {"running": sum(len(j) for j in self.running), "waiting": len(self.waiting)
                    + sum(len(pf.jobs) for pf in groups)}

    def close(self, timeout: float | None = None) -> bool:
        """Stop after the current turn; waiting and running requests get SchedulerClosed.
        -> whether the loop has stopped (it may still be inside a long runner call)."""
        self.stop()
        with self._cv:
            self.closed = True
        if not self._idle.wait(timeout):
            return False
        self._fail_all()  # what no loop will run any more
        return True

    def stop(self) -> None:
        """Makes run() return after its current turn, or the next run() at once if none is
        running; nothing fails (a later run() goes on with the requests)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()

    # -- the loop
    def run(self) -> None:
        """Runs requests until stop() or close() (or an exception such as KeyboardInterrupt, which
        fails the requests it interrupted and propagates)."""
        self._idle.clear()
        self.loop_thread = threading.current_thread()
        try:
            while True:
                with self._cv:
                    while not (self.closed or self._stopping) and not (
                            self.waiting or self.running or self.prefilling):
                        self._cv.wait()
                    if self.closed or self._stopping:
                        break
                try:
                    self._turn()
                except Exception as e:  # noqa: BLE001  (a failed step or gather: every running request gets it)
                    self._fail_running(e)
            if self.closed:  # a close() whose wait for this turn timed out left its requests to this loop
                self._fail_all()
        except BaseException:
            self._fail_all()
            raise
        finally:
            with self._cv:
                self._stopping = False  # a stop() before this run() began ends this one, not the next
            self._idle.set()

    def _fail_all(self) -> None:
        err = SchedulerClosed(CLOSED)
        self._fail_running(err)
        with self._cv:
            jobs, self.waiting = list(self.waiting), collections.deque()
        for job in jobs:
            job._fail(err)

    @contextlib.contextmanager
    def _timed(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t

    def _turn(self) -> None:
        self._drop_cancelled()
        self._feed_prompts()
        if self.running:
            self._decode()

    def _fail_running(self, exc: BaseException) -> None:
        jobs = self.running + [j for pf in self.prefilling for j in pf.jobs]
        self.running, self.prefilling, self.state, self.logits = [], [], None, None
        for job in jobs:
            job._fail(exc)

    def _drop_cancelled(self) -> None:
        with self._cv:
            self.waiting = collections.deque(j for j in self.waiting if not j.cancelled.is_set())
        self.prefilling = [pf for pf in self.prefilling if not all(j.cancelled.is_set() for j in pf.jobs)]
        self._keep([j for j in self.running if not j.cancelled.is_set()])

    def _keep(self, jobs: list[Job]) -> None:
        """Only these of the running jobs stay: their rows are gathered out of the batch state."""
        if len(jobs) == len(self.running):
            return
        rows, off = [], 0
        for job in self.running:
            if job in jobs:
                rows += range(off, off + len(job))
            off += len(job)
        self.running = jobs
        if not rows:
            self.state = self.logits = None
            return
        self.logits = self.logits[rows]
        with self._timed("gather"):
            self.state = self.runner.gather_states([(self.state, rows)])

    def _running_rows(self) -> int:
        return sum(len(j) for j in self.running)

    def _admit(self, max_len: int | None = None) -> list[Job]:
        """The waiting requests that fit beside the running and prefilling rows, oldest first (one
        that does not fit stops the rest: first come, first served). With nothing running or
        prefilling the oldest is admitted whatever its size. One that would pad the group past
        MAX_PAD_WASTE stops it too (it leads the next group), and so does one with a prompt longer
        than max_len. Without gather_states, one request and only when idle; one marked `alone`,
        by itself."""
        with self._cv:
            busy = bool(self.running or self.prefilling)
            jobs, rows = [], self._running_rows() + sum(pf.rows for pf in self.prefilling)
            while self.waiting:
                job = self.waiting[0]
                fits = self.batching and rows + len(job) <= self.max_rows
                if max_len is not None and max(map(len, job.req.ids_list)) > max_len:
                    break
                if (jobs or busy) and not fits or jobs and (job.alone or not _pads_little(jobs + [job])):
                    break
                jobs.append(self.waiting.popleft())
                rows += len(job)
                if not self.batching or job.alone:
                    break
            return jobs

    def _feed_prompts(self) -> None:
        """Admits a prefill group when fewer than MAX_PREFILLS are being fed (beside another, only one
        that goes in one piece), then feeds one piece of the group with the fewest positions left
        (the oldest of equals), so that a short prompt is not held behind a long one's pieces, but
        the oldest group after MAX_OVERTAKES turns in a row without, so that short prompts arriving
        one after another do not hold a long one back for good; a group fed to its end joins the
        running rows."""
        while len(self.prefilling) < MAX_PREFILLS and self._start_prefill(
                self.prefill_chunk if self.prefilling else None):
            pass
        if not self.prefilling:
            return
        pf = min(self.prefilling, key=lambda g: g.length - g.done)  # min keeps the first of equals
        if pf is not self.prefilling[0] and self._overtaken >= MAX_OVERTAKES:
            pf = self.prefilling[0]  # a stream of short prompts overtaking it every turn starved it
        self._overtaken = self._overtaken + 1 if pf is not self.prefilling[0] else 0
        try:
            with self._timed("prefill"):
                pf.done, logits, state = next(pf.pieces)
        except Exception as e:  # noqa: BLE001  (these requests' alone)
            self.prefilling.remove(pf)
            if len(pf.jobs) == 1:
                pf.jobs[0]._fail(e)
                return
            with self._cv:  # fed alone each, so that one request's failure (a prompt past llama.cpp's
                for job in reversed(pf.jobs):  # n_ctx) is not its neighbours'
                    job.alone = True
                    self.waiting.appendleft(job)
            return
        if pf.done == pf.length:
            self.prefilling.remove(pf)
            self._join(pf.jobs, logits, state)

    def _start_prefill(self, max_len: int | None = None) -> bool:
        """A new prefill group of the waiting requests `_admit(max_len)` gives -> whether there were any."""
        jobs = self._admit(max_len)
        if not jobs:
            return False
        ids, mask = left_pad([p for job in jobs for p in job.req.ids_list])
        try:
            pieces = prefill_pieces(self.runner, ids, mask, self.runner.new_state(ids.shape[0]), self.prefill_chunk)
        except Exception as e:  # noqa: BLE001  (these requests' alone)
            for job in jobs:
                job._fail(e)
            return True
        self.prefilling.append(_Prefill(jobs, pieces, ids.shape[1]))
        return True

    def _join(self, jobs: list[Job], logits, state) -> None:
        """Fed requests' rows join the running batch (those done at once, or cancelled, do not)."""
        rows, off, joining = [], 0, []
        for job in jobs:
            if job.req.max_new_tokens == 0:
                job._finish()
            elif not job.cancelled.is_set():
                rows += range(off, off + len(job))
                joining.append(job)
            off += len(job)
        if not joining:
            return
        parts = [(state, None if len(rows) == off else rows)]
        try:
            with self._timed("gather"):
                if self.running:
                    self.state = self.runner.gather_states([(self.state, None)] + parts)
                    self.logits = torch.cat([self.logits, logits[rows]])
                else:
                    self.state = state if parts[0][1] is None else self.runner.gather_states(parts)
                    self.logits = logits[rows]
        except Exception as e:  # noqa: BLE001  (neither prefilling nor running now: fail them here, run() the rest)
            for job in joining:
                job._fail(e)
            raise
        self.running += joining

    def _decode(self) -> None:
        """Sample every running row, hand out the tokens, drop finished requests, step the rest."""
        vocab, nxt, off, going = self.runner.vocab_size, [], 0, []
        t0 = time.perf_counter()
        for job in self.running:
            n = len(job)
            try:
                tokens = job.rows.sample(self.logits[off:off + n], job.req.scfg, job.req.generators, vocab)
                job.rows.push(tokens, (lambda i, t, job=job: job.events.put(("token", i, t))) if job.stream else None)
                job.steps += 1
            except Exception as e:  # noqa: BLE001  (a sampling error is this request's alone)
                job._fail(e)
                tokens = None
            off += n
            if tokens is None:
                continue
            if job.rows.all_done or job.steps >= job.req.max_new_tokens:
                job._finish()
                continue
            going.append(job)
            nxt.append(tokens)
        self.seconds["sample"] += time.perf_counter() - t0
        self._keep(going)
        if self.running:
            self.batch_sizes[self._running_rows()] += 1
            with self._timed("step"):
                self.logits, self.state = self.runner.step(torch.cat(nxt), self.state)
