//! What the terminal sees: output formats, colour only on a terminal, and progress lines.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How data is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// Colour: auto (only on a terminal), always or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

/// Plain progress lines, with colour only on a terminal.
pub struct Printer {
    colour: bool,
    /// Standard output is a terminal (progress may redraw in place).
    pub terminal: bool,
}

impl Printer {
    pub fn new(colour: bool) -> Printer {
        Printer {
            colour,
            terminal: std::io::stdout().is_terminal(),
        }
    }
    pub fn heading(&mut self, s: &str) {
        if self.colour {
            println!("\n\x1b[1m==> {s}\x1b[0m");
        } else {
            println!("\n==> {s}");
        }
    }
    pub fn line(&mut self, s: &str) {
        println!("  {s}");
    }
    pub fn ok(&mut self, s: &str) {
        self.mark("ok", "32", s)
    }
    pub fn warn(&mut self, s: &str) {
        self.mark("warning", "33", s)
    }
    pub fn error(&mut self, s: &str) {
        self.mark("error", "31", s)
    }
    fn mark(&mut self, word: &str, code: &str, s: &str) {
        if self.colour {
            println!("  \x1b[{code}m{word:<7}\x1b[0m {s}");
        } else {
            println!("  {word:<7} {s}");
        }
    }
}

/// A block of lines that follows something slow (install's rollout): redrawn in place by
/// indicatif on a terminal, printed again whenever it changes anywhere else (logs, CI).
pub struct Progress {
    bar: Option<ProgressBar>,
    last: Vec<String>,
}

impl Progress {
    pub fn new(terminal: bool) -> Progress {
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template("  after {elapsed}:\n{msg}")
                    .expect("a valid indicatif template"),
            );
            bar.enable_steady_tick(Duration::from_secs(1));
            bar
        });
        Progress {
            bar,
            last: Vec::new(),
        }
    }

    /// Shows `lines` (`elapsed` is printed with them when they are not redrawn in place).
    pub fn update(&mut self, elapsed: Duration, lines: Vec<String>) {
        if lines == self.last {
            return;
        }
        match &self.bar {
            Some(bar) => bar.set_message(
                lines
                    .iter()
                    .map(|l| format!("    {l}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            None => {
                println!("  after {:>4}s:", elapsed.as_secs());
                for l in &lines {
                    println!("    {l}");
                }
            }
        }
        self.last = lines;
    }

    /// Leaves the last lines on the screen.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
