"""``dmc fit`` and ``dmc bench`` under torchrun: one process per rank, rank 0 writes.

``torchrun ... -m torch_dmc fit|bench ...`` starts ``WORLD_SIZE`` copies of the command; each
finds its place in the environment that torchrun sets (:func:`world`: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``). Outside torchrun (no ``RANK``/``WORLD_SIZE``) nothing here runs and nothing of
``torch.distributed`` is initialised: ``torch_dmc.cli.main`` calls :func:`run` only when
:func:`world` says the process was launched.

:func:`run` starts a :class:`Session` (the default process group: gloo on a CPU, NCCL when
``--device`` is a GPU, which is then ``cuda:LOCAL_RANK``; plus a gloo group for Python objects,
and a client of torchrun's key-value store for messages), runs the command in it, and turns any
failure into a failure of every rank:

- A rank that raises records its error in the store (the first failure wins) and exits non-zero
  (2 for a user error, as ``dmc`` without torchrun); the others find the record at their next
  meeting point or between two units of work and exit too (:class:`PeerFailed`).
- Ranks meet by name (:meth:`Session.agree`, :meth:`Session.from_root`, :meth:`Session.gather`),
  polling the store. A wait has no limit while the awaited rank is alive (rank 0 may fit the
  reference for an hour while the others wait), and fails after ``timeout`` seconds without a
  sign of life from it: every rank adds to its own counter every few seconds from a background
  thread. The gloo and NCCL collectives run only once every rank has arrived, with the same
  timeout (``--dist-timeout``, else ``$DMC_DIST_TIMEOUT``, else :data:`DEFAULT_TIMEOUT_S`).
- Only rank 0 prints (the others' stdout and stderr go to ``/dev/null``, apart from their own
  error message) and shows progress.

What is shared out, what is merged, and how: docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "SUPPORTED_COMMANDS",
    "World",
    "PeerFailed",
    "Session",
    "world",
    "timeout_seconds",
    "device_for",
    "shard",
    "split",
    "current",
    "run",
    "dumps",
    "loads",
]

T = TypeVar("T")

#: Seconds a rank waits for a sign of life of another one, and for a collective, before failing.
DEFAULT_TIMEOUT_S = 600.0

#: The environment variable that sets the timeout when ``--dist-timeout`` is not given.
TIMEOUT_ENV = "DMC_DIST_TIMEOUT"

#: The ``dmc`` sub-commands that run shared out across ranks under torchrun.
SUPPORTED_COMMANDS = ("fit", "bench")

_POLL_S = 0.05  # how often a waiting rank looks at the store


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``world_size`` and its GPU index on the node.

    Attributes:
        rank: 0..world_size-1 (``RANK``); rank 0 writes the outputs.
        world_size: the number of processes (``WORLD_SIZE``).
        local_rank: the rank on this node (``LOCAL_RANK``), the index of its GPU.
        launched: whether a launcher (torchrun, or ``srun`` with the variables set) started the
            process; ``False``: a plain process, rank 0 of 1, and nothing distributed runs.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False

    @property
    def is_root(self) -> bool:
        """Whether this is rank 0, the one that writes and prints."""
        return self.rank == 0


def world(environ: Mapping[str, str] | None = None) -> World:
    """This process's :class:`World`, read from ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.

    Args:
        environ: the environment (default ``os.environ``).

    Raises:
        ValueError: only one of ``RANK`` and ``WORLD_SIZE`` is set, or they are not integers
            with ``0 <= RANK < WORLD_SIZE``.
    """
    env = os.environ if environ is None else environ
    have = [k for k in ("RANK", "WORLD_SIZE") if k in env]
    if not have:
        return World()
    if len(have) == 1:
        raise ValueError(f"{have[0]} is set but not {({'RANK', 'WORLD_SIZE'} - set(have)).pop()}; "
                         "start distributed runs with torchrun, which sets both.")
    try:
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(f"RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}, LOCAL_RANK="
                         f"{env.get('LOCAL_RANK')!r}: expected integers.") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local}: expected "
                         "0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0.")
    return World(rank, size, local, launched=True)


def timeout_seconds(value: float | None = None, environ: Mapping[str, str] | None = None) -> float:
    """The timeout: ``value`` (``--dist-timeout``), else ``$DMC_DIST_TIMEOUT``, else the default.

    Raises:
        ValueError: not a positive number.
    """
    env = os.environ if environ is None else environ
    source, raw = ("--dist-timeout", value) if value is not None else (TIMEOUT_ENV, env.get(TIMEOUT_ENV))
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{source} {raw}: expected a positive number of seconds.")
    return seconds


def device_for(device: str | torch.device | None, w: World) -> str | None:
    """The device of rank ``w``: ``cuda`` without an index becomes ``cuda:LOCAL_RANK``."""
    if device is None:
        return None
    d = torch.device(device)
    if d.type == "cuda" and d.index is None and w.launched:
        return f"cuda:{w.local_rank}"
    return str(device)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s share of ``items``: ``items[rank::world_size]``.

    The shares are disjoint, cover ``items``, and depend only on the arguments.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in 0..{world_size - 1}, found {rank}")
    return list(items[rank::world_size])


def split(weights: Sequence[float], parts: int) -> list[range]:
    """``parts`` contiguous blocks of indices of ``weights`` with about equal total weight.

    Item ``i`` goes to block ``floor(parts · (W_{<i} + w_i/2) / W)`` (``W``: the total), so the
    blocks are contiguous, disjoint, cover every index, keep the items' order, and depend only on
    the arguments. Zero total weight: by count.
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, found {parts}")
    w = [float(x) for x in weights]
    if any(x < 0 for x in w):
        raise ValueError("weights must be non-negative")
    total = sum(w)
    if total <= 0:
        w, total = [1.0] * len(w), float(len(w))
    owner, before = [], 0.0
    for x in w:
        owner.append(min(parts - 1, int(parts * (before + x / 2) / total)))
        before += x
    starts = [0] * (parts + 1)
    for p in range(parts + 1):
        starts[p] = next((i for i, o in enumerate(owner) if o >= p), len(owner))
    return [range(starts[p], starts[p + 1]) for p in range(parts)]


def dumps(obj: Any) -> bytes:
    """``obj`` as bytes (``torch.save``): tensors, dataclasses and plain Python objects."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    """The object of :func:`dumps`, every tensor on the CPU (the sender's devices may not exist
    here). Only for bytes from the ranks of this run: it unpickles."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


class PeerFailed(RuntimeError):
    """Another rank failed; this one stops too.

    Attributes:
        rank: the rank that failed first.
        message: its error, on one line.
        user_error: whether it was a user error (exit status 2) rather than a bug (1).
    """

    def __init__(self, rank: int, message: str, user_error: bool) -> None:
        super().__init__(f"rank {rank} failed: {message}")
        self.rank, self.message, self.user_error = rank, message, user_error

    @property
    def exit_code(self) -> int:
        """2 for a user error, 1 otherwise (as the failed rank's own exit status)."""
        return 2 if self.user_error else 1


class Session:
    """This process's part in a distributed run: process groups, store, heartbeat.

    Start it with :meth:`start` (every rank at once) and end it with :meth:`close`; :func:`run`
    does both around a command.

    Attributes:
        world: this process's :class:`World`.
        timeout: seconds without a sign of life of an awaited rank, or for a collective, before
            this rank fails.
        device: the device of this rank (``cuda:LOCAL_RANK`` for ``--device cuda``), or ``None``.
        backend: the default process group's backend, ``"gloo"`` or ``"nccl"``.
    """

    def __init__(self, w: World, timeout: float, device: str | None, backend: str,
                 group: Any, store: Any, beat_store: Any) -> None:
        self.world, self.timeout, self.device, self.backend = w, timeout, device, backend
        self.group = group  # gloo group for Python objects
        self.store = store  # this run's keys (PrefixStore)
        self._beat_store = beat_store
        self._stop = threading.Event()
        self._seen: dict[int, tuple[int, float]] = {}  # rank → (heartbeat count, when it changed)
        self._received: dict[int, int] = {}  # rank → messages taken from it
        self._sent = 0
        self._beat_error: BaseException | None = None
        self._thread = threading.Thread(target=self._beat, name="dmc-heartbeat", daemon=True)
        self._thread.start()

    # -- start and end ---------------------------------------------------------------------------
    @classmethod
    def start(cls, w: World, *, timeout: float = DEFAULT_TIMEOUT_S,
              device: str | torch.device | None = None) -> Session:
        """Initialise ``torch.distributed`` for rank ``w`` (every rank calls it).

        Args:
            w: this process (:func:`world`; ``launched`` must be true).
            timeout: see the class.
            device: the command's ``--device``: a GPU selects NCCL for the default group and
                ``cuda:LOCAL_RANK``; anything else gloo.

        Raises:
            ValueError: NCCL or gloo missing from this torch build, or the GPU of
                ``LOCAL_RANK`` missing.
        """
        import torch.distributed as dist

        if not w.launched:
            raise ValueError("not launched by torchrun (no RANK and WORLD_SIZE in the environment)")
        if not dist.is_available():
            raise ValueError("this torch build has no torch.distributed; run without torchrun.")
        device = device_for(device, w)
        wait = timedelta(seconds=timeout)
        if device is not None and torch.device(device).type == "cuda":
            if not dist.is_nccl_available():
                raise ValueError(f"--device {device}: this torch build has no NCCL.")
            index = torch.device(device).index or 0
            if index >= torch.cuda.device_count():
                raise ValueError(f"--device {device}: this node has {torch.cuda.device_count()} "
                                 f"GPU(s); LOCAL_RANK {w.local_rank} needs GPU {index}.")
            torch.cuda.set_device(index)
            backend = "nccl"
            dist.init_process_group("nccl", init_method="env://", rank=w.rank,
                                    world_size=w.world_size, timeout=wait,
                                    device_id=torch.device("cuda", index))
            group = dist.new_group(backend="gloo", timeout=wait)
        else:
            if not dist.is_gloo_available():
                raise ValueError("this torch build has no gloo backend; run without torchrun.")
            backend = "gloo"
            dist.init_process_group("gloo", init_method="env://", rank=w.rank,
                                    world_size=w.world_size, timeout=wait)
            group = dist.group.WORLD
        store, beat_store = _client(wait), _client(wait)
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefix = f"torch_dmc/{run_id}/{attempt}/"
        session = cls(w, timeout, device, backend, group, dist.PrefixStore(prefix, store),
                      dist.PrefixStore(prefix, beat_store))
        _CURRENT.append(session)
        return session

    def close(self) -> None:
        """Leave the run: mark this rank as gone, stop the heartbeat, destroy the groups."""
        import torch.distributed as dist

        with contextlib.suppress(Exception):  # the store may be gone with a failed run
            self.store.set(f"left/{self.rank}", "1")
        self._stop.set()
        self._thread.join(timeout=5)
        if self in _CURRENT:
            _CURRENT.remove(self)
        if dist.is_initialized():
            dist.destroy_process_group()

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.world.rank

    @property
    def world_size(self) -> int:
        """The number of ranks."""
        return self.world.world_size

    @property
    def is_root(self) -> bool:
        """Whether this is rank 0."""
        return self.world.is_root

    # -- liveness and failures -------------------------------------------------------------------
    def _beat(self) -> None:
        interval = min(5.0, self.timeout / 6)
        try:
            while True:
                self._beat_store.add(f"beat/{self.rank}", 1)
                if self._stop.wait(interval):
                    return
        except Exception as err:  # the store is gone: the run is over; the main thread finds out
            self._beat_error = err

    def record_failure(self, err: BaseException, user_error: bool) -> bool:
        """Record ``err`` as the run's failure unless another rank's is recorded already.

        Returns:
            Whether the recorded failure is this rank's (it then prints its message).
        """
        from ..cli import error_message

        text = error_message(err)
        if not user_error:
            text = f"{type(err).__name__}: {text}"
        mine = json.dumps({"rank": self.rank, "message": text, "user_error": user_error})
        try:
            got = self.store.compare_set("abort", "", mine)
        except Exception:  # no store: nobody else can have recorded anything reachable
            return True
        got = got.decode() if isinstance(got, bytes) else got
        return json.loads(got)["rank"] == self.rank

    def check(self, ranks: Sequence[int] = ()) -> None:
        """Raise :class:`PeerFailed` if a rank recorded a failure, ``TimeoutError`` if one of
        ``ranks`` that has not left gave no sign of life for ``timeout`` seconds."""
        if self.store.check(["abort"]):
            failure = json.loads(self.store.get("abort"))
            if failure["rank"] != self.rank:
                raise PeerFailed(failure["rank"], failure["message"], failure["user_error"])
        now = time.monotonic()
        for r in ranks:
            if r == self.rank or self.store.check([f"left/{r}"]):
                continue
            count = self.store.add(f"beat/{r}", 0)
            last = self._seen.get(r)
            if last is None or last[0] != count:
                self._seen[r] = (count, now)
            elif now - last[1] > self.timeout:
                raise TimeoutError(f"rank {r} gave no sign of life for {self.timeout:g} s (is it "
                                   f"still running?); set --dist-timeout or ${TIMEOUT_ENV} to wait "
                                   "longer")

    def _wait_for(self, keys: list[str], ranks: Sequence[int]) -> None:
        """Poll until every key exists, checking failures and the liveness of ``ranks``."""
        while not self.store.check(keys):
            self.check(ranks)
            time.sleep(_POLL_S)
        self.check(ranks)

    def _others(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    # -- meeting points --------------------------------------------------------------------------
    def agree(self, name: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; return its value once every rank has run it without error.

        If some rank raised, the lowest such rank raises its own error (and records it as the
        run's failure); the others raise :class:`PeerFailed`. So an error that every rank makes
        (a bad flag) is reported once, by rank 0. ``name`` must be unique in the run.
        """
        from ..cli import USER_ERRORS, error_message

        result: Any = None
        error: Exception | None = None
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 — every rank learns of it below
            error = err
        status = None if error is None else {
            "message": error_message(error) if isinstance(error, USER_ERRORS)
            else f"{type(error).__name__}: {error_message(error)}",
            "user_error": isinstance(error, USER_ERRORS)}
        self.store.set(f"agree/{name}/{self.rank}", json.dumps(status))
        keys = [f"agree/{name}/{r}" for r in range(self.world_size)]
        self._wait_for(keys, self._others())
        statuses = [json.loads(self.store.get(k)) for k in keys]
        failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
        if failed:
            first, status = failed[0]
            if first == self.rank:
                assert error is not None
                self.record_failure(error, status["user_error"])
                raise error
            raise PeerFailed(first, status["message"], status["user_error"])
        return result

    def from_root(self, name: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only while the others wait (however long, while rank 0 lives);
        every rank returns its value (sent as :func:`dumps` bytes, tensors on the CPU).

        An error of rank 0 is recorded as the run's failure; the others raise
        :class:`PeerFailed`.
        """
        import torch.distributed as dist

        payload = [None]
        if self.is_root:
            payload = [dumps(fn())]  # an error propagates; run() records it
            self.store.set(f"root/{name}", "1")
        else:
            self._wait_for([f"root/{name}"], [0])
        dist.broadcast_object_list(payload, src=0, group=self.group)
        return loads(payload[0])

    def gather(self, name: str, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (as :func:`dumps` bytes) on rank 0, in rank order, once every
        rank has arrived (however long that takes, while they live); ``None`` on the others."""
        import torch.distributed as dist

        self.store.set(f"gather/{name}/{self.rank}", "1")
        self._wait_for([f"gather/{name}/{r}" for r in range(self.world_size)], self._others())
        out = [None] * self.world_size if self.is_root else None
        dist.gather_object(dumps(obj), out, dst=0, group=self.group)
        return None if out is None else [loads(b) for b in out]

    # -- messages to rank 0 ----------------------------------------------------------------------
    def send(self, obj: Any) -> None:
        """Post ``obj`` to rank 0 (not to be called on rank 0); it arrives in order, without
        waiting for rank 0 to take it."""
        if self.is_root:
            raise RuntimeError("rank 0 does not send to itself")
        self.store.set(f"msg/{self.rank}/{self._sent}", dumps(obj))
        self._sent += 1

    def receive(self, expected: Mapping[int, int], *, wait: bool) -> Iterator[tuple[int, Any]]:
        """On rank 0: ``(rank, obj)`` for each message :meth:`send` posted, in order per rank.

        Args:
            expected: rank → the number of messages it sends in all.
            wait: wait until they all arrived (while the senders live); else take only those
                already there.
        """
        while True:
            waiting = [r for r, n in expected.items() if self._received.get(r, 0) < n]
            progressed = False
            for r in waiting:
                key = f"msg/{r}/{self._received.get(r, 0)}"
                if self.store.check([key]):
                    obj = loads(self.store.get(key))
                    self.store.delete_key(key)
                    self._received[r] = self._received.get(r, 0) + 1
                    progressed = True
                    yield r, obj
            if not waiting or not wait:
                self.check()
                return
            if not progressed:
                self.check(waiting)
                time.sleep(_POLL_S)


def _client(timeout: timedelta):
    """A new client of the run's key-value store (torchrun's agent, or rank 0's TCPStore)."""
    import torch.distributed as dist

    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        raise ValueError("MASTER_ADDR and MASTER_PORT are not set; start distributed runs with "
                         "torchrun, which sets them.")
    return dist.TCPStore(host, int(port), is_master=False, timeout=timeout)


_CURRENT: list[Session] = []


def current() -> Session | None:
    """The session of the running ``dmc`` command under torchrun, or ``None`` (no torchrun)."""
    return _CURRENT[-1] if _CURRENT else None


@contextlib.contextmanager
def _silenced(on: bool) -> Iterator[None]:
    """stdout and stderr to ``/dev/null`` while ``on`` (the ranks other than 0)."""
    if not on:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), \
            contextlib.redirect_stderr(null):
        yield


def run(command: str, runner: Callable[[Any], int], args: Any) -> int:
    """Run ``dmc <command>`` as one rank of a torchrun job; return this rank's exit status.

    ``fit`` and ``bench`` (:data:`SUPPORTED_COMMANDS`) run in a :class:`Session`; another
    command is refused when ``WORLD_SIZE > 1`` (by rank 0; the others exit 2 silently) and runs
    as usual otherwise. A user error is one line on stderr, ``dmc <command>: error: ...`` (from
    a rank other than 0: ``... error: rank R: ...``), and status 2; rank 0 also reports another
    rank's failure as ``... error: rank R failed: ...``. With ``args.debug`` the error is raised.
    """
    from ..cli import USER_ERRORS, error_message, fail, run_command

    w = world()
    debug = bool(getattr(args, "debug", False))
    if command not in SUPPORTED_COMMANDS:
        if w.world_size == 1:
            return run_command(command, runner, args)
        if w.is_root:
            fail(command, f"under torchrun (WORLD_SIZE={w.world_size}) only `dmc "
                 f"{'` and `dmc '.join(SUPPORTED_COMMANDS)}` run; run `dmc {command}` without "
                 "torchrun.")
        return 2
    try:
        session = Session.start(w, timeout=timeout_seconds(getattr(args, "dist_timeout", None)),
                                device=getattr(args, "device", None))
    except USER_ERRORS as err:
        if debug:
            raise
        return fail(command, error_message(err)) if w.is_root else 2
    prefix = "" if w.is_root else f"rank {w.rank}: "
    message, code, raised = None, 0, None
    args.debug = True  # a runner wrapped in run_command raises its user errors: handled below
    try:
        with _silenced(not w.is_root):
            try:
                code = runner(args)
            except PeerFailed as err:
                code = err.exit_code
                if w.is_root:
                    message = str(err)
            except BaseException as err:
                user = isinstance(err, USER_ERRORS)
                owner = session.record_failure(err, user)
                if user and not debug:
                    code = 2
                    message = prefix + error_message(err) if owner else None
                else:
                    raised = err
    finally:
        session.close()
    if message:
        fail(command, message)
    if raised is not None:
        raise raised
    return code
