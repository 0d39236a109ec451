//! The original's option syntax: `key=value` pairs separated by commas, where a value may hold
//! commas inside square brackets (`affinity=[0@[1,2]]`).

use std::collections::BTreeMap;

use super::ConfigError;

/// The pairs of one option value, checked against the keys the option knows.
pub struct OptionParser {
    option: &'static str,
    raw: String,
    values: BTreeMap<String, String>,
}

fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

impl OptionParser {
    /// Parses `raw` for `--option`. A bare word (no `=`) is accepted only if it is one of
    /// `bare_words` and is returned under the key `""`.
    pub fn parse(
        option: &'static str,
        raw: &str,
        keys: &[&str],
        bare_words: &[&str],
    ) -> Result<Self, ConfigError> {
        Self::parse_sets(option, raw, &[keys], bare_words)
    }

    /// `parse` with the known keys in several lists (for example the option's own and a
    /// set that several options share).
    pub fn parse_sets(
        option: &'static str,
        raw: &str,
        key_sets: &[&[&str]],
        bare_words: &[&str],
    ) -> Result<Self, ConfigError> {
        let mut values = BTreeMap::new();
        for part in split_top_level(raw) {
            if part.is_empty() {
                continue;
            }
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, v),
                None if bare_words.contains(&part) => ("", part),
                None => {
                    return Err(ConfigError::new(
                        option,
                        raw,
                        format!("'{part}' is not a key=value pair"),
                    ))
                }
            };
            if !key.is_empty() && !key_sets.iter().any(|keys| keys.contains(&key)) {
                return Err(ConfigError::new(
                    option,
                    raw,
                    format!(
                        "unknown key '{key}' (known: {})",
                        key_sets.concat().join(", ")
                    ),
                ));
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(ConfigError::new(
                    option,
                    raw,
                    format!("'{key}' is given twice"),
                ));
            }
        }
        Ok(OptionParser {
            option,
            raw: raw.to_string(),
            values,
        })
    }

    pub fn error(&self, msg: impl Into<String>) -> ConfigError {
        ConfigError::new(self.option, &self.raw, msg.into())
    }

    /// Refuses the keys the original accepts but this VMM does not implement yet.
    pub fn refuse(&self, unsupported: &[&str]) -> Result<(), ConfigError> {
        match unsupported.iter().find(|k| self.has(k)) {
            Some(k) => Err(self.error(format!("'{k}' is not supported yet"))),
            None => Ok(()),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn bare(&self) -> Option<&str> {
        self.get("")
    }

    pub fn has(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// `on`/`off` (and `true`/`false`).
    pub fn toggle(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some("on" | "true") => Ok(true),
            Some("off" | "false") => Ok(false),
            Some(v) => Err(self.error(format!("'{key}' must be on or off, not '{v}'"))),
        }
    }

    pub fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|_| self.error(format!("'{key}' must be a number, not '{v}'")))
            })
            .transpose()
    }

    pub fn size(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        self.get(key)
            .map(|v| {
                parse_size(v).ok_or_else(|| {
                    self.error(format!(
                        "invalid size '{v}' for '{key}' (use e.g. 512M, 2G)"
                    ))
                })
            })
            .transpose()
    }
}

/// `4096`, `64K`, `512M`, `2G` (binary units, either case).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        (i, 't' | 'T') => (&s[..i], 40),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        for bad in [
            "",
            "M",
            "12X",
            "-1G",
            "1.5G",
            "99999999999999999999G",
            "1 G",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn pairs_brackets_and_errors() {
        let p = OptionParser::parse(
            "--cpus",
            "boot=2,affinity=[0@[1,2]],max=4",
            &["boot", "max", "affinity"],
            &[],
        )
        .unwrap();
        assert_eq!(p.get("affinity"), Some("[0@[1,2]]"));
        assert_eq!(p.number::<u8>("max").unwrap(), Some(4));
        let e = OptionParser::parse("--cpus", "boot=2,foo=1", &["boot"], &[])
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "--cpus boot=2,foo=1: unknown key 'foo' (known: boot)"
        );
        assert!(OptionParser::parse("--cpus", "boot=1,boot=2", &["boot"], &[]).is_err());
        assert!(OptionParser::parse("--cpus", "boot", &["boot"], &[]).is_err());
        let p = OptionParser::parse("--serial", "tty", &["file"], &["tty", "off"]).unwrap();
        assert_eq!(p.bare(), Some("tty"));
        assert!(p.toggle("file", false).is_ok());
        let p = OptionParser::parse("--memory", "shared=yes", &["shared"], &[]).unwrap();
        assert!(p.toggle("shared", false).is_err());
    }
}
