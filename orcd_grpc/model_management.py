"""The scheduler's model management: which model it serves, loading one beside it, swapping it
in and retiring the old one, and unloading. A part of `Scheduler` (its base class), split out
for size: every method here runs on the scheduler's state and posts engine work as commands
(`Scheduler._run_command`), so loads and unloads happen between the engine thread's steps.
"""
from __future__ import annotations

import time

from . import lifecycle, logs
from .draft_model import load_draft
from .errors import NotFound
from .request import MODEL_SWAPPED, MODEL_UNLOADED, Unavailable

log = logs.get_logger("orcd.scheduler")


def default_loader(path, **kwargs):
    from .loader import load_engine

    return load_engine(path, **kwargs)


class ModelManagement:
    @property
    def engine(self):
        return self._engine

    @property
    def model_info(self):
        e = self._engine
        return e.info if e is not None else None

    def load(self, path, *, model_id: str | None = None, context_length: int = 0, max_context: int = 0,
             backend: str = "auto", max_vram: int = 0, max_ram: int = 0, progress=None, draft_path=None,
             kv_cache_type: str = ""):
        """Loads a model beside the served one and swaps it in; the old one serves meanwhile.

        A failed load raises and leaves the old model in place; so does a model whose test step
        (engine.check_finite, on the engine thread, just before the swap) fails.
        """
        with self._load_lock:
            if not self._accepting:
                raise Unavailable("the worker is shutting down")
            t0 = time.monotonic()
            extra = {"max_context": max_context} if max_context else {}
            if kv_cache_type:
                extra["kv_cache_type"] = kv_cache_type
            held = [self._engine, *self.retiring]
            # The new model loads beside the loaded ones, and each limit caps the worker, not each
            # model: what they hold on its memory is not the newcomer's to take (without
            # --max-ram the limit is the machine's available memory, already short of it).
            max_vram = lifecycle.left_beside(held, "cuda", max_vram, "--max-vram", "max_vram")
            max_ram = lifecycle.left_beside(held, "cpu", max_ram, "--max-ram", "max_ram")
            try:
                engine = self._loader(path, model_id=model_id, backend=backend, context_length=context_length,
                                      max_sequences=self.max_sequences, max_vram=max_vram, max_ram=max_ram,
                                      progress=progress, **extra)
            except BaseException as exc:
                lifecycle.drop_frames(exc)
                raise
            if draft_path:
                try:
                    load_draft(self._loader, engine, draft_path, backend=backend, max_sequences=self.max_sequences,
                               max_vram=max_vram, max_ram=max_ram, **extra)
                except BaseException as exc:
                    engine.close()
                    engine = None
                    lifecycle.drop_frames(exc)
                    raise
            try:
                self._run_command(lambda: self._check_and_swap(engine))
            except BaseException as exc:
                engine.close()
                engine = None  # the closure above holds it too: nothing may keep the failed model alive
                lifecycle.drop_frames(exc)
                raise
            log.info("model loaded", extra={"fields": {
                "model_id": engine.info.model_id, "path": str(engine.info.path),
                "backend": engine.info.backend, "seconds": round(time.monotonic() - t0, 3)}})
            return engine.info

    def plan_load(self, path, **kwargs):
        """LoadModel's dry run (load_plan.plan) beside the loaded models; loads nothing."""
        from .load_plan import plan

        with self._load_lock:  # the models held are those a load now would see
            return plan([self._engine, *self.retiring], path, max_sequences=self.max_sequences, **kwargs)

    def unload(self, model_id: str) -> None:
        def _do():
            e = self._engine
            served = e is not None and model_id in ("", e.info.model_id)
            retired = self.retiring.named(model_id)  # a swap's old model still finishing requests
            if not served and not retired:
                raise NotFound(f"no model {model_id!r} is loaded", field="model_id")
            for old in retired:  # the swap's second half: their model was replaced
                self._cancel_all(MODEL_SWAPPED, f"model {model_id} was replaced and is unloaded", old)
            if served:
                self._cancel_all(MODEL_UNLOADED, f"model {e.info.model_id} unloaded", e)
                self._engine = None
                self._closed_engine(e)
                self._model_changed(None)
            self._close_retired()
        self._run_command(_do)
        log.info("model unloaded", extra={"fields": {"model_id": model_id}})

    def _check_and_swap(self, engine) -> None:
        # On the engine thread, between the old model's steps: the test step then runs on the
        # thread (and device state) that every later step of the engine runs on, and never
        # beside a step of the served model.
        engine.check_finite()
        self._swap(engine)

    def _swap(self, engine) -> None:
        engine.speculation = self.speculation
        old, self._engine = self._engine, engine
        if old is not None:
            # Its requests were tokenized for it: they finish on it, and it is freed after them.
            self.retiring.add(old)
        self._model_changed(engine.info)

    def _closed_engine(self, e) -> None:
        e.close()
        if self.on_engine_closed is not None:
            self.on_engine_closed(e)

    def _close_retired(self, force: bool = False) -> None:
        with self._cv:
            live = {id(r.engine) for r in list(self._waiting) + list(self._running)}
        for e in self.retiring.close_idle(live, force):
            if self.on_engine_closed is not None:
                self.on_engine_closed(e)
        keep = [self._engine, *self.retiring]
        self._overlaps = {k: o for k, o in self._overlaps.items() if any(o.engine is e for e in keep)}

    def _model_changed(self, info) -> None:
        if self.metrics is not None:
            self.metrics.set_model(info)
        if self._on_model_change is not None:
            try:
                self._on_model_change(info)
            except Exception:
                log.exception("model change callback failed")
