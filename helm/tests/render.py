"""Lints and installs a chart with Helm (the helm-sdkpy library) against a
throw-away in-process Kubernetes API that accepts everything and records it,
then prints JSON: {"lint": <helm lint result>, "manifest": <rendered YAML>,
"applied": [<every object Helm created>]}. No cluster is needed; the
objects are exactly what `helm install` would send to one. The lint runs
with the same values (merged into a copy of the chart's values.yaml, as
`helm lint -f` would), so a member's templates are linted too.

Usage: render.py [--namespace NAMESPACE] CHART [VALUES_JSON]
       render.py --install KUBECONFIG NAMESPACE RELEASE CHART [VALUES_JSON]
       render.py --uninstall KUBECONFIG NAMESPACE RELEASE

--namespace: the release's namespace (default flotilla). --install installs
the release into that cluster's namespace instead (the API server
validates every object; nothing waits for pods) and prints the same JSON
("applied": null); --uninstall removes it, waiting until its objects are
deleted.
"""

import asyncio
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading

import helm_sdkpy

# The API groups the chart uses, as discovery documents describe them.
RESOURCES = {
    "/api/v1": [
        ("secrets", "Secret", True),
        ("configmaps", "ConfigMap", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("pods", "Pod", True),
        ("namespaces", "Namespace", False),
    ],
    "/apis/apps/v1": [("deployments", "Deployment", True), ("statefulsets", "StatefulSet", True)],
    "/apis/policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "/apis/rbac.authorization.k8s.io/v1": [
        ("roles", "Role", True),
        ("rolebindings", "RoleBinding", True),
        ("clusterroles", "ClusterRole", False),
        ("clusterrolebindings", "ClusterRoleBinding", False),
    ],
    "/apis/monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor", True)],
}

applied = []


def merged(base, override):
    """Helm's merge of values: maps merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merged(base.get(k), v) if k in base else v
        return out
    return override


def lint(config, chart, release, values):
    """`helm lint` of `chart` with `values` on top of its own (as `helm
    lint -f` does; the library's Lint takes no values). The chart's own
    values come parsed from the installed `release`."""
    if not values:
        return asyncio.run(helm_sdkpy.Lint(config).run(chart))
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, os.path.basename(os.path.normpath(chart)))
        shutil.copytree(chart, copy)
        # JSON is YAML.
        with open(os.path.join(copy, "values.yaml"), "w") as f:
            json.dump(merged(release["chart"]["values"], values), f)
        return asyncio.run(helm_sdkpy.Lint(config).run(copy))


class FakeApi(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/version":
            return self.reply(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0", "platform": "linux/amd64"})
        if path == "/api":
            return self.reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        if path == "/apis":
            groups = []
            for p in RESOURCES:
                if p.startswith("/apis/"):
                    group, version = p[len("/apis/"):].split("/")
                    gv = {"groupVersion": f"{group}/{version}", "version": version}
                    groups.append({"name": group, "versions": [gv], "preferredVersion": gv})
            return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        if path in RESOURCES:
            gv = "v1" if path == "/api/v1" else path[len("/apis/"):]
            return self.reply(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": [
                {"name": n, "singularName": "", "namespaced": ns, "kind": k,
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                for n, k, ns in RESOURCES[path]]})
        if "labelSelector" in self.path:
            # Helm's release history: none yet.
            return self.reply(200, {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []})
        return self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": "NotFound", "code": 404, "message": "not found"})

    def body(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "json" not in (self.headers.get("Content-Type") or ""):
            # Helm's own release record (protobuf); not part of the chart.
            return None
        return json.loads(raw or b"{}")

    def do_POST(self):
        obj = self.body()
        if obj is None:
            obj = {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "release"}}
        else:
            applied.append(json.loads(json.dumps(obj)))
        obj.setdefault("metadata", {})["resourceVersion"] = "1"
        return self.reply(201, obj)

    def do_PUT(self):
        obj = self.body() or {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "release"}}
        obj.setdefault("metadata", {})["resourceVersion"] = "2"
        return self.reply(200, obj)

    do_PATCH = do_PUT

    def do_DELETE(self):
        return self.reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})


def install(kubeconfig, namespace, name, chart, values):
    config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
    release = asyncio.run(helm_sdkpy.Install(config).run(
        name, chart, values=values, wait=False, create_namespace=True))
    result = lint(config, chart, release, values)
    json.dump({"lint": result, "manifest": release.get("manifest", ""), "applied": None}, sys.stdout)


def uninstall(kubeconfig, namespace, name):
    config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
    asyncio.run(helm_sdkpy.Uninstall(config).run(name, wait=True))


def main():
    args = sys.argv[1:]
    if args[0] == "--install":
        kubeconfig, namespace, name, chart, *rest = args[1:]
        return install(kubeconfig, namespace, name, chart, json.loads(rest[0]) if rest else None)
    if args[0] == "--uninstall":
        return uninstall(*args[1:4])
    namespace = "flotilla"
    if args[0] == "--namespace":
        namespace, args = args[1], args[2:]
    chart = args[0]
    values = json.loads(args[1]) if len(args) > 1 else None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.NamedTemporaryFile("w", suffix=".kubeconfig", delete=False) as kc:
        kc.write(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: fake, cluster: {{server: 'http://127.0.0.1:{server.server_address[1]}'}}}}]\n"
            f"contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {namespace}}}}}]\n"
            "users: [{name: fake, user: {}}]\ncurrent-context: fake\n"
        )
    config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kc.name)
    release = asyncio.run(helm_sdkpy.Install(config).run("flotilla", chart, values=values, wait=False))
    result = lint(config, chart, release, values)
    json.dump({"lint": result, "manifest": release.get("manifest", ""), "applied": applied}, sys.stdout)


if __name__ == "__main__":
    main()
