# The module's data that needs no nixpkgs: the typed `settings` options (names, types, defaults),
# the secret files handed to the daemon with LoadCredential, the options mapped onto settings keys,
# and `render`, which turns option values into the daemon's settings the way the module does.
# Pure Nix (builtins only): CI evaluates it with plain `nix-instantiate --eval` (no nixpkgs there)
# to produce and check tests/fixtures/nixos-example.toml, and the docs test reads its tables.
let
  # `path` is a list of attribute names; absent attributes give null.
  getPath = path: attrs:
    builtins.foldl'
      (acc: key: if builtins.isAttrs acc && builtins.hasAttr key acc then builtins.getAttr key acc else null)
      attrs
      path;

  # { a = { b = value; }; } from [ "a" "b" ] and value.
  setPath = path: value:
    let n = builtins.length path;
    in builtins.foldl' (acc: i: { ${builtins.elemAt path (n - 1 - i)} = acc; }) value (builtins.genList (i: i) n);

  # Right side wins; attribute sets are merged recursively (lists and scalars are replaced).
  deepMerge = left: right:
    left // builtins.mapAttrs
      (key: value:
        if builtins.isAttrs value && builtins.hasAttr key left && builtins.isAttrs left.${key}
        then deepMerge left.${key} value
        else value)
      right;

  mergeAll = builtins.foldl' deepMerge { };
in
rec {
  inherit getPath setPath deepMerge;

  # Typed options under `settings`. Defaults are the daemon's own defaults for a host
  # (src/config/mod.rs, profile Host); tests/nix_module.rs checks that they stay equal and that
  # every path exists in the daemon's configuration. Type names are mapped to lib.types by the module.
  typedSettings = [
    {
      path = [ "server" "listen" ];
      type = "address";
      default = "127.0.0.1:8080";
      description = "Address and port of the API listener (`host:port`, IPv6 as `[::]:8443`). A non-loopback address needs TLS (`tls.certFile`, `tls.keyFile`).";
    }
    {
      path = [ "storage" "data_dir" ];
      type = "absolutePath";
      default = "/var/lib/libvirt-volume-provisioner";
      description = "Directory of the job store. The default is the unit's StateDirectory; other paths are created by tmpfiles and made writable for the unit.";
    }
    {
      path = [ "jobs" "max_concurrent" ];
      type = "jobSlots";
      default = 2;
      description = "Jobs running at once (1-64); the others wait in the queue.";
    }
    {
      path = [ "jobs" "queue_capacity" ];
      type = "queueCapacity";
      default = 64;
      description = "Pending jobs waiting for a slot (0-100000); beyond this a request gets 429.";
    }
    {
      path = [ "jobs" "timeout" ];
      type = "duration";
      default = "180m";
      description = "Time limit of one job, counted from the moment it starts running (humantime syntax: `90m`, `3h`).";
    }
    {
      path = [ "jobs" "retention" ];
      type = "duration";
      default = "7d";
      description = "Finished jobs older than this are removed from the store.";
    }
    {
      path = [ "volumes" "backend" ];
      type = "backend";
      default = "lvm";
      description = "`lvm` (logical volumes in `volumes.lvm.volume_group`) or `directory` (sparse files; development).";
    }
    {
      path = [ "volumes" "lvm" "volume_group" ];
      type = "lvmName";
      default = "vg0";
      description = "Volume group the logical volumes are created in. Defaults to the first of `lvm.volumeGroups` (in attribute-name order) when any is declared.";
    }
    {
      path = [ "volumes" "lvm" "devices" ];
      type = "strList";
      default = [ ];
      description = "Physical volumes LVM may open: every LVM command of the daemon gets `--devices <path>` for each, so LVM scans only these (empty: no narrowing). Defaults to the devices of the group in `volumes.lvm.volume_group` when it is one of `lvm.volumeGroups`.";
    }
    {
      path = [ "volumes" "lvm" "thin_pool" ];
      type = "str";
      default = "";
      description = "An existing thin pool in `volumes.lvm.volume_group`: new volumes are thin LVs in it (empty: linear LVs). Defaults to the first of `lvm.volumeGroups.<group in use>.thinPools` (in attribute-name order) when any is declared.";
    }
    {
      path = [ "volumes" "lvm" "golden_images" ];
      type = "bool";
      default = true;
      description = "With a thin pool: each cached image is written once into a read-only golden thin LV, and new volumes are thin snapshots of it.";
    }
    {
      path = [ "volumes" "lvm" "golden_max_bytes" ];
      type = "positiveInt";
      default = 107374182400;
      description = "Pool data (bytes) all golden LVs together may hold; the least recently used are removed to make room, an image that cannot fit is copied instead.";
    }
    {
      path = [ "volumes" "lvm" "thin_pool_max_percent" ];
      type = "percent";
      default = 90;
      description = "Nothing is created in the thin pool while its data or metadata use is above this percent (1-100).";
    }
    {
      path = [ "volumes" "encryption" "key_dir" ];
      type = "str";
      default = "";
      description = "Directory (0700, files 0600) of the records of encrypted volumes, and of their LUKS passphrases when libvirt does not hold them (`libvirt.pool` empty). Empty: `keys` in `storage.data_dir`. Back it up with the volumes: a volume whose key file is lost cannot be opened.";
    }
    {
      path = [ "volumes" "directory" "path" ];
      type = "absolutePath";
      default = "/var/lib/libvirt-volume-provisioner/volumes";
      description = "Directory of the volumes when `volumes.backend = \"directory\"`.";
    }
    {
      path = [ "cache" "dir" ];
      type = "absolutePath";
      default = "/var/cache/libvirt-volume-provisioner";
      description = "Directory of the image cache. The default is the unit's CacheDirectory.";
    }
    {
      path = [ "cache" "max_size_bytes" ];
      type = "positiveInt";
      default = 21474836480;
      description = "Upper bound of the image cache in bytes; least recently used images are evicted beyond it.";
    }
    {
      path = [ "cache" "max_age" ];
      type = "duration";
      default = "7d";
      description = "Cached images unused for longer than this are evicted.";
    }
    {
      path = [ "cache" "declared_fetch_window" ];
      type = "duration";
      default = "30s";
      description = "Declared images (`images.<name>`) missing from the cache are fetched at a random moment within this window after start and after each reload, so a fleet switched at once does not ask its object store at once (`0s`: at once).";
    }
    {
      path = [ "cache" "declared_fetch_concurrency" ];
      type = "jobSlots";
      default = 2;
      description = "Declared images fetched or refreshed at once (1-64).";
    }
    {
      path = [ "s3" "endpoint" ];
      type = "str";
      default = "";
      description = "S3 / MinIO endpoint URL, e.g. `https://minio.example.com:9000`. Empty: no S3 source.";
    }
    {
      path = [ "s3" "region" ];
      type = "str";
      default = "us-east-1";
      description = "S3 region.";
    }
    {
      path = [ "s3" "bucket" ];
      type = "str";
      default = "";
      description = "Bucket used when an image URL names only a key.";
    }
    {
      path = [ "s3" "access_key" ];
      type = "str";
      default = "";
      description = "S3 access key id (an identifier, not the secret: the secret key goes in `s3.secretKeyFile`).";
    }
    {
      path = [ "tls" "client_auth" ];
      type = "clientAuth";
      default = "required";
      description = "`required`: the TLS handshake fails without a client certificate signed by `tls.clientCaFile`; `optional`: a certificate is verified when presented, otherwise an API token is needed.";
    }
    {
      path = [ "auth" "allowed_clients" ];
      type = "strList";
      default = [ ];
      description = "Client certificate subject CNs or DNS/URI SANs allowed to call the API; empty: any certificate the client CA signed.";
    }
    {
      path = [ "libvirt" "uri" ];
      type = "str";
      default = "qemu:///system";
      description = "libvirt connection URI used by `virsh`.";
    }
    {
      path = [ "libvirt" "pool" ];
      type = "str";
      default = "";
      description = "libvirt storage pool of the volumes: refreshed after a volume is written or removed, and libvirt is asked which running domains use a volume before it is reused or deleted; empty: no libvirt integration. When set, the unit is ordered after libvirtd.";
    }
    {
      path = [ "log" "level" ];
      type = "str";
      default = "info";
      description = "`error`, `warn`, `info`, `debug`, `trace`, or a full `RUST_LOG` filter.";
    }
    {
      path = [ "log" "format" ];
      type = "logFormat";
      default = "json";
      description = "`json` or `text`; logs go to the journal.";
    }
  ];

  # Secret (or at least private) files. Each option takes an absolute path *string* outside the
  # Nix store; the unit hands the file over with `LoadCredential=<name>:<path>` and the daemon finds
  # it as `$CREDENTIALS_DIRECTORY/<name>` (config::resolve_credential), so `setting` is set to `name`.
  credentials = [
    {
      option = [ "tls" "certFile" ];
      name = "tls.crt";
      setting = [ "tls" "cert_file" ];
      description = "Server certificate chain (PEM). With `tls.keyFile` the API is served over TLS.";
    }
    {
      option = [ "tls" "keyFile" ];
      name = "tls.key";
      setting = [ "tls" "key_file" ];
      description = "Server private key (PEM).";
    }
    {
      option = [ "tls" "clientCaFile" ];
      name = "client-ca.crt";
      setting = [ "tls" "client_ca_file" ];
      description = "CA certificates (PEM) that client certificates are verified against (mutual TLS).";
    }
    {
      option = [ "auth" "tokensFile" ];
      name = "api-tokens";
      setting = [ "auth" "tokens_file" ];
      description = "API tokens, one per line (`token` or `name:token`).";
    }
    {
      option = [ "s3" "secretKeyFile" ];
      name = "s3-secret-key";
      setting = [ "s3" "secret_key_file" ];
      description = "File holding the S3 secret key.";
    }
    {
      option = [ "s3" "caFile" ];
      name = "s3-ca.crt";
      setting = [ "s3" "ca_file" ];
      description = "CA certificates (PEM) trusted for the S3 endpoint, besides the system roots.";
    }
    {
      option = [ "otlp" "caFile" ];
      name = "otlp-ca.crt";
      setting = [ "telemetry" "otlp_ca_file" ];
      description = "CA certificates (PEM) trusted for the OTLP collector.";
    }
  ];

  # Plain options written to a settings key when set (null: the key is left to `settings` and the
  # daemon's default).
  mapped = [
    {
      option = [ "otlp" "endpoint" ];
      setting = [ "telemetry" "otlp_endpoint" ];
      description = "OTLP/gRPC collector URL, e.g. `https://otel-collector:4317` (sets `settings.telemetry.otlp_endpoint`). null: no trace export unless `settings` says otherwise.";
    }
    {
      option = [ "otlp" "serviceName" ];
      setting = [ "telemetry" "service_name" ];
      description = "Service name of the exported traces (sets `settings.telemetry.service_name`). null: the daemon's default, `libvirt-volume-provisioner`.";
    }
  ];

  # `images.<name> = { url; checksum; checksumUrl; imageType; golden; refresh; }` rendered into
  # the daemon's `[[images]]` array (attribute-name order; fields left out take the daemon's
  # defaults, as the module's option defaults do).
  imagesSettings = cfg:
    let
      images = getPath [ "images" ] cfg;
      entry = name: i: {
        inherit name;
        inherit (i) url;
        checksum = i.checksum or "";
        checksum_url = i.checksumUrl or "";
        image_type = i.imageType or "qcow2";
        golden = i.golden or false;
        refresh = i.refresh or "6h";
      };
    in
    if images == null || images == { } then { }
    else { images = map (name: entry name images.${name}) (builtins.attrNames images); };

  # Settings keys the module writes from `credentials`: only for options that are set.
  credentialSettings = cfg:
    mergeAll (map (c: setPath c.setting c.name) (builtins.filter (c: getPath c.option cfg != null) credentials));

  # `LoadCredential=` entries for the options that are set.
  loadCredentials = cfg:
    map (c: "${c.name}:${getPath c.option cfg}") (builtins.filter (c: getPath c.option cfg != null) credentials);

  # Settings keys the module writes from `mapped`: only for options that are set.
  mappedSettings = cfg:
    mergeAll (map (m: setPath m.setting (getPath m.option cfg)) (builtins.filter (m: getPath m.option cfg != null) mapped));

  # Names `lvm.volumeGroups` accepts (the module asserts it): LVM's VG name characters without
  # `+` (not allowed in a systemd unit name), not starting with `-` or `.`.
  volumeGroupNamePattern = "[A-Za-z0-9_][A-Za-z0-9_.-]*";
  validVolumeGroupName = name: builtins.match volumeGroupNamePattern name != null;

  # The volume group used when `settings.volumes.lvm.volume_group` is not set: the first declared
  # one with a valid name (attribute names are sorted), or null. An invalid name is left to the
  # module's assertion, which names it, instead of becoming the default and failing the type
  # check of `settings.volumes.lvm.volume_group` with a less helpful message.
  defaultVolumeGroup = cfg:
    let
      groups = getPath [ "lvm" "volumeGroups" ] cfg;
      valid = builtins.filter validVolumeGroupName (builtins.attrNames groups);
    in
    if groups == null || valid == [ ] then null else builtins.head valid;

  # The devices of the volume group in use (`volume_group`, the final value of
  # `settings.volumes.lvm.volume_group`) when it is one of `lvm.volumeGroups`, otherwise [ ]:
  # the default of `settings.volumes.lvm.devices`.
  volumeGroupDevices = cfg: volume_group:
    let groups = getPath [ "lvm" "volumeGroups" ] cfg;
    in if groups != null && builtins.hasAttr volume_group groups then groups.${volume_group}.devices else [ ];

  # The first thin pool (attribute names are sorted) of the volume group in use when it is one of
  # `lvm.volumeGroups`, otherwise "": the default of `settings.volumes.lvm.thin_pool`.
  defaultThinPool = cfg: volume_group:
    let
      groups = getPath [ "lvm" "volumeGroups" ] cfg;
      pools = if groups != null && builtins.hasAttr volume_group groups then groups.${volume_group}.thinPools or { } else { };
    in
    if pools == { } then "" else builtins.head (builtins.attrNames pools);

  typedDefaults = mergeAll (map (o: setPath o.path o.default) typedSettings);

  # What the module renders to config.toml for option values `cfg` (the same shape as the module's
  # options, e.g. nixos-module/example.nix). The module itself merges through the NixOS module
  # system with the same pieces: option defaults < default volume group and its devices
  # (mkDefault) < definitions.
  render = cfg:
    let
      vg = defaultVolumeGroup cfg;
      userSettings = if cfg ? settings then cfg.settings else { };
      defaults = deepMerge typedDefaults (if vg == null then { } else setPath [ "volumes" "lvm" "volume_group" ] vg);
      inUse = (deepMerge defaults userSettings).volumes.lvm.volume_group;
    in
    mergeAll [
      defaults
      (setPath [ "volumes" "lvm" "devices" ] (volumeGroupDevices cfg inUse))
      (setPath [ "volumes" "lvm" "thin_pool" ] (defaultThinPool cfg inUse))
      userSettings
      (credentialSettings cfg)
      (mappedSettings cfg)
      (imagesSettings cfg)
    ];
}
