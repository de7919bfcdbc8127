//! A real terminal for the CLI's live output: a shell script run in a detached tmux session,
//! whose pane the test reads frame by frame.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A shell script run in a real terminal: a detached tmux session (`lvp-<name>-<pid>`) of
/// `width` x `height`, killed on drop. The script's last command's status goes to a file
/// (`exit=<status>`), which tells that it ended.
pub struct Terminal {
    session: String,
    done: PathBuf,
}

impl Terminal {
    /// Writes `script` into `dir/run.sh` and starts it in a new session.
    pub fn start(dir: &Path, name: &str, (width, height): (u16, u16), script: &str) -> Terminal {
        if Command::new("tmux").arg("-V").output().is_err() {
            panic!("tmux is needed for this test (apt-get install tmux; .ci/run installs it)");
        }
        let done = dir.join("done");
        let _ = std::fs::remove_file(&done);
        let file = dir.join("run.sh");
        let script = format!(
            "{script}\necho \"exit=$?\" > {}\nsleep 30\n",
            done.display()
        );
        std::fs::write(&file, script).unwrap();
        let session = format!("lvp-{name}-{}", std::process::id());
        let (x, y) = (width.to_string(), height.to_string());
        let status = Command::new("tmux")
            .args(["new-session", "-d", "-x", &x, "-y", &y, "-s", &session])
            .status()
            .unwrap();
        assert!(status.success());
        let terminal = Terminal { session, done };
        terminal.keys(&[&format!("clear; sh {}", file.display()), "Enter"]);
        terminal
    }

    /// Types `keys` (tmux send-keys names).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend_from_slice(keys);
        assert!(Command::new("tmux").args(&args).status().unwrap().success());
    }

    /// What the pane shows.
    pub fn capture(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the pane shows `what`; that frame.
    pub fn wait_for(&self, what: &str, deadline: Instant) -> String {
        loop {
            let frame = self.capture();
            if frame.contains(what) {
                return frame;
            }
            assert!(
                Instant::now() < deadline,
                "the pane never showed {what:?}:\n{frame}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the script has ended, giving every frame meanwhile to `frame`; the
    /// `exit=<status>` line.
    pub fn wait_done(&self, deadline: Instant, mut frame: impl FnMut(String)) -> String {
        loop {
            // The shell creates the file, then writes the line.
            let exit = std::fs::read_to_string(&self.done).unwrap_or_default();
            if exit.ends_with('\n') {
                return exit;
            }
            assert!(
                Instant::now() < deadline,
                "the command did not finish:\n{}",
                self.capture()
            );
            frame(self.capture());
            std::thread::sleep(Duration::from_millis(150));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .status();
    }
}
