"""Mutation-testing round (review 45, part b): tests for behaviour of tp.py and of the HTTP
server's connection guards (serve_http.py) that a single-line mutation could change without any
earlier test failing.

Tensor parallelism runs here in one process: W ranks are W threads, and torch.distributed's
collectives that tp.py calls (all_reduce, broadcast, get_rank, get_world_size) are replaced by a
thread-barrier version that sums every rank's tensor (_ThreadRanks). What is checked is the
sharded model's logits against transformers' unsharded model (the independent reference), as
tests/test_tensor_parallel.py does over gloo processes, for the cases it does not run: ngroups
above one group per rank (ngroups 4 over 2 ranks: each rank reads 2 of B/C's groups) and biases
over 4 ranks (only one rank may add a row-parallel projection's bias). CPU only, no network."""

from __future__ import annotations

import errno
import os
import select
import socket
import sys
import threading
import time
import types

import pytest
import torch

from conftest import build_hf_model, rel_err

# ----------------------------------------------------------------------------- tp.py, in threads

BATCH, PREFILL, STEPS = 2, 19, 3  # 19: past the tiny Mamba2 models' chunk_size 16


class _ThreadRanks:
    """W ranks as W threads of this process, standing in for torch.distributed's group: all_reduce
    hands every rank the sum of every rank's tensor (added in rank order, so each rank gets the same
    bits), broadcast hands every rank src's tensor."""

    def __init__(self, world: int):
        self.world = world
        self.local = threading.local()
        self.barrier = threading.Barrier(world, timeout=120)
        self.slots = [None] * world

    def patch(self, monkeypatch):
        import torch.distributed as dist

        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda group=None: self.local.rank)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: self.world)
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)
        monkeypatch.setattr(dist, "broadcast", self.broadcast)

    def _exchange(self, tensor):
        self.slots[self.local.rank] = tensor.detach().clone()
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()  # every rank has read the slots before one writes its next tensor there
        return got

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        got = self._exchange(tensor)
        total = got[0].clone()
        for t in got[1:]:
            total += t
        tensor.copy_(total)

    def broadcast(self, tensor, src=0, group=None, async_op=False):
        tensor.copy_(self._exchange(tensor)[src])

    def run(self, fn):
        """fn(rank) in each rank's thread -> [fn(0), ..., fn(W - 1)]; a rank's error is raised here."""
        results, errors = [None] * self.world, []

        def main(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # the other ranks would wait for it at the next barrier
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=main, args=(r,), daemon=True) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a rank never finished"
        if errors:
            raise errors[0]
        return results


def _ids(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (BATCH, PREFILL + STEPS), generator=g)


def _run_sharded(model, ids) -> torch.Tensor:
    """A prefill of PREFILL tokens, then STEPS single-token steps -> logits (b, PREFILL + STEPS, vocab)."""
    with torch.inference_mode():
        state = model.new_state(ids.shape[0])
        out = [model(ids[:, :PREFILL], state).logits]
        for t in range(STEPS):
            out.append(model.step(ids[:, PREFILL + t], state).unsqueeze(1))
    return torch.cat(out, 1)


# name -> (conftest kind, transformers overrides, worlds)
SHARDED = {
    # 8 heads in 4 groups: over 2 ranks each rank keeps 4 heads and reads 2 groups of B / C (over 4:
    # one group each); biases on in_proj / out_proj, which one rank alone may add
    "mamba2_g4_bias": ("mamba2_g2", dict(n_groups=4, use_bias=True), (2, 4)),
    "mamba1_bias": ("mamba", dict(use_bias=True), (4,)),
}
CASES = [(name, world, how) for name, (_, _, worlds) in SHARDED.items() for world in worlds
         for how in ("load_sharded", "apply_tensor_parallel")]


@pytest.fixture(scope="module")
def sharded_checkpoints(tmp_path_factory):
    made = {}
    for name, (kind, overrides, _) in SHARDED.items():
        hf = build_hf_model(kind, **overrides)
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder)
        made[name] = (folder, hf)
    return made


@pytest.mark.parametrize("name, world, how", CASES, ids=[f"{n}-{w}ranks-{h}" for n, w, h in CASES])
def test_sharded_logits_match_transformers(sharded_checkpoints, monkeypatch, name, world, how):
    """A rank's slices (both paths: read from the files, and cut from a loaded model) give
    transformers' logits on every rank. ngroups 4 over 2 ranks: each rank reads two whole groups
    of B and C (a rank that kept one group's rows of in_proj / conv1d, or whose config said one
    group, computed with another rank's B/C or failed on the shapes). Biases over 4 ranks: the sum
    over ranks must hold out_proj's bias once (rank 0's): a mistake in which rank keeps it gives 3x
    (or 0x) the bias, which 2 ranks cannot show when exactly one of two keeps it."""
    from mamba_deploy.checkpoint import load_model
    from mamba_deploy.tp import apply_tensor_parallel, load_sharded

    folder, hf = sharded_checkpoints[name]
    ranks = _ThreadRanks(world)
    ranks.patch(monkeypatch)
    ids = _ids(hf.config.vocab_size)

    def rank_main(rank):
        model = load_sharded(folder) if how == "load_sharded" else apply_tensor_parallel(load_model(folder))
        assert (model.tp.rank, model.tp.world) == (rank, world)
        return _run_sharded(model, ids)

    got = ranks.run(rank_main)
    with torch.no_grad():
        ref = hf(ids).logits
    err = rel_err(got[0][..., :ref.shape[-1]], ref)
    assert err < 1e-4, f"{name} over {world} ranks ({how}): {err:.2e} from transformers"
    for r in range(1, world):
        assert torch.equal(got[r], got[0]), f"rank {r} of {world} differs from rank 0"


def test_local_config_keeps_each_ranks_whole_groups():
    """local_config's contract: a rank's slice is d_inner / W channels and the groups its heads
    read: with ngroups 4 over 2 ranks, 2 groups (not 1: a rank's 4 heads span 2 of the 4 groups)."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.tp import local_config

    cfg = MambaConfig(arch="mamba2", d_model=32, n_layer=1, vocab_size=16, headdim=8, ngroups=4)  # 8 heads
    heads_per_group = cfg.nheads // cfg.ngroups
    for world in (1, 2, 4, 8):
        local = local_config(cfg, world)
        want = max(1, (cfg.nheads // world) // heads_per_group)  # whole groups a rank's heads read
        assert (local.nheads, local.ngroups, local.d_inner) == (cfg.nheads // world, want, cfg.d_inner // world)


@pytest.mark.parametrize("world", [0, -2])
def test_local_config_refuses_no_ranks_with_a_config_error(world):
    """local_config's contract (its check): the number of ranks is an int >= 1. 0 raised a
    ZeroDivisionError from the divisibility check instead of the ConfigError naming it."""
    from mamba_deploy.config import MambaConfig
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.tp import local_config

    cfg = MambaConfig(arch="mamba2", d_model=32, n_layer=1, vocab_size=16, headdim=8, ngroups=2)
    with pytest.raises(ConfigError, match="number of ranks must be an int >= 1"):
        local_config(cfg, world)


def _launch_env(monkeypatch, **env):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_init_distributed_non_integer_rank_variables_are_a_config_error(monkeypatch):
    """RANK / WORLD_SIZE / LOCAL_RANK set by hand to a non-integer: the typed ConfigError that
    tells to let torchrun set them, not int()'s ValueError."""
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.tp import init_distributed

    _launch_env(monkeypatch, RANK="first", WORLD_SIZE="2", LOCAL_RANK="0")
    with pytest.raises(ConfigError, match="must be integers.*'first'.*torchrun"):
        init_distributed("cpu")


def test_init_distributed_reports_the_group_the_caller_made(monkeypatch):
    """A caller that made the process group itself: init_distributed joins nothing and answers
    that group's rank and size (what apply_tensor_parallel shards over), not the launcher's
    variables. Here: a 1-rank gloo group, the variables saying rank 1 of 2."""
    import torch.distributed as dist

    from mamba_deploy import tp
    from mamba_deploy.tp import init_distributed

    if dist.is_initialized():
        pytest.skip("a process group is already open in this process")
    _launch_env(monkeypatch, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    monkeypatch.setitem(tp._group, "joined", tp._group["joined"])
    monkeypatch.setitem(tp._group, "opened", tp._group["opened"])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        assert init_distributed("cpu") == (0, 1, "cpu")
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- DeadlineReader

def test_a_read_under_a_deadline_waits_no_longer_than_the_time_left():
    """DeadlineReader's contract: every recv's timeout is the time left before the deadline. With
    0.3 s left and a 20 s idle timeout, a silent client is cut off at ~0.3 s, not after the idle
    timeout (a client that went silent late in its request held the handler past the deadline)."""
    from mamba_deploy.serve_http import DeadlineReader

    a, b = socket.socketpair()
    with a, b:
        reader = DeadlineReader(a, 20.0)
        reader.deadline = time.monotonic() + 0.3
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            reader.readinto(bytearray(16))
        assert time.monotonic() - t0 < 5.0


def test_a_deadline_already_past_is_a_timeout_error_without_reading():
    """DeadlineReader's contract: past the deadline, reading raises TimeoutError (which the handler
    turns into a 408 / a closed connection) and takes no byte; socket.settimeout refuses a
    negative time left with a ValueError, which would reach the client as a 500."""
    from mamba_deploy.serve_http import DeadlineReader

    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"late bytes")
        for idle in (None, 20.0):
            reader = DeadlineReader(a, idle)
            reader.deadline = time.monotonic() - 1.0
            with pytest.raises(TimeoutError):
                reader.readinto(bytearray(16))
        assert a.recv(16) == b"late bytes"


def test_after_a_read_under_a_deadline_the_socket_has_its_idle_timeout_again():
    """DeadlineReader's contract ("replies are written with the plain timeout"): a read under a
    deadline shortens the socket's timeout to the time left only for that read. Left at 0.2 s, the
    next wait without a deadline (or a reply's write) gave up after 0.2 s instead of `idle`."""
    from mamba_deploy.serve_http import DeadlineReader

    a, b = socket.socketpair()
    with a, b:
        reader = DeadlineReader(a, 20.0)
        b.sendall(b"x")
        reader.deadline = time.monotonic() + 0.2
        buf = bytearray(1)
        assert reader.readinto(buf) == 1 and buf == b"x"
        assert a.gettimeout() == 20.0
        reader.deadline = None  # the request is in (serve.py's _request_in)
        timer = threading.Timer(0.8, lambda: b.sendall(b"y"))
        timer.start()
        try:
            assert reader.readinto(buf) == 1 and buf == b"y"  # waited 0.8 s: within the 20 s idle timeout
        finally:
            timer.join()


# ----------------------------------------------------------------------------- AcceptPause

class _Clock:
    """serve_http's time module, with a clock the test moves and sleeps recorded."""

    def __init__(self):
        self.now, self.slept = 1000.0, []

    def monotonic(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)


def _fail(code):
    def accept():
        raise OSError(code, os.strerror(code))
    return accept


def test_an_accept_error_other_than_a_shortage_passes_at_once_unlogged(monkeypatch, capsys):
    """AcceptPause's contract: only running out of descriptors / buffers / memory waits and logs.
    A connection reset before it was accepted (ECONNABORTED) is the client's, says nothing about
    the server, and must neither delay the next accept nor print "cannot accept connections"."""
    from mamba_deploy import serve_http

    clock = _Clock()
    monkeypatch.setattr(serve_http, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    pause = serve_http.AcceptPause(quiet=False)
    with pytest.raises(OSError) as e:
        pause(_fail(errno.ECONNABORTED))
    assert e.value.errno == errno.ECONNABORTED
    assert clock.slept == [] and capsys.readouterr().err == ""
    assert pause(lambda: ("sock", ("127.0.0.1", 1))) == ("sock", ("127.0.0.1", 1))


def test_a_lasting_descriptor_shortage_is_logged_again_every_interval(monkeypatch, capsys):
    """AcceptPause's contract: "one log line per ACCEPT_WARN_EVERY_S while it lasts": one line,
    none more within the interval, another once it has passed (an operator watching the log must
    see that the shortage goes on); every failed accept waits ACCEPT_PAUSE_S."""
    from mamba_deploy import serve_http

    clock = _Clock()
    monkeypatch.setattr(serve_http, "time", types.SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))
    pause = serve_http.AcceptPause(quiet=False)
    lines = []
    for dt in (0.0, 0.5 * serve_http.ACCEPT_WARN_EVERY_S, 0.6 * serve_http.ACCEPT_WARN_EVERY_S):
        clock.now += dt
        with pytest.raises(OSError):
            pause(_fail(errno.EMFILE))
        lines.append(capsys.readouterr().err.count("cannot accept connections"))
    assert lines == [1, 0, 1]  # at 0, 0.5 and 1.1 intervals
    assert clock.slept == [serve_http.ACCEPT_PAUSE_S] * 3


# ----------------------------------------------------------------------------- listening

def test_an_address_this_machine_lacks_is_named_as_such(capsys):
    """`serve --host 192.0.2.1` (TEST-NET-1, RFC 5737: on no machine): the bind fails with
    EADDRNOTAVAIL, before any model is loaded, and the error says the address is not this
    machine's and how to listen locally or on every interface, not the generic advice."""
    from mamba_deploy.cli import main
    from mamba_deploy.serve_http import check_can_listen

    try:
        check_can_listen("192.0.2.1", 0)
    except OSError as e:
        if e.errno != errno.EADDRNOTAVAIL:
            pytest.skip(f"binding 192.0.2.1 here fails otherwise: {e}")
    else:
        pytest.skip("this machine binds non-local addresses (ip_nonlocal_bind)")
    assert main(["serve", "no-such-model-folder", "--backend", "torch", "--host", "192.0.2.1", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 192.0.2.1:0" in err and "not an address of this machine" in err, err
    assert "--host 127.0.0.1" in err and "0.0.0.0" in err


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
def test_a_port_refused_for_privileges_says_so(code):
    """bind_error's contract: a bind refused for lack of privileges (EACCES, or EPERM where a
    security module refuses it) tells to pick a port of 1024 or above."""
    from mamba_deploy.errors import ConfigError
    from mamba_deploy.serve_http import bind_error

    err = bind_error("0.0.0.0", 80, OSError(code, os.strerror(code)))
    assert isinstance(err, ConfigError)
    assert str(err).startswith("cannot listen on 0.0.0.0:80: ") and "needs privileges" in str(err)
    assert "--port of 1024 or above" in str(err)


def test_the_port_of_a_server_just_stopped_is_free_to_listen_on():
    """check_can_listen binds as the server will (SO_REUSEADDR, socketserver's allow_reuse_address):
    a port whose server just stopped, its closed connections still in TIME_WAIT, is one the new
    server can bind, so the early check must not refuse it ("another process is listening")."""
    from http.server import ThreadingHTTPServer

    from mamba_deploy.serve_http import check_can_listen

    assert ThreadingHTTPServer.allow_reuse_address
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn, _ = listener.accept()
    conn.close()  # the server closes first: its side of the connection enters TIME_WAIT
    assert client.recv(1) == b""
    client.close()
    listener.close()
    if sys.platform.startswith("linux"):  # the situation under test: the port is still in use, in TIME_WAIT
        with socket.socket() as plain:
            with pytest.raises(OSError) as e:
                plain.bind(("127.0.0.1", port))
            assert e.value.errno == errno.EADDRINUSE
    check_can_listen("127.0.0.1", port)  # no error


# ----------------------------------------------------------------------------- peer_closed

def _tcp_pair():
    """A loopback TCP connection -> (client socket, the server's accepted socket)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname(), timeout=5)
        conn, _ = listener.accept()
    return client, conn


def test_a_client_that_reset_its_connection_is_gone():
    """peer_closed's contract: a client that reset its connection (RST: a closed socket with
    SO_LINGER 0, a crashed client, a proxy giving up) has gone, as one that closed it; else its
    generation would run on to max_tokens for nobody. A socket this server already closed is
    gone too."""
    import struct

    from mamba_deploy.serve_http import peer_closed

    client, conn = _tcp_pair()
    with conn:
        assert not peer_closed(conn)  # connected, nothing sent: still there
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # sends a RST, not a FIN
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        assert poller.poll(5000), "the reset never reached the server's socket"
        # one look: the first read after a RST raises ECONNRESET and clears it (a second one reads EOF)
        assert peer_closed(conn)
    assert peer_closed(conn)  # closed here: fileno -1
