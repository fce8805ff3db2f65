"""Step time on an idle and on a busy machine, with one BLAS thread and with OpenBLAS's own
threads, against GPflow in the same runs.

Usage::

    .venv-bench/bin/python benchmarks/threads.py --write       # the grid, into RESULTS.md
    .venv/bin/python benchmarks/threads.py --libs numpyro_svgp --n 10000 --m 64 --rounds 4

**What is measured.** The step of ``benchmarks/peers.py`` (one full-batch Adam step on the
negative ELBO, D = 8, the same data and start in every library), timed by the same worker
processes, in three settings:

- numpyro_svgp with its BLAS libraries held at one thread, as ``ns.train`` holds them while
  it trains (``blas_threads=1``, the default);
- numpyro_svgp with OpenBLAS's own threads (one per core; ``ns.train(..., blas_threads=None)``
  in a process started without ``OPENBLAS_NUM_THREADS``);
- GPflow with TensorFlow's default threads.

**Idle and loaded in the same run.** The driver starts one spinning Python process per core
(``--load``) and keeps them stopped (SIGSTOP). Each round times every setting twice: once
with the load stopped and once with it running (SIGCONT), the order of the two conditions
and of the settings rotated every round. So each cell's idle and loaded figures come from
the same processes, interleaved, and drift of the machine falls on both alike.

**Reading the table.** Per cell and setting: the medians over rounds of the time per step,
idle and loaded, and the slowdown (loaded over idle). *Cores* is the process's CPU time
(all its threads, including its own workers' spin-waiting) over its wall time per step: how
many cores the step keeps busy. The slowdown splits as

    slowdown = (cores idle / cores loaded) * (CPU per step loaded / CPU per step idle),

so where the CPU per step stays about the same, a step that keeps more cores busy when idle
loses more when those cores are taken: with one spinner per core, a process gets about half
the cores (one, on two cores). The last two columns divide the setting's median by the
better of numpyro_svgp's two settings in that condition: the default should be within 1.10
of the best in both, and its slowdown no worse than GPflow's.
"""

import argparse
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers  # noqa: E402  (the workers, the data and the machine's description)

OURS = peers.OURS
ONE = f"{OURS}, 1 BLAS thread (default)"
OWN = f"{OURS}, OpenBLAS's threads"
SETTINGS = {ONE: (OURS, "1"), OWN: (OURS, "none"), "gpflow": ("gpflow", "none")}
DEFAULT_CELLS = ((10_000, 64), (100_000, 64), (10_000, 256), (1_000, 1024))
BEGIN, END = "<!-- threads:begin -->", "<!-- threads:end -->"
HEADER = (
    "| dtype | N | M | setting | idle ms | loaded ms | slowdown | cores idle | cores loaded "
    "| idle / best ours | loaded / best ours |"
)
RULE = "|---|---|---|---|---|---|---|---|---|---|---|"


class Load:
    """``count`` spinning processes, stopped until ``on()``."""

    def __init__(self, count):
        spin = "while True: pass"
        self.processes = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
        self.off()

    def _signal(self, sig):
        for p in self.processes:
            p.send_signal(sig)

    def on(self):
        self._signal(signal.SIGCONT)
        time.sleep(0.2)  # let them take the cores before the timing starts

    def off(self):
        self._signal(signal.SIGSTOP)

    def close(self):
        for p in self.processes:
            p.kill()
            p.wait()


def run_cell(workers, load, dtype_name, n, m, args, tmp):
    import jax
    import step_time

    import numpyro_svgp as ns

    jax.config.update("jax_enable_x64", True)
    X, y, Z = (np.asarray(a) for a in step_time.data(n, m, dtype_name))
    check_mean, check_tril = peers.check_q(m, X.dtype)
    path = os.path.join(tmp, "cell.npz")
    np.savez(path, X=X, y=y, Z=Z, check_mean=check_mean, check_tril=check_tril)
    jitter = ns.default_jitter(X.dtype)
    cell = f"| {dtype_name} | {n} | {m} |"

    built, rows = {}, []
    for name, w in workers.items():
        reply = w.ask(cmd="build", data=path, jitter=jitter)
        if "error" in reply:
            rows.append(f"{cell} {name} | error: {reply['error']} | | | | | | |")
        elif reply["warm_seconds"] > args.max_seconds:
            rows.append(
                f"{cell} {name} | skipped ({reply['warm_seconds']:.1f} s per step) | | | | | | |"
            )
            w.ask(cmd="release")
        else:
            built[name] = reply
    names = list(built)
    k = {
        name: max(1, min(10_000, math.ceil(args.round_seconds / built[name]["warm_seconds"])))
        for name in names
    }
    times = {(name, c): [] for name in names for c in ("idle", "loaded")}
    cores = {(name, c): [] for name in names for c in ("idle", "loaded")}
    for round_ in range(args.rounds):
        conditions = ("idle", "loaded") if round_ % 2 == 0 else ("loaded", "idle")
        for condition in conditions:
            if condition == "loaded":
                load.on()
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                reply = workers[name].ask(cmd="time", k=k[name])
                seconds = reply.get("seconds", math.nan)
                times[name, condition].append(seconds)
                cores[name, condition].append(reply.get("cpu_seconds", math.nan) / seconds)
            load.off()
    for w in workers.values():
        w.ask(cmd="release")

    median = {key: float(np.median(v)) for key, v in times.items()}
    used = {key: float(np.median(v)) for key, v in cores.items()}
    best = {
        c: min(median[name, c] for name in (ONE, OWN) if name in built) for c in ("idle", "loaded")
    }
    for name in names:
        idle, loaded = median[name, "idle"], median[name, "loaded"]
        rows.append(
            f"{cell} {name} | {1e3 * idle:.3g} | {1e3 * loaded:.3g} | {loaded / idle:.2f} | "
            f"{used[name, 'idle']:.2f} | {used[name, 'loaded']:.2f} | "
            f"{idle / best['idle']:.2f} | {loaded / best['loaded']:.2f} |"
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", help="data sizes (with --m: all pairs)")
    parser.add_argument("--m", type=int, nargs="+", help="numbers of inducing points")
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--libs", nargs="+", default=[OURS, "gpflow"], choices=[OURS, "gpflow"])
    parser.add_argument("--load", type=int, default=os.cpu_count(), help="spinning processes")
    parser.add_argument("--max-seconds", type=float, default=3.0)
    parser.add_argument("--round-seconds", type=float, default=0.25)
    parser.add_argument("--python", default=sys.executable, help="the workers' interpreter")
    parser.add_argument("--write", action="store_true", help="rewrite the section in --results")
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args(argv)
    if args.n is None and args.m is None:
        grid = DEFAULT_CELLS
    else:
        grid = [
            (n, m)
            for n in args.n or sorted({n for n, _ in DEFAULT_CELLS})
            for m in args.m or sorted({m for _, m in DEFAULT_CELLS})
        ]

    chosen = {name: s for name, s in SETTINGS.items() if s[0] in args.libs}
    workers, versions, threads = {}, [], []
    for name, (lib, blas) in chosen.items():
        workers[name] = peers.Worker(lib, args.python, blas)
    load = None
    try:
        for name in list(workers):
            reply = workers[name].ask(cmd="hello")
            if "error" in reply:
                print(f"{name} left out: {reply['error']}", file=sys.stderr)
                workers.pop(name).close()
                continue
            versions.append(reply["versions"])
            threads.append(f"{name}: {reply['threads']}")
        if ONE not in workers:
            return 1
        load = Load(args.load)
        load_line = f"Load: {args.load} spinning Python processes, in the loaded rounds only."
        head = peers.run_head("threads.py", argv, versions, threads, load_line)
        print("\n".join(head) + "\n" + HEADER + "\n" + RULE, flush=True)
        table = []
        with tempfile.TemporaryDirectory() as tmp:
            for dtype_name in args.dtype:
                for n, m in grid:
                    rows = run_cell(workers, load, dtype_name, n, m, args, tmp)
                    print("\n".join(rows), flush=True)
                    table += rows
    finally:
        if load is not None:
            load.close()
        for w in workers.values():
            w.close()

    if args.write:
        peers.write_section(
            args.results,
            "## Idle and loaded, one BLAS thread or OpenBLAS's own (`benchmarks/threads.py`)",
            head,
            "Medians over rounds of the time per step; slowdown is loaded over idle; cores "
            "is the process's CPU time over its wall time; the last two columns divide by the "
            "better numpyro_svgp setting in that condition (see the module docstring).",
            table,
            [HEADER, RULE],
            BEGIN,
            END,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
