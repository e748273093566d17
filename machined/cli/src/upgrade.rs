//! `machinectl upgrade`, `upgrade status` and `rollback`: A/B upgrades of the nodes.
//!
//! `upgrade --image BUNDLE|URL` streams a bundle file to the node in 1 MiB messages (the
//! first carries the options and the file's size), or, for an `http://` or `https://`
//! value, has the node fetch it. The node's progress is shown as phases with percents:
//! redrawn in place on a terminal, one line per phase and per 10% otherwise
//! ([`ProgressPrinter`]). When the node reboots into the new slot, machinectl waits
//! (`--wait`, default 10 min) for it to answer `Version` again ([`wait_for_version`]),
//! polling with short per-attempt deadlines so that it returns as soon as the node is back
//! and never later than `--wait`: exit 0 when the new version answers from the new slot,
//! 1 when the node came back on its old slot (with the failed phase and reason from
//! `UpgradeStatus`) or did not answer in time. Several nodes are upgraded one after the
//! other, and the first that fails stops the rest.
//!
//! `rollback` makes the other (blessed) slot boot next, and waits the same way.
//! `upgrade status` shows the slots, the newest attempt with its phases, and the versions
//! that failed on the node.

use std::fmt::Write as _;
use std::future::Future;
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_stream::StreamExt as _;

use super::api::{OutputArgs, Session, Target, file_chunks, parse_duration, runtime, upload};
use super::output::{Format, Records, render};
use keelson_api::api::proto;
use keelson_api::client::Connector;

/// How long one attempt to reach a rebooting node may take (connect, TLS, `Version`).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a rebooting node is asked whether it is back.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// `machinectl upgrade`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct UpgradeArgs {
    /// `upgrade status`.
    #[command(subcommand)]
    pub command: Option<UpgradeCommand>,
    /// The upgrade bundle: a file (streamed to the node), or an http:// or https:// URL
    /// that the node fetches itself.
    #[arg(long, value_name = "BUNDLE|URL", required = true)]
    pub image: Option<String>,
    /// Write the new slot now and switch to it at the next reboot (no reboot now).
    #[arg(long)]
    pub stage: bool,
    /// Run every check on the node (signature, architecture, version path, space, config,
    /// components, failed versions) and write nothing.
    #[arg(long, conflicts_with = "stage")]
    pub dry_run: bool,
    /// Install a version that failed on this node before, or upgrade a control plane whose
    /// etcd member is unhealthy or whose cluster would lose quorum.
    #[arg(long)]
    pub force: bool,
    /// Install an older version than the running one.
    #[arg(long)]
    pub allow_downgrade: bool,
    /// How long the new slot has to become healthy before it is given up (node default:
    /// 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub health_timeout: Option<Duration>,
    /// How long to wait for the node to answer with the new version after it reboots
    /// (0: do not wait).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10m")]
    pub wait: Duration,
}

/// `machinectl upgrade ...`.
#[derive(Debug, Subcommand)]
pub enum UpgradeCommand {
    /// Show the slots (version, boot entry, blessed or tries left, booted, next), the
    /// newest upgrade with its phases and durations, and the versions that failed here
    /// (reader).
    Status(OutputArgs),
}

/// `machinectl rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// How long to wait for the node to answer from the other slot after it reboots (0: do
    /// not wait).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "10m")]
    pub wait: Duration,
}

/// Where the bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A local file, streamed.
    File(PathBuf),
    /// A URL the node fetches.
    Url(String),
}

impl Source {
    /// `--image`'s value: an `http://` or `https://` URL, else a file.
    pub fn parse(image: &str) -> Source {
        let lower = image.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            Source::Url(image.to_owned())
        } else {
            Source::File(PathBuf::from(image))
        }
    }
}

/// The options the node gets in the first message.
pub fn options(args: &UpgradeArgs, source: &Source, size: u64) -> proto::UpgradeOptions {
    proto::UpgradeOptions {
        stage: args.stage,
        dry_run: args.dry_run,
        force: args.force,
        allow_downgrade: args.allow_downgrade,
        health_timeout_seconds: args.health_timeout.map_or(0, |d| d.as_secs().max(1)),
        url: match source {
            Source::Url(url) => url.clone(),
            Source::File(_) => String::new(),
        },
        size: match source {
            Source::File(_) => size,
            Source::Url(_) => 0,
        },
    }
}

/// Runs `machinectl upgrade ...`.
pub fn run(target: &Target, args: &UpgradeArgs) -> anyhow::Result<ExitCode> {
    if let Some(UpgradeCommand::Status(output)) = &args.command {
        let target = Target {
            output: output.output,
            ..target.clone()
        };
        return status(&target);
    }
    let Some(image) = &args.image else {
        bail!("upgrade needs --image BUNDLE|URL (or `upgrade status`)");
    };
    let source = Source::parse(image);
    let size = match &source {
        Source::File(path) => {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("cannot read the upgrade bundle {}", path.display()))?;
            if !meta.is_file() {
                bail!(
                    "{} is not a file: pass an upgrade bundle (keelson-<arch>.bundle, from `cargo xtask image`) or an http(s) URL",
                    path.display()
                );
            }
            meta.len()
        }
        Source::Url(_) => 0,
    };
    let options = options(args, &source, size);
    let session = target.session()?;
    let tty = std::io::stdout().is_terminal();
    runtime()?.block_on(async {
        for address in session.addresses() {
            let done = upgrade_one(&session, address, &source, &options, tty).await?;
            say(&done_line(address, &done, &options));
            if done.rebooting && !args.wait.is_zero() {
                let expected = Expected {
                    version: done.version.clone(),
                    slot: done.slot.clone(),
                };
                await_node(&session, address, &expected, args.wait).await?;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// Prints one line on stdout, at once.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// One node's upgrade call: the bundle sent (or its URL), the progress shown, the last
/// message returned.
async fn upgrade_one(
    session: &Session,
    address: &str,
    source: &Source,
    options: &proto::UpgradeOptions,
    tty: bool,
) -> anyhow::Result<proto::UpgradeProgress> {
    let mut client = session.client(address).await?;
    let first = proto::UpgradeRequest {
        options: Some(options.clone()),
        data: Vec::new(),
    };
    let mut printer = ProgressPrinter::new(address, tty);
    let result = match source {
        Source::Url(_) => {
            let requests = tokio_stream::iter([first]);
            follow(client.upgrade(requests), &mut printer, None).await
        }
        Source::File(path) => {
            let (chunks, failure) = file_chunks(path.clone())
                .await
                .map_err(|s| session.status(address, &s))?;
            // The upload's own progress: bytes handed to the connection so far.
            let (sent_tx, sent_rx) = tokio::sync::mpsc::unbounded_channel();
            let mut sent = 0u64;
            let requests = tokio_stream::iter([first]).chain(chunks.map(move |data| {
                sent += data.len() as u64;
                let _ = sent_tx.send(sent);
                proto::UpgradeRequest {
                    options: None,
                    data,
                }
            }));
            let transfer = Some((sent_rx, options.size));
            upload(
                follow(client.upgrade(requests), &mut printer, transfer),
                failure,
            )
            .await
        }
    };
    print_now(&printer.finish());
    let last = result.map_err(|s| session.status(address, &s))?;
    last.ok_or_else(|| {
        anyhow!(
            "{address} ended the upgrade without its last message (done): the node may have restarted machined; run `machinectl upgrade status` to see how far it got"
        )
    })
}

/// Shows the progress of an upgrade call until its last message, which it returns
/// (`None` when the stream ended without one); with `transfer`, also the upload's
/// progress (bytes sent, of the bundle's size) as the `transfer` phase.
async fn follow<S>(
    call: impl Future<Output = Result<tonic::Response<S>, tonic::Status>>,
    printer: &mut ProgressPrinter,
    transfer: Option<(tokio::sync::mpsc::UnboundedReceiver<u64>, u64)>,
) -> Result<Option<proto::UpgradeProgress>, tonic::Status>
where
    S: tokio_stream::Stream<Item = Result<proto::UpgradeProgress, tonic::Status>> + Unpin,
{
    let (mut sent, size) = match transfer {
        Some((rx, size)) => (Some(rx), size),
        None => (None, 0),
    };
    let mut stream = call.await?.into_inner();
    loop {
        let next_sent = async {
            match sent.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            done = next_sent => match done {
                Some(done) => {
                    let p = proto::UpgradeProgress {
                        phase: "transfer".into(),
                        done,
                        total: size,
                        ..proto::UpgradeProgress::default()
                    };
                    print_now(&printer.update(&p));
                }
                None => sent = None,
            },
            message = stream.next() => {
                let Some(message) = message else {
                    return Ok(None);
                };
                let message = message?;
                print_now(&printer.update(&message));
                if message.done_all {
                    return Ok(Some(message));
                }
            }
        }
    }
}

fn print_now(text: &str) {
    if text.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// The line that says what the upgrade did on the node.
pub fn done_line(
    address: &str,
    done: &proto::UpgradeProgress,
    options: &proto::UpgradeOptions,
) -> String {
    let (version, slot) = (&done.version, &done.slot);
    if options.dry_run {
        format!(
            "{address}: dry run: {version} for slot {slot} passed every check; nothing was written"
        )
    } else if done.rebooting {
        format!("{address}: {version} installed in slot {slot}; the node is rebooting into it")
    } else if options.stage {
        format!("{address}: {version} staged in slot {slot}: it boots at the next reboot")
    } else {
        format!("{address}: {version} installed in slot {slot}; it boots at the next reboot")
    }
}

/// Shows an upgrade's progress messages: on a terminal one line redrawn in place; else a
/// line per new message, one per tenth of a phase with a known total (labelled with that
/// tenth, `transfer 40%`, and the exact bytes), and one per 64 MiB of a phase without.
/// Phases may interleave (the upload's `transfer` and the node's `write`).
#[derive(Debug)]
pub struct ProgressPrinter {
    address: String,
    tty: bool,
    message: String,
    /// The last tenth (phases with a total) or 64 MiB step (others) shown, per phase.
    steps: Vec<(String, u64)>,
    /// Whether a redrawn line is on the terminal now.
    drawn: bool,
}

impl ProgressPrinter {
    /// A printer for one node's upgrade.
    pub fn new(address: &str, tty: bool) -> ProgressPrinter {
        ProgressPrinter {
            address: address.to_owned(),
            tty,
            message: String::new(),
            steps: Vec::new(),
            drawn: false,
        }
    }

    /// The text to write for one message.
    pub fn update(&mut self, p: &proto::UpgradeProgress) -> String {
        let mut out = String::new();
        if !p.message.is_empty() && p.message != self.message {
            self.message.clone_from(&p.message);
            out.push_str(&self.clear());
            let _ = writeln!(out, "{}: {}: {}", self.address, p.phase, p.message);
        }
        let percent = p.done.min(p.total).saturating_mul(100).checked_div(p.total);
        let (step, label) = match percent {
            Some(percent) if self.tty => (percent / 10, format!("{percent}%")),
            Some(percent) => (percent / 10, format!("{}%", percent / 10 * 10)),
            None if p.done > 0 => (p.done >> 26, String::new()),
            None => return out,
        };
        let amount = match percent {
            Some(_) => format!("{label} ({} of {})", mib(p.done), mib(p.total)),
            None => mib(p.done),
        };
        let address = &self.address;
        let last = self
            .steps
            .iter()
            .find(|(phase, _)| *phase == p.phase)
            .map(|(_, step)| *step);
        if self.tty {
            let _ = write!(out, "\r\x1b[2K{address}: {} {amount}", p.phase);
            self.drawn = true;
        } else if last.is_none_or(|last| step > last) {
            let _ = writeln!(out, "{address}: {} {amount}", p.phase);
        }
        match self.steps.iter_mut().find(|(phase, _)| *phase == p.phase) {
            Some(entry) => entry.1 = step,
            None => self.steps.push((p.phase.clone(), step)),
        }
        out
    }

    /// What ends the display (the newline after a redrawn line).
    pub fn finish(&mut self) -> String {
        self.clear()
    }

    fn clear(&mut self) -> String {
        if std::mem::take(&mut self.drawn) {
            "\n".into()
        } else {
            String::new()
        }
    }
}

/// Bytes as `512 B`, `72.0 KiB`, `12.5 MiB`.
fn mib(bytes: u64) -> String {
    let (shift, unit) = match bytes {
        0..1024 => return format!("{bytes} B"),
        1024..1_048_576 => (10, "KiB"),
        _ => (20, "MiB"),
    };
    let tenths = bytes.saturating_mul(10) >> shift;
    format!("{}.{} {unit}", tenths / 10, tenths % 10)
}

/// A duration as `45s`, `2m05s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The version and slot a rebooting node should answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// The OS version.
    pub version: String,
    /// The slot, `a` or `b`.
    pub slot: String,
}

/// What [`wait_for_version`] asks the node: `Version` (its version and slot) and
/// `UpgradeStatus`, each within a deadline.
pub trait Probe {
    /// The node's (version, slot), or why it did not answer.
    fn version(&self, limit: Duration) -> impl Future<Output = Result<(String, String), String>>;
    /// The node's upgrade status.
    fn status(
        &self,
        limit: Duration,
    ) -> impl Future<Output = Result<proto::UpgradeStatusResponse, String>>;
}

/// How a wait for a rebooting node ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitOutcome {
    /// The expected version answered from the expected slot.
    Up {
        /// How long after the wait began.
        after: Duration,
        /// Its upgrade status, when the node gave it.
        status: Option<proto::UpgradeStatusResponse>,
    },
    /// The node answered with another version or slot, and the attempt is recorded as
    /// failed (or the node had gone down and came back so).
    CameBack {
        /// The version that answered.
        version: String,
        /// The slot it answered from.
        slot: String,
        /// How long after the wait began.
        after: Duration,
        /// Its upgrade status, when the node gave it.
        status: Option<proto::UpgradeStatusResponse>,
    },
    /// Nothing conclusive within the wait.
    TimedOut {
        /// The last answer or error.
        last: String,
    },
}

/// Polls `probe` every `interval` until the node answers with `expected` (or came back
/// without it), and at most `wait`. Each attempt is bounded by [`ATTEMPT_TIMEOUT`] and by
/// what is left of `wait`, so it returns within `wait` (plus the time of printing).
/// An answer with the old version before the node went down is the old boot still
/// shutting down, unless `UpgradeStatus` already says that the attempt failed.
/// `say` gets a line when the node goes down.
pub async fn wait_for_version(
    probe: &impl Probe,
    expected: &Expected,
    wait: Duration,
    interval: Duration,
    say: &mut dyn FnMut(&str),
) -> WaitOutcome {
    let start = Instant::now();
    let deadline = start + wait;
    let mut went_down = false;
    let mut last = "no answer yet".to_owned();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return WaitOutcome::TimedOut { last };
        }
        let limit = left.min(ATTEMPT_TIMEOUT);
        let answer = tokio::time::timeout(limit, probe.version(limit))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}", human(limit))));
        match answer {
            Ok((version, slot)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let limit = left.min(ATTEMPT_TIMEOUT);
                let status = if limit.is_zero() {
                    None
                } else {
                    tokio::time::timeout(limit, probe.status(limit))
                        .await
                        .ok()
                        .and_then(Result::ok)
                };
                let after = start.elapsed();
                if version == expected.version && slot == expected.slot {
                    return WaitOutcome::Up { after, status };
                }
                let failed = status
                    .as_ref()
                    .is_some_and(|s| s.outcome == "failed" && s.to_version == expected.version);
                if failed || went_down {
                    return WaitOutcome::CameBack {
                        version,
                        slot,
                        after,
                        status,
                    };
                }
                last =
                    format!("its last answer was {version} from slot {slot}, before it went down");
            }
            Err(why) => {
                if !went_down {
                    went_down = true;
                    say(&format!("down ({why})"));
                }
                last = format!("the last attempt: {why}");
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(interval)).await;
    }
}

/// A node reached by a fresh connection per attempt (its address and the client
/// certificate stay the same across the reboot).
#[derive(Debug, Clone)]
pub struct NodeProbe {
    connector: Connector,
    address: String,
}

impl NodeProbe {
    /// Probes `address` with `connector`'s credentials.
    pub fn new(connector: Connector, address: &str) -> NodeProbe {
        NodeProbe {
            connector,
            address: address.to_owned(),
        }
    }
}

impl Probe for NodeProbe {
    async fn version(&self, limit: Duration) -> Result<(String, String), String> {
        let connector = self.connector.clone().with_timeout(Some(limit));
        let mut client = connector
            .connect(&self.address)
            .await
            .map_err(|e| keelson_api::error_chain(&e))?;
        let v = client
            .version(proto::VersionRequest {})
            .await
            .map_err(|s| keelson_api::error_chain(&connector.status_error(&self.address, &s)))?
            .into_inner();
        Ok((v.os_version, v.slot))
    }

    async fn status(&self, limit: Duration) -> Result<proto::UpgradeStatusResponse, String> {
        let connector = self.connector.clone().with_timeout(Some(limit));
        let mut client = connector
            .connect(&self.address)
            .await
            .map_err(|e| keelson_api::error_chain(&e))?;
        Ok(client
            .upgrade_status(proto::UpgradeStatusRequest {})
            .await
            .map_err(|s| keelson_api::error_chain(&connector.status_error(&self.address, &s)))?
            .into_inner())
    }
}

/// Waits for `address` to answer with `expected`, printing what happens; an error when it
/// came back otherwise or not in time.
async fn await_node(
    session: &Session,
    address: &str,
    expected: &Expected,
    wait: Duration,
) -> anyhow::Result<()> {
    say(&format!(
        "{address}: waiting up to {} for {} to answer from slot {}",
        human(wait),
        expected.version,
        expected.slot
    ));
    let probe = NodeProbe::new(session.connector().clone(), address);
    let mut show = |line: &str| say(&format!("{address}: {line}"));
    let outcome = wait_for_version(&probe, expected, wait, POLL_INTERVAL, &mut show).await;
    judge(address, expected, wait, &outcome).map(|line| say(&line))
}

/// The line for a node that came back as expected, or the error for one that did not.
pub fn judge(
    address: &str,
    expected: &Expected,
    wait: Duration,
    outcome: &WaitOutcome,
) -> anyhow::Result<String> {
    match outcome {
        WaitOutcome::Up { after, status } => Ok(format!(
            "{address}: {} answers from slot {} after {} (upgrade {})",
            expected.version,
            expected.slot,
            human(*after),
            status
                .as_ref()
                .map_or("status unknown", |s| s.outcome.as_str())
        )),
        WaitOutcome::CameBack {
            version,
            slot,
            after,
            status,
        } => {
            let why = match status {
                Some(s) if s.outcome == "failed" => format!(
                    "the upgrade to {} failed at {}: {}",
                    s.to_version, s.failed_phase, s.failed_reason
                ),
                Some(s) => format!("the upgrade status says {:?}", s.outcome),
                None => "its upgrade status did not answer".into(),
            };
            Err(anyhow!(
                "{address} came back on {version} (slot {slot}) after {}, not on {} (slot {}): it fell back; {why}. `machinectl upgrade status` shows the attempt",
                human(*after),
                expected.version,
                expected.slot
            ))
        }
        WaitOutcome::TimedOut { last } => Err(anyhow!(
            "{address} did not answer with {} from slot {} within {} ({last}); look at its console, then run `machinectl upgrade status` once it answers (a longer --wait waits longer)",
            expected.version,
            expected.slot,
            human(wait)
        )),
    }
}

/// `machinectl rollback`.
pub fn rollback(target: &Target, args: &RollbackArgs) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    runtime()?.block_on(async {
        for address in session.addresses() {
            let mut client = session.client(address).await?;
            let r = client
                .rollback(proto::RollbackRequest {})
                .await
                .map_err(|s| session.status(address, &s))?
                .into_inner();
            say(&format!(
                "{address}: rolling back to {} in slot {}; the node is rebooting into it",
                r.version, r.slot
            ));
            if !args.wait.is_zero() {
                let expected = Expected {
                    version: r.version,
                    slot: r.slot,
                };
                await_node(&session, address, &expected, args.wait).await?;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `machinectl upgrade status`.
pub fn status(target: &Target) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    let format = target.output;
    runtime()?.block_on(async {
        let mut json_rows = Vec::new();
        let mut failed = false;
        for address in session.addresses() {
            let result = async {
                let mut c = session.client(address).await?;
                Ok::<_, keelson_api::client::ClientError>(
                    c.upgrade_status(proto::UpgradeStatusRequest {})
                        .await
                        .map_err(|s| session.status(address, &s))?
                        .into_inner(),
                )
            }
            .await;
            match result {
                Ok(s) if format == Format::Table => print!("{}", status_text(address, &s)),
                Ok(s) => json_rows.push(status_json(address, &s)),
                Err(e) => {
                    failed = true;
                    eprintln!("machinectl: error: {}", keelson_api::error_chain(&e));
                }
            }
        }
        if format != Format::Table {
            let mut records = Records::new(&["node", "slots", "attempt", "failed"]);
            for row in json_rows {
                records.push(row);
            }
            print!("{}", render(&records, format));
        }
        Ok(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}

fn slot_json(s: &proto::SlotStatus) -> Value {
    json!({
        "slot": s.slot,
        "version": s.version,
        "entry": s.entry,
        "blessed": s.blessed,
        "tries_left": s.tries_left,
        "booted": s.booted,
        "next": s.next,
    })
}

/// One node's status for `-o json|yaml`: node, slots, attempt (null when none), failed.
pub fn status_json(address: &str, s: &proto::UpgradeStatusResponse) -> Vec<Value> {
    let attempt = (!s.to_version.is_empty()).then(|| {
        json!({
            "from_version": s.from_version,
            "to_version": s.to_version,
            "to_slot": s.to_slot,
            "rollback": s.rollback,
            "outcome": s.outcome,
            "failed_phase": s.failed_phase,
            "failed_reason": s.failed_reason,
            "booted_entry": s.booted_entry,
            "tries_used": s.tries_used,
            "expect_ready": s.expect_ready,
            "phases": phase_rows(&s.phases)
                .into_iter()
                .map(|(phase, at_ms, took_ms)| json!({"phase": phase, "at_ms": at_ms, "took_ms": took_ms}))
                .collect::<Vec<_>>(),
        })
    });
    vec![
        json!(address),
        Value::Array(s.slots.iter().map(slot_json).collect()),
        attempt.unwrap_or(Value::Null),
        Value::Array(
            s.failed
                .iter()
                .map(|f| {
                    json!({"version": f.version, "phase": f.phase, "reason": f.reason, "at_ms": f.at_ms})
                })
                .collect(),
        ),
    ]
}

/// Each phase with when it was reached and how long it took since the one before (the
/// first's start is not recorded).
fn phase_rows(phases: &[proto::UpgradePhase]) -> Vec<(String, u64, Option<u64>)> {
    let mut before: Option<u64> = None;
    phases
        .iter()
        .map(|p| {
            let took = before.map(|b| p.at_ms.saturating_sub(b));
            before = Some(p.at_ms);
            (p.phase.clone(), p.at_ms, took)
        })
        .collect()
}

/// One node's status as text: the slots' table, the newest attempt and its phases, the
/// failed versions.
pub fn status_text(address: &str, s: &proto::UpgradeStatusResponse) -> String {
    let mut out = String::new();
    let mut slots = Records::new(&[
        "node",
        "slot",
        "version",
        "entry",
        "blessed",
        "tries_left",
        "booted",
        "next",
    ]);
    for slot in &s.slots {
        slots.push(vec![
            json!(address),
            json!(slot.slot),
            json!(slot.version),
            json!(slot.entry),
            json!(slot.blessed),
            if slot.blessed || slot.entry.is_empty() {
                json!("")
            } else {
                json!(slot.tries_left)
            },
            json!(slot.booted),
            json!(slot.next),
        ]);
    }
    out.push_str(&render(&slots, Format::Table));
    if s.to_version.is_empty() {
        let _ = writeln!(out, "{address}: no upgrade attempt recorded");
    } else {
        let what = if s.rollback { "rollback" } else { "upgrade" };
        let _ = writeln!(
            out,
            "{address}: newest {what}: {} -> {} (slot {}): {}",
            s.from_version, s.to_version, s.to_slot, s.outcome
        );
        if s.outcome == "failed" {
            let _ = writeln!(
                out,
                "{address}: failed at {}: {}",
                s.failed_phase, s.failed_reason
            );
        }
        if !s.booted_entry.is_empty() {
            let _ = writeln!(
                out,
                "{address}: booted from {} after {} tries",
                s.booted_entry, s.tries_used
            );
        }
        if !s.expect_ready.is_empty() {
            let _ = writeln!(
                out,
                "{address}: healthy only with {} ready again (ready before the {what})",
                s.expect_ready.join(" and ")
            );
        }
        let mut phases = Records::new(&["phase", "at", "took"]);
        for (phase, at_ms, took) in phase_rows(&s.phases) {
            phases.push(vec![
                json!(phase),
                json!(utc(at_ms)),
                json!(took.map_or_else(|| "-".to_owned(), millis)),
            ]);
        }
        if !phases.rows.is_empty() {
            out.push_str(&render(&phases, Format::Table));
        }
    }
    for f in &s.failed {
        let _ = writeln!(
            out,
            "{address}: failed version {} at {} ({}): {}",
            f.version,
            f.phase,
            utc(f.at_ms),
            f.reason
        );
    }
    out
}

/// Milliseconds as `850ms`, `12.3s`, `2m05s`.
fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
    } else {
        human(Duration::from_millis(ms))
    }
}

/// Milliseconds since the Unix epoch as `2026-12-06T07:45:26Z`.
pub use keelson_node_protocol::clock::utc;

/// What `version` adds from `UpgradeStatus`: the other slot and its version, whether the
/// booted slot is on trial, the newest attempt's outcome, and the newest failure
/// (`0.3.0 at stage2: why`) when that attempt failed. Empty values when the status is
/// unknown.
pub fn version_extras(status: Option<&proto::UpgradeStatusResponse>, booted: &str) -> Vec<Value> {
    let Some(s) = status else {
        return vec![json!(""), json!(""), json!(null), json!(""), json!("")];
    };
    let other = s
        .slots
        .iter()
        .find(|x| x.slot != booted && !booted.is_empty());
    let trial = s
        .slots
        .iter()
        .find(|x| x.booted || x.slot == booted)
        .map(|x| !x.blessed && !x.entry.is_empty());
    let failed = if s.outcome == "failed" {
        format!(
            "{} at {}: {}",
            s.to_version, s.failed_phase, s.failed_reason
        )
    } else {
        String::new()
    };
    vec![
        json!(other.map(|o| o.slot.clone()).unwrap_or_default()),
        json!(other.map(|o| o.version.clone()).unwrap_or_default()),
        trial.map_or(Value::Null, Value::Bool),
        json!(s.outcome),
        json!(failed),
    ]
}

/// The columns [`version_extras`] fills.
pub const VERSION_EXTRA_COLUMNS: [&str; 5] =
    ["other_slot", "other_version", "trial", "upgrade", "failed"];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser as _;
    use std::cell::{Cell, RefCell};

    fn parse(args: &[&str]) -> Result<crate::Cli, clap::Error> {
        crate::Cli::try_parse_from(std::iter::once("machinectl").chain(args.iter().copied()))
    }

    fn upgrade_args(args: &[&str]) -> UpgradeArgs {
        match parse(args).unwrap().command {
            crate::Command::Upgrade(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_command_line() {
        let a = upgrade_args(&["upgrade", "--image", "k.bundle"]);
        assert_eq!(a.image.as_deref(), Some("k.bundle"));
        assert_eq!(a.wait, Duration::from_secs(600));
        assert!(!a.stage && !a.dry_run && !a.force && !a.allow_downgrade);
        assert!(a.command.is_none());
        let a = upgrade_args(&[
            "upgrade",
            "--image",
            "https://h/k.bundle",
            "--stage",
            "--force",
            "--allow-downgrade",
            "--health-timeout",
            "5m",
            "--wait",
            "90s",
        ]);
        let source = Source::parse(a.image.as_deref().unwrap());
        assert_eq!(source, Source::Url("https://h/k.bundle".into()));
        let o = options(&a, &source, 42);
        assert!(o.stage && o.force && o.allow_downgrade && !o.dry_run);
        assert_eq!(o.health_timeout_seconds, 300);
        assert_eq!(o.url, "https://h/k.bundle");
        assert_eq!(o.size, 0);
        assert_eq!(a.wait, Duration::from_secs(90));
        let a = upgrade_args(&["upgrade", "--image", "./k.bundle", "--dry-run"]);
        let source = Source::parse("./k.bundle");
        let o = options(&a, &source, 42);
        assert!(o.dry_run && o.url.is_empty());
        assert_eq!((o.size, o.health_timeout_seconds), (42, 0));
        assert_eq!(
            Source::parse("HTTP://x/b"),
            Source::Url("HTTP://x/b".into())
        );

        let a = upgrade_args(&["upgrade", "status", "-o", "json"]);
        assert!(matches!(
            a.command,
            Some(UpgradeCommand::Status(OutputArgs {
                output: Format::Json
            }))
        ));
        // --image is required unless it is `status`; --stage and --dry-run exclude each other.
        assert!(parse(&["upgrade"]).is_err());
        assert!(parse(&["upgrade", "--image", "b", "--stage", "--dry-run"]).is_err());
        assert!(parse(&["upgrade", "--image", "b", "--wait", "soon"]).is_err());
        assert!(parse(&["upgrade", "--image", "b", "status"]).is_err());
        match parse(&["rollback", "--wait", "2m"]).unwrap().command {
            crate::Command::Rollback(r) => assert_eq!(r.wait, Duration::from_secs(120)),
            other => panic!("{other:?}"),
        }
    }

    fn progress(phase: &str, done: u64, total: u64, message: &str) -> proto::UpgradeProgress {
        proto::UpgradeProgress {
            phase: phase.into(),
            done,
            total,
            message: message.into(),
            ..proto::UpgradeProgress::default()
        }
    }

    #[test]
    fn progress_without_a_terminal_is_a_line_per_tenth() {
        let mut p = ProgressPrinter::new("n:1", false);
        let mut out = String::new();
        out += &p.update(&progress("check", 0, 0, "signature ok (key dev)"));
        const M: u64 = 1 << 20;
        for done in (0..=100).map(|i| i * M + i * 1000) {
            out += &p.update(&progress("transfer", done.min(100 * M), 100 * M, ""));
        }
        out += &p.update(&progress("write", 0, 0, "root into ROOT-B"));
        out += &p.update(&progress("write", 5 * M, 0, ""));
        out += &p.update(&progress("write", 70 * M, 0, ""));
        out += &p.update(&progress("write", 71 * M, 0, ""));
        out += &p.finish();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "n:1: check: signature ok (key dev)");
        assert_eq!(lines[1], "n:1: transfer 0% (0 B of 100.0 MiB)");
        assert_eq!(lines[2], "n:1: transfer 10% (10.0 MiB of 100.0 MiB)");
        assert_eq!(lines[6], "n:1: transfer 50% (50.0 MiB of 100.0 MiB)");
        assert_eq!(lines[11], "n:1: transfer 100% (100.0 MiB of 100.0 MiB)");
        assert_eq!(lines[12], "n:1: write: root into ROOT-B");
        assert_eq!(lines[13], "n:1: write 5.0 MiB");
        assert_eq!(lines[14], "n:1: write 70.0 MiB");
        assert_eq!(mib(512), "512 B");
        // Interleaved phases keep their own steps; a tenth is labelled as such.
        let mut p = ProgressPrinter::new("n", false);
        let a = p.update(&progress("transfer", 13, 100, ""));
        let b = p.update(&progress("write", 5, 100, ""));
        let c = p.update(&progress("transfer", 19, 100, ""));
        let d = p.update(&progress("transfer", 21, 100, ""));
        assert_eq!(a, "n: transfer 10% (13 B of 100 B)\n");
        assert_eq!(b, "n: write 0% (5 B of 100 B)\n");
        assert_eq!(
            (c.as_str(), d.as_str()),
            ("", "n: transfer 20% (21 B of 100 B)\n")
        );
        assert_eq!(mib(73_728), "72.0 KiB");
        assert_eq!(lines.len(), 15, "{out}");
        assert!(!out.contains('\r'));
    }

    #[test]
    fn progress_on_a_terminal_is_redrawn() {
        let mut p = ProgressPrinter::new("n:1", true);
        let a = p.update(&progress("transfer", 1 << 20, 4 << 20, ""));
        assert_eq!(a, "\r\x1b[2Kn:1: transfer 25% (1.0 MiB of 4.0 MiB)");
        let b = p.update(&progress("verify", 0, 0, "reading back"));
        assert_eq!(b, "\nn:1: verify: reading back\n");
        assert_eq!(p.finish(), "");
        p.update(&progress("verify", 1, 2, ""));
        assert_eq!(p.finish(), "\n");
    }

    #[test]
    fn the_last_line_says_what_happened() {
        let done = proto::UpgradeProgress {
            done_all: true,
            version: "0.2.0".into(),
            slot: "b".into(),
            rebooting: true,
            ..proto::UpgradeProgress::default()
        };
        let o = proto::UpgradeOptions::default();
        assert_eq!(
            done_line("n", &done, &o),
            "n: 0.2.0 installed in slot b; the node is rebooting into it"
        );
        let not = proto::UpgradeProgress {
            rebooting: false,
            ..done
        };
        let staged = proto::UpgradeOptions {
            stage: true,
            ..o.clone()
        };
        assert_eq!(
            done_line("n", &not, &staged),
            "n: 0.2.0 staged in slot b: it boots at the next reboot"
        );
        let dry = proto::UpgradeOptions { dry_run: true, ..o };
        assert_eq!(
            done_line("n", &not, &dry),
            "n: dry run: 0.2.0 for slot b passed every check; nothing was written"
        );
    }

    /// A node that answers from a script: one entry per `Version` attempt (the last
    /// repeats), with a fixed `UpgradeStatus`.
    struct Scripted {
        answers: Vec<Result<(&'static str, &'static str), &'static str>>,
        calls: Cell<usize>,
        status: proto::UpgradeStatusResponse,
        /// How long each `Version` attempt takes.
        delay: Duration,
        said: RefCell<Vec<String>>,
    }

    impl Scripted {
        fn new(answers: Vec<Result<(&'static str, &'static str), &'static str>>) -> Scripted {
            Scripted {
                answers,
                calls: Cell::new(0),
                status: proto::UpgradeStatusResponse {
                    to_version: "0.2.0".into(),
                    outcome: "booting".into(),
                    ..proto::UpgradeStatusResponse::default()
                },
                delay: Duration::ZERO,
                said: RefCell::new(Vec::new()),
            }
        }

        async fn wait(&self, wait: Duration) -> (WaitOutcome, Duration) {
            let start = std::time::Instant::now();
            let expected = Expected {
                version: "0.2.0".into(),
                slot: "b".into(),
            };
            let mut say = |l: &str| self.said.borrow_mut().push(l.to_owned());
            let outcome =
                wait_for_version(self, &expected, wait, Duration::from_millis(20), &mut say).await;
            (outcome, start.elapsed())
        }
    }

    impl Probe for Scripted {
        async fn version(&self, _limit: Duration) -> Result<(String, String), String> {
            let n = self.calls.get();
            self.calls.set(n + 1);
            tokio::time::sleep(self.delay).await;
            let answer = self.answers[n.min(self.answers.len() - 1)];
            answer
                .map(|(v, s)| (v.to_owned(), s.to_owned()))
                .map_err(str::to_owned)
        }

        async fn status(&self, _limit: Duration) -> Result<proto::UpgradeStatusResponse, String> {
            Ok(self.status.clone())
        }
    }

    fn block_on<T>(f: impl Future<Output = T>) -> T {
        runtime().unwrap().block_on(f)
    }

    #[test]
    fn the_wait_ends_as_soon_as_the_new_version_answers() {
        // The old boot answers first (not yet down), then the node is down, then back.
        let node = Scripted::new(vec![
            Ok(("0.1.0", "a")),
            Err("connection refused"),
            Err("connection refused"),
            Ok(("0.2.0", "b")),
        ]);
        let (outcome, took) = block_on(node.wait(Duration::from_secs(60)));
        assert!(matches!(outcome, WaitOutcome::Up { .. }), "{outcome:?}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert_eq!(node.calls.get(), 4);
        assert_eq!(*node.said.borrow(), vec!["down (connection refused)"]);
        let line = judge("n", &expected(), Duration::from_secs(60), &outcome).unwrap();
        assert!(
            line.starts_with("n: 0.2.0 answers from slot b after 0s (upgrade booting)"),
            "{line}"
        );
    }

    fn expected() -> Expected {
        Expected {
            version: "0.2.0".into(),
            slot: "b".into(),
        }
    }

    #[test]
    fn a_node_back_on_the_old_slot_fell_back() {
        let mut node = Scripted::new(vec![Err("refused"), Ok(("0.1.0", "a"))]);
        node.status.outcome = "failed".into();
        node.status.failed_phase = "stage2".into();
        node.status.failed_reason = "the kernel or stage 1 never reached stage 2".into();
        let (outcome, took) = block_on(node.wait(Duration::from_secs(60)));
        assert!(took < Duration::from_secs(2), "took {took:?}");
        let err = judge("n", &expected(), Duration::from_secs(60), &outcome)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("n came back on 0.1.0 (slot a) after 0s, not on 0.2.0 (slot b): it fell back; the upgrade to 0.2.0 failed at stage2: the kernel or stage 1 never reached stage 2"),
            "{err}"
        );

        // Recorded as failed already: no need to see it go down.
        let (outcome, _) = block_on(node.wait(Duration::from_secs(60)));
        assert!(matches!(outcome, WaitOutcome::CameBack { .. }));
    }

    #[test]
    fn the_old_boot_answering_before_the_reboot_is_not_a_fall_back() {
        // The old machined still answers and nothing failed: keep polling until the wait
        // ends, never past it.
        let node = Scripted::new(vec![Ok(("0.1.0", "a"))]);
        let (outcome, took) = block_on(node.wait(Duration::from_millis(500)));
        let WaitOutcome::TimedOut { last } = &outcome else {
            panic!("{outcome:?}");
        };
        assert!(last.contains("0.1.0 from slot a"), "{last}");
        assert!(took < Duration::from_millis(900), "took {took:?}");
        assert!(node.calls.get() > 5);
    }

    #[test]
    fn a_node_that_never_answers_fails_within_the_wait() {
        let mut node = Scripted::new(vec![Err("no route to host")]);
        // Each attempt hangs longer than the whole wait: it is cut at the wait.
        node.delay = Duration::from_secs(30);
        let (outcome, took) = block_on(node.wait(Duration::from_millis(700)));
        assert!(took < Duration::from_millis(1500), "took {took:?}");
        let err = judge("n", &expected(), Duration::from_secs(1), &outcome)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("n did not answer with 0.2.0 from slot b within 1s"),
            "{err}"
        );
    }

    #[test]
    fn status_text_and_json() {
        let s = proto::UpgradeStatusResponse {
            slots: vec![
                proto::SlotStatus {
                    slot: "a".into(),
                    version: "0.1.0".into(),
                    entry: "keelson-a.conf".into(),
                    blessed: true,
                    tries_left: 0,
                    booted: true,
                    next: true,
                },
                proto::SlotStatus {
                    slot: "b".into(),
                    version: "".into(),
                    entry: "".into(),
                    ..proto::SlotStatus::default()
                },
            ],
            from_version: "0.1.0".into(),
            to_version: "0.3.0".into(),
            to_slot: "b".into(),
            outcome: "failed".into(),
            failed_phase: "healthy".into(),
            failed_reason: "not healthy within 300 s".into(),
            phases: vec![
                proto::UpgradePhase {
                    phase: "transfer".into(),
                    at_ms: 1_765_000_000_000,
                },
                proto::UpgradePhase {
                    phase: "write".into(),
                    at_ms: 1_765_000_004_250,
                },
            ],
            failed: vec![proto::FailedVersion {
                version: "0.3.0".into(),
                phase: "healthy".into(),
                reason: "not healthy within 300 s".into(),
                at_ms: 0,
            }],
            ..proto::UpgradeStatusResponse::default()
        };
        let text = status_text("n", &s);
        for want in [
            "NODE   SLOT   VERSION   ENTRY            BLESSED   TRIES_LEFT   BOOTED   NEXT",
            "n      a      0.1.0     keelson-a.conf   yes                    yes      yes",
            "n: newest upgrade: 0.1.0 -> 0.3.0 (slot b): failed",
            "n: failed at healthy: not healthy within 300 s",
            "transfer   2025-12-06T05:46:40Z   -",
            "write      2025-12-06T05:46:44Z   4.2s",
            "n: failed version 0.3.0 at healthy (1970-01-01T00:00:00Z): not healthy within 300 s",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        let row = status_json("n", &s);
        assert_eq!(row[1][0]["entry"], "keelson-a.conf");
        assert_eq!(row[2]["phases"][1]["took_ms"], 4250);
        assert_eq!(row[2]["phases"][0]["took_ms"], Value::Null);
        assert_eq!(row[3][0]["version"], "0.3.0");
        let extras = version_extras(Some(&s), "a");
        assert_eq!(
            extras,
            vec![
                json!("b"),
                json!(""),
                json!(false),
                json!("failed"),
                json!("0.3.0 at healthy: not healthy within 300 s")
            ]
        );
        assert_eq!(version_extras(None, "a")[2], Value::Null);
    }

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_543_126_000), "2026-12-06T07:45:26Z");
    }
}
