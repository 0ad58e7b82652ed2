"""Adapter versions: a run's published checkpoints (`checkpoints/step-N/`), each one version.

The learner publishes a checkpoint atomically (temp dir, fsync, rename), so a version on disk is
always complete. `Versions.refresh` (called by a watcher thread every `poll` seconds) loads the
newest one beside the one serving and then swaps a single reference; a request takes that
reference once, at its start (`current`), and uses it to its end, so no request fails or mixes
two versions. An admin pins an older version (`pin`, kept in `serve-pin.json` across restarts)
and unpins with ``latest``. A run with no checkpoint yet serves ``base``: the base model with a
fresh LoRA adapter (zero B, so exactly the base model).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from herllm import atomic

BASE_VERSION = "base"
LOAD_LOCK = threading.RLock()
"""Held while a model is built: transformers' `from_pretrained` patches process-wide state
(the meta-device init) and two loads in two threads can leave it patched for good."""
PIN_FILE = "serve-pin.json"
log = logging.getLogger("herllm.serve")


def load_version(run_dir: Path, step: int | None):
    """The run's model at checkpoint `step` (None: no checkpoint, the base model)."""
    from herllm.config import build_config
    from herllm.infer.adapted import AdaptedModel
    from herllm.models.load import attach_lora, load_base

    with LOAD_LOCK:
        if step is not None:
            return AdaptedModel.from_run(run_dir, step, knowledge=False)  # the server has its own
        cfg = build_config(str(run_dir / "config.yaml"), [])
        base, tokenizer = load_base(cfg.model)
        return AdaptedModel(attach_lora(base, cfg.lora), tokenizer, None)


class Versions:
    """Which version answers, and the loaded model of it (see module doc)."""

    def __init__(
        self, run_dir: str | Path, loader: Callable[[Path, int | None], object] = load_version
    ):
        self.run_dir = Path(run_dir)
        self.loader = loader
        self._lock = threading.Lock()  # one load at a time; `current` never waits on it
        self._serving: tuple[str, object] | None = None
        self._ident: tuple[int, int] | None = None
        self.swaps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what exists ---------------------------------------------------------------------
    def available(self) -> list[str]:
        """Versions on disk, oldest first (``base`` when there is no checkpoint)."""
        names = [p.name for _s, p in atomic.list_checkpoints(self.run_dir / "checkpoints")]
        return names or [BASE_VERSION]

    def pinned(self) -> str | None:
        path = self.run_dir / PIN_FILE
        return json.loads(path.read_text())["version"] if path.is_file() else None

    def wanted(self) -> str:
        pin = self.pinned()
        available = self.available()
        if pin is not None and pin in available:
            return pin
        return available[-1]

    # -- serving -------------------------------------------------------------------------
    def current(self) -> tuple[str, object]:
        """(version, model) to answer one request with; loads the first one if needed."""
        serving = self._serving
        if serving is None:
            self.refresh()
            serving = self._serving
        return serving

    def _identity(self, name: str) -> tuple[int, int] | None:
        """The checkpoint folder's inode and change time: a learner that resumes from an
        earlier checkpoint deletes the versions after it and may publish a folder of the same
        name with other weights, which must be loaded anew."""
        if name == BASE_VERSION:
            return None
        try:
            st = (self.run_dir / "checkpoints" / name).stat()
        except OSError:
            return None
        return st.st_ino, st.st_ctime_ns

    def refresh(self) -> bool:
        """Load the wanted version if it is not the one serving (by name and by folder); True
        when it swapped. At start, a version that cannot be loaded (being pruned or replaced
        by the learner right now) gives way to the next older one."""
        with self._lock:
            name = self.wanted()
            ident = self._identity(name)
            if self._serving is not None and self._serving[0] == name and self._ident == ident:
                return False
            candidates = [name]
            if self._serving is None:
                older = [v for v in self.available() if v != name]
                candidates += older[::-1]
            for i, cand in enumerate(candidates):
                step = None if cand == BASE_VERSION else int(cand.removeprefix(atomic.PREFIX))
                ident = self._identity(cand)
                try:
                    model = self.loader(self.run_dir, step)
                    break
                except Exception as exc:  # e.g. pruned by the learner while it was being read
                    if self._serving is None and i + 1 < len(candidates):
                        log.warning("version %s could not be loaded (%s); trying %s", cand,
                                    exc, candidates[i + 1])  # fmt: skip
                        continue
                    if self._serving is None:
                        raise
                    log.warning("version %s could not be loaded (%s); still serving %s", cand,
                                exc, self._serving[0])  # fmt: skip
                    return False
            if self._serving is not None and self._serving[0] == cand:
                log.warning("version %s was replaced on disk (a learner resumed from an earlier "
                            "checkpoint); serving the new one", cand)  # fmt: skip
            self._serving, self._ident = (cand, model), ident  # a request sees old or new, whole
            self.swaps += 1
            log.info("serving adapter version %s", cand)
            return True

    def pin(self, version: str) -> str:
        """Serve `version` from now on (``latest``: follow the newest again)."""
        path = self.run_dir / PIN_FILE
        if version == "latest":
            path.unlink(missing_ok=True)
        else:
            if version not in self.available():
                raise KeyError(version)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": version}))
            tmp.replace(path)
        self.refresh()
        return self._serving[0]

    def watch(self, poll: float = 0.5) -> None:
        """Refresh every `poll` seconds in a daemon thread until `stop`."""

        def loop():
            while not self._stop.wait(poll):
                try:
                    self.refresh()
                except Exception:  # noqa: BLE001 - the watcher must survive a bad checkpoint
                    log.exception("refreshing the adapter version failed")

        self._thread = threading.Thread(target=loop, name="herllm-versions", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
