"""Check a Kubernetes custom resource against its CRD's OpenAPI v3 schema, as the API server would
on `kubectl apply` (strict field validation, kubectl's default).

jsonschema does the JSON Schema part. A CRD's schema is "structural" OpenAPI with Kubernetes'
own extensions, which JSON Schema does not know; they are translated here:

- a field the schema does not declare is an error (the server rejects it under strict validation,
  and would otherwise drop it without a word), except under `x-kubernetes-preserve-unknown-fields`;
  `x-kubernetes-embedded-resource` objects also take apiVersion, kind and metadata;
- `nullable: true` admits null (nothing else does);
- `x-kubernetes-int-or-string` admits an integer or a string (controller-gen also writes the
  `anyOf`; a `pattern` beside it applies to the string form only, as in JSON Schema);
- `x-kubernetes-list-type: map` items are unique by their `x-kubernetes-list-map-keys` (a key's
  `default` standing in where it is omitted, e.g. a port's protocol), `set` items are unique;
- `x-kubernetes-validations` CEL rules are evaluated (the `cel` package); transition rules (those
  reading `oldSelf`) apply to updates only and are skipped, as on create;
- `format: int32` / `int64` bound the integer, `date-time` must be RFC 3339;
- the root `metadata` is ObjectMeta, which the server checks for every object: the name a DNS
  subdomain, labels and annotations maps of strings, label keys and values well formed;
- `status` belongs to the controller (the status subresource): a manifest may not set it.
"""

from __future__ import annotations

import datetime
import functools
import re
from pathlib import Path

import cel
import jsonschema
import yaml

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB: libyaml when present

_DNS_SUBDOMAIN = r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_LABEL_KEY = (r"^((?=[^/]{1,253}/)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
              r"(?=[^/]{1,63}$)[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")  # [DNS subdomain/]name
_LABEL_VALUE = r"^((?=.{1,63}$)[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": _DNS_SUBDOMAIN},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "pattern": _DNS_SUBDOMAIN},
        "labels": {"type": "object", "propertyNames": {"pattern": _LABEL_KEY},
                   "additionalProperties": {"type": "string", "pattern": _LABEL_VALUE}},
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


@functools.lru_cache(maxsize=None)
def load_crd(path: Path) -> dict:
    crd = yaml.load(Path(path).read_text(), Loader=_LOADER)
    assert crd.get("kind") == "CustomResourceDefinition", f"{path}: not a CustomResourceDefinition"
    return crd


def crd_schema(crd: dict, api_version: str, kind: str) -> dict:
    """The OpenAPI v3 schema a `kind` object of `api_version` must satisfy, from its CRD."""
    group, _, version = api_version.rpartition("/")
    spec = crd["spec"]
    if (group, kind) != (spec["group"], spec["names"]["kind"]):
        raise ValueError(f"the CRD defines {spec['group']} {spec['names']['kind']}, not {group} {kind}")
    for v in spec["versions"]:
        if v["name"] == version:
            if not v.get("served", False):
                raise ValueError(f"{api_version} {kind} is no longer served")
            return v["schema"]["openAPIV3Schema"]
    raise ValueError(f"the CRD has no version {version} (has {[v['name'] for v in spec['versions']]})")


def to_json_schema(node: dict) -> dict:
    """A structural schema node with its Kubernetes semantics made explicit in JSON Schema."""
    out = dict(node)
    if "properties" in node:
        out["properties"] = {name: to_json_schema(sub) for name, sub in node["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            out[key] = to_json_schema(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [to_json_schema(sub) for sub in node[key]]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": {"type": "object"}, **out.get("properties", {})}
    is_object = node.get("type") == "object" or "properties" in node
    if is_object and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable"):
        out.pop("nullable")
        return {"anyOf": [{"type": "null"}, out]}
    return out


def _list_type(validator, list_type, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a list of type set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        item_props = schema.get("items", {}).get("properties", {})
        seen = {}
        for i, item in enumerate(instance):
            if not isinstance(item, dict):
                continue
            key = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
            if key in seen:
                shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key))
                yield jsonschema.ValidationError(f"items {seen[key]} and {i} have the same key ({shown})")
            seen[key] = i


def _cel_rules(validator, rules, instance, schema):
    for rule in rules:
        expr = rule["rule"]
        if re.search(r"\boldSelf\b", expr):
            continue  # a transition rule: checked on updates only
        try:
            ok = cel.evaluate(expr, {"self": instance})
        except Exception as e:  # a rule this evaluator cannot run is an error, not a pass
            yield jsonschema.ValidationError(f"CEL rule {expr!r} could not be evaluated: {e}")
            continue
        if ok is not True:
            yield jsonschema.ValidationError(rule.get("message") or f"failed CEL rule {expr!r}")


def _format(validator, fmt, instance, schema):
    if fmt in _INT_RANGES and validator.is_type(instance, "integer"):
        low, high = _INT_RANGES[fmt]
        if not low <= instance <= high:
            yield jsonschema.ValidationError(f"{instance} is out of the {fmt} range")
    elif fmt == "date-time" and validator.is_type(instance, "string"):
        try:
            datetime.datetime.fromisoformat(instance.replace("Z", "+00:00"))
        except ValueError:
            yield jsonschema.ValidationError(f"{instance!r} is not an RFC 3339 date-time")


KubernetesValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules, "format": _format},
)


@functools.lru_cache(maxsize=None)
def _validator(crd_path: Path, api_version: str, kind: str):
    schema = to_json_schema(crd_schema(load_crd(crd_path), api_version, kind))
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted({"apiVersion", "kind", "metadata", *schema.get("required", [])})
    schema["properties"].pop("status", None)  # the controller's: not settable by a manifest
    return KubernetesValidator(schema)


def errors(manifest: dict, crd_path: Path) -> list[str]:
    """Every way `manifest` breaks its CRD, as `path.to.field: problem` lines (none: valid)."""
    if not isinstance(manifest, dict) or not manifest.get("apiVersion") or not manifest.get("kind"):
        return ["<root>: a manifest is a mapping with apiVersion and kind"]
    validator = _validator(Path(crd_path), manifest["apiVersion"], manifest["kind"])
    found = []
    for error in validator.iter_errors(manifest):
        where = ".".join(str(p) for p in error.absolute_path) or "<root>"
        message = error.message
        if error.validator == "anyOf" and error.schema.get("x-kubernetes-int-or-string"):
            message = f"{error.instance!r} is neither an integer nor a string (e.g. a quantity: 500m, 16Gi)"
        found.append(f"{where}: {message}")
    return sorted(found)
