"""tests/stack's supervision: processes started in their own session with a log in
.stack/logs, recorded in the state file, stopped by process group; waiting for them."""
import os
import shlex
import signal
import subprocess
import time

from tests.stacklib.state import LOGS, ROOT, StackError, save_state


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
    LOGS.mkdir(parents=True, exist_ok=True)
    full = [str(a) for a in argv]
    if uid is not None:
        full = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"] + full
    if netns:
        full = ["ip", "netns", "exec", netns] + full
    log = open(LOGS / f"{name}.log", "ab")
    log.write(f"\n--- {time.strftime('%H:%M:%S')} start: {shlex.join(full)}\n".encode())
    log.flush()
    penv = dict(os.environ)
    for k in list(penv):
        if k.startswith("AWS_"):
            del penv[k]
    penv.update(env or {})
    proc = subprocess.Popen(
        full,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=penv,
        cwd=ROOT,
        start_new_session=True,
    )
    state["procs"][name] = {"pid": proc.pid, "argv": full, "netns": netns, "uid": uid, "env": env or {}}
    save_state(state)
    return proc.pid


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_proc(state, name, sig=signal.SIGTERM):
    info = state["procs"].pop(name, None)
    save_state(state)
    if not info:
        return
    pid = info["pid"]
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.time() + 5
    while time.time() < deadline and alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(what, check, timeout=30.0, interval=0.1):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception as e:  # the thing is not up yet
            last = e
        time.sleep(interval)
    raise StackError(f"timed out waiting for {what}" + (f" ({last})" if last else ""))


def in_ns(state, netns, argv, **kw):
    if state["mode"] == "netns" and netns:
        argv = ["ip", "netns", "exec", netns] + list(argv)
    return run(*argv, **kw)


def http_ok(state, netns, url):
    res = in_ns(state, netns, ["curl", "-sf", "-o", "/dev/null", "-m", "2", url], check=False)
    return res.returncode == 0
