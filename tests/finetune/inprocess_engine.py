"""The co-serving engine side without vLLM: the scheduler's planner and the worker's trainer in
one thread, stepping as an idle engine would (tests of the jobs' engine driver)."""

from __future__ import annotations

import threading
import time

from vllm_slora.finetune.base_weights import base_weights_from_checkpoint
from vllm_slora.finetune.coserve_planner import TrainingPlanner
from vllm_slora.finetune.coserve_worker import WorkerTraining
from vllm_slora.step_plan import SLoRAWorkerReport


class EngineGone(RuntimeError):
    pass


class InProcessEngine:
    def __init__(self, model_dir, crash_after_publish: int | None = None, on_crash=None,
                 crash_on: str = "checkpointed", freeze: bool = False, step_gap_s: float = 0.0,
                 max_jobs: int = 2) -> None:
        # crash_after_publish: the engine dies right after a job's `crash_on` event ("checkpointed":
        # its optimizer state is on disk; "published": its version only) of that step (restart tests).
        # freeze: it only stops stepping there and still answers calls until stop().
        self.crash_after_publish, self.on_crash, self.crash_on = crash_after_publish, on_crash, crash_on
        self.freeze = freeze
        self.step_gap_s = step_gap_s  # a wait between steps (as inference would take): slower jobs
        self.planner = TrainingPlanner(slack=0.1, idle_step_s=0.02, max_jobs=max_jobs)
        self.worker = WorkerTraining(None, base_model=str(model_dir), base=base_weights_from_checkpoint(model_dir))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    async def call(self, action: str, payload: dict) -> dict:
        if self._stop.is_set():
            raise EngineGone("the engine is gone")
        with self._lock:
            return self.planner.handle(action, payload)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                order = self.planner.order(running=0, waiting=0, scheduled_tokens=0)
                if order is not None:
                    spent, units = self.worker.step(order)
                    events = self.worker.take_events()
                    self.planner.take(SLoRAWorkerReport(
                        training=events, train_seconds=spent, train_units=units,
                        next_unit_seconds=self.worker.next_unit_seconds()))
                    if self.crash_after_publish is not None and any(
                            e.kind == self.crash_on and e.step >= self.crash_after_publish for e in events):
                        if not self.freeze:
                            self._stop.set()
                        if self.on_crash is not None:
                            self.on_crash()
                        return
            if order is None:
                time.sleep(0.005)
            elif self.step_gap_s:
                time.sleep(self.step_gap_s)

    def between_steps(self):
        """Hold the engine between two steps (a `with` block): the planner's and the worker's
        views agree inside."""
        return self._lock

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def wait_stopped(self, timeout: float = 60.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the engine did not stop"
