"""Driver side of the process isolation: hands point specs to worker processes and gets results.

ForkServer keeps one ``python -m dmlkern.bench.worker --serve`` alive and asks it to fork a
child per point; SpawnRunner starts a fresh interpreter per point (slower: ~4 s of imports each).
Both enforce a hard wall-clock limit per point and turn crashes/kills into a status.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile

from .worker import _collect

SERVER_START_TIMEOUT = 300  # s: the server imports torch, dmlkern, PML (+ triton)


def worker_env() -> dict:
    env = dict(os.environ)
    # Freed blocks >= 128 KiB go back to the OS at once (no dynamic mmap threshold), so the peak
    # RSS of a timed call is not hidden by memory an earlier call left in malloc's heap.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.pop("DMLKERN_BACKEND", None)  # each point sets it for its provider
    # torch.cuda.is_available() without cuInit: a CUDA driver initialised before fork() is unusable
    # in the children (the fork server never calls it, but keep it safe).
    env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class RunnerError(RuntimeError):
    pass


class ForkUnsafe(RunnerError):
    """Forked children cannot use CUDA here: use SpawnRunner."""


# Messages of a CUDA driver that was initialised before fork() (the driver then switches to spawn).
FORK_CUDA_ERRORS = ("forked subprocess", "initialization error", "cuda driver initialization failed")


def fork_broke_cuda(result) -> bool:
    note = (result.get("note") or "").lower()
    return result.get("status") == "error" and any(s in note for s in FORK_CUDA_ERRORS)


class _Base:
    def __init__(self, log_path, python=None):
        self.python = python or sys.executable
        self.log_path = log_path
        self.tmpdir = tempfile.mkdtemp(prefix="dmlkern-bench-")
        self._count = 0

    def _result_path(self):
        self._count += 1
        return os.path.join(self.tmpdir, f"r{self._count}.json")

    def close(self):
        try:
            for f in os.listdir(self.tmpdir):
                os.remove(os.path.join(self.tmpdir, f))
            os.rmdir(self.tmpdir)
        except OSError:
            pass


class ForkServer(_Base):
    def __init__(self, log_path, python=None):
        super().__init__(log_path, python)
        self.proc = None
        self.log = open(log_path, "a")

    def _start(self):
        self.proc = subprocess.Popen(
            [self.python, "-m", "dmlkern.bench.worker", "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=worker_env(),
            text=True, bufsize=1,
        )
        ready = self._readline(SERVER_START_TIMEOUT)
        if not ready or not json.loads(ready).get("ready"):
            self._stop()
            raise RunnerError(f"the worker server did not start (see {self.log_path})")
        if json.loads(ready).get("cuda_initialized"):
            self._stop()
            raise ForkUnsafe("CUDA was initialised while importing; forked points could not use it")

    def _readline(self, timeout):
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                return None
        finally:
            sel.close()
        return self.proc.stdout.readline()

    def _stop(self):
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                try:  # idle: it reads "quit"; busy (interrupted sweep): SIGTERM kills its point first
                    self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    self.proc.stdin.flush()
                    self.proc.wait(timeout=2)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.terminate()
                    try:
                        self.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
        finally:
            self.proc = None

    def _request(self, req, hard_limit):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        req = dict(req, result=self._result_path(), hard_limit=hard_limit)
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except OSError:
            self._stop()
            return {"status": "error", "note": "the worker server died"}
        line = self._readline(hard_limit + 60)
        if not line:  # the server died (e.g. the OOM killer chose it) or hangs: restart next time
            if self.proc.poll() is None:
                self.proc.kill()
            code = self.proc.wait()
            self.proc = None
            if code == -signal.SIGKILL:
                return {"status": "oom", "note": "the worker server was killed by SIGKILL (out of memory?)"}
            return {"status": "error", "note": f"the worker server stopped (exit {code})"}
        return json.loads(line)

    def run(self, spec, hard_limit):
        return self._request({"op": "run", "spec": spec}, hard_limit)

    def info(self):
        res = self._request({"op": "info"}, 120)
        if "status" in res and "torch" not in res:
            raise RunnerError(f"machine info failed: {res.get('note')}")
        return res

    def close(self):
        self._stop()
        self.log.close()
        super().close()


class SpawnRunner(_Base):
    IMPORT_SLACK = 60  # s on top of each point's limit: a fresh interpreter imports torch first

    def _spawn(self, args, hard_limit):
        path = self._result_path()
        if os.path.exists(path):
            os.remove(path)
        with open(self.log_path, "a") as log:
            proc = subprocess.Popen([self.python, "-m", "dmlkern.bench.worker", *args, "--result", path],
                                    stdout=log, stderr=log, env=worker_env(), start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=hard_limit + self.IMPORT_SLACK)
            except subprocess.TimeoutExpired:
                timed_out = True
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the point, or helpers it left behind
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        code = proc.returncode
        status = (-code) if code < 0 else (code << 8)  # as os.waitpid encodes it
        return _collect(path, status, timed_out, hard_limit)

    def run(self, spec, hard_limit):
        return self._spawn(["--point", json.dumps(spec)], hard_limit)

    def info(self):
        res = self._spawn(["--info"], 120)
        if "status" in res and "torch" not in res:
            raise RunnerError(f"machine info failed: {res.get('note')}")
        return res


class Runner:
    """The runner the sweep uses: a ForkServer (or SpawnRunner for --isolation spawn) that falls
    back to SpawnRunner if forked children cannot use CUDA."""

    def __init__(self, kind, log_path):
        self.kind = kind
        self.log_path = log_path
        self.impl = SpawnRunner(log_path) if kind == "spawn" else ForkServer(log_path)

    def _to_spawn(self, why):
        sys.stderr.write(f"dmlkern.bench: {why}; running each point in a fresh interpreter instead\n")
        self.impl.close()
        self.kind = "spawn"
        self.impl = SpawnRunner(self.log_path)

    def info(self):
        try:
            return self.impl.info()
        except ForkUnsafe as exc:
            self._to_spawn(str(exc))
            return self.impl.info()

    def run(self, spec, hard_limit):
        try:
            res = self.impl.run(spec, hard_limit)
        except ForkUnsafe as exc:
            self._to_spawn(str(exc))
            return self.impl.run(spec, hard_limit)
        if self.kind == "fork" and spec.get("device") == "cuda" and fork_broke_cuda(res):
            self._to_spawn(f"a forked point could not use CUDA ({res.get('note', '')[:120]})")
            res = self.impl.run(spec, hard_limit)
        return res

    def close(self):
        self.impl.close()


def make_runner(kind, log_path):
    return Runner(kind, log_path)

