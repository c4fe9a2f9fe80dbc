"""The `oss-jax` CLI, paused at a known point until a signal arrives (run by the tests that interrupt a command, so
that they interrupt it there, not after a guessed delay that a loaded machine turns into a race).

    python tests/paused_cli.py MARKER POINT oss-jax-arguments...

POINT is `save` (a conversion's first Orbax partial save is on disk, not finalized), `step=N` (a training run has
logged step N) or `token=N` (a chat's first reply has streamed N tokens). There the command writes MARKER and sleeps;
the test then sends SIGINT, SIGTERM or SIGKILL. All else is the real command: `oss_jax.cli.main` in the main thread,
with its own signal handlers and clean-up.

Tests start it with `paused_command`, which returns once the command is paused there.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository (convert/ is not on the path here)
PAUSE_S = 600  # never interrupted: the command then runs on to the end, which the test's own checks reject


def pause(marker: Path) -> None:
    marker.write_text("paused\n")
    time.sleep(PAUSE_S)


def pause_after_first_save(marker: Path) -> None:
    """Pause once the converter has waited out its first partial save (the data is on disk, not yet finalized)."""
    from convert import streaming

    wait = streaming._GroupSaver._wait

    def paused_wait(self) -> None:
        saving = self.pending is not None
        wait(self)
        if saving and not marker.exists():
            pause(marker)

    streaming._GroupSaver._wait = paused_wait


def pause_after_step(marker: Path, step: int) -> None:
    """Pause a training run right after it logged `step` (through fit's own on_step hook)."""
    from oss_jax import finetune

    fit = finetune.fit

    def paused_fit(*args, **kwargs):
        def on_step(metrics: dict) -> None:
            if metrics["step"] == step:
                pause(marker)

        return fit(*args, on_step=on_step, **kwargs)

    finetune.fit = paused_fit


def pause_at_token(marker: Path, n: int) -> None:
    """Pause the first reply of `oss-jax chat` (a Session) once it has streamed `n` tokens."""
    from oss_jax import session

    generate = session.Session.generate

    def paused_generate(self, prompt, *, on_token=None, **kwargs):
        count = [0]

        def counting(ids, done):
            count[0] += 1
            if count[0] == n and not marker.exists():
                pause(marker)
            return None if on_token is None else on_token(ids, done)

        return generate(self, prompt, on_token=counting, **kwargs)

    session.Session.generate = paused_generate


@contextlib.contextmanager
def paused_command(workdir: Path, point: str, argv: list[str], env: dict | None = None,
                   ready: Callable[[], bool] = lambda: True, timeout: float = 300, stdin: str = ""
                   ) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Run the CLI with `argv` (and `stdin` as its input) paused at `point`; yield (the process, its output file) once
    it is paused there and `ready()` holds. Fails at once if the command exits first; `timeout` is a hang guard, not a
    timing. A process still running at exit is killed."""
    marker, log, given = workdir / "paused", workdir / "log", workdir / "stdin"
    given.write_text(stdin)
    with open(log, "w") as out, open(given) as inp:
        proc = subprocess.Popen([sys.executable, __file__, str(marker), point, *argv], env=env, stdin=inp, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not (marker.exists() and ready()):
            if proc.poll() is not None:
                raise AssertionError(f"exited with {proc.returncode} before its pause point ({point}):\n"
                                     f"{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not paused at {point} after {timeout} s:\n{log.read_text()}")
            time.sleep(0.05)
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main() -> int:
    marker, point, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if point == "save":
        pause_after_first_save(marker)
    elif point.startswith("token="):
        pause_at_token(marker, int(point.removeprefix("token=")))
    else:
        pause_after_step(marker, int(point.removeprefix("step=")))
    from oss_jax.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
