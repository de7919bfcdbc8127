//! Real GnuPG for signature tests: a throwaway home, keys and signatures made the way vendors
//! make them (`--quick-gen-key`, `--detach-sign`, `--clearsign`, `--faked-system-time` for keys
//! that expired long ago).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A GnuPG home of its own (deleted with the value).
pub struct Gpg {
    home: tempfile::TempDir,
}

impl Gpg {
    pub fn new() -> Gpg {
        let home = tempfile::tempdir().unwrap();
        Gpg { home }
    }

    /// Runs gpg in batch mode; its stdout (asserting success).
    pub fn run(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("gpg")
            .arg("--homedir")
            .arg(self.home.path())
            .args(["--batch", "--yes", "--pinentry-mode", "loopback"])
            .args(["--passphrase", ""])
            .args(args)
            .output()
            .expect("gpg must be installed (apt-get install gnupg)");
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// A new signing key for `uid` expiring after `expire` (`1y`, `1d`), made at `faked`
    /// (`20200101T000000`) when given; its fingerprint.
    pub fn key(&self, uid: &str, expire: &str, faked: Option<&str>) -> String {
        let mut args = vec![];
        if let Some(t) = faked {
            args.extend(["--faked-system-time", t]);
        }
        args.extend(["--quick-gen-key", uid, "ed25519", "sign", expire]);
        self.run(&args);
        let listing = self.run(&["--with-colons", "--list-keys", uid]);
        String::from_utf8(listing)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .map(|l| l.trim_matches(':').to_string())
            .unwrap()
    }

    /// `gpg --export` of `uids` into `path` (a binary keyring, as distributions ship them).
    pub fn export(&self, uids: &[&str], path: &Path) -> PathBuf {
        let mut args = vec!["--export"];
        args.extend(uids);
        std::fs::write(path, self.run(&args)).unwrap();
        path.to_path_buf()
    }

    /// Signs `file` as `uid` with `how` (`--detach-sign`, `--armor --detach-sign`,
    /// `--clearsign`) into `out`, at `faked` when given.
    pub fn sign(&self, uid: &str, how: &str, file: &Path, out: &Path, faked: Option<&str>) {
        let mut args = vec![];
        if let Some(t) = faked {
            args.extend(["--faked-system-time", t]);
        }
        args.extend(["--local-user", uid]);
        args.extend(how.split(' '));
        let (out, file) = (out.display().to_string(), file.display().to_string());
        args.extend(["--output", &out, &file]);
        self.run(&args);
    }
}
