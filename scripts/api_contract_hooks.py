"""Schemathesis hooks of scripts/api-contract.sh: values no JSON Schema can state.

The daemon's OpenAPI document carries every rule on the shape of a request. What it cannot carry
depends on the running daemon or on another part of the same request; these hooks fill that in
right before each request is sent. They replace only values the document already allows, with
values it allows too, so a case generated as valid stays valid and one generated as invalid
stays invalid (its invalid part is left as it is):

- image_url: which sources a daemon accepts is its configuration (sources.file_roots,
  sources.allowed_hosts, s3.endpoint; 400 otherwise). A well-formed image_url becomes the small
  qcow2 the script serves below file_roots, so valid requests make real jobs that complete.
- checksum_url: like image_url, a source the configuration must allow (and a manifest must be
  there to name the image). A well-formed checksum_url becomes the script's SHA256SUMS beside the
  small qcow2.
- image: which names are declared is the daemon's configuration ([[images]]; 400 unknown_image
  otherwise). A well-formed image name becomes `small`, the image the script declares.
- Idempotency-Key: one key names one request, so two cases that happen to draw the same key
  with different bodies get 422 by design. A well-formed key is made unique to its case.
- X-Content-SHA256: a well-formed digest becomes the body's real one (a mismatch is 422 by
  design: the content, not the shape, is wrong).
- Content-Length of an upload: the body's framing, which the HTTP client writes, so its value
  must be the body's real length. A well-formed value becomes the real length; a zero is sent
  as it is, with no body (the daemon answers 400); a value that is not a number cannot frame a
  request at all (hyper answers it with an empty 400 before the daemon sees it) and such cases
  are dropped (`filter_case`); a case that leaves the header out sends its body chunked, so the
  request really has no Content-Length (the daemon answers 411, which api-contract.toml adds to
  what a missing required header may get).

One failure is the contract's own answer and is dropped by `filter_failure`: cancelling a job
that has finished is 400 `job_terminal` (the Go service's status, kept for its clients), a state
the schema of a job id cannot know.
"""

import atexit
import collections
import hashlib
import os
import re
import sys
import uuid

import schemathesis
from schemathesis.transport.serialization import serialize_binary

IMAGE_URL = os.environ["LVP_CONTRACT_IMAGE_URL"]
DECLARED_IMAGE = "small"
CHECKSUM_URL = os.environ["LVP_CONTRACT_CHECKSUM_URL"]
IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,255}")
SHA256_HEX = re.compile(r"[0-9A-Fa-f]{64}")
UPLOAD = "PUT /api/v1/volumes/{name}/content"


def _image_url_rule(case, field="image_url"):
    """The schema of the body field `field`, as the daemon's document states it."""
    body = case.operation.definition.raw.get("requestBody", {})
    schema = body.get("content", {}).get("application/json", {}).get("schema", {})
    ref = schema.get("$ref", "")
    if not ref.startswith("#/components/schemas/"):
        return None
    components = case.operation.schema.raw_schema["components"]["schemas"]
    return components[ref.rsplit("/", 1)[1]].get("properties", {}).get(field)


def _well_formed_url(value, rule):
    return (
        isinstance(value, str)
        and rule.get("minLength", 0) <= len(value) <= rule.get("maxLength", len(value))
        and re.search(rule.get("pattern", ""), value) is not None
    )


def _header(headers, name):
    """The header's name as the case spells it, if the case has it."""
    for key in headers or {}:
        if key.lower() == name.lower():
            return key
    return None


def _body_bytes(body):
    """The bytes Schemathesis sends for an `application/octet-stream` body."""
    if body is None or type(body).__name__ == "NotSet":
        return b""
    return serialize_binary(body)


class _Streamed:
    """A body `requests` sends chunked: iterable, and of no length it could write down."""

    def __init__(self, content):
        self.content = content

    def __iter__(self):
        return iter([self.content])

    def __len__(self):
        return 0


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if isinstance(body, dict) and "image_url" in body:
        rule = _image_url_rule(case)
        if rule is not None and _well_formed_url(body["image_url"], rule):
            body["image_url"] = IMAGE_URL
    if isinstance(body, dict) and "image" in body:
        rule = _image_url_rule(case, "image")
        if rule is not None and _well_formed_url(body["image"], rule):
            body["image"] = DECLARED_IMAGE
    if isinstance(body, dict) and "checksum_url" in body:
        rule = _image_url_rule(case, "checksum_url")
        if rule is not None and _well_formed_url(body["checksum_url"], rule):
            body["checksum_url"] = CHECKSUM_URL
    headers = case.headers
    key = _header(headers, "Idempotency-Key")
    if key is not None and isinstance(headers[key], str) and IDEMPOTENCY_KEY.fullmatch(headers[key]):
        headers[key] = uuid.uuid4().hex
    if case.operation.label != UPLOAD:
        return
    content = _body_bytes(body)
    digest = _header(headers, "X-Content-SHA256")
    if digest is not None and isinstance(headers[digest], str) and SHA256_HEX.fullmatch(headers[digest]):
        headers[digest] = hashlib.sha256(content).hexdigest()
    length = _header(headers, "Content-Length")
    if length is None:
        kwargs["data"] = _Streamed(content)
    elif int(headers[length]) == 0:
        kwargs["data"] = b""
    else:
        headers[length] = str(len(content))


@schemathesis.hook
def filter_case(context, case):
    if case.operation.label != UPLOAD:
        return True
    length = _header(case.headers, "Content-Length")
    if length is None:
        return True
    value = str(case.headers[length])
    return value.isascii() and value.isdigit()


CANCELS = ("POST /api/v1/jobs/{id}/cancel", "DELETE /api/v1/cancel/{id}")


@schemathesis.hook
def filter_failure(context, failure, case, response):
    if (
        failure.code == "ST202"
        and case.operation.label in CANCELS
        and response.status_code == 400
    ):
        try:
            terminal = response.json().get("reason") == "job_terminal"
        except ValueError:
            terminal = False
        if terminal:
            DROPPED[case.operation.label] += 1
            return False
    return True


DROPPED = collections.Counter()


@atexit.register
def _report_dropped():
    for label, n in sorted(DROPPED.items()):
        print(f"api-contract hooks: {n} x {label} of a finished job answered 400 job_terminal "
              "(the contract's status; not counted as a failure)", file=sys.stderr)
