"""Starting, waiting for and stopping processes: the one process harness of tests/stack,
the benchmarks (bench/harness.py) and the filter's Envoy tests
(tests/filter/meshiam_filter_harness.py).

The general part: `start` (a process with its output in a log file, in a session of its
own unless told otherwise), `wait_for` (poll until ready; fails at once if the process
exits, with the tail of its log), `stop` (SIGTERM to its process group, SIGKILL after a
timeout), `port_open`, `http_get`, `url_ok`, `free_port`, `log_tail`.

tests/stack's supervision on top of it: `spawn` records what it starts in
.stack/state.json (a later `tests/stack` invocation stops it by process group: `stop_proc`),
`wait_until` raises StackError, `run`, `in_ns` and `http_ok` run commands (inside a network
namespace).
"""
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from tests.stacklib.state import LOGS, ROOT, StackError, save_state

# ---------------------------------------------------------------------------- general


def start(argv, log_path, env=None, append=False, banner=False, new_session=True, cwd=ROOT):
    """Starts argv, its stdout and stderr going to log_path (appended to with append; with
    banner, after a line saying what starts). In a session of its own (new_session), `stop`
    ends its whole process group. Returns the Popen, with `log_path` and `log_file` set."""
    argv = [str(a) for a in argv]
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log = open(log_path, "ab" if append else "wb")
    if banner:
        log.write(f"\n--- {time.strftime('%H:%M:%S')} start: {shlex.join(argv)}\n".encode())
        log.flush()
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=new_session)
    except BaseException:
        log.close()
        raise
    proc.log_path = str(log_path)
    proc.log_file = log
    return proc


def alive(pid):
    """True while pid runs. A zombie is not alive: the stack's processes outlive the
    `tests/stack up` that started them, so their parent is PID 1, which may reap them late
    (here, seconds later: every stop waited for it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _running(pid, proc):
    if proc is not None:
        return proc.poll() is None
    try:
        os.waitpid(pid, os.WNOHANG)  # reaps it if it is our child
    except ChildProcessError:
        pass
    return alive(pid)


def stop(pid, timeout=5.0, sig=signal.SIGTERM, proc=None, group=True):
    """Sends sig to pid's process group (group=False: to pid alone), waits up to timeout for
    it to end, then SIGKILLs the same. With proc (our Popen of pid) it is also reaped and its
    log closed."""
    kill = os.killpg if group else os.kill
    try:
        if proc is not None and proc.poll() is not None:
            return
        try:
            kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _running(pid, proc):
            time.sleep(0.05)
        if _running(pid, proc):
            try:
                kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if proc is not None:
                proc.wait()
    finally:
        log = getattr(proc, "log_file", None)
        if log is not None and not log.closed:
            log.close()


def log_tail(path, n=2000):
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            return f.read()[-n:].decode(errors="replace")
    except OSError:
        return ""


def wait_for(what, check, timeout=30.0, interval=0.05, proc=None, error=RuntimeError, tail=2000):
    """Polls check() until it is true. Raises error naming what, with the last exception
    check raised; with proc, also at once when it exits, and with the tail of its log."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise error(f"{what}: the process exited {proc.returncode}\n"
                        f"{log_tail(getattr(proc, 'log_path', None), tail)}")
        try:
            if check():
                return
        except Exception as e:  # the thing is not up yet
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    msg = f"timed out waiting for {what}" + (f" ({last})" if last else "")
    if proc is not None:
        msg += "\n" + log_tail(getattr(proc, "log_path", None), tail)
    raise error(msg)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host, port, timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url, headers=None, timeout=2):
    """(status, body) of a GET, whatever proxy the environment names."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with _opener.open(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def url_ok(url, timeout=1):
    try:
        return http_get(url, timeout=timeout)[0] == 200
    except (OSError, urllib.error.URLError):
        return False


# ---------------------------------------------------------------------------- tests/stack


def run(*argv, check=True, capture=False, input=None):
    res = subprocess.run(
        [str(a) for a in argv],
        check=False,
        text=True,
        input=input,
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if check and res.returncode != 0:
        raise StackError(f"{' '.join(map(str, argv))} failed: {res.stderr.strip()}")
    return res


def spawn(state, name, argv, netns=None, uid=None, env=None):
    full = [str(a) for a in argv]
    if uid is not None:
        full = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + full
    if netns:
        full = ["ip", "netns", "exec", netns] + full
    penv = dict(os.environ)
    for k in list(penv):
        if k.startswith("AWS_"):
            del penv[k]
    penv.update(env or {})
    proc = start(full, LOGS / f"{name}.log", env=penv, append=True, banner=True)
    # The child keeps its own copy of the log; a later `tests/stack` stops it by pid.
    proc.log_file.close()
    state["procs"][name] = {"pid": proc.pid, "argv": full, "netns": netns, "uid": uid, "env": env or {}}
    save_state(state)
    return proc.pid


def stop_proc(state, name, sig=signal.SIGTERM):
    info = state["procs"].pop(name, None)
    save_state(state)
    if info:
        stop(info["pid"], timeout=5, sig=sig)


def wait_until(what, check, timeout=30.0, interval=0.1):
    wait_for(what, check, timeout=timeout, interval=interval, error=StackError)


def in_ns(state, netns, argv, **kw):
    if state["mode"] == "netns" and netns:
        argv = ["ip", "netns", "exec", netns] + list(argv)
    return run(*argv, **kw)


def http_ok(state, netns, url):
    res = in_ns(state, netns, ["curl", "-sf", "-o", "/dev/null", "-m", "2", url], check=False)
    return res.returncode == 0
