//! Running the external tools the daemon drives (LVM, virsh): `LC_ALL=C`, stdin closed (a
//! prompt can never hang a job), a time limit after which the child is killed, stdout returned,
//! and the tail of stderr in every error. `stderr_tail` is shared with `qemu-img`, whose output
//! is streamed instead. Also `SecretFd`: how a secret (a LUKS passphrase) reaches a child
//! without an argument, an environment variable or a file on disk.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// Bytes of a command's stderr kept in an error.
pub(crate) const STDERR_KEEP: usize = 2048;

/// How one command may run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limit {
    /// The command is killed after this long.
    pub(crate) timeout: Duration,
    /// The setting that controls `timeout`, named in the error so the reader knows what to
    /// raise (e.g. `volumes.lvm.command_timeout`); `None` for a fixed limit.
    pub(crate) setting: Option<&'static str>,
}

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CommandError {
    #[error(
        "`{command}` timed out after {}{}",
        humantime::format_duration(*.timeout),
        setting.map(|s| format!(" ({s})")).unwrap_or_default()
    )]
    TimedOut {
        command: String,
        timeout: Duration,
        setting: Option<&'static str>,
    },
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        /// The last `STDERR_KEEP` bytes of stderr, trimmed.
        stderr: String,
    },
    #[error("`{command}` printed output that is not UTF-8")]
    NotUtf8 { command: String },
}

/// A secret for one child process: the bytes in an anonymous memory file (`memfd_create`,
/// close-on-exec in the daemon) that the child gets as its descriptor 3 and opens as
/// `SecretFd::PATH` (qemu's `secret,file=`, virsh's `--file`; `/proc/self/fd/3` rather than
/// `/dev/fd/3`, which a minimal /dev lacks). Nothing reaches a disk, an
/// argument list or an environment; the memory is freed when the last descriptor closes.
#[derive(Debug)]
pub(crate) struct SecretFd {
    /// The memory file holding the secret (close-on-exec here; `pass_to` makes it fd 3).
    fd: OwnedFd,
}

impl SecretFd {
    /// What the child opens to read the secret.
    pub(crate) const PATH: &'static str = "/proc/self/fd/3";

    pub(crate) fn new(secret: &[u8]) -> std::io::Result<SecretFd> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let fd = memfd_create("lvp-secret", MFdFlags::MFD_CLOEXEC)?;
        let mut file = std::fs::File::from(fd);
        file.write_all(secret)?;
        Ok(SecretFd { fd: file.into() })
    }

    /// Makes the secret the child's descriptor 3 (the only descriptor it inherits from this).
    pub(crate) fn pass_to(&self, cmd: &mut Command) {
        let raw = self.fd.as_raw_fd();
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if raw == 3 {
                    nix::libc::fcntl(3, nix::libc::F_SETFD, 0);
                } else if nix::libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Runs `program args...` within `limit` and returns its stdout.
pub(crate) async fn run(
    program: &str,
    args: &[&str],
    limit: Limit,
) -> Result<String, CommandError> {
    run_with_secret(program, args, limit, None).await
}

/// `run`, with `secret` (when given) readable by the child at `SecretFd::PATH`.
pub(crate) async fn run_with_secret(
    program: &str,
    args: &[&str],
    limit: Limit,
    secret: Option<&SecretFd>,
) -> Result<String, CommandError> {
    let command = format!("{program} {}", args.join(" "));
    let mut cmd = Command::new(program);
    if let Some(secret) = secret {
        secret.pass_to(&mut cmd);
    }
    cmd.args(args)
        .env("LC_ALL", "C")
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    tracing::debug!(%command, "running command");
    let out = match tokio::time::timeout(limit.timeout, cmd.output()).await {
        Err(_) => {
            return Err(CommandError::TimedOut {
                command,
                timeout: limit.timeout,
                setting: limit.setting,
            });
        }
        Ok(Err(source)) => return Err(CommandError::Spawn { command, source }),
        Ok(Ok(out)) => out,
    };
    if !out.status.success() {
        return Err(CommandError::Failed {
            command,
            status: out.status,
            stderr: stderr_tail(&out.stderr, STDERR_KEEP),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| CommandError::NotUtf8 { command })
}

/// The last `keep` bytes of `stderr` (cut at a character boundary), trimmed.
pub(crate) fn stderr_tail(stderr: &[u8], keep: usize) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    let start = text.len().saturating_sub(keep);
    let start = (start..=text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    text[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(ms: u64) -> Limit {
        Limit {
            timeout: Duration::from_millis(ms),
            setting: Some("test.timeout"),
        }
    }

    #[tokio::test]
    async fn errors_carry_stderr_status_and_the_setting() {
        let err = run(
            "sh",
            &["-c", "echo 'Volume group \"vg0\" not found' >&2; exit 5"],
            limit(5000),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("Volume group \"vg0\" not found"), "{err}");
        assert!(err.contains("exit status: 5"), "{err}");
        let err = run("sleep", &["5"], limit(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("timed out after 300ms (test.timeout)"),
            "{err}"
        );
        let err = run("/nonexistent/lvs", &[], limit(1000))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot start"), "{err}");
        let env = run("sh", &["-c", "echo $LC_ALL"], limit(5000))
            .await
            .unwrap();
        assert_eq!(env.trim(), "C");
    }

    #[tokio::test]
    async fn a_secret_reaches_the_child_only_as_descriptor_3() {
        let secret = SecretFd::new(b"s3cr3t-value").unwrap();
        let script = format!(
            "cat {}; echo; cat /proc/self/cmdline /proc/self/environ",
            SecretFd::PATH
        );
        let out = run_with_secret("sh", &["-c", &script], limit(5000), Some(&secret))
            .await
            .unwrap();
        let mut lines = out.splitn(2, '\n');
        assert_eq!(lines.next(), Some("s3cr3t-value"));
        assert!(!lines.next().unwrap().contains("s3cr3t"), "{out}");
        // Read twice: each open starts at the beginning.
        let again = run_with_secret("cat", &[SecretFd::PATH], limit(5000), Some(&secret))
            .await
            .unwrap();
        assert_eq!(again, "s3cr3t-value");
        // Without it, the child has no descriptor 3.
        assert!(run("cat", &[SecretFd::PATH], limit(5000)).await.is_err());
    }

    #[test]
    fn tails_cut_at_character_boundaries() {
        assert_eq!(stderr_tail(b"  abc  \n", 10), "abc");
        assert_eq!(stderr_tail("xxé".as_bytes(), 1), "");
        assert_eq!(stderr_tail("xxé".as_bytes(), 2), "é");
        assert_eq!(stderr_tail(b"0123456789", 4), "6789");
    }
}
