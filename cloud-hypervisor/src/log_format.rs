//! `--log-format`: the original's templates. Tokens in braces are replaced for each line
//! (`{boottime}`, `{wallclock}`, `{glog}`, `{localglog}`, `{pid}`, `{tid}`, `{thread}`,
//! `{level}`, `{levelchar}`, `{location}`, `{msg}`, and the date and time fields `{year}`,
//! `{month}`, `{day}`, `{hour}`, `{minute}`, `{second}`, `{micros}`, `{offset}` in UTC, each
//! with a `local` variant); `{{` and `}}` are literal braces. A template with an unknown token
//! or an unpaired brace is refused when the VMM starts, naming it.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    Micros,
    Offset,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Token {
    Literal(String),
    BootTime,
    WallClock,
    Glog,
    LocalGlog,
    Pid,
    Tid,
    Thread,
    Level,
    LevelChar,
    Location,
    Msg,
    /// A date or time field, in UTC (`false`) or local time (`true`).
    Time(Field, bool),
}

fn token(name: &str) -> Option<Token> {
    let (field, local) = match name.strip_prefix("local") {
        Some(rest) => (rest, true),
        None => (name, false),
    };
    let field = match field {
        "year" => Some(Field::Year),
        "month" => Some(Field::Month),
        "day" => Some(Field::Day),
        "hour" => Some(Field::Hour),
        "minute" => Some(Field::Minute),
        "second" => Some(Field::Second),
        "micros" => Some(Field::Micros),
        "offset" => Some(Field::Offset),
        _ => None,
    };
    if let Some(f) = field {
        return Some(Token::Time(f, local));
    }
    Some(match name {
        "boottime" => Token::BootTime,
        "wallclock" => Token::WallClock,
        "glog" => Token::Glog,
        "localglog" => Token::LocalGlog,
        "pid" => Token::Pid,
        "tid" => Token::Tid,
        "thread" => Token::Thread,
        "level" => Token::Level,
        "levelchar" => Token::LevelChar,
        "location" => Token::Location,
        "msg" => Token::Msg,
        _ => return None,
    })
}

/// The template's tokens, or why it is refused.
pub fn parse(format: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut literal = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => return Err(format!("'{{{name}' has no closing '}}'")),
                    }
                }
                let t = token(&name).ok_or_else(|| format!("unknown token '{{{name}}}'"))?;
                if !literal.is_empty() {
                    out.push(Token::Literal(std::mem::take(&mut literal)));
                }
                out.push(t);
            }
            '}' => return Err("a '}' without its '{' (write '}}' for a brace)".into()),
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        out.push(Token::Literal(literal));
    }
    Ok(out)
}

/// Whether the tokens need local time: its zone is then read before any thread is confined.
pub fn wants_local_time(tokens: &[Token]) -> bool {
    tokens
        .iter()
        .any(|t| matches!(t, Token::LocalGlog | Token::Time(_, true)))
}

/// A moment broken down into date and time fields, with its offset from UTC in seconds.
struct Broken {
    tm: libc::tm,
    micros: u32,
}

fn broken(now: SystemTime, local: bool) -> Broken {
    let d = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as libc::time_t;
    // SAFETY: tm is plain data; all zeros is a valid value for the call to fill.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; the _r variants keep no shared state
    // (localtime_r reads the zone glibc loaded at start-up, `load_local_zone`).
    unsafe {
        if local {
            libc::localtime_r(&secs, &mut tm);
        } else {
            libc::gmtime_r(&secs, &mut tm);
        }
    }
    Broken {
        tm,
        micros: d.subsec_micros(),
    }
}

/// Loads the local time zone now, while the VMM has one thread and no seccomp filter
/// (glibc reads `/etc/localtime` on the first local conversion only).
pub fn load_local_zone() {
    let _ = broken(SystemTime::now(), true);
}

fn field(b: &Broken, f: Field) -> String {
    let t = &b.tm;
    match f {
        Field::Year => format!("{:04}", t.tm_year + 1900),
        Field::Month => format!("{:02}", t.tm_mon + 1),
        Field::Day => format!("{:02}", t.tm_mday),
        Field::Hour => format!("{:02}", t.tm_hour),
        Field::Minute => format!("{:02}", t.tm_min),
        Field::Second => format!("{:02}", t.tm_sec),
        Field::Micros => format!("{:06}", b.micros),
        Field::Offset => {
            let off = t.tm_gmtoff;
            let sign = if off < 0 { '-' } else { '+' };
            let off = off.unsigned_abs();
            format!("{sign}{:02}:{:02}", off / 3600, off % 3600 / 60)
        }
    }
}

fn glog(b: &Broken) -> String {
    let t = &b.tm;
    format!(
        "{:02}{:02} {:02}:{:02}:{:02}.{:06}",
        t.tm_mon + 1,
        t.tm_mday,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
        b.micros
    )
}

/// One log line (without its end of line).
pub fn render(tokens: &[Token], start: Instant, record: &log::Record) -> String {
    let now = SystemTime::now();
    let mut utc = None;
    let mut local = None;
    let mut out = String::new();
    // Broken down once a line, and only if a token needs it.
    fn at(slot: &mut Option<Broken>, now: SystemTime, local: bool) -> &Broken {
        slot.get_or_insert_with(|| broken(now, local))
    }
    for t in tokens {
        match t {
            Token::Literal(s) => out.push_str(s),
            Token::BootTime => {
                out.push_str(&format!("{:>10.6}", start.elapsed().as_secs_f32()));
            }
            Token::WallClock => {
                let b = at(&mut utc, now, false);
                let date = [Field::Year, Field::Month, Field::Day].map(|f| field(b, f));
                let time = [Field::Hour, Field::Minute, Field::Second].map(|f| field(b, f));
                out.push_str(&format!(
                    "{}T{}.{:06}Z",
                    date.join("-"),
                    time.join(":"),
                    b.micros
                ));
            }
            Token::Glog => out.push_str(&glog(at(&mut utc, now, false))),
            Token::LocalGlog => out.push_str(&glog(at(&mut local, now, true))),
            Token::Pid => out.push_str(&std::process::id().to_string()),
            Token::Tid => {
                // SAFETY: gettid has no preconditions (the system call: glibc's wrapper can
                // be left unresolved in a static binary).
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                out.push_str(&tid.to_string());
            }
            Token::Thread => out.push_str(std::thread::current().name().unwrap_or("anonymous")),
            Token::Level => out.push_str(record.level().as_str()),
            Token::LevelChar => out.push_str(&record.level().as_str()[..1]),
            Token::Location => match (record.file(), record.line()) {
                (Some(file), Some(line)) => out.push_str(&format!("{file}:{line}")),
                _ => out.push_str(record.target()),
            },
            Token::Msg => out.push_str(&record.args().to_string()),
            Token::Time(f, false) => out.push_str(&field(at(&mut utc, now, false), *f)),
            Token::Time(f, true) => out.push_str(&field(at(&mut local, now, true), *f)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(format: &str) -> String {
        let tokens = parse(format).unwrap();
        render(
            &tokens,
            Instant::now(),
            &log::Record::builder()
                .args(format_args!("hello {{x}}"))
                .level(log::Level::Warn)
                .file(Some("vmm/src/a.rs"))
                .line(Some(7))
                .target("vmm::a")
                .build(),
        )
    }

    #[test]
    fn the_default_and_each_token() {
        let l = line(crate::logger::DEFAULT_FORMAT);
        assert!(l.starts_with("cloud-hypervisor:   0.0"), "{l}");
        assert!(
            l.ends_with("s: <log_format::tests::the_default_and_each_token> WARN:vmm/src/a.rs:7 -- hello {x}"),
            "{l}"
        );
        assert_eq!(line("{levelchar}|{level}|{{msg}}|}}"), "W|WARN|{msg}|}");
        assert_eq!(line("{pid}"), std::process::id().to_string());
        let w = line("{wallclock}");
        // 2026-12-07T08:02:15.542701Z
        assert_eq!(
            (w.len(), &w[4..5], &w[10..11], &w[19..20]),
            (27, "-", "T", "."),
            "{w}"
        );
        assert!(w.ends_with('Z'), "{w}");
        let g = line("{glog}");
        assert_eq!((g.len(), &g[4..5], &g[7..8]), (20, " ", ":"), "{g}");
        let f = line("{year}-{month}-{day} {hour}:{minute}:{second}.{micros} {offset}");
        assert_eq!(f.len(), 33, "{f}");
        assert!(f.ends_with(" +00:00"), "{f}");
        let lf = line("{localyear}{localoffset}");
        assert_eq!(lf.len(), 10, "{lf}");
        assert_eq!(line("{localglog}").len(), 20);
        assert!(line("{tid}").parse::<u32>().is_ok());
        assert_eq!(
            parse("{glog}").unwrap(),
            [Token::Glog],
            "a token alone has no literal"
        );
        assert!(wants_local_time(&parse("x{localhour}").unwrap()));
        assert!(!wants_local_time(&parse("{hour}{glog}").unwrap()));
    }

    #[test]
    fn unknown_tokens_and_unpaired_braces_are_refused() {
        for (bad, says) in [
            ("{nope}", "unknown token '{nope}'"),
            ("{msg", "'{msg' has no closing '}'"),
            ("a}b", "a '}' without its '{' (write '}}' for a brace)"),
            ("{}", "unknown token '{}'"),
        ] {
            assert_eq!(parse(bad).unwrap_err(), says, "{bad}");
        }
    }
}
