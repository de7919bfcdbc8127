//! Writing images into volumes with `qemu-img convert`: always an explicit `-f` (never format
//! probing; the disk inside an OVA is named by `--image-opts` with its driver and a `raw`
//! window of the OVA file, which is as explicit), `-O raw -n` onto the existing volume (`--target-is-zero` only onto a volume that
//! is known to read zeros), resource limits and a process group for the child, cancellation
//! that kills it, and progress parsed from `-p` output. Also how much data an image holds
//! (`qemu-img map`). An encrypted target is written through QEMU's `luks` driver
//! (`--target-image-opts`), formatted first by `format_luks`; its passphrase reaches qemu-img
//! only as a `secret` object read from `SecretFd::PATH`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::command::SecretFd;
use crate::image::ImageType;
use crate::image::inspect::Member;
use crate::telemetry::metrics::metrics;

/// Address-space limit of a qemu-img child (image-safety checklist item 6).
const QEMU_IMG_ADDRESS_SPACE: u64 = 4 << 30;
/// Bytes of stderr kept for error messages.
const STDERR_KEEP: usize = 4096;

/// One conversion.
#[derive(Debug, Clone)]
pub(crate) struct ConvertSpec {
    /// The cached image (a path the daemon generated).
    pub(crate) source: PathBuf,
    /// Format decided by the inspector.
    pub(crate) format: ImageType,
    /// Where the image lies inside `source` when that is an OVA (the inspector's `ova_disk`).
    pub(crate) member: Option<Member>,
    /// The volume.
    pub(crate) target: PathBuf,
    /// Write with O_DIRECT (`-t none`); false falls back to the page cache (`-t writeback`).
    pub(crate) direct_io: bool,
    /// Parallel coroutines (`-m`).
    pub(crate) coroutines: u8,
    /// The target reads zeros everywhere (a new thin LV in a pool that zeroes new chunks):
    /// `--target-is-zero`, so only data is written. Never for a volume that held data.
    pub(crate) target_is_zero: bool,
    /// CPU seconds the child may use.
    pub(crate) cpu_limit: Duration,
    /// Read the source without taking its locks (`-U`): a volume a running domain has open,
    /// copied as it is on request (a clone with `allow_in_use`).
    pub(crate) force_share: bool,
    /// At most this many bytes per second (`-r`; `volumes.io.*_bytes_per_second`); 0: no limit.
    pub(crate) rate_limit: u64,
    /// The child's IO priority (`ioprio_set` value, see `config::IoPriority::ioprio`).
    pub(crate) io_priority: Option<i32>,
    /// The target is a LUKS volume (formatted by `format_luks`) opened with this passphrase:
    /// written through QEMU's `luks` driver.
    pub(crate) luks: Option<Arc<SecretFd>>,
}

/// The id of the `secret` object that carries a LUKS passphrase.
const KEY_ID: &str = "lvpkey";

/// `--object secret,...` reading the passphrase from the descriptor `SecretFd` passes.
fn secret_object() -> [String; 2] {
    [
        "--object".into(),
        format!("secret,id={KEY_ID},file={}", SecretFd::PATH),
    ]
}

/// A path inside a QemuOpts string (commas doubled).
fn opts_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// Formats `target` (a new volume) as LUKS for a payload of at least `payload_bytes`, with the
/// passphrase `secret` (QEMU's defaults: aes-256-xts, 8 key slots, PBKDF2 calibrated to 2 s).
/// On a block device the payload is everything after the header; a file is cut to header +
/// payload.
pub(crate) async fn format_luks(
    target: &Path,
    secret: &SecretFd,
    payload_bytes: u64,
) -> Result<(), ConvertError> {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "luks".into()];
    args.extend(secret_object());
    args.extend([
        "-o".into(),
        format!("key-secret={KEY_ID}"),
        target.display().to_string(),
        payload_bytes.to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let limit = crate::command::Limit {
        timeout: Duration::from_secs(300),
        setting: None,
    };
    metrics()
        .qemu_img_invocations_total
        .with_label_values(&["create"])
        .inc();
    crate::command::run_with_secret("qemu-img", &args, limit, Some(secret))
        .await
        .map(|_| ())
        .map_err(|e| ConvertError::Failed {
            status: "qemu-img create -f luks".into(),
            stderr: e.to_string(),
        })
}

/// Why a conversion did not finish.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConvertError {
    #[error("cannot start qemu-img: {0}")]
    Spawn(std::io::Error),
    #[error("qemu-img convert failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("qemu-img convert was stopped")]
    Cancelled,
}

/// How qemu-img is told what the source is: `-f <format>` and the path, or, for the disk in
/// an OVA, `--image-opts` and an option string (`driver=<format>` over a `raw` driver with the
/// member's offset and size over the file; commas in the path doubled, as QemuOpts wants).
/// Returns the flags and the source argument.
pub(crate) fn source_args(
    path: &Path,
    format: ImageType,
    member: Option<Member>,
) -> (Vec<String>, String) {
    let path = path.display().to_string();
    match member {
        None => (vec!["-f".into(), format.as_str().into()], path),
        Some(m) => (
            vec!["--image-opts".into()],
            format!(
                "driver={},file.driver=raw,file.offset={},file.size={},\
                 file.file.driver=file,file.file.filename={}",
                format.as_str(),
                m.offset,
                m.size,
                path.replace(',', ",,")
            ),
        ),
    }
}

/// The argument list (without the program name).
pub(crate) fn convert_args(spec: &ConvertSpec) -> Vec<String> {
    let (flags, source) = source_args(&spec.source, spec.format, spec.member);
    let mut args = vec!["convert".to_string(), "-p".into()];
    if spec.force_share {
        args.push("-U".into());
    }
    args.extend(flags);
    if spec.luks.is_some() {
        args.extend(secret_object());
        args.push("--target-image-opts".into());
    } else {
        args.extend(["-O".into(), "raw".into()]);
    }
    args.extend([
        "-n".into(),
        "-W".into(),
        "-m".into(),
        spec.coroutines.clamp(1, 16).to_string(),
        "-t".into(),
        if spec.direct_io { "none" } else { "writeback" }.into(),
    ]);
    if spec.target_is_zero && spec.luks.is_none() {
        args.push("--target-is-zero".into());
    }
    if spec.rate_limit > 0 {
        args.extend(["-r".into(), spec.rate_limit.to_string()]);
    }
    args.push(source);
    args.push(match spec.luks {
        Some(_) => format!(
            "driver=luks,key-secret={KEY_ID},file.filename={}",
            opts_path(&spec.target)
        ),
        None => spec.target.display().to_string(),
    });
    args
}

/// One extent of `qemu-img map --output=json`.
#[derive(serde::Deserialize)]
struct MapExtent {
    length: u64,
    data: bool,
    #[serde(default)]
    zero: bool,
}

/// Bytes of an image's virtual disk that hold data (not holes or zero clusters), from
/// `qemu-img map` (reads only the image's metadata), each extent rounded out to `granule`
/// bytes (the thin pool's chunk: that much is provisioned for any write into it).
pub(crate) async fn data_bytes(
    source: &Path,
    format: ImageType,
    member: Option<Member>,
    granule: u64,
) -> Result<u64, ConvertError> {
    let (flags, source) = source_args(source, format, member);
    let mut args: Vec<&str> = vec!["map"];
    args.extend(flags.iter().map(String::as_str));
    args.extend(["--output=json", source.as_str()]);
    let limit = crate::command::Limit {
        timeout: Duration::from_secs(300),
        setting: None,
    };
    let out = crate::command::run("qemu-img", &args, limit)
        .await
        .map_err(|e| ConvertError::Failed {
            status: "qemu-img map".into(),
            stderr: e.to_string(),
        })?;
    let extents: Vec<MapExtent> = serde_json::from_str(&out).map_err(|e| ConvertError::Failed {
        status: "qemu-img map".into(),
        stderr: format!("unexpected output: {e}"),
    })?;
    Ok(sum_data(&extents, granule))
}

fn sum_data(extents: &[MapExtent], granule: u64) -> u64 {
    let granule = granule.max(1);
    let mut offset = 0u64;
    let mut total = 0u64;
    let mut last_end = 0u64;
    for e in extents {
        if e.data && !e.zero && e.length > 0 {
            let start = (offset / granule * granule).max(last_end);
            let end = (offset + e.length).div_ceil(granule) * granule;
            total += end.saturating_sub(start);
            last_end = last_end.max(end);
        }
        offset += e.length;
    }
    total
}

/// Whether `path` accepts O_DIRECT writes (tmpfs and some file systems do not).
pub(crate) fn supports_direct_io(path: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)
        .is_ok()
}

/// Parses the last progress value in a chunk of `qemu-img -p` output (`    (12.34/100%)\r`),
/// as a fraction 0..=1.
pub(crate) fn parse_progress(chunk: &str) -> Option<f64> {
    chunk
        .split(['\r', '\n'])
        .filter_map(|line| {
            let line = line.trim();
            let inner = line.strip_prefix('(')?.strip_suffix("/100%)")?;
            inner.parse::<f64>().ok()
        })
        .next_back()
        .map(|p| (p / 100.0).clamp(0.0, 1.0))
}

/// Runs the conversion; `on_progress` gets fractions as qemu-img reports them.
pub(crate) async fn convert(
    spec: &ConvertSpec,
    cancel: &CancellationToken,
    mut on_progress: impl FnMut(f64),
) -> Result<(), ConvertError> {
    let mut cmd = Command::new("qemu-img");
    if let Some(secret) = &spec.luks {
        secret.pass_to(&mut cmd);
    }
    cmd.args(convert_args(spec))
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let cpu = spec.cpu_limit.as_secs().max(60);
    let io_priority = spec.io_priority;
    let daemon = nix::unistd::getpid();
    // SAFETY: only async-signal-safe calls (prctl, getppid, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            use nix::sys::resource::{Resource, setrlimit};
            // If the daemon dies (even by SIGKILL), the conversion dies with it: nothing keeps
            // writing into a volume that restart recovery is about to remove.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // A daemon that died between fork and the line above sent no signal: then the
            // child must not go on to exec.
            if nix::unistd::getppid() != daemon {
                return Err(std::io::Error::other(
                    "the daemon exited before qemu-img started",
                ));
            }
            setrlimit(
                Resource::RLIMIT_AS,
                QEMU_IMG_ADDRESS_SPACE,
                QEMU_IMG_ADDRESS_SPACE,
            )?;
            setrlimit(Resource::RLIMIT_CPU, cpu, cpu)?;
            setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
            if let Some(prio) = io_priority {
                // ioprio_set(IOPRIO_WHO_PROCESS, this process, prio): a plain syscall. A kernel
                // that refuses it leaves the inherited class (not worth failing the write). No
                // pointers are passed.
                let _ = nix::libc::syscall(nix::libc::SYS_ioprio_set, 1, 0, prio);
            }
            Ok(())
        });
    }
    metrics()
        .qemu_img_invocations_total
        .with_label_values(&["convert"])
        .inc();
    tracing::debug!(args = ?convert_args(spec), "starting qemu-img");
    let mut child = cmd.spawn().map_err(ConvertError::Spawn)?;
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf).await;
        crate::command::stderr_tail(&buf, STDERR_KEEP)
    });

    let mut buf = [0u8; 512];
    let mut pending = String::new();
    let kill = |pid: Option<u32>| {
        if let Some(pid) = pid {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                kill(pid);
                let _ = child.wait().await;
                return Err(ConvertError::Cancelled);
            }
            n = stdout.read(&mut buf) => {
                match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
                        if let Some(f) = parse_progress(&pending) {
                            on_progress(f);
                        }
                        // Keep only the unfinished tail.
                        if let Some(i) = pending.rfind(['\r', '\n']) {
                            pending.drain(..=i);
                        }
                    }
                }
            }
        }
    }
    let status = tokio::select! {
        _ = cancel.cancelled() => {
            kill(pid);
            let _ = child.wait().await;
            return Err(ConvertError::Cancelled);
        }
        s = child.wait() => s.map_err(ConvertError::Spawn)?,
    };
    let stderr = stderr_task.await.unwrap_or_default();
    if status.success() {
        on_progress(1.0);
        Ok(())
    } else {
        Err(ConvertError::Failed {
            status: status.to_string(),
            stderr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A conversion of `source` (`format`) into `target` with the test defaults.
    fn spec(
        source: impl Into<PathBuf>,
        format: ImageType,
        target: impl Into<PathBuf>,
    ) -> ConvertSpec {
        ConvertSpec {
            source: source.into(),
            format,
            member: None,
            target: target.into(),
            direct_io: false,
            coroutines: 2,
            cpu_limit: Duration::from_secs(60),
            force_share: false,
            rate_limit: 0,
            io_priority: None,
            luks: None,
            target_is_zero: false,
        }
    }

    #[test]
    fn progress_lines() {
        assert_eq!(parse_progress("    (0.00/100%)\r"), Some(0.0));
        assert_eq!(
            parse_progress("    (12.50/100%)\r    (37.50/100%)\r"),
            Some(0.375)
        );
        assert_eq!(parse_progress("    (100.00/100%)\r\n"), Some(1.0));
        assert_eq!(parse_progress("    (45.0"), None, "incomplete line");
        assert_eq!(parse_progress("garbage"), None);
    }

    #[test]
    fn args_always_name_the_format() {
        let spec = ConvertSpec {
            direct_io: true,
            coroutines: 8,
            ..spec("/c/k.img", ImageType::Raw, "/dev/vg0/v")
        };
        let args = convert_args(&spec);
        let joined = args.join(" ");
        assert_eq!(
            joined,
            "convert -p -f raw -O raw -n -W -m 8 -t none /c/k.img /dev/vg0/v"
        );
        assert!(!joined.contains("target-is-zero"));
        let zeroed = ConvertSpec {
            target_is_zero: true,
            ..spec.clone()
        };
        assert_eq!(
            convert_args(&zeroed).join(" "),
            "convert -p -f raw -O raw -n -W -m 8 -t none --target-is-zero /c/k.img /dev/vg0/v"
        );
        let shared = ConvertSpec {
            force_share: true,
            ..spec
        };
        assert!(
            convert_args(&shared)
                .join(" ")
                .starts_with("convert -p -U -f raw")
        );
    }

    #[test]
    fn a_luks_target_is_opened_through_the_driver_with_the_secret_on_fd_3() {
        let secret = Arc::new(SecretFd::new(b"never-in-argv").unwrap());
        let luks = ConvertSpec {
            target_is_zero: true,
            luks: Some(secret),
            ..spec("/c/k.img", ImageType::Qcow2, "/dev/vg0/a,b")
        };
        let joined = convert_args(&luks).join(" ");
        assert_eq!(
            joined,
            "convert -p -f qcow2 --object secret,id=lvpkey,file=/proc/self/fd/3 \
             --target-image-opts -n -W -m 2 -t writeback /c/k.img \
             driver=luks,key-secret=lvpkey,file.filename=/dev/vg0/a,,b"
        );
        assert!(!joined.contains("never-in-argv"));
    }

    #[test]
    fn data_is_counted_in_whole_granules() {
        let e = |length, data| MapExtent {
            length,
            data,
            zero: false,
        };
        // 4 KiB of data at 0, a hole, 4 KiB at 1 MiB + 4 KiB: two 64 KiB chunks.
        let map = [
            e(4096, true),
            e((1 << 20) - 4096 + 4096, false),
            e(4096, true),
            e(1 << 20, false),
        ];
        assert_eq!(sum_data(&map, 64 << 10), 128 << 10);
        // Adjacent extents in one chunk count once.
        let map = [e(4096, true), e(4096, true)];
        assert_eq!(sum_data(&map, 64 << 10), 64 << 10);
        assert_eq!(sum_data(&[e(1 << 20, false)], 64 << 10), 0);
    }

    #[tokio::test]
    async fn data_bytes_of_a_sparse_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("s.raw");
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[7u8; 1 << 20], 8 << 20).unwrap();
        let qcow = dir.path().join("s.qcow2");
        let ok = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow)
            .status()
            .unwrap();
        assert!(ok.success());
        let bytes = data_bytes(&qcow, ImageType::Qcow2, None, 64 << 10)
            .await
            .unwrap();
        assert_eq!(bytes, 1 << 20);
    }

    #[tokio::test]
    async fn converts_and_reports_progress() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("s.qcow2");
        let dst = dir.path().join("d.raw");
        let ok = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&src)
            .arg("16M")
            .status()
            .unwrap();
        assert!(ok.success());
        std::fs::File::create(&dst)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let spec = ConvertSpec {
            direct_io: supports_direct_io(&dst),
            coroutines: 4,
            ..spec(src, ImageType::Qcow2, dst.clone())
        };
        let mut seen = Vec::new();
        convert(&spec, &CancellationToken::new(), |f| seen.push(f))
            .await
            .unwrap();
        assert_eq!(seen.last(), Some(&1.0));
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }

    /// A VMDK inside another file (as in an OVA) converts and maps through `--image-opts`
    /// exactly as the bare VMDK does.
    #[tokio::test]
    async fn a_member_of_a_container_reads_like_the_bare_image() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("s.raw");
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(8 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[9u8; 1 << 20], 3 << 20).unwrap();
        let vmdk = dir.path().join("s.vmdk");
        let ok = std::process::Command::new("qemu-img")
            .args([
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
            ])
            .arg(&raw)
            .arg(&vmdk)
            .status()
            .unwrap();
        assert!(ok.success());
        // 1536 bytes of something else before the disk, 700 after; a comma in the name.
        let outer = dir.path().join("a,b.ova");
        let disk = std::fs::read(&vmdk).unwrap();
        let mut bytes = vec![0x55u8; 1536];
        bytes.extend_from_slice(&disk);
        bytes.extend_from_slice(&[0x66u8; 700]);
        std::fs::write(&outer, bytes).unwrap();
        let member = Some(Member {
            offset: 1536,
            size: disk.len() as u64,
        });
        let bare = data_bytes(&vmdk, ImageType::Vmdk, None, 64 << 10)
            .await
            .unwrap();
        let inner = data_bytes(&outer, ImageType::Vmdk, member, 64 << 10)
            .await
            .unwrap();
        assert_eq!((bare, inner), (1 << 20, 1 << 20));
        let dst = dir.path().join("d.raw");
        std::fs::File::create(&dst)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let spec = ConvertSpec {
            member,
            ..spec(outer, ImageType::Vmdk, dst.clone())
        };
        assert!(convert_args(&spec).contains(&"--image-opts".to_string()));
        assert!(!convert_args(&spec).contains(&"-f".to_string()));
        convert(&spec, &CancellationToken::new(), |_| {})
            .await
            .unwrap();
        assert!(std::fs::read(&dst).unwrap() == std::fs::read(&raw).unwrap());
    }

    #[tokio::test]
    async fn wrong_format_fails_with_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("s.raw");
        std::fs::write(&src, vec![0u8; 4096]).unwrap();
        let dst = dir.path().join("d.raw");
        std::fs::File::create(&dst).unwrap().set_len(4096).unwrap();
        let spec = ConvertSpec {
            coroutines: 1,
            ..spec(src, ImageType::Qcow2, dst)
        };
        let err = convert(&spec, &CancellationToken::new(), |_| {})
            .await
            .unwrap_err();
        assert!(err.to_string().contains("qcow2"), "{err}");
    }
}
