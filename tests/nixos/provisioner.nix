# NixOS VM test of the module (flake check `nixos-vm`, run with pkgs.testers.runNixOSTest): a
# hypervisor running the example configuration (nixos-module/example.nix) with an empty disk that
# becomes its volume group, nixpkgs' MinIO serving a qcow2 image made at build time, and a client
# calling the API over mutual TLS with curl. Checks: the bytes written into the LV, refusal of
# callers without an allowed certificate (each next to the same request with the allowed one),
# rejection of a qcow2 with a backing file, a settings change applied by reload without a
# restart, LVM narrowed to the group's disk inside the unit's device sandbox, a volume group
# creation resumed after an interruption, refusal when a group of the same name is on an
# undeclared disk, and refusal to create a volume group on a device that carries data (leaving
# the data untouched).
{ self, pkgs }:

let
  example = import ../../nixos-module/example.nix;
  s3User = example.settings.s3.access_key;
  s3Password = "lvp-test-minio-secret";

  # Test PKI, generated at build time with openssl as X.509 v3 certificates with extensions
  # (rustls rejects v1). Test-only keys: they live in the store by design.
  pki = pkgs.runCommand "lvp-test-pki" { nativeBuildInputs = [ pkgs.openssl ]; } ''
    mkdir "$out"
    cd "$out"
    ca() {
      openssl req -x509 -new -noenc -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$1.key" -out "$1.crt" -days 3650 -subj "/CN=$1" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash"
    }
    # leaf NAME CA EXTENDED-KEY-USAGE SUBJECT-ALT-NAMES
    leaf() {
      openssl req -new -noenc -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
        -keyout "$1.key" -out "$1.csr" -subj "/CN=$1"
      printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=$3" "subjectAltName=$4" "subjectKeyIdentifier=hash" \
        "authorityKeyIdentifier=keyid" > "$1.ext"
      openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -CAcreateserial \
        -days 3650 -extfile "$1.ext" -out "$1.crt"
      rm "$1.csr" "$1.ext"
    }
    ca ca
    ca foreign-ca
    leaf hypervisor ca serverAuth "DNS:hypervisor,DNS:localhost,IP:127.0.0.1"
    leaf s3 ca serverAuth "DNS:s3"
    leaf client ca clientAuth "DNS:client"
    leaf intruder ca clientAuth "DNS:intruder"
    leaf stranger foreign-ca clientAuth "DNS:stranger"
    for cert in *.crt; do
      openssl x509 -in "$cert" -noout -text | grep -q "Version: 3 (0x2)"
    done
  '';

  # Images made at build time: an 8 MiB raw disk with recognisable content, its qcow2 form with
  # a `.sha256` beside it, and a hostile qcow2 whose backing file would expose a host file.
  images = pkgs.runCommand "lvp-test-images" { nativeBuildInputs = [ pkgs.qemu-utils ]; } ''
    mkdir "$out"
    cd "$out"
    truncate -s 8M disk.raw
    printf 'libvirt-volume-provisioner NixOS VM test image\n' | dd of=disk.raw conv=notrunc status=none
    seq 1 100000 | dd of=disk.raw bs=1M seek=3 conv=notrunc status=none
    printf 'end of image' | dd of=disk.raw bs=1 seek=$((8 * 1024 * 1024 - 12)) conv=notrunc status=none
    qemu-img convert -f raw -O qcow2 disk.raw disk.qcow2
    sha256sum disk.qcow2 | cut -d' ' -f1 > disk.qcow2.sha256
    sha256sum disk.raw | cut -d' ' -f1 > disk.raw.sha256
    qemu-img create -q -f qcow2 -u -b /etc/hostname -F raw hostile.qcow2 8M
    sha256sum hostile.qcow2 | cut -d' ' -f1 > hostile.qcow2.sha256
  '';

  # MinIO's certificate directory: its module chowns `certificatesDir` to minio (a tmpfiles `d`
  # rule), which a store path does not allow, so an activation script fills one under /run.
  minioCertificates = "/run/lvp-test-minio-certs";

  # nixpkgs marks MinIO as insecure (abandoned upstream, removal announced for 26.05), which
  # stops evaluation. The test's MinIO is a throwaway server on the test's private network, so the
  # mark is lifted here for this test only. Before nixpkgs 26.05 the test must move to another S3
  # server packaged with a NixOS module (Garage).
  permitted = pkg: pkg.overrideAttrs (old: { meta = old.meta // { knownVulnerabilities = [ ]; }; });

  minioCredentials = pkgs.writeText "lvp-test-minio-credentials" ''
    MINIO_ROOT_USER=${s3User}
    MINIO_ROOT_PASSWORD=${s3Password}
  '';
in
{
  name = "libvirt-volume-provisioner";

  nodes = {
    s3 = {
      services.minio = {
        enable = true;
        package = permitted pkgs.minio;
        rootCredentialsFile = minioCredentials;
        certificatesDir = minioCertificates;
      };
      # Test-only keys (they are in the store anyway): world-readable, so MinIO's user reads them.
      system.activationScripts.lvp-test-minio-certs = {
        deps = [ "specialfs" ];
        text = ''
          install -d -m 0755 ${minioCertificates} ${minioCertificates}/CAs
          install -m 0444 ${pki}/s3.crt ${minioCertificates}/public.crt
          install -m 0444 ${pki}/s3.key ${minioCertificates}/private.key
          install -m 0444 ${pki}/ca.crt ${minioCertificates}/CAs/ca.crt
        '';
      };
      networking.firewall.allowedTCPPorts = [ 9000 ];
      environment.systemPackages = [ (permitted pkgs.minio-client) ];
      environment.etc."lvp-test/pki".source = pki;
      environment.etc."lvp-test/images".source = images;
    };

    hypervisor = { lib, ... }: {
      imports = [ self.nixosModules.default ];

      # Exactly the documented example.
      services.libvirt-volume-provisioner = example;

      # /dev/vdb: the example's volume group; /dev/vdc: a disk the refusal check writes data on;
      # /dev/vdd: an interrupted creation; /dev/vde, /dev/vdf: a group of the same name elsewhere.
      virtualisation.emptyDiskImages = [ 2048 64 64 64 64 ];

      # The example expects its secrets under /run/keys (a secret manager's job on a real host);
      # here an activation script copies the test PKI there, outside the store, root-only.
      system.activationScripts.lvp-test-keys = {
        deps = [ "specialfs" ];
        text = ''
          install -D -m 0600 ${pki}/hypervisor.crt ${example.tls.certFile}
          install -D -m 0600 ${pki}/hypervisor.key ${example.tls.keyFile}
          install -D -m 0600 ${pki}/ca.crt ${example.tls.clientCaFile}
          install -D -m 0600 ${pki}/ca.crt ${example.s3.caFile}
          install -D -m 0600 /dev/null ${example.s3.secretKeyFile}
          printf '%s' ${lib.escapeShellArg s3Password} > ${example.s3.secretKeyFile}
        '';
      };

      # A settings change, applied with switch-to-configuration: must reload, not restart.
      specialisation.reloaded.configuration = {
        services.libvirt-volume-provisioner.settings.jobs.max_concurrent = lib.mkForce 3;
      };
      # A volume group whose creation was interrupted after pvcreate: must be completed.
      specialisation.resumed.configuration = {
        services.libvirt-volume-provisioner = {
          lvm.volumeGroups.vg_resume.devices = [ "/dev/vdd" ];
          settings.volumes.lvm.volume_group = "vg_vms";
        };
      };
      # A volume group declared on a blank disk while a group of that name exists on another,
      # undeclared disk: must be refused, the blank disk left blank.
      specialisation.duplicate.configuration = {
        services.libvirt-volume-provisioner = {
          lvm.volumeGroups.vg_dup.devices = [ "/dev/vdf" ];
          settings.volumes.lvm.volume_group = "vg_vms";
        };
      };
      # A second declared volume group on a disk that carries data: must be refused.
      specialisation.refused.configuration = {
        services.libvirt-volume-provisioner = {
          lvm.volumeGroups.vg_refused.devices = [ "/dev/vdc" ];
          settings.volumes.lvm.volume_group = "vg_vms";
        };
      };
    };

    client = {
      environment.systemPackages = [ pkgs.curl ];
      environment.etc."lvp-test/pki".source = pki;
    };
  };

  testScript = { nodes, ... }:
    let
      toplevel = nodes.hypervisor.system.build.toplevel;
    in
    ''
      import json
      import os
      import re
      import time

      API = "https://hypervisor:8443"
      PKI = "/etc/lvp-test/pki"
      CURL = f"curl --silent --show-error --cacert {PKI}/ca.crt"
      UNIT = "libvirt-volume-provisioner.service"
      MC = "SSL_CERT_FILE=/etc/lvp-test/pki/ca.crt mc"


      def curl_as(cert):
          return f"{CURL} --cert {PKI}/{cert}.crt --key {PKI}/{cert}.key"


      def tls_refused(curl, alert):
          """The request fails in the TLS handshake with the server's `alert`, not for any other
          reason (DNS, connection refused). With HTTP/1.1 curl reports the alert: exit status 56
          (receive error; 35 if the alert comes during the handshake) and OpenSSL's text."""
          status, out = client.execute(f"{curl} --http1.1 --fail -o /dev/null {API}/api/v1/jobs 2>&1")
          assert status in (35, 56), (status, out)
          assert alert in out, (status, out)


      def request(method, path, body=None, cert="client"):
          """Returns (HTTP status, parsed JSON body or None)."""
          cmd = f"{curl_as(cert)} -X {method} -o /tmp/body -w '%{{http_code}}' {API}{path}"
          if body is not None:
              cmd += f" -H 'Content-Type: application/json' --data '{json.dumps(body)}'"
          code = int(client.succeed(cmd).strip())
          text = client.succeed("cat /tmp/body")
          try:
              return code, json.loads(text)
          except ValueError:
              return code, None


      def wait_job(job_id, timeout=600):
          deadline = time.monotonic() + timeout
          while True:
              code, status = request("GET", f"/api/v1/jobs/{job_id}")
              assert code == 200, (code, status)
              if status["status"] in ("completed", "failed", "cancelled"):
                  return status
              if time.monotonic() > deadline:
                  raise Exception(f"job {job_id} still {status['status']} after {timeout}s: {status}")
              time.sleep(2)


      def provision(image, volume):
          code, body = request("POST", "/api/v1/jobs", {
              "image_url": f"https://s3:9000/images/{image}",
              "volume_name": volume,
              "volume_size_gb": 1,
              "correlation_id": f"nixos-test-{volume}",
          })
          return code, body


      def reload_successes():
          text = client.succeed(f"{curl_as('client')} --fail {API}/metrics")
          match = re.search(
              r'^libvirt_volume_provisioner_config_reload_total\{[^}]*result="success"[^}]*\} ([0-9.e+]+)$',
              text,
              re.M,
          )
          return float(match.group(1)) if match else 0.0


      def main_pid():
          return hypervisor.succeed(f"systemctl show --property MainPID --value {UNIT}").strip()


      def switch(specialisation):
          return f"${toplevel}/specialisation/{specialisation}/bin/switch-to-configuration test 2>&1"


      start_all()

      with subtest("MinIO serves the images over TLS"):
          s3.wait_for_unit("minio.service")
          s3.wait_for_open_port(9000)
          s3.wait_until_succeeds(f"{MC} alias set local https://s3:9000 ${s3User} ${s3Password}")
          s3.succeed(f"{MC} mb local/images")
          for name in ["disk.qcow2", "disk.qcow2.sha256", "hostile.qcow2", "hostile.qcow2.sha256"]:
              s3.succeed(f"{MC} cp /etc/lvp-test/images/{name} local/images/{name}")

      with subtest("the declared volume group is created and the hardened service runs"):
          hypervisor.wait_for_unit("libvirt-volume-provisioner-vg-vg_vms.service")
          hypervisor.succeed("vgs vg_vms")
          hypervisor.wait_for_unit(UNIT)
          hypervisor.wait_for_open_port(8443)
          caps = hypervisor.succeed(f"systemctl show --property CapabilityBoundingSet --value {UNIT}").split()
          assert sorted(caps) == ["cap_ipc_lock", "cap_sys_admin", "cap_sys_nice"], caps
          assert hypervisor.succeed(f"systemctl show --property NoNewPrivileges --value {UNIT}").strip() == "yes"
          # The configuration file is a stable /etc path; the secrets are credentials, not store files.
          hypervisor.succeed("grep -q 'cert_file = \"tls.crt\"' /etc/libvirt-volume-provisioner/config.toml")
          hypervisor.fail("grep -Rq '${s3Password}' /etc/libvirt-volume-provisioner/")

      with subtest("callers without an allowed client certificate get nothing"):
          # Positive control: the same request with the allowed certificate succeeds, so each
          # failure below is the certificate's.
          client.succeed(f"{curl_as('client')} --http1.1 --fail -o /dev/null {API}/api/v1/jobs")
          # No certificate: the handshake fails (tls.client_auth = "required").
          tls_refused(CURL, "alert certificate required")
          # A certificate from another CA: the handshake fails.
          tls_refused(curl_as("stranger"), "alert unknown ca")
          # Signed by the right CA but not in auth.allowed_clients: 403, no job.
          code, body = request("POST", "/api/v1/jobs", {
              "image_url": "https://s3:9000/images/disk.qcow2",
              "volume_name": "vm-intruder",
              "volume_size_gb": 1,
          }, cert="intruder")
          assert code == 403, (code, body)
          hypervisor.fail("lvs vg_vms/vm-intruder")

      with subtest("a qcow2 image from MinIO is written into a new logical volume"):
          code, body = provision("disk.qcow2", "vm-disk-001")
          assert code == 202, (code, body)
          status = wait_job(body["job_id"])
          assert status["status"] == "completed", status
          assert status["volume_path"] == "/dev/vg_vms/vm-disk-001", status
          size = os.path.getsize("${images}/disk.raw")
          with open("${images}/disk.raw.sha256") as f:
              expected = f.read().strip()
          written = hypervisor.succeed(
              f"head -c {size} /dev/vg_vms/vm-disk-001 | sha256sum | cut -d' ' -f1"
          ).strip()
          assert written == expected, (written, expected)
          lv_bytes = hypervisor.succeed(
              "lvs --noheadings --units b --nosuffix -o lv_size vg_vms/vm-disk-001"
          ).strip()
          assert int(lv_bytes) == 1 << 30, lv_bytes

      with subtest("a qcow2 image with a backing file is rejected"):
          code, body = provision("hostile.qcow2", "vm-hostile")
          if code == 202:
              status = wait_job(body["job_id"])
              assert status["status"] == "failed", status
              reason = status.get("error", "")
          else:
              assert code == 400, (code, body)
              reason = body["message"]
          assert "backing" in reason.lower(), reason
          hypervisor.fail("lvs vg_vms/vm-hostile")

      with subtest("a settings change is reloaded without a restart"):
          pid = main_pid()
          before = reload_successes()
          out = hypervisor.succeed(switch("reloaded"))
          lines = out.splitlines()
          assert any(
              l.startswith("reloading the following units:") and UNIT in l for l in lines
          ), out
          for prefix in ["stopping the following units:", "restarting the following units:", "starting the following units:"]:
              assert not any(l.startswith(prefix) and UNIT in l for l in lines), out
          hypervisor.succeed("grep -Eq '^[[:space:]]*max_concurrent = 3$' /etc/libvirt-volume-provisioner/config.toml")
          deadline = time.monotonic() + 30
          while reload_successes() <= before:
              assert time.monotonic() < deadline, "the daemon did not report a successful reload"
              time.sleep(1)
          assert main_pid() == pid, (pid, main_pid())
          hypervisor.succeed(f"systemctl is-active {UNIT}")

      with subtest("LVM narrowed to the group's disk works inside the unit's device sandbox"):
          # The daemon's LVM commands get --devices for the group's disks (settings.volumes.lvm.devices);
          # in the daemon's device sandbox such a command opens nothing else and reports nothing else.
          code, effective = request("GET", "/api/v1/config")
          assert code == 200, (code, effective)
          assert effective["config"]["volumes"]["lvm"]["devices"] == ["/dev/vdb"], effective
          out = hypervisor.succeed(
              "systemd-run --quiet --wait --pipe --property=DevicePolicy=closed"
              " --property='DeviceAllow=/dev/mapper/control rw' --property='DeviceAllow=block-device-mapper rw'"
              " --property='DeviceAllow=/dev/vdb rw'"
              " \"$(command -v vgs)\" --devices /dev/vdb --noheadings -o vg_name vg_vms 2>&1"
          )
          assert out.strip() == "vg_vms", out

      with subtest("a volume group creation interrupted after pvcreate is completed"):
          # What an interrupted run of the unit leaves: a physical volume in no group (made the
          # way the unit makes them, narrowed to the disk, so that no LVM devices file appears).
          hypervisor.succeed("pvcreate --devices /dev/vdd /dev/vdd")
          hypervisor.succeed(switch("resumed"))
          hypervisor.succeed("vgs vg_resume")
          journal = hypervisor.succeed("journalctl --no-pager -u libvirt-volume-provisioner-vg-vg_resume.service")
          assert "unused LVM physical volume" in journal, journal
          hypervisor.wait_for_unit(UNIT)

      with subtest("a volume group of the same name on an undeclared disk is never duplicated"):
          # The unit may read every disk, so it sees vg_dup on /dev/vde although only /dev/vdf is
          # declared (with read access to the declared disk only, it saw no group and made a second one).
          hypervisor.succeed("vgcreate --devices /dev/vde vg_dup /dev/vde")
          hypervisor.fail(switch("duplicate"))
          journal = hypervisor.succeed("journalctl --no-pager -u libvirt-volume-provisioner-vg-vg_dup.service")
          assert "are not among the declared devices" in journal, journal
          assert hypervisor.succeed("pvs --noheadings -o pv_name --select vg_name=vg_dup").split() == ["/dev/vde"]
          # Nothing was written to /dev/vdf: still no signature at all.
          assert hypervisor.succeed("wipefs --no-act --noheadings /dev/vdf").strip() == ""
          hypervisor.fail(f"systemctl is-active {UNIT}")

      with subtest("a volume group is never created on a device that carries data"):
          hypervisor.succeed("echo 'label: dos' | sfdisk --quiet /dev/vdc")
          hypervisor.succeed("printf precious | dd of=/dev/vdc bs=1 seek=1048576 conv=notrunc,fsync status=none")
          hypervisor.fail(switch("refused"))
          journal = hypervisor.succeed("journalctl --no-pager -u libvirt-volume-provisioner-vg-vg_refused.service")
          assert "refusing to create vg_refused" in journal, journal
          hypervisor.fail("vgs vg_refused")
          hypervisor.succeed('test "$(blkid -p -o value -s PTTYPE /dev/vdc)" = dos')
          hypervisor.succeed('test "$(dd if=/dev/vdc bs=1 skip=1048576 count=8 status=none)" = precious')
          # The daemon requires its volume groups: it does not run on a refused one.
          hypervisor.fail(f"systemctl is-active {UNIT}")
    '';
}
