"""The stop button at a moment no test picked: in one JupyterLab-like kernel, on a cold cache, every
code cell that ran longer than 0.3 s in the cold run is stopped at a seeded random instant of the
first half of its duration (a stop as a cell ends: the last test). Each stop that lands ends the
cell with one line, and what that line says works (run the cell again; or restart the kernel and
Run All): the run then ends with the cold run's evaluation losses, generations and answers, and no
library module was imported for the first time after the imports cells (a stop there could cut it
in half)."""

import asyncio
import inspect
import json
import random
import shutil
import threading
import time

from conftest import (
    LiveKernel,
    code_cells,
    log_history,
    one_line_error,
    smoke,
    stage_dir,
)

SEED, LONGER_THAN = 36, 0.3  # seconds: a cell shorter than this is not stopped
MODULES_BEFORE = "import sys as _sys\n_modules_before = {id(m) for m in _sys.modules.values()}"
MODULES_AFTER = (  # modules first loaded since (a name given to a module loaded before is none)
    "import json as _json\nprint('NEW_MODULES=' + _json.dumps(sorted(name for name, m in "
    "_sys.modules.items() if id(m) not in _modules_before)))"
)


# The stop button pressed from inside the kernel (the same SIGINT the kernel manager sends), after
# a delay from the moment the cell's code starts, and only while it runs: IPython's pre_run_cell
# and post_run_cell events bound that (a press outside them would hit the kernel's own messaging,
# which no notebook can guard). _STOP["after"] is taken by the next cell that runs.
STOP_BUTTON = """
import os as _os, signal as _signal, threading as _threading, time as _time
_STOP = {"after": None, "running": None, "lock": _threading.Lock()}


def _cell_starts(info):
    after, _STOP["after"] = _STOP["after"], None
    with _STOP["lock"]:
        _STOP["running"] = cell = object()  # this cell, while it runs
    if after is not None:
        def press():
            _time.sleep(after)  # the random instant (it orders nothing: whatever it hits must work)
            with _STOP["lock"]:
                if _STOP["running"] is cell:  # still this cell's code: not the next cell's
                    _os.kill(_os.getpid(), _signal.SIGINT)
        _threading.Thread(target=press, daemon=True).start()


def _cell_ends(result):
    while True:
        try:
            with _STOP["lock"]:
                _STOP["running"] = None
            return
        except KeyboardInterrupt:  # pressed as the code ended: it stopped nothing
            pass


get_ipython().events.register("pre_run_cell", _cell_starts)
get_ipython().events.register("post_run_cell", _cell_ends)
"""


def stop_button_kernel() -> LiveKernel:
    kernel = LiveKernel()
    assert kernel.run_cells([STOP_BUTTON])["error"] is None
    return kernel


def test_a_stop_at_a_random_instant_of_every_cell_says_what_works_and_it_works(cold_run, tmp_path):
    workdir, cold = cold_run
    shutil.copytree(workdir / "data", tmp_path / "data")
    durations = {  # each code cell's time in the cold run (papermill's record)
        c.source: c.metadata.get("papermill", {}).get("duration") or 0.0
        for c in cold["nb"].cells
        if c.cell_type == "code"
    }
    sources = list(code_cells())
    early = next(i for i, s in enumerate(sources) if s.startswith("# Imports: what later cells"))
    parameters = "# Parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in smoke(tmp_path).items())
    cells = [
        sources[0],
        parameters,
        *sources[1 : early + 1],
        MODULES_BEFORE,
        *sources[early + 1 :],
        MODULES_AFTER,
    ]
    rng, kernel, stops, restarts = random.Random(SEED), stop_button_kernel(), [], 0
    try:
        for index, source in enumerate(cells):
            seconds = durations.get(source, 0.0)
            # within the first half of its cold-run time, so the stop lands while it runs (a cell
            # under load here may run faster than its cold run did; its end: the test below)
            stop_after = rng.uniform(0, seconds / 2) if seconds > LONGER_THAN else None
            result = kernel.run_cells([f"_STOP['after'] = {stop_after}", source])
            title = source.splitlines()[0]
            if result["error"] is None:
                continue
            message = one_line_error(result)  # only a stop ends a cell here: one line
            stops.append(f"{title[:60]} -> {message[:150]}")
            if "restart the kernel" in message:  # ... then Run All (up to this cell)
                kernel.close()
                kernel, restarts = stop_button_kernel(), restarts + 1
                for again in cells[: index + 1]:
                    assert kernel.run_cells([again])["error"] is None, again.splitlines()[0]
            else:  # "run it again", "run this cell again (or the notebook) to resume there"
                again = kernel.run_cells([source])
                assert again["error"] is None, (title, message, again["error"])
        new_modules = json.loads(result["text"].split("NEW_MODULES=")[1])
    finally:
        kernel.close()
    (tmp_path / "stops.txt").write_text("\n".join(stops) + f"\nrestarts: {restarts}\n")
    print(f"{len(stops)} stops landed, {restarts} restarts:", *stops, sep="\n  ")
    assert len(stops) >= 5, stops  # the draw stops most cells that run long
    assert new_modules == [], f"imported after the imports cells: {new_modules}"

    # what the uninterrupted cold run made: evaluation losses, generations, answers
    ours, theirs = tmp_path / "cache", workdir / "cache"
    for stage in ("pretrain", "sft_model"):
        losses = [
            [e["eval_loss"] for e in log_history(c, stage) if "eval_loss" in e]
            for c in (ours, theirs)
        ]
        assert losses[0] == losses[1], stage
    for stage, name in (("pretrain", "generations.json"), ("base_answers", "answers.json"),
                        ("sft_model", "answers.json")):  # fmt: skip
        made = [json.loads((stage_dir(c, stage) / name).read_text()) for c in (ours, theirs)]
        assert made[0] == made[1], stage


LATE_STOPS, LATE_SEED = 40, 43


def test_a_stop_as_a_cell_ends_is_said_and_the_cell_gets_its_reply(tmp_path):
    """The stop button pressed around the end of a cell's code (after it, or in its last moments),
    at seeded random instants: the cell always gets its reply (never busy until a restart) and
    says at most one line; the kernel runs the next cell."""
    kernel = LiveKernel()
    kernel.client.timeout = 30  # a cell that got no reply would wait forever
    hooks = [s for s in code_cells() if s.startswith(("# Imports: the standard", "# User errors"))]
    rng, said = random.Random(LATE_SEED), []
    try:
        assert kernel.run_cells(hooks)["error"] is None
        for i in range(LATE_STOPS):
            ready = tmp_path / f"ready-{i}"
            press = stop_button_after(kernel, ready, rng.uniform(0, 0.004))
            cell = f"_ = sum(range(20_000))\nopen({str(ready)!r}, 'w').close()"
            result = kernel.run_cells([cell])  # a cell without a reply: CellTimeoutError
            press.join()
            if result["error"]:
                said.append(one_line_error(result))
            elif result["text"].strip():
                said.append(result["text"].strip())
            assert kernel.run_cells(["print('next')"])["text"].strip() == "next"
    finally:
        kernel.close()
    late = [s for s in said if s.startswith("[stopped] as this cell finished")]
    assert late, f"no stop of {LATE_STOPS} landed after a cell's code: {said}"
    assert all("\n" not in s for s in said), said


def stop_button_after(kernel, ready, delay: float):
    """A thread that presses the stop button (the kernel manager's interrupt) `delay` seconds after
    the cell creates `ready` (the random instant samples the cell's end; it orders nothing)."""

    def press():
        while not ready.exists():
            time.sleep(0.0005)
        time.sleep(delay)
        pressed = kernel.client.km.interrupt_kernel()
        if inspect.isawaitable(pressed):
            asyncio.run(pressed)

    thread = threading.Thread(target=press, daemon=True)
    thread.start()
    return thread
