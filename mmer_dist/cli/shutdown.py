"""Stop the background threads a command leaves running, before the interpreter finalizes.

At interpreter exit, daemon threads that are still running are stopped abruptly; one that is
inside native code when that happens can abort the whole process ("terminate called without an
active exception", exit 134) after the command already printed its result. So the ``mmer``
entry point stops each such thread and waits for it: zarr's and fsspec's I/O event-loop
threads, tqdm's monitor thread, and Ray (when a command started it). The merge's prefetch and
write-behind pools (``merge/passes.py``) and the object-store lease thread are already joined
by the code that starts them.
"""

from __future__ import annotations

import sys

JOIN_SECONDS = 10.0


def _stop_loop(loop_holder: list, thread_holder: list | None) -> None:
    loop = loop_holder[0] if loop_holder else None
    thread = thread_holder[0] if thread_holder else None
    if loop is None or loop.is_closed():
        return
    loop.call_soon_threadsafe(loop.stop)
    if thread is not None:
        thread.join(JOIN_SECONDS)


def release_background_threads() -> None:
    zarr_sync = sys.modules.get("zarr.core.sync")
    if zarr_sync is not None:
        if zarr_sync._executor is not None:
            zarr_sync._executor.shutdown(wait=True, cancel_futures=True)
        _stop_loop(zarr_sync.loop, zarr_sync.iothread)
        zarr_sync.cleanup_resources()
    fsspec_asyn = sys.modules.get("fsspec.asyn")
    if fsspec_asyn is not None:
        _stop_loop(fsspec_asyn.loop, fsspec_asyn.iothread)
    tqdm_std = sys.modules.get("tqdm.std")
    if tqdm_std is not None and tqdm_std.tqdm.monitor is not None:
        tqdm_std.tqdm.monitor.exit()  # sets its stop event and joins it
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
