//! Diagnostics: warnings and errors to stderr, everything to the optional
//! `logFile`. stdout is reserved for the result or the error JSON.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Default)]
pub struct Log {
    file: Option<File>,
    prefix: String,
}

impl Log {
    pub fn new(prefix: String) -> Log {
        Log { file: None, prefix }
    }

    pub fn open_file(&mut self, path: &Path) {
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => self.file = Some(f),
            Err(e) => eprintln!("flannel: cannot open logFile {}: {e}", path.display()),
        }
    }

    fn write_file(&mut self, level: &str, msg: &str) {
        if let Some(f) = &mut self.file {
            let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            let _ = writeln!(f, "{}.{:03} {level} {} {msg}", t.as_secs(), t.subsec_millis(), self.prefix);
        }
    }

    pub fn info(&mut self, msg: &str) {
        self.write_file("INFO", msg);
    }

    pub fn warn(&mut self, msg: &str) {
        eprintln!("flannel: warning: {} {msg}", self.prefix);
        self.write_file("WARN", msg);
    }

    pub fn error(&mut self, msg: &str) {
        eprintln!("flannel: error: {} {msg}", self.prefix);
        self.write_file("ERROR", msg);
    }
}
