"""In-task checkpoints: resume a task at the update it was interrupted at, bit for bit.

Every `training.checkpoint_every` updates the in-flight task's state is saved under
checkpoints/<task>/update-<u>/ (u = updates done):
- DeepSpeed's engine checkpoint of the trainable parameters only (the current adapter; the frozen
  base and earlier adapters are reloaded from the model and adapters/), the optimizer state (each
  ZeRO rank its partition) and the lr scheduler;
- method_rank<r>.pt: the flatness method's own state on rank r (e.g. RWP's Fisher EMA, which is
  per rank);
- state.json: the updates done, the updates skipped as non-finite so far, and the world size.
Nothing else is needed: data order, noise and dropout are keyed by (seed, task, update), never
carried in a generator. Atomic: all ranks write into a hidden `.tmp-update-<u>` folder, then rank
0 renames it; a kill at any moment leaves either the complete folder or a temp folder that resume
ignores and removes. Older checkpoints are removed after the new one is in place, and the task's
whole folder once its matrix row is written.
A complete folder that does not read back (state.json garbled or short of a key, a state file truncated or
missing) is skipped with one notice: resume falls back to the previous complete checkpoint, which, as only
the newest is kept, means the task's start.
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cl_flat import dist
from cl_flat.errors import UserError
from cl_flat.files import atomic_write_text, writing

PREFIX = "update-"
TEMP = ".tmp-"
STATE_KEYS = ("updates", "skipped", "world_size")


def unreadable(path: Path) -> str | None:
    """What keeps the checkpoint folder `path` from loading, or None. Each .pt file (torch's zip format) must
    open as a zip: a truncated one has lost its central directory, at the end."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"state.json: {exc.strerror if isinstance(exc, OSError) else exc}"
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or type(state.get(k)) is not int]
    if missing:
        return f"state.json has no integer {', '.join(missing)}"
    if f"{PREFIX}{state['updates']:07d}" != path.name:
        return f"state.json says updates = {state['updates']}"
    needed = [f"method_rank{r}.pt" for r in range(state["world_size"])]
    absent = [n for n in needed if not (path / n).is_file()]
    if not any(path.glob("*model_states.pt")):
        absent.insert(0, "the model states file")
    if absent:
        return f"{', '.join(absent)} missing"
    for file in sorted(path.glob("*.pt")):
        try:
            with zipfile.ZipFile(file):
                pass
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{file.name}: {exc}"
    return None


@dataclass(frozen=True)
class TaskCheckpoints:
    """The checkpoints of one task: `folder` (checkpoints/<task>/), written every `every` updates (0 = never)."""

    folder: Path
    every: int

    def due(self, updates_done: int, total: int) -> bool:
        """Checkpoint after `updates_done` updates? (never after the last: the adapter is saved then)."""
        return self.every > 0 and updates_done % self.every == 0 and updates_done < total

    def latest(self) -> int:
        """Updates done by the newest complete checkpoint that reads back (0: none)."""
        return self._choose()[0]

    def _choose(self) -> tuple[int, list[str]]:
        """The newest complete checkpoint that reads back (0: none) and a notice per newer one skipped."""
        if not self.folder.is_dir():
            return 0, []
        done = sorted((int(p.name[len(PREFIX):]) for p in self.folder.iterdir()
                       if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()), reverse=True)
        skipped = []
        for updates in done:
            problem = unreadable(self._path(updates))
            if problem is None:
                break
            skipped.append((self._path(updates), problem))
        else:
            updates = 0
        target = self._path(updates).name if updates else "the task's start"
        return updates, [f"note: checkpoint {path} is unreadable ({problem}); resuming from {target}"
                         for path, problem in skipped]

    def _path(self, updates_done: int) -> Path:
        return self.folder / f"{PREFIX}{updates_done:07d}"

    def save(self, engine, method, updates_done: int, skipped: int) -> None:
        """Collective: every rank calls it after the update's `engine.step()`."""
        tag = f"{TEMP}{PREFIX}{updates_done:07d}"
        temp = self.folder / tag
        if dist.is_main():
            shutil.rmtree(temp, ignore_errors=True)
            self.folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        # DeepSpeed's exclude_frozen_parameters misses a frozen weight tied under a second name (the
        # output head tied to the embedding: 28M parameters in SmolLM2): keep trainable keys only
        trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        full_state = engine.module_state_dict
        engine.module_state_dict = lambda **kw: {k: v for k, v in full_state(**kw).items() if k in trainable}
        try:
            with writing(temp):  # a full disk: the newest complete checkpoint before this one is kept
                engine.save_checkpoint(str(self.folder), tag=tag, save_latest=False, exclude_frozen_parameters=True)
                torch.save(method.state_dict(), temp / f"method_rank{dist.rank()}.pt")
        finally:
            del engine.module_state_dict
        dist.barrier()
        if dist.is_main():
            atomic_write_text(temp / "state.json", json.dumps({"updates": updates_done, "skipped": skipped,
                                                               "world_size": dist.world_size()}) + "\n")
            final = self._path(updates_done)
            shutil.rmtree(final, ignore_errors=True)  # only an unreadable one, skipped by the resume, is there
            temp.rename(final)
            for old in self.folder.iterdir():
                if old != final:
                    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        dist.barrier()

    def load(self, engine, method) -> tuple[int, int]:
        """Restore the newest complete checkpoint into `engine` and `method`: (updates done, updates
        skipped), (0, 0) if there is none."""
        done = None
        if dist.is_main():  # every rank takes rank 0's choice
            done, notices = self._choose()
            for notice in notices:
                print(notice, file=sys.stderr, flush=True)
        done = dist.broadcast_object(done)
        if not done:
            return 0, 0
        path = self._path(done)
        state = json.loads((path / "state.json").read_text())
        saved_world = state["world_size"]
        if saved_world != dist.world_size():
            raise UserError(f"{path}: saved by {saved_world} processes, resumed with {dist.world_size()}; "
                            "resume with the same number of processes (or delete the folder to restart the task)")
        engine.load_checkpoint(str(self.folder), tag=path.name, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
        method.load_state_dict(torch.load(path / f"method_rank{dist.rank()}.pt", map_location=engine.device,
                                          weights_only=True))
        return done, state["skipped"]

    def remove(self) -> None:
        """Rank 0: the task is complete (adapter saved, row written)."""
        if dist.is_main():
            shutil.rmtree(self.folder, ignore_errors=True)
