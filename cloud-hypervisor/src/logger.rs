//! Log lines in the original's format, to standard error or `--log-file`.

use std::io::Write;
use std::time::Instant;

use log::LevelFilter;

pub const DEFAULT_FORMAT: &str =
    "cloud-hypervisor: {boottime}s: <{thread}> {level}:{location} -- {msg}";

/// `-v` count → level, as the original maps it.
pub fn level(verbosity: u8) -> LevelFilter {
    match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

fn render(format: &str, start: Instant, record: &log::Record) -> String {
    let mut out = format.to_string();
    let replace = |out: &mut String, token: &str, value: &dyn Fn() -> String| {
        if out.contains(token) {
            *out = out.replace(token, &value());
        }
    };
    // The message goes last so braces inside it are never taken for tokens.
    replace(&mut out, "{boottime}", &|| {
        format!("{:.6}", start.elapsed().as_secs_f64())
    });
    replace(&mut out, "{wallclock}", &|| {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!("{}.{:06}", d.as_secs(), d.subsec_micros())
    });
    replace(&mut out, "{thread}", &|| {
        std::thread::current().name().unwrap_or("?").to_string()
    });
    replace(&mut out, "{level}", &|| record.level().to_string());
    replace(&mut out, "{location}", &|| {
        format!(
            "{}:{}",
            record.file().unwrap_or("?"),
            record.line().unwrap_or(0)
        )
    });
    out.replace("{msg}", &record.args().to_string())
}

pub fn init(verbosity: u8, file: Option<std::fs::File>, format: String) {
    let start = Instant::now();
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(level(verbosity))
        .format(move |buf, record| writeln!(buf, "{}", render(&format, start, record)));
    if let Some(f) = file {
        builder.target(env_logger::Target::Pipe(Box::new(f)));
    }
    let _ = builder.try_init();
}
