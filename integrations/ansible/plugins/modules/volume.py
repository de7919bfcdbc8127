#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: libvirt-volume-provisioner maintainers
# Apache License 2.0 (see the repository's Cargo.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: volume
short_description: A volume made from an image by a libvirt-volume-provisioner daemon
description:
  - Provisions a volume from an image URL or a declared image name, grows it, or deletes it,
    through the daemon's HTTP API, and waits for the job.
  - Idempotent through an C(Idempotency-Key) derived from O(name), the image and O(image_type),
    not from the size. A re-run gets the job an earlier run made and reports no change; a
    larger O(size_gb) than that job's grows the volume through C(POST /api/v1/volumes/{name}/resize).
  - The daemon keeps idempotency keys as long as their jobs (C(jobs.retention), 7 days by
    default); it has no read-only volume lookup, so after that a re-run submits a new job,
    which rewrites an existing volume of the same size that nothing has open.
version_added: 0.1.0
author:
  - libvirt-volume-provisioner maintainers (@lvp-maintainers)
extends_documentation_fragment:
  - lvp.provisioner.connection
options:
  name:
    description:
      - The volume's name (C([A-Za-z0-9+_.-]), 1 to 127 characters).
    type: str
    required: true
  state:
    description:
      - V(present) makes the volume from the image (and grows it to O(size_gb)); V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
  image_url:
    description:
      - The image to write (C(s3://bucket/key), C(https://...), C(file:///...)). Exclusive with O(image).
    type: str
  image:
    description:
      - The name of an image the daemon declares (C([[images]])). Exclusive with O(image_url).
    type: str
  image_type:
    description:
      - Format of the image, checked by the daemon (C(qcow2), C(raw), ...).
    type: str
  size_gb:
    description:
      - Size of the volume in GiB. Required with O(state=present).
    type: int
  correlation_id:
    description:
      - Echoed in the job, its logs and traces.
    type: str
  encrypt:
    description:
      - Make the volume LUKS-encrypted. The job's C(encryption) says where its key is (a libvirt
        secret to name in the domain's C(<encryption format='luks'>) element, or a key file).
      - Only when the volume is made; an existing volume keeps what it is.
    type: bool
    default: false
  secret_uuid:
    description:
      - With O(encrypt=true), an existing libvirt secret (usage C(volume), not private) holding
        the passphrase; omitted, the daemon makes one.
    type: str
  wait:
    description:
      - Whether to wait for the job to end.
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait for the job.
    type: int
    default: 3600
attributes:
  check_mode:
    support: full
    description: Predicts from the daemon's job records; sends nothing that changes state.
  diff_mode:
    support: none
    description: Nothing to compare; the job's status is returned.
  platform:
    support: full
    platforms: posix
    description: Any host that reaches the daemon's API; Python's standard library only.
notes:
  - With O(state=absent) the module always reports a change, as the daemon's C(DELETE) answers the
    same for a volume it removed and for one that was not there.
"""

EXAMPLES = r"""
- name: A 50 GiB disk from a qcow2 in S3
  lvp.provisioner.volume:
    api_url: https://hv1.example.com:8443
    ca_path: /etc/lvp/ca.crt
    client_cert: /etc/lvp/client.crt
    client_key: /etc/lvp/client.key
    name: vm-disk-001
    image_url: s3://vm-images/ubuntu-24.04.qcow2
    size_gb: 50

- name: Grown to 80 GiB
  lvp.provisioner.volume:
    api_url: https://hv1.example.com:8443
    name: vm-disk-001
    image_url: s3://vm-images/ubuntu-24.04.qcow2
    size_gb: 80

- name: An encrypted disk; the job says which libvirt secret holds its key
  lvp.provisioner.volume:
    api_url: https://hv1.example.com:8443
    name: vm-disk-002
    image_url: s3://vm-images/ubuntu-24.04.qcow2
    size_gb: 50
    encrypt: true

- name: Gone
  lvp.provisioner.volume:
    api_url: https://hv1.example.com:8443
    name: vm-disk-001
    state: absent
"""

RETURN = r"""
job:
  description: The job's last status (the API's StatusResponse).
  returned: when a job was submitted or found
  type: dict
volume_path:
  description: Where the volume is (C(/dev/vg/name) or a file).
  returned: when the job completed
  type: str
resize:
  description: The daemon's answer to the resize.
  returned: when the volume was grown
  type: dict
"""

import time
import urllib.parse

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.lvp.provisioner.plugins.module_utils.lvp_api import (
    Client,
    LvpError,
    connection_spec,
    connection_together,
    idempotency_key,
    image_fields,
)

RESIZE_PATH = "/api/v1/volumes/{name}/resize"
# Replayed failed jobs skipped before giving up (each retry's key is chained to the failed job).
MAX_RETRIES = 10


def same_image(job, params):
    if params.get("image"):
        return job.get("image") == params["image"]
    return job.get("image_url") == params.get("image_url")


def predict(client, params):
    """Check mode: what a real run would do, from the daemon's job records."""
    done = [j for j in client.jobs_for_volume(params["name"]) if j.get("status") == "completed"]
    if not done or not same_image(done[0], params):
        return dict(changed=True, job=done[0] if done else None)
    return dict(changed=params["size_gb"] > (done[0].get("volume_size_gb") or 0), job=done[0])


def submit(client, body, key):
    """POSTs the job; a key still being stored elsewhere is retried. (HTTP status, answer)."""
    for attempt in range(5):
        try:
            status, answer, dummy = client.request("POST", "/api/v1/jobs", body, {"Idempotency-Key": key})
            return status, answer
        except LvpError as e:
            if e.reason != "idempotency_key_in_flight" or attempt == 4:
                raise
            time.sleep(1)
    raise LvpError(0, "idempotency_key_in_flight", "the Idempotency-Key stayed in flight")


def follow(module, client, job_id):
    p = module.params
    return client.wait(job_id, p["wait_timeout"]) if p["wait"] else client.job(job_id)


def present(module, client):
    p = module.params
    fields = image_fields(p)
    key = idempotency_key("volume", dict(name=p["name"], **fields))
    body = dict(volume_name=p["name"], volume_size_gb=p["size_gb"], **fields)
    if p.get("correlation_id"):
        body["correlation_id"] = p["correlation_id"]
    if p.get("secret_uuid") and not p["encrypt"]:
        module.fail_json(msg="secret_uuid is for encrypted volumes: set encrypt: true")
    if p["encrypt"]:
        body["encryption"] = dict(format="luks")
        if p.get("secret_uuid"):
            body["encryption"]["secret_uuid"] = p["secret_uuid"]
    if module.check_mode:
        return predict(client, p)
    for dummy in range(MAX_RETRIES):
        try:
            status, answer = submit(client, body, key)
        except LvpError as e:
            if e.reason == "idempotency_key_reused":
                # An earlier run made this volume from this image with another body (size,
                # correlation id): the job records say what it has.
                return existing(module, client)
            raise
        job = follow(module, client, answer["job_id"])
        if status == 200 and job.get("status") in ("failed", "cancelled"):
            # A replay of an earlier run's failed job: try again under a key chained to it.
            key = idempotency_key("volume-retry", dict(after=job["job_id"], key=key))
            continue
        if job.get("status") in ("failed", "cancelled"):
            module.fail_json(msg="job %s %s: %s" % (job["job_id"], job["status"], job.get("error")), job=job)
        return dict(changed=status == 202, job=job, volume_path=job.get("volume_path"))
    module.fail_json(msg="%d earlier jobs for this volume failed" % MAX_RETRIES)


def existing(module, client):
    """The volume an earlier run made: as it is, or grown to O(size_gb)."""
    p = module.params
    done = [j for j in client.jobs_for_volume(p["name"]) if j.get("status") == "completed"]
    if not done or not same_image(done[0], p):
        module.fail_json(
            msg="the Idempotency-Key of volume %s was used for another request whose job has not "
            "completed; see the daemon's jobs for this volume" % p["name"],
            reason="idempotency_key_reused",
        )
    made = done[0].get("volume_size_gb") or 0
    if p["size_gb"] == made:
        return dict(changed=False, job=done[0], volume_path=done[0].get("volume_path"))
    if p["size_gb"] < made:
        module.fail_json(msg="volume %s has %d GiB; volumes are never shrunk" % (p["name"], made), reason="shrink_refused")
    return resize(module, client)


def resize(module, client):
    p = module.params
    if RESIZE_PATH not in client.paths():
        module.fail_json(
            msg="volume %s was made with another size and this daemon cannot grow volumes "
            "(its OpenAPI document has no %s)" % (p["name"], RESIZE_PATH),
            reason="resize_not_supported",
        )
    if module.check_mode:
        return dict(changed=True)
    path = "/api/v1/volumes/%s/resize" % urllib.parse.quote(p["name"], safe="")
    status, answer, dummy = client.request("POST", path, dict(size_gb=p["size_gb"]))
    result = dict(changed=True, resize=answer)
    if status == 202 and answer.get("job_id"):
        job = follow(module, client, answer["job_id"])
        if job.get("status") in ("failed", "cancelled"):
            module.fail_json(msg="resize job %s %s: %s" % (job["job_id"], job["status"], job.get("error")), job=job)
        result["job"] = job
    elif "previous_size_bytes" in answer:
        result["changed"] = answer["previous_size_bytes"] != answer.get("size_bytes")
    return result


def absent(module, client):
    if module.check_mode:
        return dict(changed=True)
    path = "/api/v1/volumes/%s" % urllib.parse.quote(module.params["name"], safe="")
    status, answer, dummy = client.request("DELETE", path)
    result = dict(changed=True, deleted=answer)
    if status == 202 and answer.get("job_id"):
        result["job"] = follow(module, client, answer["job_id"])
    return result


def main():
    spec = connection_spec()
    spec.update(
        name=dict(type="str", required=True),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        image_url=dict(type="str"),
        image=dict(type="str"),
        image_type=dict(type="str"),
        size_gb=dict(type="int"),
        correlation_id=dict(type="str"),
        encrypt=dict(type="bool", default=False),
        secret_uuid=dict(type="str", no_log=False),  # a UUID naming the secret, not its value
        wait=dict(type="bool", default=True),
        wait_timeout=dict(type="int", default=3600),
    )
    module = AnsibleModule(
        argument_spec=spec,
        supports_check_mode=True,
        mutually_exclusive=[("image_url", "image")],
        required_together=connection_together(),
        required_if=[
            ("state", "present", ("image_url", "image"), True),
            ("state", "present", ("size_gb",)),
        ],
    )
    try:
        client = Client(module.params)
        if module.params["state"] == "absent":
            result = absent(module, client)
        else:
            result = present(module, client)
    except LvpError as e:
        module.fail_json(msg=e.message, reason=e.reason, status=e.status, body=e.body)
    module.exit_json(volume=module.params["name"], **result)


if __name__ == "__main__":
    main()
