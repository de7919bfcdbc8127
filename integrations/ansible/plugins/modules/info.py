#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: libvirt-volume-provisioner maintainers
# Apache License 2.0 (see the repository's Cargo.toml)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: info
short_description: What a libvirt-volume-provisioner daemon has and can do
description:
  - Reads a daemon's health, its recent jobs, its image cache, its declared images (when the
    daemon has them) and which optional routes it serves. Changes nothing.
version_added: 0.1.0
author:
  - libvirt-volume-provisioner maintainers (@lvp-maintainers)
extends_documentation_fragment:
  - lvp.provisioner.connection
options:
  job_limit:
    description:
      - At most this many jobs, newest first (1 to 1000; 0 leaves jobs out).
    type: int
    default: 50
  volume:
    description:
      - Only the jobs that made this volume.
    type: str
attributes:
  check_mode:
    support: full
    description: Reads only.
  diff_mode:
    support: none
    description: Nothing to compare; the job's status is returned.
  platform:
    support: full
    platforms: posix
    description: Any host that reaches the daemon's API; Python's standard library only.
"""

EXAMPLES = r"""
- name: What hv1 has
  lvp.provisioner.info:
    api_url: https://hv1.example.com:8443
    ca_path: /etc/lvp/ca.crt
    client_cert: /etc/lvp/client.crt
    client_key: /etc/lvp/client.key
  register: hv1

- name: Grow volumes only where the daemon can
  ansible.builtin.debug:
    msg: "{{ hv1.features.resize }}"
"""

RETURN = r"""
health:
  description: C(GET /health) (status, version, uptime, jobs running and slots).
  returned: always
  type: dict
jobs:
  description: Recent jobs (StatusResponse), newest first.
  returned: always
  type: list
  elements: dict
cache:
  description: C(GET /api/v1/cache/images) (the first 1000 entries and the count).
  returned: always
  type: dict
declared_images:
  description: C(GET /api/v1/images), or null when the daemon has no declared images.
  returned: always
  type: list
  elements: dict
features:
  description: Optional routes this daemon serves (from its OpenAPI document).
  returned: always
  type: dict
  contains:
    resize:
      description: C(POST /api/v1/volumes/{name}/resize).
      type: bool
      returned: always
    clone:
      description: C(POST /api/v1/volumes/{name}/clone).
      type: bool
      returned: always
    declared_images:
      description: C(GET /api/v1/images).
      type: bool
      returned: always
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.lvp.provisioner.plugins.module_utils.lvp_api import (
    Client,
    LvpError,
    connection_spec,
    connection_together,
)


def gather(module, client):
    p = module.params
    paths = client.paths()
    features = dict(
        resize="/api/v1/volumes/{name}/resize" in paths,
        clone="/api/v1/volumes/{name}/clone" in paths,
        declared_images="/api/v1/images" in paths,
    )
    jobs = []
    if p["volume"]:
        jobs = client.jobs_for_volume(p["volume"])[: p["job_limit"]]
    elif p["job_limit"] > 0:
        jobs = client.get("/api/v1/jobs?limit=%d" % p["job_limit"]).get("jobs", [])
    declared = None
    if features["declared_images"]:
        declared = client.get("/api/v1/images").get("images", [])
    return dict(
        changed=False,
        health=client.get("/health"),
        jobs=jobs,
        cache=client.get("/api/v1/cache/images?offset=0&limit=1000"),
        declared_images=declared,
        features=features,
    )


def main():
    spec = connection_spec()
    spec.update(job_limit=dict(type="int", default=50), volume=dict(type="str"))
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True, required_together=connection_together())
    if not 0 <= module.params["job_limit"] <= 1000:
        module.fail_json(msg="job_limit must be between 0 and 1000")
    try:
        result = gather(module, Client(module.params))
    except LvpError as e:
        module.fail_json(msg=e.message, reason=e.reason, status=e.status, body=e.body)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
