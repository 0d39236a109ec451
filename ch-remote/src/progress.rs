//! `send-migration` following the migration it started through `vm.migration-progress` (an
//! extension of this VMM): its passes on standard error, then the summary or the failure.

use std::io::Write;
use std::time::{Duration, Instant};

use api::client::{Client, Reply};
use api::http::Method;
use api::{MigrationProgress, MigrationState};

/// How often `send-migration` asks for the migration's progress.
const POLL: Duration = Duration::from_millis(200);
/// The longest `send-migration` stays silent while a migration runs.
const QUIET: Duration = Duration::from_secs(2);

pub(crate) const PROGRESS: &str = "vm.migration-progress";

/// Whether `reply`, to `vm.migration-progress`, comes from a VMM that has the endpoint: a
/// progress (200), or the endpoint's own refusal when no migration was started (404 with an
/// "Error from API" chain). The original answers 404 `["Not Found"]`.
pub(crate) fn tells_progress(reply: &Reply) -> bool {
    match reply.status {
        200 => serde_json::from_slice::<MigrationProgress>(&reply.body).is_ok(),
        404 => reply.error_lines().first().map(String::as_str) == Some("Error from API"),
        _ => false,
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// The line for a pass, as `send-migration` prints it.
fn pass_line(p: &MigrationProgress) -> String {
    let secs = p.elapsed_ms as f64 / 1000.0;
    format!(
        "pass {}: {:.1} MiB sent ({:.1} MiB in all), {:.1} MiB dirty, {:.0} MiB/s, {secs:.1} s",
        p.pass,
        mib(p.bytes),
        mib(p.total_bytes),
        mib(p.dirty_bytes),
        mib(p.total_bytes) / secs.max(0.001),
    )
}

/// The last line of a completed migration.
fn summary_line(p: &MigrationProgress) -> String {
    let downtime = p.downtime_us.map_or_else(
        || "unknown".to_string(),
        |d| format!("{:.1} ms", d as f64 / 1000.0),
    );
    format!(
        "migration to {} completed in {:.1} s: {} passes, {:.1} MiB sent, downtime {downtime}",
        p.destination_url,
        p.elapsed_ms as f64 / 1000.0,
        p.pass,
        mib(p.total_bytes),
    )
}

/// Follows the migration just started until it completes (Ok) or fails (its error), printing
/// each pass seen on standard error.
pub(crate) fn follow_migration(mut client: Client, socket: &std::path::Path) -> Result<(), String> {
    let mut err = std::io::stderr().lock();
    let mut last: Option<MigrationProgress> = None;
    let mut reconnected = false;
    let mut said = Instant::now();
    loop {
        let reply = match client.call(Method::Get, PROGRESS, None) {
            Ok(r) => r,
            Err(e) => {
                // A connection the VMM closed (it keeps at most so many) is opened again,
                // once; a VMM that is gone has ended without telling the outcome.
                let again = (!reconnected)
                    .then(|| Client::connect(socket).ok())
                    .flatten();
                if let Some(c) = again {
                    client = c;
                    reconnected = true;
                    continue;
                }
                let seen = last.as_ref().map_or_else(
                    || "nothing".to_string(),
                    |p| format!("pass {}, {:.1} MiB sent", p.pass, mib(p.total_bytes)),
                );
                return Err(format!(
                    "{PROGRESS}: {e}: the VMM ended before telling the migration's outcome \
                     (last seen: {seen})"
                ));
            }
        };
        reconnected = false;
        if reply.status != 200 {
            let mut msg = format!("{PROGRESS}: the VMM answered {}", reply.status);
            for line in reply.error_lines() {
                msg.push_str(": ");
                msg.push_str(&line);
            }
            return Err(msg);
        }
        let p: MigrationProgress = serde_json::from_slice(&reply.body).map_err(|e| {
            format!(
                "{PROGRESS}: unreadable answer ({e}): {}",
                String::from_utf8_lossy(&reply.body)
            )
        })?;
        if last.is_none() {
            let _ = writeln!(
                err,
                "migrating to {} ({:.0} MiB of guest memory)",
                p.destination_url,
                mib(p.memory_bytes)
            );
        }
        let new_pass = last.as_ref().map_or(p.pass > 0, |l| p.pass != l.pass);
        match p.state {
            MigrationState::Running => {
                if new_pass {
                    let _ = writeln!(err, "{}", pass_line(&p));
                    said = Instant::now();
                } else if said.elapsed() >= QUIET {
                    // A long pass (or the downtime) says it is still under way.
                    let _ = writeln!(
                        err,
                        "pass {} under way: {:.1} MiB sent in all, {:.1} s",
                        p.pass + 1,
                        mib(p.total_bytes),
                        p.elapsed_ms as f64 / 1000.0
                    );
                    said = Instant::now();
                }
            }
            MigrationState::Completed => {
                let _ = writeln!(err, "{}", summary_line(&p));
                return Ok(());
            }
            MigrationState::Failed => {
                return Err(format!(
                    "vm.send-migration: the migration failed after {:.1} s: {}",
                    p.elapsed_ms as f64 / 1000.0,
                    p.error.as_deref().unwrap_or("no reason given")
                ));
            }
        }
        last = Some(p);
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a VMM tells progress, from its answer to `vm.migration-progress`; the lines
    /// printed.
    #[test]
    fn progress_is_told_and_printed() {
        let reply = |status, body: &str| Reply {
            status,
            body: body.as_bytes().to_vec(),
        };
        // Ours, before any migration and after one; the original's; anything else.
        assert!(tells_progress(&reply(
            404,
            r#"["Error from API","The migration progress is not available","No migration has been started"]"#
        )));
        let p = MigrationProgress {
            state: MigrationState::Running,
            destination_url: "unix:/m".into(),
            pass: 3,
            bytes: 3 << 20,
            total_bytes: 300 << 20,
            dirty_bytes: 1 << 19,
            memory_bytes: 256 << 20,
            elapsed_ms: 1500,
            downtime_us: None,
            error: None,
        };
        let json = serde_json::to_string(&p).unwrap();
        assert!(tells_progress(&reply(200, &json)));
        assert!(!tells_progress(&reply(404, r#"["Not Found"]"#)));
        assert!(!tells_progress(&reply(404, "")));
        assert!(!tells_progress(&reply(200, "{}")));
        assert!(!tells_progress(&reply(400, r#"["Bad Request"]"#)));
        assert_eq!(
            pass_line(&p),
            "pass 3: 3.0 MiB sent (300.0 MiB in all), 0.5 MiB dirty, 200 MiB/s, 1.5 s"
        );
        let done = MigrationProgress {
            state: MigrationState::Completed,
            downtime_us: Some(12_345),
            ..p
        };
        assert_eq!(
            summary_line(&done),
            "migration to unix:/m completed in 1.5 s: 3 passes, 300.0 MiB sent, downtime 12.3 ms"
        );
    }
}
