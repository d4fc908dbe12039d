//! What the terminal sees: output formats, colour only on a terminal, and progress lines.

use std::io::IsTerminal;

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
