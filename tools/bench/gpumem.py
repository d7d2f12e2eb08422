"""Peak GPU memory of child processes, for the benchmarks that compare `pnd` with PyTorch.

`pnd` has no allocator counter that a parent can read, so both sides are measured the same way
from outside: the device's used memory (NVML through `pynvml`, else `nvidia-smi`), sampled every
20 ms while a child runs; a child's peak is the highest sample of its run (or of a window the child
reports, see `peak`) minus the level before it started. That includes the CUDA context and the
libraries' workspaces (cuBLAS, cuDNN), on both sides alike; the PyTorch children also report
`torch.cuda.max_memory_allocated` (tensors only). Without a GPU (the CPU rehearsal) there are no
samples and every GPU figure is None; the host's peak resident memory (the child's own
`ru_maxrss`, from `os.wait4`) is reported on every machine.

`run(cmd, timeout)` runs one child under its own timeout (its whole process group is killed at the
limit) and returns what it printed, its exit status, wall time and peaks. `PND_CHECK_DEADLINE`
(UNIX seconds, set by `tools/gpu-check.sh` per step) shortens every timeout to end by then, and a
SIGTERM to this process kills the running child's group first, so a step cut short by the check's
own `timeout` leaves no process behind on the GPU.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

MIB = 1024 * 1024
_children: set[int] = set()


def _terminate(signum, frame):
    for pgid in list(_children):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, _terminate)


class GpuSampler:
    """Samples the used memory of GPU `index` in a background thread until `stop()`."""

    def __init__(self, index: int = 0, period: float = 0.02):
        self.index, self.period = index, period
        self.samples: list[tuple[float, int]] = []
        self.source = None
        self._stop = threading.Event()
        self._thread = None
        self._read = self._open()

    def _open(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            self.source = "nvml"
            return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:
            pass
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        query = [smi, f"--id={self.index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        try:
            subprocess.run(query, check=True, capture_output=True, timeout=10)
        except Exception:
            return None
        self.source = "nvidia-smi"
        # One process per sample is slow (~20 ms); the thread samples as fast as it answers.
        return lambda: int(subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.split()[0]) * MIB

    @property
    def available(self) -> bool:
        return self._read is not None

    def _loop(self):
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self._read()))
            except Exception:
                pass
            self._stop.wait(self.period)

    def start(self):
        if self._read is not None and self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def level(self) -> int | None:
        """The used memory now (a fresh reading)."""
        if self._read is None:
            return None
        try:
            return self._read()
        except Exception:
            return None

    def peak(self, t0: float, t1: float) -> int | None:
        """The highest sample taken in [t0, t1] (None without samples there)."""
        xs = [u for t, u in self.samples if t0 <= t <= t1]
        return max(xs) if xs else None


def mib(x):
    return None if x is None else round(x / MIB, 1)


def _tee(stream, into: list):
    """Copies a child's stderr to ours line by line and keeps it."""
    for line in iter(stream.readline, b""):
        into.append(line)
        sys.stderr.buffer.write(line)
        sys.stderr.flush()


def run(cmd, timeout: float, sampler: GpuSampler | None = None, env=None, cwd=None) -> dict:
    """Runs `cmd` under `timeout` seconds (its stderr is copied to ours as it comes); returns its
    stdout and stderr, exit status (`timed_out` when killed at the limit), wall time, host peak RSS
    and GPU peak above the level before it started."""
    base = sampler.level() if sampler else None
    start = time.time()
    deadline = os.environ.get("PND_CHECK_DEADLINE")
    if deadline:
        timeout = max(1.0, min(timeout, float(deadline) - start))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
                            start_new_session=True)
    _children.add(proc.pid)
    out, err = [], []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    err_reader = threading.Thread(target=_tee, args=(proc.stderr, err), daemon=True)
    err_reader.start()
    timed_out, status, usage = False, None, None
    while True:
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status, usage = st, ru
            break
        if time.time() - start > timeout:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    _children.discard(proc.pid)
    proc.returncode = os.waitstatus_to_exitcode(status)
    end = time.time()
    reader.join(timeout=5)
    err_reader.join(timeout=5)
    gpu = sampler.peak(start, end) if sampler else None
    return {
        "rc": proc.returncode,
        "timed_out": timed_out,
        "timeout_s": round(timeout, 1),
        "wall_s": round(end - start, 3),
        "t0": start,
        "t1": end,
        "stdout": (out[0] if out else b"").decode(errors="replace"),
        "stderr": b"".join(err).decode(errors="replace"),
        "host_peak_mib": round(usage.ru_maxrss / 1024, 1) if usage else None,
        "gpu_base": base,
        "gpu_peak_mib": mib(gpu - base) if gpu is not None and base is not None else None,
    }


def window_peak_mib(sampler: GpuSampler | None, base, t0: float, t1: float):
    """The GPU peak in a window a child reported, above `base` (its parent's level before it)."""
    if sampler is None or base is None:
        return None
    p = sampler.peak(t0, t1)
    return mib(p - base) if p is not None else None


def main(argv):
    """`gpumem.py --json FILE -- CMD...`: runs CMD (its stdout and stderr pass through) with the
    GPU sampled, writes its wall time and peaks to FILE, and exits with its status."""
    if len(argv) < 4 or argv[0] != "--json" or argv[2] != "--":
        sys.exit("usage: gpumem.py --json FILE -- CMD...")
    sampler = GpuSampler().start()
    res = run(argv[3:], float(os.environ.get("PND_CHECK_TIMEOUT", "86400")), sampler)
    sampler.stop()
    sys.stdout.write(res["stdout"])
    sys.stdout.flush()
    keep = ("rc", "timed_out", "wall_s", "host_peak_mib", "gpu_peak_mib")
    with open(argv[1], "w") as f:
        json.dump({k: res[k] for k in keep} | {"gpu_memory": sampler.source}, f)
    sys.exit(124 if res["timed_out"] else (res["rc"] if res["rc"] >= 0 else 128 - res["rc"]))


if __name__ == "__main__":
    main(sys.argv[1:])
