"""The real fabric: UCXX tag messages between UCX workers, endpoints from worker addresses.

Why these choices (measured on the 2-core dev machine, see shared/DESIGN.md):

- Endpoints come from worker addresses exchanged as bytes (through Ray), never from a
  listener: the ucxx listener binds every interface with no way to pick one, and the
  address path runs ~5.5 GB/s with ``sm``/``cma`` where listener+TCP runs ~0.6.
- UCX peer error handling is off by default: with it on, UCX refuses shared-memory
  endpoints ("Destination is unreachable") and falls back to TCP at ~0.6 GB/s. A dead
  peer is noticed by the protocol's heartbeat instead (``TransportConfig.timeout_s``).
  Aborting an endpoint does cancel its posted receives, which is what makes freeing the
  pages of a dead sender safe; it does not cancel sends to a dead receiver.
- UCX is initialised once per process, on the transport's own loop thread, with the
  config's transports passed as options (they win over the environment), and only
  when first used: never before a fork or an actor's creation.
"""

from __future__ import annotations

import logging
import os
import threading

from kv_store.config import TransportConfig
from kv_store.errors import (BadAddress, MessageTruncated, OperationCanceled,
                             TransportConfigError, TransportError)
from kv_store.loop_thread import EventLoopThread
from kv_store.transport_base import Buffer, Endpoint, Fabric

log = logging.getLogger(__name__)

_MIN_ADDRESS = 1 + 8 + 2  # header, worker uuid, at least one device entry

_fabric: "UcxFabric | None" = None
_fabric_lock = threading.Lock()


def ucx_fabric(config: TransportConfig) -> "UcxFabric":
    """This process's UCX worker, started on first use. One per process: UCXX keeps a
    single global context, so a second call must ask for the same UCX settings."""
    global _fabric
    with _fabric_lock:
        if _fabric is None:
            _fabric = UcxFabric(config)
        elif (_fabric.env != config.ucx_env()
              or _fabric.config.ucx_error_handling != config.ucx_error_handling):
            raise TransportConfigError(
                f"UCX already runs in this process with {_fabric.env} "
                f"(error_handling={_fabric.config.ucx_error_handling}); asked for {config.ucx_env()} "
                f"(error_handling={config.ucx_error_handling})")
        return _fabric


def _map_error(e: Exception) -> TransportError:
    import ucxx.exceptions as ux
    if isinstance(e, ux.UCXMessageTruncatedError):
        return MessageTruncated(str(e) or "message truncated")
    if isinstance(e, (ux.UCXCanceledError, ux.UCXCanceled, ux.UCXCloseError)):
        return OperationCanceled(str(e) or "canceled")
    return TransportError(f"{type(e).__name__}: {e}")


class UcxFabric(Fabric):
    def __init__(self, config: TransportConfig) -> None:
        self.config = config
        self.env = config.ucx_env()
        # Set before ucxx is imported, for UCX's own reads of the environment; the options
        # passed to init below are what actually decides.
        os.environ.update(self.env)
        self.loop = EventLoopThread("ucx-kv-transport")
        self._address = self.loop.run(self._init(), timeout_s=120)

    async def _init(self) -> bytes:
        import ucxx
        options = {"TLS": self.config.ucx_tls}
        if self.config.ucx_net_devices != "all":
            options["NET_DEVICES"] = self.config.ucx_net_devices
        try:
            ucxx.init(options=options, progress_mode="thread")
        except RuntimeError as e:
            raise TransportConfigError(f"UCX was initialised in this process by someone else: {e}") from e
        log.info("UCX %s worker up: TLS=%s NET_DEVICES=%s", ucxx.__ucx_version__,
                 self.config.ucx_tls, self.config.ucx_net_devices)
        return ucxx.get_worker_address().tobytes()

    def address(self) -> bytes:
        return self._address

    def check_address(self, address: bytes) -> None:
        # UCX parses a worker address without a length and asserts on what it does not expect
        # (a bad version aborts the process), so only a header like our own goes to it: the
        # address version and flags are the same for every worker of one UCX build and config.
        super().check_address(address)
        if len(address) < _MIN_ADDRESS or address[0] != self._address[0]:
            raise BadAddress(f"not a UCX worker address of this deployment's format ({len(address)} "
                             f"bytes, header {address[:1].hex() or 'none'}; ours {self._address[:1].hex()})")

    async def connect(self, address: bytes) -> "UcxEndpoint":
        import ucxx
        try:
            ep = await ucxx.create_endpoint_from_worker_address(
                ucxx.get_ucx_address_from_buffer(address),
                endpoint_error_handling=self.config.ucx_error_handling)
        except ucxx.exceptions.UCXError as e:
            raise _map_error(e) from e
        return UcxEndpoint(ep)

    async def recv_any(self, buf: Buffer, tag: int) -> None:
        import ucxx
        from ucxx.types import Tag
        try:
            await ucxx.recv(buf, Tag(tag))
        except ucxx.exceptions.UCXError as e:
            raise _map_error(e) from e


class UcxEndpoint(Endpoint):
    def __init__(self, ep) -> None:  # ucxx's Endpoint; untyped so ucxx is imported lazily
        self._ep = ep
        self._aborted = False

    async def send(self, buf: Buffer, tag: int) -> None:
        await self._tagged(self._ep.send, buf, tag)

    async def recv(self, buf: Buffer, tag: int) -> None:
        await self._tagged(self._ep.recv, buf, tag)

    async def _tagged(self, op, buf: Buffer, tag: int) -> None:
        import ucxx
        from ucxx.types import Tag
        if self._aborted:
            raise OperationCanceled("endpoint closed")
        try:
            await op(buf, tag=Tag(tag), force_tag=True)
        except ucxx.exceptions.UCXError as e:
            raise _map_error(e) from e

    def abort(self) -> None:
        if not self._aborted:
            self._aborted = True
            self._ep.abort()

    @property
    def closed(self) -> bool:
        return self._aborted or self._ep.closed
