"""Validates the Kubernetes manifests in manifests/ offline. Run through scripts/validate-manifests,
which provides a Python with the pinned validators.

* Built-in kinds (Deployment, Service, RBAC, CustomResourceDefinition, ...) are checked against
  the Kubernetes OpenAPI schemas shipped by the PyPI package kubernetes-validate, in strict mode:
  an unknown field is an error, and so is a kind with no schema.
* Custom resources (InferencePool, InferenceObjective) are checked against the openAPIV3Schema of
  the matching CRD in the CRD directory (manifests/crds, or $CRD_DIR) with jsonschema, made
  strict the way the API server's strict field validation is: unknown fields are errors unless
  the schema preserves them. Their metadata is checked as ObjectMeta.
* A missing CRD file is an error, never a skip.

Environment: MANIFESTS_DIR (default manifests), CRD_DIR (default $MANIFESTS_DIR/crds),
K8S_VERSIONS (space-separated, default below).
Prints one line per document and exits 1 on any error.
"""

import os
import re
import sys
from pathlib import Path

import jsonschema
import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = Path(os.environ.get("MANIFESTS_DIR") or ROOT / "manifests").resolve()

# The CRDs every custom resource in manifests/ is checked against. They are generated from the
# picker's Rust types.
REQUIRED_CRDS = [
    "inference.networking.k8s.io_inferencepools.yaml",
    "inference.networking.x-k8s.io_inferencepools.yaml",
    "inference.networking.x-k8s.io_inferenceobjectives.yaml",
]

# 1.33: the API version the picker's Kubernetes client is built against (k8s-openapi v1_33);
# the newest version kubernetes-validate knows is added at run time.
DEFAULT_VERSIONS = ["1.33"]


DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def metadata_problems(kind, metadata):
    """The API server's checks of names and labels, which the OpenAPI schemas do not carry."""
    name = metadata.get("name", "")
    if kind == "Service":
        if len(name) > 63 or not DNS1035_LABEL.fullmatch(name):
            yield f"metadata.name {name!r} is not a DNS-1035 label (a Service name must be one)"
    elif len(name) > 253 or not DNS1123_SUBDOMAIN.fullmatch(name):
        yield f"metadata.name {name!r} is not a DNS-1123 subdomain"
    namespace = metadata.get("namespace")
    if namespace is not None and (len(namespace) > 63 or not DNS1123_LABEL.fullmatch(str(namespace))):
        yield f"metadata.namespace {namespace!r} is not a DNS-1123 label"
    for key, value in (metadata.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.fullmatch(value):
            yield f"label {key}={value!r}: not a valid label value"


def rel(path):
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def load_documents(path):
    """The non-empty YAML documents of a file, or raises with a readable message."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [d for d in yaml.safe_load_all(text) if d is not None]


def strictify(schema, root=False, junctor=False):
    """A copy of a CRD structural schema where objects reject unknown fields (as the API server's
    strict field validation does) and `nullable` admits null. OpenAPI v3.0 extensions that
    jsonschema does not know are left in place and ignored. The branches of allOf/anyOf/oneOf
    (`junctor`) only restrict values of the fields their parent declares, so they are not closed
    themselves."""
    if not isinstance(schema, dict):
        return schema
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: strictify(v) for k, v in s["properties"].items()}
        if root:
            # Every object may carry apiVersion, kind and metadata even if the schema omits them.
            for key in ("apiVersion", "kind", "metadata"):
                s["properties"].setdefault(key, {})
        if (
            not junctor
            and "additionalProperties" not in s
            and not s.get("x-kubernetes-preserve-unknown-fields")
        ):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strictify(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strictify(s["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(s.get(key), list):
            s[key] = [strictify(x, junctor=True) for x in s[key]]
    if isinstance(s.get("not"), dict):
        s["not"] = strictify(s["not"], junctor=True)
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"] if isinstance(s["type"], str) else list(s["type"]) + ["null"]
    return s


def split_api_version(api_version):
    if "/" in api_version:
        group, version = api_version.split("/", 1)
        return group, version
    return "", api_version


def json_path(error):
    return "." + ".".join(str(p) for p in error.absolute_path) if error.absolute_path else "(root)"


class Validator:
    def __init__(self, crd_dir, versions):
        self.crd_dir = crd_dir
        self.versions = versions
        self.errors = 0
        self.checked = 0
        # (group, kind) -> {version: (schema, served), "_file": path}
        self.crds = {}

    def fail(self, where, message):
        self.errors += 1
        print(f"FAIL {where}: {message}")

    def load_crds(self):
        for name in REQUIRED_CRDS:
            path = self.crd_dir / name
            if not path.is_file():
                self.fail(
                    rel(path),
                    "CRD file missing. The custom resources in manifests/ are validated against "
                    "it; generate the CRDs from the Rust types (or point CRD_DIR at a directory "
                    "holding them).",
                )
                continue
            try:
                docs = load_documents(path)
            except (OSError, yaml.YAMLError) as e:
                self.fail(rel(path), f"cannot read: {e}")
                continue
            crds = [d for d in docs if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"]
            if len(crds) != 1:
                self.fail(rel(path), f"expected one CustomResourceDefinition, found {len(crds)}")
                continue
            crd = crds[0]
            try:
                spec = crd["spec"]
                group, kind, plural = spec["group"], spec["names"]["kind"], spec["names"]["plural"]
                versions = spec["versions"]
            except (KeyError, TypeError) as e:
                self.fail(rel(path), f"not a CustomResourceDefinition: missing {e}")
                continue
            if crd.get("metadata", {}).get("name") != f"{plural}.{group}":
                self.fail(rel(path), f"metadata.name must be {plural}.{group} (the API server requires <plural>.<group>)")
            if name != f"{group}_{plural}.yaml":
                self.fail(rel(path), f"file defines {plural}.{group}, expected file name {group}_{plural}.yaml")
            entry = self.crds.setdefault((group, kind), {"_file": path})
            for v in versions:
                schema = (v.get("schema") or {}).get("openAPIV3Schema")
                if schema is None:
                    self.fail(rel(path), f"version {v.get('name')} has no openAPIV3Schema")
                    continue
                entry[v["name"]] = (schema, bool(v.get("served")))

    def check_builtin(self, where, doc):
        for version in self.versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                self.fail(where, f"Kubernetes {version} (strict): {json_path(e)}: {e.message}")
                return False
            except kv.SchemaNotFoundError as e:
                self.fail(
                    where,
                    f"{e.message}; not a built-in kind, and no CRD in {rel(self.crd_dir)} defines it",
                )
                return False
            except kv.VersionNotSupportedError:
                self.fail(where, f"kubernetes-validate has no schemas for Kubernetes {version}")
                return False
        return True

    def check_custom(self, where, doc, group, version, kind):
        entry = self.crds[(group, kind)]
        crd_file = rel(entry["_file"])
        if version not in entry:
            self.fail(where, f"{kind} has no version {version} in {crd_file}")
            return False
        schema, served = entry[version]
        if not served:
            self.fail(where, f"{kind} version {version} is not served by {crd_file}")
            return False
        ok = True
        validator = jsonschema.Draft4Validator(strictify(schema, root=True))
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
            self.fail(where, f"{crd_file} {version}: {json_path(e)}: {e.message}")
            ok = False
        # Metadata is ObjectMeta whatever the CRD says: check it strictly as a ConfigMap's.
        wrapper = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")}
        try:
            kv.validate(wrapper, self.versions[-1], strict=True)
        except kv.ValidationError as e:
            self.fail(where, f"metadata (ObjectMeta): {json_path(e)}: {e.message}")
            ok = False
        return ok

    def check_document(self, path, index, doc):
        self.checked += 1
        where = f"{rel(path)}#{index}"
        if not isinstance(doc, dict):
            self.fail(where, "document is not a mapping")
            return
        api_version, kind = doc.get("apiVersion"), doc.get("kind")
        name = (doc.get("metadata") or {}).get("name")
        if not (isinstance(api_version, str) and isinstance(kind, str) and isinstance(name, str)):
            self.fail(where, "apiVersion, kind and metadata.name are required")
            return
        where = f"{rel(path)} {kind}/{name}"
        problems = list(metadata_problems(kind, doc["metadata"]))
        for problem in problems:
            self.fail(where, problem)
        if problems:
            return
        group, version = split_api_version(api_version)
        if (group, kind) in self.crds:
            if self.check_custom(where, doc, group, version, kind):
                print(f"ok   {where} (CRD schema, strict)")
        elif group.startswith("inference.networking."):
            self.fail(where, f"no CRD for {kind} in group {group} in {rel(self.crd_dir)}")
        elif self.check_builtin(where, doc):
            print(f"ok   {where} (Kubernetes {', '.join(self.versions)}, strict)")

    def run(self, files):
        self.load_crds()
        for path in files:
            try:
                docs = load_documents(path)
            except (OSError, yaml.YAMLError) as e:
                self.fail(rel(path), f"cannot parse YAML: {e}")
                continue
            if path.name == "kustomization.yaml":
                # Not a Kubernetes object; tests/manifests.rs checks that its resources exist.
                continue
            if not docs:
                self.fail(rel(path), "no YAML document")
            for i, doc in enumerate(docs):
                self.check_document(path, i, doc)
        print(f"manifests: {self.checked} documents checked, {self.errors} errors")
        return 0 if self.errors == 0 else 1


def main():
    crd_dir = Path(os.environ.get("CRD_DIR") or MANIFESTS / "crds").resolve()
    latest = kv.latest_version()
    if os.environ.get("K8S_VERSIONS"):
        versions = os.environ["K8S_VERSIONS"].split()
    else:
        versions = DEFAULT_VERSIONS + [kv.major_minor(latest)]
    versions = sorted(set(versions), key=lambda v: [int(x) for x in v.split(".")[:2]])
    files = sorted(p for p in MANIFESTS.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    if crd_dir != (MANIFESTS / "crds").resolve():
        # The CRDs used for the custom resources are checked too, wherever they are.
        files += [crd_dir / n for n in REQUIRED_CRDS if (crd_dir / n).is_file()]
    if not files:
        print(f"FAIL no YAML files under {rel(MANIFESTS)}")
        return 1
    return Validator(crd_dir, versions).run(files)


if __name__ == "__main__":
    sys.exit(main())
