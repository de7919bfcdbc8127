# -*- coding: utf-8 -*-
# Copyright: libvirt-volume-provisioner maintainers
# Apache License 2.0 (see the repository's Cargo.toml)

"""The daemon's HTTP API as the modules of lvp.provisioner use it: one client built from the
connection options (mutual TLS, token), JSON requests that satisfy the API's rules, errors
that carry the API's C(reason), jobs followed to their end, and Idempotency-Keys derived from
a module's arguments. Python's standard library only (urllib, ssl), so target hosts need no
extra packages."""

from __future__ import annotations

import hashlib
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

from ansible.module_utils.basic import env_fallback

TERMINAL = ("completed", "failed", "cancelled")
# Largest answer read (a list of 1,000 jobs is a few MiB).
MAX_BODY = 32 << 20


def connection_spec():
    """The options every module takes (documented in the doc fragment lvp.provisioner.connection)."""
    return dict(
        api_url=dict(type="str", default="http://127.0.0.1:8080", fallback=(env_fallback, ["LVP_SERVER_URL"])),
        ca_path=dict(type="path"),
        client_cert=dict(type="path"),
        client_key=dict(type="path", no_log=False),
        api_token=dict(type="str", no_log=True, fallback=(env_fallback, ["LVP_TOKEN"])),
        validate_certs=dict(type="bool", default=True),
        timeout=dict(type="int", default=60),
    )


def connection_together():
    """Options that come in pairs."""
    return [("client_cert", "client_key")]


class LvpError(Exception):
    """A request the daemon refused (status >= 400) or could not be reached for (status 0)."""

    def __init__(self, status, reason, message, body=None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The API never redirects: a redirect would carry the token elsewhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class Client:
    """The API of one daemon."""

    def __init__(self, params):
        url = params["api_url"].rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise LvpError(0, "setup", "api_url %r is not an http:// or https:// URL" % url)
        self.base = url
        self.token = params.get("api_token")
        self.timeout = params["timeout"]
        handlers = [_NoRedirect()]
        if parsed.scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=self._tls(params)))
        self.opener = urllib.request.build_opener(*handlers)

    @staticmethod
    def _tls(params):
        ctx = ssl.create_default_context(cafile=params.get("ca_path"))
        if not params["validate_certs"]:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if params.get("client_cert"):
            ctx.load_cert_chain(params["client_cert"], params.get("client_key"))
        return ctx

    def request(self, method, path, body=None, headers=None):
        """Sends a request; returns (status, JSON body, response headers), raises LvpError."""
        data = None
        all_headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        if self.token:
            all_headers["Authorization"] = "Bearer " + self.token
        all_headers.update(headers or {})
        req = urllib.request.Request(self.base + path, data=data, headers=all_headers, method=method)
        try:
            with self.opener.open(req, timeout=self.timeout) as resp:
                return resp.status, _json(resp.read(MAX_BODY + 1)), dict(resp.headers)
        except urllib.error.HTTPError as e:
            answer = _json(e.read(MAX_BODY + 1))
            reason = answer.get("reason") or "http_%d" % e.code
            message = "%s %s: HTTP %d %s" % (method, path, e.code, answer.get("message", ""))
            raise LvpError(e.code, reason, message.strip(), answer)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise LvpError(0, "unreachable", "cannot reach %s: %s" % (self.base, e))

    def get(self, path):
        return self.request("GET", path)[1]

    def paths(self):
        """The paths of the daemon's OpenAPI document (what this daemon can do)."""
        return set(self.get("/api/v1/openapi.json").get("paths", {}).keys())

    def job(self, job_id):
        return self.get("/api/v1/jobs/%s" % urllib.parse.quote(job_id, safe=""))

    def wait(self, job_id, timeout, interval=1.0):
        """Polls a job until it is terminal; its last status. Raises LvpError after C(timeout) s."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("status") in TERMINAL:
                return job
            if time.monotonic() > deadline:
                raise LvpError(0, "wait_timeout", "job %s not finished within %d s (it goes on)" % (job_id, timeout), job)
            time.sleep(interval)

    def jobs_for_volume(self, name):
        """The daemon's records of jobs that made C(name) (provision and clone), newest first."""
        jobs = self.get("/api/v1/jobs?limit=1000").get("jobs", [])
        return [j for j in jobs if j.get("volume_name") == name and j.get("kind") in ("provision", "clone")]


def _json(raw):
    if len(raw) > MAX_BODY:
        raise LvpError(0, "protocol", "answer larger than %d bytes" % MAX_BODY)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {"message": raw[:200].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"value": value}


def idempotency_key(kind, fields):
    """A key derived from the fields that name a request (the same arguments give the same key,
    so a re-run gets the job an earlier run made instead of a second one)."""
    canonical = json.dumps([kind, fields], sort_keys=True, separators=(",", ":"))
    return "ansible-lvp-%s-%s" % (kind, hashlib.sha256(canonical.encode()).hexdigest()[:40])


def image_fields(params):
    """C(image_url) or C(image) (a declared name), and C(image_type), as a request body part."""
    body = {}
    if params.get("image_url"):
        body["image_url"] = params["image_url"]
    if params.get("image"):
        body["image"] = params["image"]
    if params.get("image_type"):
        body["image_type"] = params["image_type"]
    return body
