"""The wall-clock phases of one `nitp train`, measured by the run itself and written into its summary.

- start-up: from the process start (of `nitp train` itself when it started the launcher) to the first step done,
  and its parts (`mark`): "imports" (the interpreter and the modules `nitp train` loads before it starts),
  "setup" (process group, data, checks, and the imports they need), "model" (the model built and
  initialised), "engine" (`deepspeed.initialize`: AutoEP's repack, ZeRO-3's optimizer), "resume" (the checkpoint
  loaded, if any) and "first_step" (the first step with its compilation);
- each checkpoint save: the seconds training waited for it (the checkpoint manager times them);
- the end: from the last step done to the summary: the final save, the final evaluation, closing the logs.
What follows the summary — leaving the process group, the interpreter's exit — is not in it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

START_ENV = "NITP_START_TIME"  # `nitp train` sets it for the launcher: the ranks count start-up from there


def process_start() -> float:
    """When this job started (time.time() scale): the earlier of this process's start and START_ENV."""
    import psutil

    own = psutil.Process().create_time()
    try:
        return min(own, float(os.environ.get(START_ENV, own)))
    except ValueError:
        return own


class Phases:
    def __init__(self, say: Callable[[str], None] | None = None,
                 wait: Callable[[], None] | None = None) -> None:
        """`say`, if given, is told each start-up part as it ends (`nitp train --debug`: where a slow start is);
        `wait`, if given, waits for the device's queued work, before the first step is marked done (the loop
        queues a step's work ahead of the device)."""
        self.say, self.wait = say, wait
        self.start = process_start()
        self.last_step: float | None = None
        self.marks: dict[str, float] = {}  # start-up part -> when it ended

    def mark(self, part: str, at: float | None = None) -> None:
        """The start-up part `part` ended now, or `at` (its time runs from the previous mark, or from the start)."""
        self.marks[part] = time.time() if at is None else at
        if self.say is not None:
            self.say(f"start-up: {part.replace('_', ' ')} done at {self.marks[part] - self.start:.1f} s")

    def step_done(self) -> None:
        if "first_step" not in self.marks:
            if self.wait is not None:
                self.wait()
            self.mark("first_step")
        self.last_step = time.time()

    def summary(self, saves: list[tuple[int, float]], final_save: float | None) -> dict[str, Any]:
        """{"startup_s", "startup_parts": {part: seconds}, "train_s", "checkpoint_saves": [{"step", "seconds"}],
        "final_save_s", "end_s", "total_s"}; the step times are None in a run that made no step (e.g. resumed at
        its last step)."""
        now = time.time()
        first, last = self.marks.get("first_step"), self.last_step
        parts, previous = {}, self.start
        for part, end in self.marks.items():
            parts[part], previous = end - previous, end
        return {"startup_s": None if first is None else first - self.start, "startup_parts": parts,
                "train_s": None if first is None else last - first,
                "checkpoint_saves": [{"step": step, "seconds": seconds} for step, seconds in saves],
                "final_save_s": final_save,
                "end_s": None if last is None else now - last,
                "total_s": now - self.start}


def describe(phases: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows for the console summary, short enough for an 80-column table."""
    rows = []
    if phases.get("startup_s") is not None:
        rows.append(("start-up", f"{phases['startup_s']:.1f} s to the first step"))
        parts = phases.get("startup_parts") or {}
        if parts:
            rows.append(("start-up parts", ", ".join(f"{part.replace('_', ' ')} {seconds:.1f} s"
                                                  for part, seconds in parts.items())))
    saves = [save["seconds"] for save in phases.get("checkpoint_saves", [])]
    if saves:
        rows.append(("checkpoint saves", f"{len(saves)}, at most {max(saves):.2f} s each"))
    if phases.get("end_s") is not None:
        final = phases.get("final_save_s")
        rows.append(("end", f"{phases['end_s']:.1f} s" + (f" (final save {final:.2f} s)" if final is not None else "")))
    rows.append(("total", f"{phases['total_s']:.1f} s"))
    return rows
