# -*- coding: utf-8 -*-
# Copyright: libvirt-volume-provisioner maintainers
# Apache License 2.0 (see the repository's Cargo.toml)

from __future__ import annotations


class ModuleDocFragment:
    """How every module of lvp.provisioner reaches a daemon."""

    DOCUMENTATION = r"""
options:
  api_url:
    description:
      - Base URL of the daemon's API (C(https://host:8443), or C(http://127.0.0.1:8080) on loopback).
      - Falls back to the environment variable E(LVP_SERVER_URL), like the daemon's own command line.
    type: str
    default: http://127.0.0.1:8080
  ca_path:
    description:
      - CA certificate (PEM) that signed the daemon's certificate; the system's roots when not given.
    type: path
  client_cert:
    description:
      - Client certificate (PEM) for mutual TLS; needs O(client_key).
    type: path
  client_key:
    description:
      - Private key (PEM) of O(client_cert).
    type: path
  api_token:
    description:
      - API token (C(auth.tokens_file) on the daemon), sent as an C(Authorization) bearer token.
      - Falls back to the environment variable E(LVP_TOKEN). Never logged.
    type: str
  validate_certs:
    description:
      - Whether the daemon's certificate is checked. Only for tests; keep it on.
    type: bool
    default: true
  timeout:
    description:
      - Seconds one HTTP request may take.
    type: int
    default: 60
"""
