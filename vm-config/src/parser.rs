//! The original's option syntax: `key=value` pairs separated by commas. A value may hold commas
//! inside square brackets (`affinity=[0@[1,2]]`) or double quotes (`serial="a,b"`); `key=` with
//! nothing after it means the key is not given; a key given twice keeps its last value.

use std::collections::BTreeMap;

use super::ConfigError;

/// The pairs of one option value, checked against the keys the option knows.
pub struct OptionParser {
    option: &'static str,
    raw: String,
    /// Trimmed, still quoted as given (empty for `key=`).
    values: BTreeMap<String, String>,
    /// The bare words given (`tty`, `off`, ...), in order, each once.
    bare: Vec<String>,
}

/// Splits at the commas outside brackets and quotes; `None` if brackets or quotes do not
/// balance.
fn split_top_level(s: &str) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let mut depth = 0u32;
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '[' => depth += 1,
            ']' => depth = depth.checked_sub(1)?,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    (depth == 0 && !quoted).then_some(parts)
}

/// Drops the quotes of a value; `""` inside quotes right after a closing quote is a literal `"`
/// (`"a""b"` reads `a"b`), as the original reads it.
fn dequote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut quoted = false;
    let mut prev = '\0';
    for c in s.chars() {
        if c == '"' {
            if prev == '"' && !quoted {
                out.push('"');
            }
            quoted = !quoted;
        } else {
            out.push(c);
        }
        prev = c;
    }
    out
}

impl OptionParser {
    /// Parses `raw` for `--option`. A bare word (no `=`) is accepted only if it is one of
    /// `bare_words`; `bare_words()` returns them.
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
        let err = |msg: String| ConfigError::new(option, raw, msg);
        let mut values = BTreeMap::new();
        let mut bare: Vec<String> = Vec::new();
        let input = raw.trim();
        let parts = if input.is_empty() {
            Vec::new()
        } else {
            split_top_level(input)
                .ok_or_else(|| err("unbalanced brackets or quotes".to_string()))?
        };
        for part in parts {
            if part.is_empty() {
                return Err(err("an empty item between commas".to_string()));
            }
            let Some((key, value)) = part.split_once('=') else {
                if bare_words.contains(&part) {
                    if !bare.iter().any(|b| b == part) {
                        bare.push(part.to_string());
                    }
                    continue;
                }
                return Err(err(format!("'{part}' is not a key=value pair")));
            };
            if !key_sets.iter().any(|keys| keys.contains(&key)) {
                let known = key_sets.concat();
                let mut msg = format!("unknown key '{key}'");
                if !known.is_empty() {
                    msg.push_str(&format!(" (known: {})", known.join(", ")));
                }
                return Err(err(msg));
            }
            // As in the original, a later value replaces an earlier one.
            values.insert(key.to_string(), value.trim().to_string());
        }
        Ok(OptionParser {
            option,
            raw: raw.to_string(),
            values,
            bare,
        })
    }

    pub fn error(&self, msg: impl Into<String>) -> ConfigError {
        ConfigError::new(self.option, &self.raw, msg.into())
    }

    /// Refuses the keys the original accepts but this VMM does not implement yet (`key=`, which
    /// means not given, passes).
    pub fn refuse(&self, unsupported: &[&str]) -> Result<(), ConfigError> {
        match unsupported.iter().find(|k| self.get(k).is_some()) {
            Some(k) => Err(self.error(format!("'{k}' is not supported yet"))),
            None => Ok(()),
        }
    }

    /// Refuses on/off keys we do not implement when they ask for anything but `default`.
    pub fn refuse_unless(&self, key: &str, default: bool) -> Result<(), ConfigError> {
        if self.toggle(key, default)? != default {
            let v = if default { "off" } else { "on" };
            return Err(self.error(format!("{key}={v} is not supported yet")));
        }
        Ok(())
    }

    /// The value of `key`, unquoted; `None` when absent or empty (`key=`).
    pub fn get(&self, key: &str) -> Option<String> {
        self.raw_value(key).map(dequote)
    }

    /// The value as given (quotes kept); `None` when absent or empty.
    fn raw_value(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Whether `key` was given at all, even as `key=`.
    pub fn is_set(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// The bare words given, in order (each once).
    pub fn bare_words(&self) -> &[String] {
        &self.bare
    }

    /// The original's tuple list for `key`: `[<id>@<value>,...]` (`syntax` says which), each
    /// value read by `value`; `None` when the key is not given.
    pub fn tuple_list<T>(
        &self,
        key: &str,
        syntax: &str,
        value: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<Vec<(String, T)>>, ConfigError> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        let bad = |why: String| self.error(format!("{key}: {why} (expected [{syntax},...])"));
        let body = raw
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .ok_or_else(|| bad(format!("'{raw}' is not a list in brackets")))?;
        let mut items = Vec::new();
        let (mut depth, mut start) = (0i32, 0);
        for (i, c) in body.char_indices().chain([(body.len(), ',')]) {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(body[start..i].trim());
                    start = i + 1;
                }
                _ => {}
            }
            if depth < 0 {
                return Err(bad(format!("unbalanced brackets in '{raw}'")));
            }
        }
        if depth != 0 {
            return Err(bad(format!("unbalanced brackets in '{raw}'")));
        }
        items
            .into_iter()
            .map(|item| {
                let (id, v) = item
                    .split_once('@')
                    .ok_or_else(|| bad(format!("'{item}' is not <id>@<value>")))?;
                if id.is_empty() || id.contains(['[', ']', '@']) || v.contains('@') {
                    return Err(bad(format!("'{item}' is not <id>@<value>")));
                }
                let v = value(v).map_err(|m| bad(format!("{id}: {m}")))?;
                Ok((id.to_string(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// `on`/`off`/`true`/`false` in any case, as the original's toggles.
    pub fn toggle(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw_value(key) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "on" | "true" => Ok(true),
                "off" | "false" => Ok(false),
                _ => Err(self.error(format!("'{key}' must be on, off, true or false, not '{v}'"))),
            },
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
                parse_size(&v).ok_or_else(|| {
                    self.error(format!(
                        "invalid size '{v}' for '{key}' (bytes, or a number with K, M or G)"
                    ))
                })
            })
            .transpose()
    }
}

/// `[1,3-5]` (or without brackets) as numbers, ranges expanded; a number above `max` is
/// refused before any range is expanded (`0-4000000000` would otherwise take gigabytes).
pub(crate) fn int_list(raw: &str, max: u32) -> Result<Vec<u32>, String> {
    let body = raw.trim();
    let body = body
        .strip_prefix('[')
        .and_then(|b| b.strip_suffix(']'))
        .unwrap_or(body);
    let mut out = Vec::new();
    for item in body.split(',').map(str::trim) {
        let num = |s: &str| match s.parse::<u32>() {
            Ok(n) if n <= max => Ok(n),
            Ok(_) => Err(format!("'{s}' is more than {max}")),
            Err(_) => Err(format!("'{s}' is not a number")),
        };
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("'{item}' is not a rising range"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(item)?),
        }
    }
    Ok(out)
}

/// `4096`, `64K`, `512M`, `2G`: binary units, upper case only, as the original's sizes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'K') => (&s[..i], 10),
        (i, 'M') => (&s[..i], 20),
        (i, 'G') => (&s[..i], 30),
        _ => (s, 0),
    };
    // The original reads the number with u64's FromStr, which takes a leading '+'.
    let unsigned = digits.strip_prefix('+').unwrap_or(digits);
    if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    unsigned.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_the_originals_suffixes_only() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("0K"), Some(0));
        assert_eq!(parse_size("+2M"), Some(2 << 20));
        assert_eq!(parse_size(" 2M "), Some(2 << 20));
        for bad in [
            "",
            "M",
            "12X",
            "-1G",
            "1.5G",
            "99999999999999999999G",
            "1 G",
            // The original knows K, M and G in upper case only.
            "512m",
            "1g",
            "64k",
            "1T",
            "1KM",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    fn cpus(raw: &str) -> Result<OptionParser, ConfigError> {
        OptionParser::parse(
            "--cpus",
            raw,
            &["boot", "max", "affinity", "kvm_hyperv"],
            &[],
        )
    }

    #[test]
    fn pairs_brackets_and_errors() {
        let p = cpus("boot=2,affinity=[0@[1,2]],max=4").unwrap();
        assert_eq!(p.get("affinity").as_deref(), Some("[0@[1,2]]"));
        assert_eq!(p.number::<u8>("max").unwrap(), Some(4));
        let e = OptionParser::parse("--cpus", "boot=2,foo=1", &["boot"], &[])
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "--cpus boot=2,foo=1: unknown key 'foo' (known: boot)"
        );
        assert!(cpus("boot").is_err());
        let p = OptionParser::parse("--serial", "tty", &["file"], &["tty", "off"]).unwrap();
        assert_eq!(p.bare_words(), ["tty"]);
        assert!(p.toggle("file", false).is_ok());
    }

    /// The original's parser splits the trimmed input at top-level commas: an empty item
    /// (`a=1,,b=2`, a trailing comma) is an unknown key '' there, so an error here too.
    #[test]
    fn empty_items_and_unbalanced_input_are_refused() {
        for bad in [
            "boot=2,",
            ",boot=2",
            "boot=2,,max=2",
            "affinity=[0@[1,2]",
            "affinity=0]",
            "affinity=\"x",
        ] {
            assert!(cpus(bad).is_err(), "{bad}");
        }
        // Only the whole input is trimmed, not each key.
        assert_eq!(
            cpus(" boot=2 ").unwrap().number::<u8>("boot").unwrap(),
            Some(2)
        );
        assert!(cpus("boot=2, max=2").is_err());
        // An empty or blank option value gives nothing.
        for empty in ["", "   "] {
            assert!(!cpus(empty).unwrap().is_set("boot"), "{empty:?}");
        }
    }

    /// `key=` means the key is not given: every getter sees nothing, and the default applies.
    #[test]
    fn an_empty_value_means_not_given() {
        let p = cpus("boot=,max=,affinity=,kvm_hyperv=").unwrap();
        assert_eq!(p.get("boot"), None);
        assert_eq!(p.number::<u32>("max").unwrap(), None);
        assert!(p.toggle("kvm_hyperv", true).unwrap());
        assert!(!p.toggle("kvm_hyperv", false).unwrap());
        assert!(p.refuse(&["affinity"]).is_ok());
        assert!(p.is_set("boot"));
        assert!(!cpus("max=1").unwrap().is_set("boot"));
        // Values are trimmed, so a blank one is empty too.
        assert_eq!(cpus("boot= ").unwrap().get("boot"), None);
        assert_eq!(cpus("boot= 3 ").unwrap().get("boot").as_deref(), Some("3"));
    }

    /// The original keeps the last value of a key given twice.
    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        let p = cpus("boot=2,max=4,boot=3").unwrap();
        assert_eq!(p.number::<u32>("boot").unwrap(), Some(3));
        let p = cpus("boot=2,boot=").unwrap();
        assert_eq!(p.get("boot"), None);
    }

    #[test]
    fn toggles_take_on_off_true_false_in_any_case() {
        for (v, want) in [
            ("on", true),
            ("ON", true),
            ("True", true),
            ("true", true),
            ("off", false),
            ("Off", false),
            ("FALSE", false),
        ] {
            let p = cpus(&format!("kvm_hyperv={v}")).unwrap();
            assert_eq!(p.toggle("kvm_hyperv", !want).unwrap(), want, "{v}");
        }
        for bad in ["yes", "no", "1", "0", "\"on\""] {
            let p = cpus(&format!("kvm_hyperv={bad}")).unwrap();
            assert!(p.toggle("kvm_hyperv", false).is_err(), "{bad}");
        }
        let p = cpus("kvm_hyperv=on").unwrap();
        assert!(p.refuse_unless("kvm_hyperv", false).is_err());
        let p = cpus("kvm_hyperv=off").unwrap();
        assert!(p.refuse_unless("kvm_hyperv", false).is_ok());
    }

    /// Quotes protect commas and brackets, and are dropped from the value.
    #[test]
    fn quoted_values() {
        let p = OptionParser::parse(
            "--disk",
            "path=\"/a,b[c.img\",serial=x",
            &["path", "serial"],
            &[],
        )
        .unwrap();
        assert_eq!(p.get("path").as_deref(), Some("/a,b[c.img"));
        assert_eq!(p.get("serial").as_deref(), Some("x"));
        assert_eq!(dequote("a\"b\"\"c\""), "ab\"c");
        assert_eq!(dequote("\"\""), "");
    }
}
