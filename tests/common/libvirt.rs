//! libvirt inside the test VM, for the VM suites that need it (tests/libvirt_vm.rs,
//! tests/lifecycle_vm.rs): starting libvirtd over the read-only host root, `virsh`, and tiny
//! domains started paused (QEMU holds the disk open, no guest CPU runs under emulation).

use std::path::Path;
use std::time::{Duration, Instant};

use super::vm::{CaseResult, ensure, run};

/// The connection every call uses.
pub const URI: &str = "qemu:///system";

/// `virsh -c qemu:///system ARGS...`.
pub fn virsh(args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-c", URI];
    all.extend_from_slice(args);
    run("virsh", &all)
}

pub fn domain_state(name: &str) -> Result<String, String> {
    Ok(virsh(&["domstate", name])?.trim().to_string())
}

/// Defines and starts (paused) a domain named `name` whose only disk is `source`, a block
/// device or a file. Under TCG with no guest CPU running, QEMU just holds the disk open.
pub fn start_paused_domain(dir: &Path, name: &str, source: &Path, block: bool) -> CaseResult {
    start_paused_with(dir, name, source, block, "")
}

/// `start_paused_domain` for a LUKS volume (a block device) opened with the libvirt secret
/// `secret_uuid`: QEMU must open the LUKS header with the key before the domain starts. On
/// failure the domain is left undefined.
pub fn start_paused_encrypted(
    dir: &Path,
    name: &str,
    source: &Path,
    secret_uuid: &str,
) -> CaseResult {
    let encryption = format!(
        "<encryption format='luks'><secret type='passphrase' uuid='{secret_uuid}'/></encryption>"
    );
    let started = start_paused_with(dir, name, source, true, &encryption);
    if started.is_err() {
        let _ = virsh(&["undefine", name]);
    }
    started
}

fn start_paused_with(
    dir: &Path,
    name: &str,
    source: &Path,
    block: bool,
    disk_extra: &str,
) -> CaseResult {
    let (kind, attr) = if block {
        ("block", "dev")
    } else {
        ("file", "file")
    };
    let xml = format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='{kind}' device='disk'>
      <driver name='qemu' type='raw'/>
      <source {attr}='{}'/>
      <target dev='vda' bus='virtio'/>
      {disk_extra}
    </disk>
    <memballoon model='none'/>
  </devices>
</domain>
",
        source.display()
    );
    let file = dir.join(format!("{name}.xml"));
    std::fs::write(&file, xml).map_err(|e| e.to_string())?;
    virsh(&["define", &file.display().to_string()])?;
    virsh(&["start", "--paused", name])?;
    let state = domain_state(name)?;
    ensure!(state == "paused", "domain {name} is {state:?}, not paused");
    Ok(())
}

/// Defines a libvirt secret of usage `volume` (usage id `usage_path`), private or not, with
/// the value in `value_file`; returns its UUID.
pub fn define_volume_secret(
    dir: &Path,
    usage_path: &str,
    private: bool,
    value_file: &Path,
) -> Result<String, String> {
    let usage = format!("<usage type='volume'><volume>{usage_path}</volume></usage>");
    define_secret(dir, &usage, private, value_file)
}

/// Defines a libvirt secret with the `<usage>` element `usage`, private or not, with the value
/// in `value_file`; returns its UUID.
pub fn define_secret(
    dir: &Path,
    usage: &str,
    private: bool,
    value_file: &Path,
) -> Result<String, String> {
    let private = if private { "yes" } else { "no" };
    let xml = format!("<secret ephemeral='no' private='{private}'>{usage}</secret>");
    let file = dir.join("secret.xml");
    std::fs::write(&file, xml).map_err(|e| e.to_string())?;
    let out = virsh(&["secret-define", "--file", &file.display().to_string()])?;
    let uuid = out
        .split_whitespace()
        .find(|w| w.len() == 36 && w.matches('-').count() == 4)
        .ok_or(format!("no UUID in {out:?}"))?
        .to_string();
    let value = value_file.display().to_string();
    virsh(&[
        "secret-set-value",
        "--secret",
        &uuid,
        "--file",
        &value,
        "--plain",
    ])?;
    Ok(uuid)
}

/// The UUIDs of the secrets libvirt has.
pub fn secret_uuids() -> Result<Vec<String>, String> {
    Ok(virsh(&["secret-list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|t| t.len() == 36 && t.matches('-').count() == 4)
        .map(str::to_string)
        .collect())
}

pub fn stop_domain(name: &str) -> CaseResult {
    virsh(&["destroy", name])?;
    virsh(&["undefine", name]).map(|_| ())
}

/// libvirtd's state directories made writable over the read-only host root, LVM made
/// udev-free for libvirt's own LVM calls too, QEMU run without a private /dev (see
/// `libvirt_config`), then virtlogd and libvirtd started as daemons.
pub fn setup_libvirt(data: &Path) -> CaseResult {
    let state = Path::new("/run/libvirt-vm");
    for dir in ["/etc/libvirt", "/var/lib/libvirt", "/var/log/libvirt"] {
        let copy = state.join(&dir[1..]);
        std::fs::create_dir_all(&copy).map_err(|e| e.to_string())?;
        run(
            "cp",
            &["-a", &format!("{dir}/."), &copy.display().to_string()],
        )?;
        run("mount", &["--bind", &copy.display().to_string(), dir])?;
    }
    // QEMU's capabilities, probed at libvirtd's first start (about 15 s under emulation), are
    // kept between runs in the test data directory.
    let cache = data.join("libvirt-cache");
    std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
    run(
        "mount",
        &["--bind", &cache.display().to_string(), "/var/cache/libvirt"],
    )?;
    run(
        "mount",
        &["--bind", "/run/lvm-vm/lvm.conf", "/etc/lvm/lvm.conf"],
    )?;
    libvirt_config()?;
    run("virtlogd", &["-d"])?;
    start_libvirtd()
}

/// QEMU without libvirt's private /dev namespace: building it fails in this VM (QEMU then
/// finds no /dev/null and no disk), where /dev is the initramfs' devtmpfs seen through the
/// 9p-shared host root. The LVM open count does not depend on it (it counts opens of the
/// device-mapper device, whatever node they go through).
pub fn libvirt_config() -> CaseResult {
    use std::io::Write;
    let mut qemu = std::fs::OpenOptions::new()
        .append(true)
        .open("/etc/libvirt/qemu.conf")
        .map_err(|e| e.to_string())?;
    writeln!(qemu, "namespaces = []").map_err(|e| e.to_string())
}

pub fn start_libvirtd() -> CaseResult {
    run("libvirtd", &["-d"])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // `list` answers from the domain list; `version` would load QEMU's capabilities first.
        if virsh(&["list", "--name"]).is_ok() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "libvirtd did not answer within 120 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Stops libvirtd (SIGTERM to the pid in its pid file) and waits until it is gone.
pub fn stop_libvirtd() -> CaseResult {
    let pid: i32 = std::fs::read_to_string("/run/libvirtd.pid")
        .map_err(|e| format!("/run/libvirtd.pid: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("/run/libvirtd.pid: {e}"))?;
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while nix::sys::signal::kill(pid, None).is_ok() {
        ensure!(Instant::now() < deadline, "libvirtd did not stop");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
