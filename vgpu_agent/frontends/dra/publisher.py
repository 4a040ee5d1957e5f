"""Keeping the node's ResourceSlice in the API server equal to the node model.

:class:`SlicePublisher` runs one thread that waits on the node (like a ListAndWatch stream)
and publishes the slice through a :class:`~vgpu_agent.frontends.dra.types.ResourceApi`:

- at start, and whenever the slice's content changes (health, reload), with the pool
  generation one higher, so the scheduler drops what it knew of the older one;
- again, unchanged, when asked (:meth:`SlicePublisher.republish`: the kubelet registered us,
  after its own restart it wiped the node's slices), then every ``FAST_RESYNC_S`` for
  ``FAST_RESYNC_FOR_S`` (a starting kubelet's wipe retries in the background and may land
  after our registration), and every ``resync_interval_s`` after that;
- a failed publish is retried with a doubling backoff;
- when the node is closed (the agent stops cleanly), it deletes the node's slices.

The generation is kept in the state directory, so an agent restart continues from it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from typing import Callable, Optional

from vgpu_agent.frontends.dra.cdi import write_atomically
from vgpu_agent.frontends.dra.types import DraApiError, NodeSlice, ResourceApi
from vgpu_agent.model.devices import Inventory
from vgpu_agent.model.node import Node

log = logging.getLogger(__name__)

GENERATION_FILE_NAME = "dra-slice-generation.json"
RETRY_INITIAL_S = 0.5
#: After a registration, the slice is published this often for a while (the client writes
#: nothing when the slice is there and unchanged).
FAST_RESYNC_S = 2.0
FAST_RESYNC_FOR_S = 60.0
RETRY_MAX_S = 30.0

#: (inventory, generation) -> the slice to publish
BuildSlice = Callable[[Inventory, int], NodeSlice]


class GenerationStore:
    """The last published pool generation, in a small JSON file in the state directory."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, GENERATION_FILE_NAME)

    def load(self) -> int:
        """The last generation recorded (0 when none)."""
        try:
            with open(self.path, encoding="utf-8") as stream:
                value = json.load(stream).get("generation", 0)
        except (OSError, ValueError, AttributeError):
            return 0
        return value if isinstance(value, int) and value >= 0 else 0

    def save(self, generation: int) -> None:
        """Record ``generation``; a failure is only logged (the next publish tries again)."""
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            write_atomically(self.path, json.dumps({"generation": generation}) + "\n", 0o600)
        except OSError as exc:
            log.warning("recording the DRA pool generation in %s: %s", self.path, exc)


def _content(node_slice: NodeSlice) -> NodeSlice:
    """The slice with the generation left out, to tell a real change from a republish."""
    return dataclasses.replace(node_slice, generation=0)


class SlicePublisher:
    """Publishes the node's slice on every change until the node closes; then deletes it."""

    def __init__(
        self,
        node: Node,
        api: ResourceApi,
        build: BuildSlice,
        *,
        driver: str,
        node_name: str,
        generations: GenerationStore,
        resync_interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
        fast_resync_s: float = FAST_RESYNC_S,
        fast_resync_for_s: float = FAST_RESYNC_FOR_S,
    ) -> None:
        self._node = node
        self._api = api
        self._build = build
        self._driver = driver
        self._node_name = node_name
        self._generations = generations
        self._resync_interval_s = resync_interval_s
        self._fast_resync_s = fast_resync_s
        self._fast_resync_for_s = fast_resync_for_s
        self._fast_until = 0.0
        self._clock = clock
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._lock = threading.Lock()
        self._republish_wanted = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._published: Optional[NodeSlice] = None
        self._generation = generations.load()
        self.publishes = 0
        self.deleted = threading.Event()

    @property
    def published(self) -> Optional[NodeSlice]:
        """The slice last published successfully."""
        with self._lock:
            return self._published

    def start(self) -> None:
        """Start the thread (once; later calls do nothing)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="vgpu-dra-slices", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        with self._lock:
            return self._thread is not None

    def republish(self) -> None:
        """Publish the slice again now, even if it did not change, and often for a while."""
        with self._lock:
            self._republish_wanted = True
            self._fast_until = self._clock() + self._fast_resync_for_s
        self._node.wake()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for the thread to end; it deletes the slices when the node was closed
        (a clean stop), else leaves them."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        self._node.wake()
        if thread is not None:
            thread.join(timeout_s)

    # -- the thread --------------------------------------------------------------------------

    def _should_wake(self) -> bool:
        with self._lock:
            return self._republish_wanted or self._stopping

    def _run(self) -> None:
        version, inventory = self._node.snapshot()
        retry_s = self._retry_initial_s
        due_at = 0.0  # publish at once
        while True:
            if self._node.closed:
                self._delete()
                return
            with self._lock:
                if self._stopping:
                    return
                if self._republish_wanted:
                    self._republish_wanted = False
                    due_at = 0.0
            now = self._clock()
            if now >= due_at:
                if self._publish(inventory):
                    retry_s = self._retry_initial_s
                    due_at = now + self._resync_s(now)
                else:
                    due_at = now + retry_s
                    retry_s = min(retry_s * 2, self._retry_max_s)
            wait_s = max(0.01, due_at - self._clock())
            new_version, inventory = self._node.wait_for_change(version, wait_s, self._should_wake)
            if new_version != version:
                version = new_version
                due_at = 0.0

    def _resync_s(self, now: float) -> float:
        with self._lock:
            fast = now < self._fast_until
        return (
            min(self._fast_resync_s, self._resync_interval_s) if fast else self._resync_interval_s
        )

    def _publish(self, inventory: Inventory) -> bool:
        with self._lock:
            previous = self._published
        try:
            # Building may ask the API server what it supports (DraApiError: retried).
            candidate = self._build(inventory, self._generation)
            changed = previous is None or _content(previous) != _content(candidate)
            generation = self._generation + 1 if changed else self._generation
            node_slice = self._build(inventory, generation) if changed else candidate
            self._api.publish_slice(node_slice)
        except DraApiError as exc:
            log.warning("publishing the node's ResourceSlice failed: %s; retrying", exc)
            return False
        except Exception:  # the thread must keep the slice published whatever happens
            log.exception("publishing the node's ResourceSlice failed inside vgpu-agent")
            return False
        if changed:
            self._generation = generation
            self._generations.save(generation)
        with self._lock:
            self._published = node_slice
            self.publishes += 1
        # A change is news; an unchanged resync is not.
        log.log(
            logging.INFO if changed else logging.DEBUG,
            "published ResourceSlice of %s on %s: %d devices, pool generation %d",
            self._driver,
            self._node_name,
            len(node_slice.devices),
            generation,
            extra={"fields": {"VGPU_EVENT": "dra-slice"}},
        )
        return True

    def _delete(self) -> None:
        try:
            self._api.delete_slices(self._driver, self._node_name)
        except Exception as exc:  # at shutdown: say so, there is no one to retry
            log.warning(
                "deleting the ResourceSlices of %s on %s failed: %s (the kubelet deletes them "
                "once the plugin is gone)",
                self._driver,
                self._node_name,
                exc,
            )
            return
        with self._lock:
            self._published = None
        self.deleted.set()
        log.info("deleted the ResourceSlices of %s on %s", self._driver, self._node_name)
