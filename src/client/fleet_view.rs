//! `fleet`'s live view: one line per host on a terminal (a bar while a host's job runs), plain
//! lines when stdout is not a terminal (one per change of a host's state, never per percent),
//! nothing for `--output json`.

use std::cell::RefCell;
use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where the hosts' lines go.
pub(crate) enum Live {
    /// Live lines on the terminal.
    Lines(MultiProgress),
    /// A plain line per state change.
    Plain,
    /// Nothing (`--output json`: stdout carries only the final document).
    Quiet,
}

impl Live {
    /// Live lines on a terminal, plain lines when stdout is not one or `NO_COLOR` is set,
    /// nothing for `--output json`.
    pub(crate) fn choose(json: bool) -> Live {
        if json {
            Live::Quiet
        } else if std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
            Live::Lines(MultiProgress::with_draw_target(ProgressDrawTarget::stdout()))
        } else {
            Live::Plain
        }
    }

    /// The line of `host`, shown as `label` in a column `width` wide.
    pub(crate) fn line(&self, label: &str, width: usize) -> HostLine {
        let bar = match self {
            Live::Lines(multi) => {
                let template = format!("{{prefix:<{width}}} [{{bar:30}}] {{wide_msg}}");
                let bar = multi.add(ProgressBar::new(1000));
                bar.set_style(
                    ProgressStyle::with_template(&template)
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                bar.set_prefix(label.to_string());
                bar.set_message("waiting for a slot");
                Some(bar)
            }
            _ => None,
        };
        HostLine {
            label: label.to_string(),
            bar,
            plain: matches!(self, Live::Plain),
            last_state: RefCell::new(String::new()),
        }
    }

    /// Removes the live lines (before a table that says it all).
    pub(crate) fn clear(&self) {
        if let Live::Lines(multi) = self {
            let _ = multi.clear();
        }
    }
}

/// One host's line.
pub(crate) struct HostLine {
    label: String,
    bar: Option<ProgressBar>,
    /// Plain lines: print a line per state change.
    plain: bool,
    /// The state last printed (plain lines).
    last_state: RefCell<String>,
}

impl HostLine {
    /// The host is in `state` (a word: `submitting`, `downloading`...), with `detail` (percent,
    /// bytes) and how far it is (0..=100) when known.
    pub(crate) fn show(&self, state: &str, detail: &str, percent: Option<f64>) {
        if let Some(bar) = &self.bar {
            if let Some(p) = percent {
                bar.set_position((p.clamp(0.0, 100.0) * 10.0).round() as u64);
            }
            bar.set_message(format!("{state} {detail}"));
        } else if self.plain && *self.last_state.borrow() != state {
            println!("{}: {state} {detail}", self.label);
            *self.last_state.borrow_mut() = state.to_string();
        }
    }

    /// The host is done: `ok` or not, with a last word.
    pub(crate) fn done(&self, ok: bool, text: &str) {
        let mark = if ok { "ok" } else { "FAILED" };
        if let Some(bar) = &self.bar {
            if ok {
                bar.set_position(1000);
            }
            bar.finish_with_message(format!("{mark}: {text}"));
        } else if self.plain {
            println!("{}: {mark}: {text}", self.label);
        }
    }
}
