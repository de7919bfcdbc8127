#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: libvirt-volume-provisioner maintainers
# Apache License 2.0 (see the repository's Cargo.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: image
short_description: An image kept in a libvirt-volume-provisioner daemon's cache
description:
  - Prefetches an image (by URL, or by the name of an image the daemon declares) into the
    daemon's cache and waits for the job; the next volume from it starts from the cache.
  - Reports a change only when the image was downloaded (the job's C(cache_hit) says so).
version_added: 0.1.0
author:
  - libvirt-volume-provisioner maintainers (@lvp-maintainers)
extends_documentation_fragment:
  - lvp.provisioner.connection
options:
  image_url:
    description:
      - The image (C(s3://bucket/key), C(https://...), C(file:///...)). Exclusive with O(image).
    type: str
  image:
    description:
      - The name of an image the daemon declares (C([[images]])). Exclusive with O(image_url).
    type: str
  image_type:
    description:
      - Format of the image, checked by the daemon.
    type: str
  state:
    description:
      - V(prefetched) is the only state (the daemon evicts cache entries itself).
    type: str
    choices: [prefetched]
    default: prefetched
  wait:
    description:
      - Whether to wait for the download to end.
    type: bool
    default: true
  wait_timeout:
    description:
      - Seconds to wait for the download.
    type: int
    default: 3600
attributes:
  check_mode:
    support: full
    description: Looks the image up in the daemon's cache listing (or its declared images).
  diff_mode:
    support: none
    description: Nothing to compare; the job's status is returned.
  platform:
    support: full
    platforms: posix
    description: Any host that reaches the daemon's API; Python's standard library only.
"""

EXAMPLES = r"""
- name: Ubuntu in every hypervisor's cache before the VMs come
  lvp.provisioner.image:
    api_url: https://{{ inventory_hostname }}:8443
    ca_path: /etc/lvp/ca.crt
    api_token: "{{ lvp_token }}"
    image_url: s3://vm-images/ubuntu-24.04.qcow2
"""

RETURN = r"""
job:
  description: The prefetch job's last status (the API's StatusResponse).
  returned: unless in check mode
  type: dict
cached:
  description: Whether the image was in the cache before (check mode) or is now.
  returned: always
  type: bool
"""

import uuid

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.lvp.provisioner.plugins.module_utils.lvp_api import (
    Client,
    LvpError,
    connection_spec,
    connection_together,
    image_fields,
)


def cached_now(client, params):
    """Whether the daemon's cache holds the image (check mode)."""
    if params.get("image"):
        images = client.get("/api/v1/images").get("images", [])
        return any(i.get("name") == params["image"] and i.get("cached") for i in images)
    listing = client.get("/api/v1/cache/images?offset=0&limit=1000").get("images", [])
    return any(e.get("image_url") == params["image_url"] for e in listing)


def prefetch(module, client):
    p = module.params
    if module.check_mode:
        cached = cached_now(client, p)
        return dict(changed=not cached, cached=cached)
    body = image_fields(p)
    # A key per run: a replayed job of an earlier run would not say whether the image is
    # still cached now; the job's cache_hit does.
    key = "ansible-lvp-image-%s" % uuid.uuid4()
    dummy, answer, dummy2 = client.request("POST", "/api/v1/cache/fetch", body, {"Idempotency-Key": key})
    job = client.wait(answer["job_id"], p["wait_timeout"]) if p["wait"] else client.job(answer["job_id"])
    if job.get("status") in ("failed", "cancelled"):
        module.fail_json(msg="job %s %s: %s" % (job["job_id"], job["status"], job.get("error")), job=job)
    done = job.get("status") == "completed"
    return dict(changed=not (done and job.get("cache_hit")), cached=done, job=job)


def main():
    spec = connection_spec()
    spec.update(
        image_url=dict(type="str"),
        image=dict(type="str"),
        image_type=dict(type="str"),
        state=dict(type="str", choices=["prefetched"], default="prefetched"),
        wait=dict(type="bool", default=True),
        wait_timeout=dict(type="int", default=3600),
    )
    module = AnsibleModule(
        argument_spec=spec,
        supports_check_mode=True,
        mutually_exclusive=[("image_url", "image")],
        required_one_of=[("image_url", "image")],
        required_together=connection_together(),
    )
    try:
        result = prefetch(module, Client(module.params))
    except LvpError as e:
        module.fail_json(msg=e.message, reason=e.reason, status=e.status, body=e.body)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
