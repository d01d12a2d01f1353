"""tests/stack: the meshiam local stack.

A "node" network namespace runs the broker, the STS emulator (moto, behind a proxy that can
be slowed down), a stand-in for the node's own IMDS and the Kubernetes API test double; each
pod is a network namespace of its own with an Envoy sidecar carrying the meshiam filter, and
iptables capturing its port-80 traffic to 169.254.169.254 into that Envoy, as Istio does.
The namespaces are linked only to each other (a bridge in the node namespace) and addressed
from 198.18.0.0/15 and, for pods listed with an IPv6 address, fd00:198:18::/64 (dual stack:
ip6tables captures [fd00:ec2::254]:80 and [fd00:ec2::23]:80 the same way): nothing routes to
the machine's real network. The broker listens on both families; a pod with an IPv4
address reaches it over IPv4, an IPv6-only pod over IPv6.

A pod annotated `sidecar.istio.io/inject: "false"` (Istio's opt-out) gets no Envoy and no
capture: it is a pod without a sidecar, whose environment points its SDKs at the broker
(`AWS_EC2_METADATA_SERVICE_ENDPOINT`, as docs/install.md tells operators to set it). Such
pods need the network namespaces (root).

Without root the same components run on loopback: each pod's Envoy listens on its own port
and reaches the broker from its own 127.1.0.x address, and the filter matches the metadata
host by the Host header.

State lives in .stack/ (state.json, logs/, rendered configs).

The parts, by job: state.py (constants, .stack/state.json), procs.py (supervision),
netns.py (namespaces, iptables), kubeapi.py (the API double's client), sidecar.py (Envoy),
podsfile.py (the pods file, docs/pods.schema.json); this module starts the components, adds
and removes pods, and is the CLI. Other code imports it (`from tests.stacklib import stack`):
the names it re-exports below stay here.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import yaml

from tests.stacklib import meshca, podsfile
from tests.stacklib.kubeapi import api_add_namespace, api_add_pod, api_delete_pod, k8s_pod, kube_request, pod_key  # noqa: F401
from tests.stacklib.kubeapi import api_pod_token
from tests.stacklib.netns import delete_netns, make_node_netns, make_pod_netns  # noqa: F401
from tests.stacklib.procs import alive, http_ok, in_ns, run, spawn, stop_proc, wait_until  # noqa: F401
from tests.stacklib.sidecar import envoy_name, start_envoy  # noqa: F401
from tests.stacklib.state import ENVOY_ADMIN, ENVOY_UID  # noqa: F401  used by tests/e2e
from tests.stacklib.state import (ACCOUNT, BROKER_BIN, COMPONENTS, DEFAULT_PODS, KUBE_DOUBLE_BIN, LOGS,
                                  LOOP_ADMIN_BASE, LOOP_ENVOY_BASE, NODE_ACCESS_KEY, NODE_NAME, NODE_NS,
                                  NODE_SECRET_KEY, REGION, ROOT, STATE_DIR, STATE_FILE, VENV, WASM, StackError,
                                  families, load_state, need_state, node_addr, port, save_state, say, url_host)


def read_pods(path):
    """The pods file (docs/pods.schema.json, defaults filled in). The stack also needs an
    address for every pod: it builds the pod's network from the first."""
    try:
        pods, namespaces = podsfile.read(path)
    except podsfile.PodsFileError as e:
        raise StackError(str(e))
    for p in pods:
        if not p["ips"]:
            raise StackError(f"{path}: pod {p['namespace']}/{p['name']} has no 'ips': the stack needs its address")
    return pods, namespaces


NO_SIDECAR = "sidecar.istio.io/inject"


def has_sidecar(spec):
    """False for pods annotated `sidecar.istio.io/inject: "false"`, as Istio reads it."""
    return (spec.get("annotations") or {}).get(NO_SIDECAR, "").strip().lower() != "false"


def short(idx):
    return f"msh-p{idx}"


def broker_argv(state):
    kubeconfig = STATE_DIR / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "stack",
        "clusters": [{"name": "stack", "cluster": {"server": f"http://127.0.0.1:{port(state, 'kube')}"}}],
        "users": [{"name": "stack", "user": {}}],
        "contexts": [{"name": "stack", "context": {"cluster": "stack", "user": "stack"}}],
    }))
    netns = state["mode"] == "netns"
    # Both families on one socket (IPv4 callers arrive as ::ffff:198.18.x.y, which the broker
    # reads as the IPv4 address): dual-stack pods call it over IPv4, IPv6-only pods over IPv6.
    listen = "[::]" if netns else "127.0.0.1"
    admin_listen = "0.0.0.0" if netns else "127.0.0.1"
    argv = [
        BROKER_BIN,
        "--listen", f"{listen}:{port(state, 'broker')}",
        "--admin-listen", f"{admin_listen}:{port(state, 'admin')}",
        "--pod-source", "kube",
        "--node-name", NODE_NAME,
        "--base-role-arn", f"arn:aws:iam::{ACCOUNT}:role/",
        "--namespace-restriction", "allowed-roles",
        "--region", REGION,
        "--node-imds-url", f"http://127.0.0.1:{port(state, 'nodeimds')}",
    ]
    if state.get("mtls", "off") != "off":
        files = meshca.broker_files()
        argv += ["--mtls", state["mtls"], "--mtls-roots", files["roots"], "--mtls-cert", files["cert"],
                 "--mtls-key", files["key"]]
    argv += state.get("broker_args", [])
    env = {
        "KUBECONFIG": str(kubeconfig),
        # The node's own credentials (fake, marked): the broker assumes pod roles with them.
        "AWS_ACCESS_KEY_ID": NODE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": NODE_SECRET_KEY,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL_STS": f"http://127.0.0.1:{port(state, 'sts')}",
        "MESHIAM_LOG": "info,meshiam_broker=debug",
        # /debug/pods for the demo and the tests; the broker answers it on the node
        # namespace's loopback only (http://127.0.0.1:<admin port> there).
        "MESHIAM_DEBUG_ENDPOINTS": "true",
    }
    return argv, env


def start_component(state, name):
    mode = state["mode"]
    ns = NODE_NS if mode == "netns" else None
    host_any = "0.0.0.0" if mode == "netns" else "127.0.0.1"
    if name == "moto":
        spawn(state, "moto", [VENV / "bin/moto_server", "-H", "127.0.0.1", "-p", port(state, "moto")], netns=ns)
        wait_until("the STS emulator", lambda: http_ok(state, ns, f"http://127.0.0.1:{port(state, 'moto')}/moto-api/"))
    elif name == "sts":
        control = STATE_DIR / "sts-control.json"
        if not control.exists():
            control.write_text('{"delay_ms": 0}')
        # Both families: IPv6-only pods reach STS over IPv6.
        sts_hosts = "0.0.0.0,::" if mode == "netns" else host_any
        spawn(state, "sts", [VENV / "bin/python", "-m", "tests.stacklib.stsproxy", sts_hosts, port(state, "sts"),
                             "127.0.0.1", port(state, "moto"), control], netns=ns)
        wait_until("the STS proxy", lambda: http_ok(state, ns, f"http://127.0.0.1:{port(state, 'sts')}/moto-api/"))
    elif name == "nodeimds":
        spawn(state, "nodeimds", [VENV / "bin/python", "-m", "tests.stacklib.nodeimds", "127.0.0.1",
                                  port(state, "nodeimds")], netns=ns)
        wait_until("the node IMDS stand-in",
                   lambda: in_ns(state, ns, ["curl", "-sf", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
                                             f"http://127.0.0.1:{port(state, 'nodeimds')}/latest/api/token"],
                                 check=False).returncode == 0)
    elif name == "kube":
        spawn(state, "kube", [KUBE_DOUBLE_BIN, "--listen", f"{host_any}:{port(state, 'kube')}",
                              *state.get("kube_args", [])], netns=ns)
        wait_until("the Kubernetes API double", lambda: http_ok(state, ns, f"http://127.0.0.1:{port(state, 'kube')}/version"))
        # The double keeps nothing across a restart: give it the stack's namespaces and
        # registered pods again, as a real API server would still have them.
        for n in state.get("namespaces", []):
            api_add_namespace(state, n)
        for entry in state["pods"].values():
            if entry.get("registered"):
                api_add_pod(state, entry["spec"])
                write_pod_token(state, entry)
    elif name == "meshca":
        spawn(state, "meshca", [VENV / "bin/python", "-m", "tests.stacklib.meshca", "rotate-loop"])
    elif name == "broker":
        argv, env = broker_argv(state)
        spawn(state, "broker", argv, netns=ns, env=env)
        wait_until("the broker to be ready",
                   lambda: http_ok(state, ns, f"http://127.0.0.1:{port(state, 'admin')}/readyz"), timeout=30)
    else:
        raise StackError(f"unknown component {name!r} (components: {', '.join(COMPONENTS)})")


def add_pod(state, p, register=True):
    key = pod_key(p)
    if key in state["pods"]:
        raise StackError(f"pod {key} is already in the stack")
    idx = state["next_index"]
    state["next_index"] = idx + 1
    entry = {"index": idx, "spec": p, "registered": False, "sidecar": has_sidecar(p)}
    if not entry["sidecar"] and state["mode"] != "netns":
        raise StackError(f"pod {key} has no sidecar ({NO_SIDECAR}: \"false\"): on loopback its calls would "
                         "come from the machine's address, not its own; pods without a sidecar need root")
    if state["mode"] == "netns":
        entry.update(netns=short(idx), veth=f"mshv{idx}", ip=p["ips"][0])
    else:
        # Loopback: the pod "is" its own 127.1.0.x address, which its Envoy binds to when it
        # calls the broker.
        ip = f"127.1.0.{10 + idx}"
        entry.update(netns=None, ip=ip, port=LOOP_ENVOY_BASE + idx, admin_port=LOOP_ADMIN_BASE + idx)
        p = dict(p, ips=[ip])
        entry["spec"] = p
    state["pods"][key] = entry
    save_state(state)
    if state["mode"] == "netns":
        make_pod_netns(state, entry)
    if entry["sidecar"]:
        if state.get("mtls", "off") != "off":
            # The pod's workload certificate, before its sidecar starts (as the mesh's agent
            # has it ready before the application).
            meshca.issue_pod(state, entry)
        start_envoy(state, key)
    if register:
        register_pod(state, key)
    return entry


def register_pod(state, key):
    entry = state["pods"].get(key)
    if entry is None:
        raise StackError(f"no pod {key} in the stack")
    api_add_pod(state, entry["spec"])
    entry["registered"] = True
    write_pod_token(state, entry)
    save_state(state)


def token_file(spec):
    return STATE_DIR / "tokens" / f"{spec['namespace']}.{spec['name']}" / "token"


def write_pod_token(state, entry):
    """The pod's projected service-account token (audience `meshiam`), where a kubelet would
    mount it: a file of its own, no trailing newline (SDKs send it verbatim). For
    AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE; the pod's `token_file` in the state."""
    path = token_file(entry["spec"])
    try:
        token = api_pod_token(state, entry["spec"])
    except StackError as e:
        # Only the container-credentials door needs it: say so, keep the pod.
        say(f"warning: no service-account token for {pod_key(entry['spec'])}: {e}")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
    path.chmod(0o600)
    entry["token_file"] = str(path)


def annotate_pod(state, key, changes):
    """Sets (`KEY=VALUE`) or removes (`KEY-`) annotations of a pod, in the stack's record and
    in the Kubernetes API double (a PUT of the whole pod: the broker's watch sees MODIFIED)."""
    entry = state["pods"].get(key)
    if entry is None:
        raise StackError(f"no pod {key} in the stack")
    annotations = dict(entry["spec"].get("annotations") or {})
    for change in changes:
        name, sep, value = change.partition("=")
        if sep:
            annotations[name] = value
        elif change.endswith("-"):
            annotations.pop(change[:-1], None)
        else:
            raise StackError(f"annotation change {change!r}: want KEY=VALUE or KEY-")
    entry["spec"] = dict(entry["spec"], annotations=annotations)
    save_state(state)
    if entry.get("registered"):
        ns, name = key.split("/", 1)
        code = kube_request(state, "PUT", f"/api/v1/namespaces/{ns}/pods/{name}", k8s_pod(entry["spec"]))
        if code != 200:
            raise StackError(f"updating pod {key} in the API double answered {code}")


def delete_pod(state, key, api=True):
    """Removes the pod's sidecar and network; with api=False the API keeps the pod (as if
    the broker missed the deletion, e.g. while the API double is stopped)."""
    entry = state["pods"].get(key)
    if entry is None:
        raise StackError(f"no pod {key} in the stack")
    if api and entry.get("registered"):
        api_delete_pod(state, key)
    stop_proc(state, envoy_name(entry))
    if entry["netns"]:
        delete_netns(entry["netns"])
    shutil.rmtree(meshca.pod_dir(entry), ignore_errors=True)
    shutil.rmtree(token_file(entry["spec"]).parent, ignore_errors=True)
    state["pods"].pop(key, None)
    save_state(state)


def cmd_up(args):
    if load_state() is not None:
        raise StackError("the stack is already up (tests/stack down first)")
    for binary, how in ((WASM, "make wasm"), (BROKER_BIN, "make broker"), (KUBE_DOUBLE_BIN, "make broker")):
        if not binary.exists():
            raise StackError(f"{binary.relative_to(ROOT)} is missing: run `{how}` (or `make build`)")
    if not (VENV / "bin/envoy").exists():
        raise StackError(".venv is missing: run scripts/setup")
    pods, namespaces = read_pods(args.pods)
    mode = "loopback" if (args.loopback or os.geteuid() != 0) else "netns"
    if mode == "loopback":
        say("not root (or --loopback): running on loopback; the filter matches the metadata host by "
            "the Host header and pods are 127.1.0.x addresses")
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    STATE_DIR.mkdir(parents=True)
    state = {"mode": mode, "procs": {}, "pods": {}, "next_index": 0,
             "broker_args": args.broker_arg or [], "kube_args": args.kube_arg or [],
             "filter_options": args.filter_option or [], "mtls": args.mtls,
             "namespaces": namespaces, "started": time.time()}
    save_state(state)
    try:
        if mode == "netns":
            make_node_netns()
        if args.mtls != "off":
            say(f"mesh CA: root, broker certificate (broker --mtls {args.mtls})")
            meshca.init(state)
            save_state(state)
            start_component(state, "meshca")
        for c in COMPONENTS:
            say(f"starting {c}")
            start_component(state, c)
        for p in pods:
            say(f"starting pod {pod_key(p)}")
            add_pod(state, p)
    except BaseException:
        say("start failed; taking down what was started (logs kept in .stack/logs)")
        teardown(keep_logs=True)
        raise
    print_status(state)
    say("ready")


def teardown(keep_logs=False):
    state = load_state()
    if state is not None:
        for name in list(state["procs"]):
            stop_proc(state, name)
        for entry in state["pods"].values():
            if entry.get("netns"):
                delete_netns(entry["netns"])
    if os.geteuid() == 0:
        # Also whatever a crashed run left behind.
        res = run("ip", "netns", "list", check=False, capture=True)
        for line in (res.stdout or "").splitlines():
            name = line.split()[0] if line.split() else ""
            if name == NODE_NS or name.startswith("msh-p"):
                delete_netns(name)
    if keep_logs:
        STATE_FILE.unlink(missing_ok=True)
    else:
        shutil.rmtree(STATE_DIR, ignore_errors=True)


def cmd_down(args):
    teardown(keep_logs=args.keep_logs)
    say("down")


def print_status(state):
    na = node_addr(state)
    print(f"MODE={state['mode']}")
    print(f"STS_URL=http://{na}:{port(state, 'sts')}")
    print(f"BROKER_URL=http://{na}:{port(state, 'broker')}")
    print(f"BROKER_ADMIN_URL=http://{na}:{port(state, 'admin')}")
    print(f"KUBE_API_URL=http://{na}:{port(state, 'kube')}")
    print(f"LOGS={LOGS}")
    for key, entry in sorted(state["pods"].items()):
        role = (entry["spec"].get("annotations") or {}).get("iam.amazonaws.com/role", "")
        extra = f" IMDS_URL=http://127.0.0.1:{entry['port']}" if entry.get("port") else ""
        v6 = [ip for ip in entry["spec"]["ips"] if ":" in ip] if entry.get("netns") else []
        extra += f" IP6={v6[0]}" if v6 else ""
        extra += f" NETNS={entry['netns']}" if entry.get("netns") else ""
        extra += "" if entry.get("sidecar", True) else " SIDECAR=none"
        print(f"POD={key} IP={entry['ip']} ROLE={role}{extra}")


def cmd_status(args):
    state = need_state()
    print_status(state)
    down = [n for n, i in state["procs"].items() if not alive(i["pid"])]
    for n in down:
        print(f"DOWN={n}")
    return 1 if down else 0


def pod_env(state, entry):
    """An environment like a pod's: no AWS credentials, no AWS config files, the region set
    as pod specs usually do, and the emulator as the STS endpoint (a pod would reach the real
    one)."""
    home = STATE_DIR / "home" / str(entry["index"])
    home.mkdir(parents=True, exist_ok=True)
    family = 4 if 4 in families(entry["spec"]["ips"]) else 6
    env = {
        "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "AWS_ENDPOINT_URL_STS": f"http://{url_host(node_addr(state, family))}:{port(state, 'sts')}",
        # As most pod specs set it: botocore and the AWS CLI do not take the region from IMDS
        # (aws-sdk-rust does; the tests run it with this unset).
        "AWS_DEFAULT_REGION": REGION,
        "POD_NAME": entry["spec"]["name"],
        "POD_NAMESPACE": entry["spec"]["namespace"],
    }
    if not entry.get("sidecar", True):
        # What an operator sets in the pod template of a pod without a sidecar: the node's
        # broker (169.254.170.52:8787 in the manifests) as the metadata endpoint.
        broker = f"http://{node_addr(state)}:{port(state, 'broker')}"
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = broker
        env["MESHIAM_IMDS_URL"] = broker
    elif state["mode"] == "loopback":
        env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = f"http://127.0.0.1:{entry['port']}"
        env["MESHIAM_IMDS_URL"] = f"http://127.0.0.1:{entry['port']}"
    else:
        env["MESHIAM_IMDS_URL"] = "http://169.254.169.254"
    return env


def cmd_exec(args):
    state = need_state()
    entry = state["pods"].get(args.pod)
    if entry is None:
        raise StackError(f"no pod {args.pod} in the stack (tests/stack status lists them)")
    argv = args.command
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise StackError("usage: tests/stack exec NAMESPACE/POD -- COMMAND [ARG…]")
    env = pod_env(state, entry)
    if entry.get("netns"):
        argv = ["ip", "netns", "exec", entry["netns"]] + argv
    try:
        return subprocess.run(argv, env=env).returncode
    except FileNotFoundError as e:
        raise StackError(f"cannot run {argv[0]}: {e}")


def cmd_logs(args):
    if not LOGS.exists():
        raise StackError("no logs (the stack has not run)")
    files = sorted(LOGS.glob("*.log"))
    if args.component:
        files = [f for f in files if f.stem == args.component or f.stem.startswith(args.component)]
        if not files:
            raise StackError(f"no log for {args.component!r}; have: {', '.join(f.stem for f in sorted(LOGS.glob('*.log')))}")
    for f in files:
        print(f"==> {f.stem} <==")
        sys.stdout.write(f.read_text(errors="replace"))
    return 0


def cmd_pod(args):
    state = need_state()
    if args.pod_cmd == "add":
        pods, namespaces = read_pods(args.file)
        for ns in namespaces:
            api_add_namespace(state, ns)
        for p in pods:
            entry = add_pod(state, p, register=not args.defer_api)
            print(f"POD={pod_key(p)} IP={entry['ip']}")
    elif args.pod_cmd == "register":
        register_pod(state, args.pod)
    elif args.pod_cmd == "delete":
        delete_pod(state, args.pod, api=not args.keep_api)
    elif args.pod_cmd == "annotate":
        annotate_pod(state, args.pod, args.changes)
    return 0


def cmd_stop(args):
    state = need_state()
    if args.component not in state["procs"]:
        raise StackError(f"{args.component} is not running (running: {', '.join(state['procs'])})")
    stop_proc(state, args.component, signal.SIGKILL if args.kill else signal.SIGTERM)
    return 0


def cmd_start(args):
    state = need_state()
    if args.component in state["procs"] and alive(state["procs"][args.component]["pid"]):
        raise StackError(f"{args.component} is already running")
    start_component(state, args.component)
    return 0


def cmd_sts_delay(args):
    need_state()
    (STATE_DIR / "sts-control.json").write_text(json.dumps({"delay_ms": args.ms}))
    return 0


def cmd_mesh(args):
    state = need_state()
    if "mesh" not in state:
        raise StackError("the stack runs without a mesh CA (tests/stack up --mtls preferred|required)")
    if args.mesh_cmd == "rotate":
        meshca.rotate(state, root=args.root)
    elif args.mesh_cmd == "issue":
        entry = state["pods"].get(args.pod)
        if entry is None:
            raise StackError(f"no pod {args.pod} in the stack")
        ca = None
        if args.foreign_ca:
            if not (meshca.MESH / "ca" / "foreign.pem").exists():
                meshca.new_root("foreign")
            ca = "foreign"
        meshca.issue_pod(state, entry, spiffe_id=args.spiffe, ca=ca)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tests/stack", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the stack in the background; exits when it is ready")
    up.add_argument("--pods", default=str(DEFAULT_PODS), help="pods file (default tests/pods.yaml)")
    up.add_argument("--loopback", action="store_true", help="run on loopback even as root")
    up.add_argument("--broker-arg", action="append", metavar="ARG",
                    help="extra broker argument, e.g. --broker-arg=--session-duration=900 (repeatable)")
    up.add_argument("--kube-arg", action="append", metavar="ARG",
                    help="extra API double argument, e.g. --kube-arg=--bookmark-interval-ms=1000 (repeatable)")
    up.add_argument("--filter-option", action="append", metavar="KEY=JSON",
                    help="override a filter plugin option, e.g. --filter-option requireImdsv2=true")
    up.add_argument("--mtls", choices=["off", "preferred", "required"], default="off",
                    help="the broker's --mtls; not off: a mesh CA issues each pod a workload certificate its "
                         "sidecar presents on the call-out")
    down = sub.add_parser("down", help="stop everything and remove every namespace (safe to run twice)")
    down.add_argument("--keep-logs", action="store_true")
    sub.add_parser("status", help="KEY=value lines: STS_URL, BROKER_URL, KUBE_API_URL, one POD= line per pod")
    ex = sub.add_parser("exec", help="run a command in a pod: tests/stack exec NS/POD -- CMD…")
    ex.add_argument("pod")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    lg = sub.add_parser("logs", help="print the logs (of one component)")
    lg.add_argument("component", nargs="?")
    pod = sub.add_parser("pod", help="add, register or delete pods while the stack runs")
    psub = pod.add_subparsers(dest="pod_cmd", required=True)
    pa = psub.add_parser("add", help="add the pods of a pods file")
    pa.add_argument("file")
    pa.add_argument("--defer-api", action="store_true",
                    help="start the pod's network and sidecar but do not create it in the API yet")
    pr = psub.add_parser("register", help="create an added pod in the Kubernetes API")
    pr.add_argument("pod")
    pd = psub.add_parser("delete", help="delete a pod from the API and the stack")
    pd.add_argument("pod")
    pd.add_argument("--keep-api", action="store_true",
                    help="remove the pod's network and sidecar but leave it in the API (works with the API down)")
    pn = psub.add_parser("annotate", help="set (KEY=VALUE) or remove (KEY-) a pod's annotations in the API, "
                                          "as kubectl annotate --overwrite does")
    pn.add_argument("pod")
    pn.add_argument("changes", nargs="+", metavar="KEY=VALUE|KEY-")
    st = sub.add_parser("stop", help=f"stop a component ({', '.join(COMPONENTS)})")
    st.add_argument("component")
    st.add_argument("--kill", action="store_true", help="SIGKILL instead of SIGTERM")
    sa = sub.add_parser("start", help="start a stopped component")
    sa.add_argument("component")
    ms = sub.add_parser("mesh", help="the mesh CA of a stack started with --mtls")
    msub = ms.add_subparsers(dest="mesh_cmd", required=True)
    mr = msub.add_parser("rotate", help="re-issue every certificate now")
    mr.add_argument("--root", action="store_true",
                    help="with a new root: trusted next to the old one, then issuing, then the old one dropped")
    mi = msub.add_parser("issue", help="re-issue one pod's workload certificate")
    mi.add_argument("pod")
    mi.add_argument("--spiffe", help="another SPIFFE ID than the pod's own")
    mi.add_argument("--foreign-ca", action="store_true", help="from a CA the broker does not trust")
    sd = sub.add_parser("sts-delay", help="delay every new STS connection by MS milliseconds")
    sd.add_argument("ms", type=int)
    args = ap.parse_args(argv)
    handlers = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "exec": cmd_exec, "logs": cmd_logs,
                "pod": cmd_pod, "mesh": cmd_mesh, "stop": cmd_stop, "start": cmd_start, "sts-delay": cmd_sts_delay}
    try:
        return handlers[args.cmd](args) or 0
    except StackError as e:
        say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
