//! `--debug-console off|null|pty|tty|file=<path>,iobase=<port in hex>`: an x86 I/O port
//! (0xe9 by default, the Bochs and QEMU "port E9 hack") whose writes go to the host, byte for
//! byte, for firmware and early kernel output before any other device works.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, ConsoleConfig, ConsoleOutputMode, OptionParser};

/// The port the guest writes to when `iobase` is not given.
pub const DEBUG_CONSOLE_PORT: u16 = 0xe9;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugConsoleConfig {
    /// The output file (`file=`), or the pseudo-terminal's path once a `pty` is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    pub mode: ConsoleOutputMode,
    /// The I/O port; `None` (as the API may give it) is 0xe9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iobase: Option<u16>,
    /// The original's keys this VMM does not model; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

impl Default for DebugConsoleConfig {
    /// Off, at port 0xe9: what the original's configuration says when none is given.
    fn default() -> Self {
        DebugConsoleConfig {
            file: None,
            mode: ConsoleOutputMode::Off,
            iobase: Some(DEBUG_CONSOLE_PORT),
            extra: Default::default(),
        }
    }
}

impl DebugConsoleConfig {
    pub const OPTION: &'static str = "--debug-console";

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        const MODES: &[&str] = &["off", "null", "pty", "tty"];
        let p = OptionParser::parse(Self::OPTION, raw, &["file", "iobase"], MODES)?;
        // The original takes the first of off, pty, tty, null, file and drops the others; a
        // second mode is refused here rather than ignored.
        let chosen = p.bare_words().len() + usize::from(p.is_set("file"));
        if chosen != 1 {
            return Err(p.error("give exactly one of off, null, pty, tty, file=<path>"));
        }
        let mut c = DebugConsoleConfig {
            iobase: None,
            ..Default::default()
        };
        if let Some((mode, file)) = crate::mode_or_file(&p)? {
            (c.mode, c.file) = (mode, file);
        }
        if let Some(v) = p.get("iobase") {
            let port = v
                .strip_prefix("0x")
                .and_then(|h| u16::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    p.error(format!(
                        "iobase={v}: want an I/O port in hex with 0x (0x0 to 0xffff)"
                    ))
                })?;
            c.iobase = Some(port);
        }
        c.validate()?;
        Ok(c)
    }

    /// What `parse` checks, for a configuration that came as JSON too.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.extra.check("debug_console")?;
        match self.mode {
            ConsoleOutputMode::File if self.file.is_none() => Err(ConfigError::new(
                Self::OPTION,
                "file",
                "file mode needs a path (file=<path>)".into(),
            )),
            ConsoleOutputMode::Socket => Err(ConfigError::new(
                Self::OPTION,
                "socket",
                "the debug console has no socket mode (off, null, pty, tty or file)".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The port the device answers at.
    pub fn port(&self) -> u16 {
        self.iobase.unwrap_or(DEBUG_CONSOLE_PORT)
    }

    /// Whether the VM gets the device: output that goes somewhere (`off` and `null` make none,
    /// as in the original).
    pub fn enabled(&self) -> bool {
        !matches!(self.mode, ConsoleOutputMode::Off | ConsoleOutputMode::Null)
    }

    /// The host side as a console's configuration (mode and file), to open and to confine
    /// like the serial port's.
    pub fn as_console(&self) -> ConsoleConfig {
        let mut c = ConsoleConfig::new(self.mode);
        c.file = self.file.clone();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_originals_syntax() {
        let c = DebugConsoleConfig::parse("off,iobase=0xe9").unwrap();
        assert_eq!(c, DebugConsoleConfig::default());
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"mode":"Off","iobase":233}"#
        );
        let c = DebugConsoleConfig::parse("file=/tmp/dbg,iobase=0x402").unwrap();
        assert_eq!(c.mode, ConsoleOutputMode::File);
        assert_eq!(c.file, Some(PathBuf::from("/tmp/dbg")));
        assert_eq!(c.port(), 0x402);
        assert!(c.enabled());
        let c = DebugConsoleConfig::parse("tty").unwrap();
        assert_eq!(
            (c.mode, c.iobase, c.port()),
            (ConsoleOutputMode::Tty, None, 0xe9)
        );
        let c = DebugConsoleConfig::parse("pty,iobase=").unwrap();
        assert_eq!((c.mode, c.iobase), (ConsoleOutputMode::Pty, None));
        assert!(!DebugConsoleConfig::parse("null").unwrap().enabled());
    }

    #[test]
    fn refuses_what_it_cannot_do_naming_it() {
        for (raw, says) in [
            ("iobase=0xe9", "exactly one"),
            ("off,tty", "exactly one"),
            ("tty,file=/x", "exactly one"),
            ("file=", "needs a path"),
            ("socket=/s", "unknown key"),
            ("tty,iobase=e9", "iobase=e9"),
            ("tty,iobase=0x10000", "iobase=0x10000"),
            ("tty,iobase=0xzz", "iobase=0xzz"),
            ("printer", "not a key=value"),
        ] {
            let e = DebugConsoleConfig::parse(raw).unwrap_err();
            assert_eq!(e.option, "--debug-console");
            assert!(e.to_string().contains(says), "{raw}: {e}");
        }
    }

    #[test]
    fn json_as_the_original_gives_it() {
        let c: DebugConsoleConfig = serde_json::from_str(r#"{"mode": "Tty"}"#).unwrap();
        c.validate().unwrap();
        assert_eq!(c.port(), 0xe9);
        for bad in [
            r#"{"mode": "File"}"#,
            r#"{"mode": "Socket"}"#,
            r#"{"mode": "Off", "baud": 9600}"#,
        ] {
            let c: DebugConsoleConfig = serde_json::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
    }
}
