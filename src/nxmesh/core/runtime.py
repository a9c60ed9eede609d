"""The running application: one task group, every plugin's lifespan, a clean shutdown.

`run` is what ``nxmesh master`` and ``nxmesh agent`` are made of::

    pm = get_plugin_manager()
    settings = load_settings(pm)
    anyio.run(run, pm, settings, serve_api)

Startup: the provider registry is built, a service task group opens, and every plugin's
`nxmesh_lifespan` context is entered in registration order (built-ins first, so
third-party plugins can rely on them). Then ``main(runtime)`` runs, or the application
waits for a signal.

Shutdown (main returned or raised, SIGINT/SIGTERM, a service crashed): background
services are cancelled *and waited for* first, then lifespans exit in reverse order, each
inside a shielded scope bounded by ``shutdown_timeout``. Services stopping before
lifespans exit means a lifespan never closes a resource under a service still using it.
Everything lives in task groups: when `run` returns, no task it started is left.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack, ExitStack
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import anyio
import anyio.abc
import attrs
import pluggy
import structlog

from nxmesh.core.errors import NxMeshError
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.settings import Settings

__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT", "Runtime", "Stash", "StashKey", "run", "start_service"]

T = TypeVar("T")
D = TypeVar("D")

DEFAULT_SHUTDOWN_TIMEOUT = 10.0
"""Seconds each lifespan exit, and the services together, get to finish on shutdown."""

log = structlog.get_logger("nxmesh.runtime")


# ---------------------------------------------------------------------------------------
# Typed state shared between plugins
# ---------------------------------------------------------------------------------------


class StashKey(Generic[T]):
    """A key into a `Stash`; the type parameter is the type of the value stored under it.

    Create one per piece of state at module level: ``DB = StashKey[Database]("db")``.
    Keys compare by identity, so two plugins cannot collide by picking the same name.
    """

    __slots__ = ("name",)

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """State plugins share at runtime, typed per key (pytest's ``Stash``).

    ``runtime.stash[DB] = db`` in one plugin's lifespan, ``runtime.stash[DB]`` (typed
    ``Database``) in another's, instead of attributes monkeypatched onto the runtime.
    """

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast(T, self._data[key])

    def get(self, key: StashKey[T], default: D) -> T | D:
        """The value under `key`, or `default` when nothing is stored."""
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        """The value under `key`, storing `default` first when nothing is stored."""
        if key not in self._data:
            self._data[key] = default
        return self[key]

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


# ---------------------------------------------------------------------------------------
# The runtime
# ---------------------------------------------------------------------------------------


@attrs.define(eq=False)
class Runtime:
    """What a running application hands to plugins: settings, providers, a task group."""

    pm: pluggy.PluginManager
    settings: Settings
    registry: ProviderRegistries
    stash: Stash = attrs.field(factory=Stash, repr=False)
    _task_group: anyio.abc.TaskGroup | None = attrs.field(default=None, init=False, repr=False)
    _root_scope: anyio.CancelScope | None = attrs.field(default=None, init=False, repr=False)

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        """The group background services run in (``await runtime.task_group.start(fn)``).

        Available from the first lifespan entry until shutdown begins; services still in
        it at shutdown are cancelled before any lifespan exits.
        """
        if self._task_group is None:
            raise NxMeshError("the runtime is not running: its task group is closed")
        return self._task_group

    @property
    def running(self) -> bool:
        """Whether services can be started (the application has not begun shutting down)."""
        return self._task_group is not None

    def shutdown(self) -> None:
        """Stop the application as SIGTERM would: `run` returns once cleanup is done."""
        if self._root_scope is not None:
            self._root_scope.cancel()


async def start_service(
    runtime: Runtime,
    fn: Callable[..., Coroutine[Any, Any, Any]],
    *args: object,
    name: object = None,
) -> Any:
    """Start `fn` in the runtime's task group; return what it passes to ``task_status.started``.

    `fn` must accept ``task_status`` and call ``task_status.started(value)`` once it is
    ready (listening, connected...); an error before that propagates to the caller.
    """
    return await runtime.task_group.start(fn, *args, name=name)


async def run(
    pm: pluggy.PluginManager,
    settings: Settings,
    main: Callable[[Runtime], Awaitable[None]] | None = None,
    *,
    handle_signals: bool = True,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> None:
    """Run an application until `main` returns, a signal arrives or something fails.

    :param pm: the plugin manager; its `nxmesh_lifespan` implementations are entered.
    :param settings: the loaded settings (`nxmesh.core.settings.load_settings`).
    :param main: the application's own work; without it, run until a signal arrives or
        ``runtime.shutdown()`` is called.
    :param handle_signals: turn SIGINT and SIGTERM into a clean shutdown (only possible
        on the main thread; ignored elsewhere). A second signal during shutdown gets the
        default behaviour, so a stuck shutdown can still be interrupted.
    :param shutdown_timeout: seconds each lifespan exit (and the services, together) get
        before their cleanup is cancelled.

    Returns normally after a signal or `runtime.shutdown()`. An exception from `main`, a
    lifespan or a service propagates unchanged (a lone error is not wrapped in an
    exception group; several are). Cancellation from the caller propagates too.
    """
    runtime = Runtime(pm=pm, settings=settings, registry=ProviderRegistries(pm))
    try:
        async with anyio.create_task_group() as root:
            runtime._root_scope = root.cancel_scope
            if handle_signals and threading.current_thread() is threading.main_thread():
                await root.start(_cancel_on_signal, root.cancel_scope)
            try:
                await _serve(runtime, root, main, shutdown_timeout)
            finally:
                root.cancel_scope.cancel()  # the signal watcher has nothing left to guard
    except BaseExceptionGroup as group:
        single = _only_exception(group)
        if single is None:
            raise
    else:
        return
    finally:
        runtime._root_scope = None
    # Raised outside the `except` block so the error does not claim to have happened
    # "during handling" of the group that merely carried it.
    raise single


def _only_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


async def _serve(
    runtime: Runtime,
    root: anyio.abc.TaskGroup,
    main: Callable[[Runtime], Awaitable[None]] | None,
    shutdown_timeout: float,
) -> None:
    services_done = anyio.Event()
    services: anyio.abc.TaskGroup = await root.start(_host_services, services_done)
    runtime._task_group = services
    async with AsyncExitStack() as stack:
        try:
            for lifespan in _lifespans(runtime):
                await stack.enter_async_context(_BoundedExit(lifespan, shutdown_timeout))
            log.debug("runtime started")
            if main is None:
                await anyio.sleep_forever()
            else:
                await main(runtime)
        finally:
            runtime._task_group = None
            services.cancel_scope.cancel()
            with anyio.move_on_after(shutdown_timeout, shield=True) as waited:
                await services_done.wait()
            if waited.cancelled_caught:
                log.error("services ignored cancellation; still waiting", timeout=shutdown_timeout)
    log.debug("runtime stopped")


async def _host_services(
    done: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[anyio.abc.TaskGroup] = anyio.TASK_STATUS_IGNORED,
) -> None:
    # The service group lives in its own task so it can be closed (and waited for)
    # before the lifespans that were entered after it exit.
    try:
        async with anyio.create_task_group() as services:
            task_status.started(services)
            await anyio.sleep_forever()
    finally:
        done.set()


async def _cancel_on_signal(
    scope: anyio.CancelScope, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    with ExitStack() as stack:
        try:
            signals = stack.enter_context(anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM))
        except NotImplementedError:  # e.g. asyncio on Windows: run without signal handling
            task_status.started()
            return
        task_status.started()
        async for signum in signals:
            log.info("signal received; shutting down", signal=getattr(signum, "name", signum))
            scope.cancel()
            return  # closing the receiver restores the default handlers for a 2nd signal


def _lifespans(runtime: Runtime) -> list[AbstractAsyncContextManager[Any]]:
    # pluggy calls implementations last-registered first; reversed, the built-ins come
    # first and third-party lifespans can rely on them being entered.
    found = list(reversed(runtime.pm.hook.nxmesh_lifespan(runtime=runtime)))
    for cm in found:
        if not (hasattr(cm, "__aenter__") and hasattr(cm, "__aexit__")):
            raise NxMeshError(
                f"nxmesh_lifespan returned {cm!r} ({type(cm).__module__}), which is not an "
                "async context manager; decorate the function with "
                "@contextlib.asynccontextmanager or return None"
            )
    return found


class _BoundedExit(AbstractAsyncContextManager[Any]):
    """A lifespan whose exit always runs, shielded from cancellation, within a time bound."""

    def __init__(self, cm: AbstractAsyncContextManager[Any], timeout: float) -> None:
        self.cm = cm
        self.timeout = timeout

    async def __aenter__(self) -> Any:
        return await self.cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        suppress = False
        with anyio.move_on_after(self.timeout, shield=True) as scope:
            suppress = bool(await self.cm.__aexit__(exc_type, exc, tb))
        if scope.cancelled_caught:
            log.warning("lifespan cleanup timed out", lifespan=repr(self.cm), timeout=self.timeout)
        # A lifespan may handle an application error, but swallowing a cancellation
        # would keep a cancelled task running.
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            return False
        return suppress
