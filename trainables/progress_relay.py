"""The retrain's progress, from Ray Train's rank 0 to the driver's disk: both ends of one queue.

Rank 0 of a Ray Train run may train on any node, so it writes no file of the driver's. It puts its progress lines
and each epoch's metrics on a ``ray.util.queue.Queue`` (``sender``) whose actor sits on the driver's node; a
thread of the driver (``driver_progress``) drains it into ``progress.log`` and TensorBoard files on the driver's
own disk, as they arrive. Items on the queue:

- ``(PROGRESS_LINE, text)``: a progress line for the driver's log;
- ``(PROGRESS_SCALARS, epoch, {name: value})``: an epoch's metrics for TensorBoard.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.util.queue import Queue

PROGRESS_LINE = "line"
PROGRESS_SCALARS = "scalars"

Log = Callable[[str], None]
Send = Callable[[tuple[Any, ...]], None]


def sender(queue: Queue | None) -> Send | None:
    """Rank 0's way to the driver's progress queue; None without one. Progress is best effort: a queue that is
    gone (its driver died, and this worker group is about to be stopped too) never fails the training."""
    if queue is None:
        return None
    warned = []

    def send(item: tuple[Any, ...]) -> None:
        try:
            queue.put(item, timeout=10)
        except Exception as error:  # noqa: BLE001 - any Ray or queue error: drop the item, say so once
            if not warned:
                warned.append(True)
                print(f"pf-ray: progress for the driver dropped ({type(error).__name__}: {error})", flush=True)

    return send


@contextlib.contextmanager
def driver_progress(folder: Path, log: Log, interval: float = 0.5) -> Iterator[Queue]:
    """A queue for a Ray Train run's rank 0 to send its progress to this process (``TrainJob``'s ``progress``).

    While the block runs, a thread here drains it: progress lines go to ``log`` and to ``folder/progress.log``,
    each epoch's metrics to TensorBoard files in ``folder/tensorboard`` (as ``retrain/<metric>``). The queue's
    actor lives on this node and takes no CPU.
    """
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tensorboardX import SummaryWriter  # Ray Tune's own TensorBoard writer, installed with ray[tune]

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    folder.mkdir(parents=True, exist_ok=True)
    board = SummaryWriter(str(folder / "tensorboard"))
    done = threading.Event()

    def write(items: list[Any]) -> None:
        with open(folder / "progress.log", "a") as progress:
            for kind, *rest in items:
                if kind == PROGRESS_LINE:
                    progress.write(rest[0] + "\n")
                    log(rest[0])
                elif kind == PROGRESS_SCALARS:
                    epoch, metrics = rest
                    for key, value in metrics.items():
                        board.add_scalar(f"retrain/{key}", value, global_step=epoch)
        board.flush()

    def drain() -> None:
        while True:
            finished = done.is_set()
            try:
                size = queue.qsize()
                items = queue.get_nowait_batch(size) if size else []
            except Exception:  # noqa: BLE001 - the queue's actor is gone (Ray shutting down): nothing more comes
                return
            if items:
                write(items)
            if finished:
                return
            done.wait(interval)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join()
        board.close()
        with contextlib.suppress(Exception):
            queue.shutdown(force=True)  # drained above; a graceful stop would wait 5 s
