//! `machinectl`'s commands for a node's clock and its stacked etcd: `time`, `bootstrap`
//! and `etcd ...`. They reach the nodes like every API command ([`crate::api`]): one
//! call per target node, printed as a table (or `-o json|yaml`), a failed node named on
//! stderr.
//!
//! `bootstrap`, `etcd snapshot`, `etcd leave` and `etcd remove-member` act on one node
//! only and refuse several: a second bootstrap would split the cluster, a snapshot is
//! one file, and several nodes leaving (or removing the same member) at once can break
//! etcd's quorum. Clocks come first because a node refuses to bootstrap while its clock is
//! unsynced.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio_stream::StreamExt as _;

use super::api::{OutputArgs, Session, Target, file_chunks, runtime, upload};
use super::output::{Format, Records, render};
use keelson_api::api::proto;

/// `machinectl bootstrap`.
#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// Start the cluster from this etcd snapshot (from `machinectl etcd snapshot` or
    /// `etcdctl snapshot save`) instead of empty.
    #[arg(long, value_name = "SNAPSHOT")]
    pub recover_from: Option<PathBuf>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `machinectl etcd ...`.
#[derive(Debug, Subcommand)]
pub enum EtcdCommand {
    /// List the etcd cluster's members, as the node's etcd sees them (reader).
    Members(OutputArgs),
    /// Show the node's etcd member: version, database size, leader, raft term and index,
    /// errors (reader).
    Status(OutputArgs),
    /// Save a snapshot of the etcd database into FILE (operator or etcd:backup; one node).
    ///
    /// The snapshot is streamed into a temporary file beside FILE, synced, then renamed
    /// over FILE (mode 0600: it holds every Kubernetes secret). Prints its size and
    /// sha256. Restore it with `machinectl bootstrap --recover-from FILE`.
    Snapshot(SnapshotArgs),
    /// Defragment the node's etcd member, giving back the space of deleted revisions
    /// (operator).
    ///
    /// The member does not serve while it runs: on several nodes, the nodes are
    /// defragmented one after the other.
    Defrag(OutputArgs),
    /// The etcd cluster's alarms (NOSPACE, CORRUPT): list (reader), disarm (operator).
    #[command(subcommand)]
    Alarm(AlarmCommand),
    /// Make the node's member leave the etcd cluster; the node stops etcd and clears its
    /// data (admin; one node).
    Leave(OutputArgs),
    /// Remove a member from the etcd cluster by its ID, e.g. one whose node is gone for
    /// good (admin; one node, which makes the change).
    RemoveMember(RemoveMemberArgs),
    /// If the node's member leads the etcd cluster, hand the leadership to another voting
    /// member (operator).
    ForfeitLeadership(OutputArgs),
}

/// `machinectl etcd alarm ...`.
#[derive(Debug, Subcommand)]
pub enum AlarmCommand {
    /// List the active alarms (reader).
    List(OutputArgs),
    /// Disarm every active alarm, once its cause is fixed (operator).
    Disarm(OutputArgs),
}

/// `machinectl etcd snapshot FILE`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Where to write the snapshot (replaced if it exists).
    pub file: PathBuf,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `machinectl etcd remove-member ID`.
#[derive(Debug, Args)]
pub struct RemoveMemberArgs {
    /// The member's ID in hex, as `machinectl etcd members` prints it.
    #[arg(value_parser = parse_member_id)]
    pub id: String,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

impl EtcdCommand {
    /// The output flags of the command.
    pub fn output(&self) -> OutputArgs {
        match self {
            EtcdCommand::Members(o)
            | EtcdCommand::Status(o)
            | EtcdCommand::Defrag(o)
            | EtcdCommand::Leave(o)
            | EtcdCommand::ForfeitLeadership(o)
            | EtcdCommand::Alarm(AlarmCommand::List(o) | AlarmCommand::Disarm(o)) => *o,
            EtcdCommand::Snapshot(args) => args.output,
            EtcdCommand::RemoveMember(args) => args.output,
        }
    }

    /// The command as the operator types it, for messages.
    fn name(&self) -> &'static str {
        match self {
            EtcdCommand::Members(_) => "etcd members",
            EtcdCommand::Status(_) => "etcd status",
            EtcdCommand::Snapshot(_) => "etcd snapshot",
            EtcdCommand::Defrag(_) => "etcd defrag",
            EtcdCommand::Alarm(AlarmCommand::List(_)) => "etcd alarm list",
            EtcdCommand::Alarm(AlarmCommand::Disarm(_)) => "etcd alarm disarm",
            EtcdCommand::Leave(_) => "etcd leave",
            EtcdCommand::RemoveMember(_) => "etcd remove-member",
            EtcdCommand::ForfeitLeadership(_) => "etcd forfeit-leadership",
        }
    }
}

/// Parses a member ID: hex, as etcd prints it (a `0x` prefix is accepted); returns it in
/// lower case without the prefix.
pub fn parse_member_id(s: &str) -> Result<String, String> {
    let hex = s.trim();
    let hex = hex
        .strip_prefix("0x")
        .or_else(|| hex.strip_prefix("0X"))
        .unwrap_or(hex);
    if hex.is_empty() || hex.len() > 16 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not an etcd member ID: pass the hex ID that `machinectl etcd members` prints, e.g. 8e9e05c52164694d"
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

/// Refuses more than one target node for `what`, before anything is loaded or dialled
/// (`--nodes`), then again once the context is resolved (its nodes or endpoints).
pub(crate) fn one_node(target: &Target, what: &str, why: &str) -> anyhow::Result<Session> {
    let refuse = |nodes: &[String]| -> anyhow::Result<()> {
        if nodes.len() > 1 {
            bail!(
                "{what} acts on one node only ({why}), but {} were given ({}); pass one with --nodes ADDRESS",
                nodes.len(),
                nodes.join(", ")
            );
        }
        Ok(())
    };
    refuse(&target.nodes)?;
    let session = target.session()?;
    refuse(session.addresses())?;
    Ok(session)
}

/// Seconds as the table shows them (`+1.234ms`); JSON and YAML keep the number.
fn seconds(s: f64, format: Format) -> Value {
    if format != Format::Table {
        return json!(s);
    }
    let (value, unit) = match s.abs() {
        a if a >= 1.0 => (s, "s"),
        a if a >= 1e-3 => (s * 1e3, "ms"),
        _ => (s * 1e6, "µs"),
    };
    json!(format!("{value:+.3}{unit}"))
}

/// Bytes as the table shows them (`12.5 MiB`); JSON and YAML keep the number.
fn bytes(n: u64, format: Format) -> Value {
    if format != Format::Table {
        return json!(n);
    }
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return json!(format!("{n} B"));
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    json!(format!("{value:.1} {unit}"))
}

/// A text cell that is empty when the node sent nothing.
fn optional(s: String) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

const TIME_COLUMNS: [&str; 8] = [
    "servers",
    "synced",
    "synced_from",
    "offset_at_sync",
    "measured_from",
    "offset_now",
    "round_trip",
    "error",
];

/// `machinectl time`.
pub fn time(target: &Target) -> anyhow::Result<ExitCode> {
    let session = target.session()?;
    let format = target.output;
    runtime()?.block_on(async {
        Ok(session
            .each(&TIME_COLUMNS, |mut c, _| async move {
                let t = c.time(proto::TimeRequest {}).await?.into_inner();
                Ok(vec![time_row(t, format)])
            })
            .await)
    })
}

fn time_row(t: proto::TimeResponse, format: Format) -> Vec<Value> {
    // Nothing to show before the first sync, or when no server answered now.
    let shown = |from: &str, s: f64| {
        if from.is_empty() {
            Value::Null
        } else {
            seconds(s, format)
        }
    };
    let (synced_offset, offset, round_trip) = (
        shown(&t.synced_from, t.synced_offset_seconds),
        shown(&t.measured_from, t.offset_seconds),
        shown(&t.measured_from, t.round_trip_seconds),
    );
    vec![
        json!(t.servers),
        json!(t.synced),
        optional(t.synced_from),
        synced_offset,
        optional(t.measured_from),
        offset,
        round_trip,
        optional(t.error),
    ]
}

/// `machinectl bootstrap [--recover-from SNAPSHOT]`.
pub fn bootstrap(target: &Target, args: &BootstrapArgs) -> anyhow::Result<ExitCode> {
    if let Some(file) = &args.recover_from {
        let meta = std::fs::metadata(file)
            .with_context(|| format!("cannot read the snapshot {}", file.display()))?;
        if !meta.is_file() || meta.len() == 0 {
            bail!(
                "{} is not an etcd snapshot (not a file, or empty): pass a file from `machinectl etcd snapshot`",
                file.display()
            );
        }
    }
    let session = one_node(
        target,
        "bootstrap",
        "it starts a new etcd cluster on one control plane; the others join it by themselves",
    )?;
    let recover_from = args.recover_from.clone();
    runtime()?.block_on(async {
        Ok(session
            .each(&["message"], |mut c, _| {
                let recover_from = recover_from.clone();
                async move {
                    let r = match recover_from {
                        None => {
                            let only = proto::BootstrapRequest {
                                recover: false,
                                snapshot: Vec::new(),
                            };
                            c.bootstrap(tokio_stream::once(only)).await?
                        }
                        Some(file) => {
                            let (chunks, failure) = file_chunks(file).await?;
                            let messages = chunks.map(|snapshot| proto::BootstrapRequest {
                                recover: true,
                                snapshot,
                            });
                            upload(c.bootstrap(messages), failure).await?
                        }
                    };
                    Ok(vec![vec![json!(r.into_inner().message)]])
                }
            })
            .await)
    })
}

/// `machinectl etcd ...`.
pub fn etcd(target: &Target, command: &EtcdCommand) -> anyhow::Result<ExitCode> {
    let session = match command {
        EtcdCommand::Snapshot(args) => return snapshot(target, &args.file),
        EtcdCommand::Leave(_) | EtcdCommand::RemoveMember(_) => one_node(
            target,
            command.name(),
            "several members leaving at once can break etcd's quorum",
        )?,
        _ => target.session()?,
    };
    run(&session, command, target.output)
}

const MEMBER_COLUMNS: [&str; 6] = [
    "id",
    "name",
    "peer_urls",
    "client_urls",
    "learner",
    "started",
];

const STATUS_COLUMNS: [&str; 10] = [
    "member_id",
    "leader_id",
    "version",
    "db_size",
    "in_use",
    "raft_term",
    "raft_index",
    "raft_applied",
    "learner",
    "errors",
];

/// The etcd commands that are one call per node with a table for an answer.
fn run(session: &Session, command: &EtcdCommand, format: Format) -> anyhow::Result<ExitCode> {
    let message = |r: proto::EtcdMessageResponse| vec![vec![json!(r.message)]];
    let alarms = |r: proto::EtcdAlarmsResponse| {
        r.alarms
            .into_iter()
            .map(|a| vec![json!(a.member_id), json!(a.alarm)])
            .collect::<Vec<_>>()
    };
    runtime()?.block_on(async {
        Ok(match command {
            EtcdCommand::Members(_) => {
                session
                    .each(&MEMBER_COLUMNS, |mut c, _| async move {
                        let r = c.etcd_members(proto::EtcdMembersRequest {}).await?;
                        Ok(r.into_inner().members.into_iter().map(member_row).collect())
                    })
                    .await
            }
            EtcdCommand::Status(_) => {
                session
                    .each(&STATUS_COLUMNS, |mut c, _| async move {
                        let r = c.etcd_status(proto::EtcdStatusRequest {}).await?;
                        Ok(vec![status_row(r.into_inner(), format)])
                    })
                    .await
            }
            EtcdCommand::Defrag(_) => {
                session
                    .each(&["message"], |mut c, _| async move {
                        let r = c.etcd_defrag(proto::EtcdDefragRequest {}).await?;
                        Ok(message(r.into_inner()))
                    })
                    .await
            }
            EtcdCommand::Alarm(AlarmCommand::List(_)) => {
                session
                    .each(&["member_id", "alarm"], |mut c, _| async move {
                        let r = c.etcd_alarm_list(proto::EtcdAlarmListRequest {}).await?;
                        Ok(alarms(r.into_inner()))
                    })
                    .await
            }
            EtcdCommand::Alarm(AlarmCommand::Disarm(_)) => {
                session
                    .each(&["member_id", "alarm"], |mut c, _| async move {
                        let r = c
                            .etcd_alarm_disarm(proto::EtcdAlarmDisarmRequest {})
                            .await?;
                        Ok(alarms(r.into_inner()))
                    })
                    .await
            }
            EtcdCommand::Leave(_) => {
                session
                    .each(&["message"], |mut c, _| async move {
                        let r = c.etcd_leave(proto::EtcdLeaveRequest {}).await?;
                        Ok(message(r.into_inner()))
                    })
                    .await
            }
            EtcdCommand::RemoveMember(args) => {
                session
                    .each(&["message"], |mut c, _| {
                        let id = args.id.clone();
                        async move {
                            let r = c
                                .etcd_remove_member(proto::EtcdRemoveMemberRequest { id })
                                .await?;
                            Ok(message(r.into_inner()))
                        }
                    })
                    .await
            }
            EtcdCommand::ForfeitLeadership(_) => {
                session
                    .each(&["message"], |mut c, _| async move {
                        let r = c
                            .etcd_forfeit_leadership(proto::EtcdForfeitLeadershipRequest {})
                            .await?;
                        Ok(message(r.into_inner()))
                    })
                    .await
            }
            EtcdCommand::Snapshot(_) => bail!("etcd snapshot streams a file: see `snapshot`"),
        })
    })
}

fn member_row(m: proto::EtcdMember) -> Vec<Value> {
    vec![
        json!(m.id),
        json!(m.name),
        json!(m.peer_urls),
        json!(m.client_urls),
        json!(m.learner),
        json!(m.started),
    ]
}

fn status_row(s: proto::EtcdStatusResponse, format: Format) -> Vec<Value> {
    vec![
        json!(s.member_id),
        optional(s.leader_id),
        json!(s.version),
        bytes(s.db_size, format),
        bytes(s.db_size_in_use, format),
        json!(s.raft_term),
        json!(s.raft_index),
        json!(s.raft_applied_index),
        json!(s.learner),
        json!(s.errors),
    ]
}

/// `machinectl etcd snapshot FILE`: streams the node's snapshot into a temporary file
/// beside FILE, syncs it and renames it over FILE; prints its size and sha256.
fn snapshot(target: &Target, file: &Path) -> anyhow::Result<ExitCode> {
    let session = one_node(target, "etcd snapshot", "the snapshot is one file")?;
    let format = target.output;
    let Some(address) = session.addresses().first().cloned() else {
        bail!("etcd snapshot needs a node: pass one with --nodes ADDRESS");
    };
    let part = part_path(file)?;
    let written = runtime()?.block_on(receive(&session, &address, &part));
    let (size, sha256) = match written {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    if let Err(e) = std::fs::rename(&part, file) {
        let _ = std::fs::remove_file(&part);
        return Err(e).with_context(|| {
            format!(
                "cannot rename the snapshot {} to {}",
                part.display(),
                file.display()
            )
        });
    }
    sync_parent(file)?;
    let mut records = Records::new(&["node", "file", "size", "sha256"]);
    records.push(vec![
        json!(address),
        json!(file.display().to_string()),
        bytes(size, format),
        json!(sha256),
    ]);
    print!("{}", render(&records, format));
    Ok(ExitCode::SUCCESS)
}

/// The temporary file a snapshot is streamed into: `.NAME.part` beside FILE, so that the
/// rename stays on one filesystem.
fn part_path(file: &Path) -> anyhow::Result<PathBuf> {
    let Some(name) = file.file_name() else {
        bail!(
            "{} is not a file name: pass the snapshot's path, e.g. etcd.snapshot",
            file.display()
        );
    };
    let mut part = std::ffi::OsString::from(".");
    part.push(name);
    part.push(".part");
    Ok(file.with_file_name(part))
}

/// Streams the node's snapshot into `part` (mode 0600, synced); returns its size and
/// sha256 in hex.
async fn receive(session: &Session, address: &str, part: &Path) -> anyhow::Result<(u64, String)> {
    let mut c = session.client(address).await?;
    let mut stream = c
        .etcd_snapshot(proto::EtcdSnapshotRequest {})
        .await
        .map_err(|s| session.status(address, &s))?
        .into_inner();
    let mut out = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(part)
        .with_context(|| format!("cannot create {}", part.display()))?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| session.status(address, &s))?;
        out.write_all(&chunk.data)
            .with_context(|| format!("cannot write {}", part.display()))?;
        hash.update(&chunk.data);
        size += chunk.data.len() as u64;
    }
    if size == 0 {
        bail!(
            "{address} sent an empty snapshot: see `machinectl etcd status` and `machinectl logs etcd` on it"
        );
    }
    out.sync_all()
        .with_context(|| format!("cannot sync {}", part.display()))?;
    let sha256 = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((size, sha256))
}

/// Syncs the directory of `file`, so that its rename survives a power cut.
fn sync_parent(file: &Path) -> anyhow::Result<()> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync the directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids() {
        assert_eq!(
            parse_member_id("8E9E05C52164694D"),
            Ok("8e9e05c52164694d".into())
        );
        assert_eq!(parse_member_id("0x1f"), Ok("1f".into()));
        for bad in ["", "0x", "node-1", "12345678901234567", "-1"] {
            assert!(parse_member_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn table_units() {
        assert_eq!(seconds(0.0012, Format::Table), json!("+1.200ms"));
        assert_eq!(seconds(-2.5, Format::Table), json!("-2.500s"));
        assert_eq!(seconds(0.000_004, Format::Table), json!("+4.000µs"));
        assert_eq!(seconds(0.5, Format::Json), json!(0.5));
        assert_eq!(bytes(512, Format::Table), json!("512 B"));
        assert_eq!(bytes(3 << 20, Format::Table), json!("3.0 MiB"));
        assert_eq!(bytes(3 << 20, Format::Yaml), json!(3u64 << 20));
    }

    #[test]
    fn rows_leave_out_what_the_node_did_not_measure() {
        let t = proto::TimeResponse {
            servers: vec!["192.0.2.123".into()],
            synced: true,
            synced_from: "192.0.2.123".into(),
            synced_offset_seconds: -3.25,
            measured_from: String::new(),
            error: "no server answered".into(),
            ..Default::default()
        };
        let mut records = Records::new(&TIME_COLUMNS);
        records.push(time_row(t.clone(), Format::Table));
        assert_eq!(
            render(&records, Format::Table),
            "SERVERS       SYNCED   SYNCED_FROM   OFFSET_AT_SYNC   MEASURED_FROM   OFFSET_NOW   ROUND_TRIP   ERROR\n\
             192.0.2.123   yes      192.0.2.123   -3.250s                                                    no server answered\n"
        );
        let row = time_row(t, Format::Json);
        assert_eq!(row[3], json!(-3.25));
        assert_eq!(row[5], Value::Null);

        let s = proto::EtcdStatusResponse {
            member_id: "8e9e05c52164694d".into(),
            db_size: 20 << 20,
            db_size_in_use: 5 << 20,
            ..Default::default()
        };
        let row = status_row(s.clone(), Format::Table);
        assert_eq!(row[1], Value::Null, "no leader");
        assert_eq!((&row[3], &row[4]), (&json!("20.0 MiB"), &json!("5.0 MiB")));
        assert_eq!(status_row(s, Format::Json)[3], json!(20u64 << 20));
    }

    #[test]
    fn snapshots_are_written_beside_their_file() {
        assert_eq!(
            part_path(Path::new("/backups/etcd.db")).ok(),
            Some(PathBuf::from("/backups/.etcd.db.part"))
        );
        assert_eq!(
            part_path(Path::new("etcd.db")).ok(),
            Some(PathBuf::from(".etcd.db.part"))
        );
        assert!(part_path(Path::new("/")).is_err());
    }
}
