//! `machinectl`'s Kubernetes commands: `kubeconfig` and `image pull`. They reach the nodes
//! like every API command ([`crate::api`]).
//!
//! `kubeconfig` asks one control plane for a kubeconfig with a fresh admin certificate
//! (minted from the Kubernetes CA on the node, as kubeadm's `admin.conf`) and writes it
//! where kubectl looks: PATH, else the first entry of `$KUBECONFIG`, else
//! `~/.kube/config`. By default it is merged as kubectl users expect
//! ([`keelson_kube::kubeconfig::merge`]): the existing contexts, users and clusters are kept,
//! an entry of the same name is refused unless `--force`, and the current context becomes
//! the new one. `--merge=false` writes the new kubeconfig alone, and refuses to replace an
//! existing file unless `--force`. The file is written atomically, mode 0600 (it holds a
//! cluster-admin key), its directory created 0700.
//!
//! `image pull REF` has each target node pull REF into containerd through the CRI (as
//! `crictl pull` does), and prints the image ID each node reports; the node checks REF's
//! syntax first.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::json;

use super::api::{OutputArgs, Session, Target, runtime};
use super::etcd::one_node;
use super::output::{Records, render};
use keelson_api::api::proto;
use keelson_api::atomic;

/// `machinectl kubeconfig [PATH]`.
#[derive(Debug, Args)]
pub struct KubeconfigArgs {
    /// Where to write the kubeconfig. Default: the first entry of $KUBECONFIG, else
    /// ~/.kube/config.
    pub path: Option<PathBuf>,
    /// With --merge: replace a context, user or cluster of the same name in the file.
    /// With --merge=false: replace the file.
    #[arg(long)]
    pub force: bool,
    /// Merge the new context into the file, keeping its other contexts, and make it the
    /// current context (true, the default); or write the new kubeconfig alone (false).
    #[arg(
        long,
        value_name = "true|false",
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub merge: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `machinectl image pull REF`.
#[derive(Debug, Args)]
pub struct ImagePullArgs {
    /// The image, `[REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST]`, e.g.
    /// registry.k8s.io/pause:3.10 (a name without registry is Docker Hub's).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// How the kubeconfig was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Merged into an existing file.
    Merged,
    /// A new file (none was there).
    Created,
    /// An existing file replaced (`--merge=false --force`).
    Replaced,
}

impl Written {
    /// As the output shows it.
    fn name(self) -> &'static str {
        match self {
            Written::Merged => "merged",
            Written::Created => "created",
            Written::Replaced => "replaced",
        }
    }
}

/// `machinectl kubeconfig [PATH] [--force] [--merge=true|false]`.
pub fn kubeconfig(target: &Target, args: &KubeconfigArgs) -> anyhow::Result<ExitCode> {
    let path = match &args.path {
        Some(path) => path.clone(),
        None => default_path(
            std::env::var_os("KUBECONFIG").as_deref(),
            std::env::var_os("HOME").as_deref(),
        )?,
    };
    // Refused before a certificate is minted for nothing.
    refuse_replacing(&path, args.merge, args.force)?;
    let session = one_node(
        target,
        "kubeconfig",
        "one control plane mints the admin certificate",
    )?;
    let Some(address) = session.addresses().first().cloned() else {
        bail!("kubeconfig needs a control plane: pass one with --nodes ADDRESS");
    };
    let answer = runtime()?.block_on(ask(&session, &address))?;
    let text = String::from_utf8(answer.kubeconfig)
        .with_context(|| format!("{address} sent a kubeconfig that is not UTF-8"))?;
    let written = write(&path, &text, args.merge, args.force)?;
    let mut records = Records::new(&["node", "context", "file", "written"]);
    records.push(vec![
        json!(address),
        json!(answer.context),
        json!(path.display().to_string()),
        json!(written.name()),
    ]);
    print!("{}", render(&records, target.output));
    Ok(ExitCode::SUCCESS)
}

async fn ask(session: &Session, address: &str) -> anyhow::Result<proto::KubeconfigResponse> {
    let mut c = session.client(address).await?;
    let r = c
        .kubeconfig(proto::KubeconfigRequest {})
        .await
        .map_err(|s| session.status(address, &s))?;
    Ok(r.into_inner())
}

/// Where kubectl reads its config: the first non-empty entry of `$KUBECONFIG`, else
/// `$HOME/.kube/config`.
pub fn default_path(
    kubeconfig: Option<&std::ffi::OsStr>,
    home: Option<&std::ffi::OsStr>,
) -> anyhow::Result<PathBuf> {
    if let Some(first) = kubeconfig
        .map(std::env::split_paths)
        .into_iter()
        .flatten()
        .find(|p| !p.as_os_str().is_empty())
    {
        return Ok(first);
    }
    match home {
        Some(home) if !home.is_empty() => Ok(Path::new(home).join(".kube").join("config")),
        _ => bail!(
            "neither $KUBECONFIG nor $HOME is set, so there is no default kubeconfig: pass its path (machinectl kubeconfig PATH)"
        ),
    }
}

/// Refuses to replace an existing file with a kubeconfig of its own (`--merge=false`)
/// without `force`.
fn refuse_replacing(path: &Path, merge: bool, force: bool) -> anyhow::Result<()> {
    if !merge && !force && path.symlink_metadata().is_ok() {
        bail!(
            "{} exists: pass --force to replace it with the new kubeconfig, or merge into it (without --merge=false)",
            path.display()
        );
    }
    Ok(())
}

/// Writes the node's kubeconfig `new` to `path`: merged into the existing file, or alone
/// (refusing to replace a file unless `force`). Atomic, mode 0600, the directory 0700; a
/// symbolic link is followed, as kubectl does, and its target replaced.
pub fn write(path: &Path, new: &str, merge: bool, force: bool) -> anyhow::Result<Written> {
    refuse_replacing(path, merge, force)?;
    let resolved;
    let path = match path.symlink_metadata() {
        Ok(meta) if meta.file_type().is_symlink() => {
            resolved = std::fs::canonicalize(path).with_context(|| {
                format!("{} is a symbolic link that leads nowhere", path.display())
            })?;
            resolved.as_path()
        }
        _ => path,
    };
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the kubeconfig {}", path.display()));
        }
    };
    let (content, written) = match (&existing, merge) {
        (Some(old), true) => {
            let merged =
                keelson_kube::kubeconfig::merge(Some(old), new, force).with_context(|| {
                    format!("cannot merge into {}; nothing was written", path.display())
                })?;
            (merged, Written::Merged)
        }
        (None, true) => {
            // Through merge all the same: the file gets the shape that a merge gives.
            let fresh = keelson_kube::kubeconfig::merge(None, new, force)
                .with_context(|| format!("cannot write {}", path.display()))?;
            (fresh, Written::Created)
        }
        (Some(_), false) => (new.to_owned(), Written::Replaced),
        (None, false) => (new.to_owned(), Written::Created),
    };
    atomic::write(path, content.as_bytes(), atomic::PRIVATE_FILE_MODE)
        .with_context(|| format!("cannot write the kubeconfig {}", path.display()))?;
    Ok(written)
}

/// `machinectl image pull REF`: each target node pulls REF.
pub fn image_pull(session: &Session, args: &ImagePullArgs) -> anyhow::Result<ExitCode> {
    let reference = args.reference.clone();
    runtime()?.block_on(async {
        Ok(session
            .each(&["reference", "image"], |mut c, _| {
                let reference = reference.clone();
                async move {
                    let request = proto::ImagePullRequest {
                        reference: reference.clone(),
                    };
                    let r = c.image_pull(request).await?;
                    Ok(vec![vec![json!(reference), json!(r.into_inner().image)]])
                }
            })
            .await)
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::os::unix::fs::PermissionsExt as _;

    use clap::Parser as _;

    use super::*;
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("machinectl").chain(args.iter().copied()))
    }

    fn kubeconfig_args(args: &[&str]) -> KubeconfigArgs {
        match parse(args).map(|c| c.command) {
            Ok(Command::Kubeconfig(a)) => a,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn kubeconfig_arguments() {
        let check = |args: &[&str], path: Option<&str>, force: bool, merge: bool| {
            let a = kubeconfig_args(args);
            assert_eq!(
                (a.path.as_deref(), a.force, a.merge),
                (path.map(Path::new), force, merge),
                "{args:?}"
            );
        };
        check(&["kubeconfig"], None, false, true);
        check(&["kubeconfig", "k.yaml"], Some("k.yaml"), false, true);
        check(&["kubeconfig", "--merge"], None, false, true);
        check(
            &["kubeconfig", "--merge=false", "k"],
            Some("k"),
            false,
            false,
        );
        // The value takes `=`: a bare --merge before PATH is not read as its value.
        check(&["kubeconfig", "--merge", "k"], Some("k"), false, true);
        check(
            &["kubeconfig", "k", "--force", "--merge=true"],
            Some("k"),
            true,
            true,
        );
        for bad in [
            &["kubeconfig", "--merge=no"][..],
            &["kubeconfig", "a", "b"],
            &["kubeconfig", "--force=yes"],
            &["kubeconfig", "--merge", "false", "k"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn image_pull_arguments() {
        match parse(&["image", "pull", "registry.k8s.io/pause:3.10", "-o", "json"])
            .map(|c| c.command)
        {
            Ok(Command::Image(crate::api::ImageCommand::Pull(a))) => {
                assert_eq!(a.reference, "registry.k8s.io/pause:3.10");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["image", "pull"]).is_err());
        assert!(parse(&["image", "pull", "a", "b"]).is_err());
    }

    #[test]
    fn help_says_what_and_which_role() {
        let mut cli = <Cli as clap::CommandFactory>::command();
        let help = |cli: &mut clap::Command, path: &[&str]| {
            let mut cmd = cli.clone();
            for name in path {
                cmd = cmd
                    .find_subcommand(name)
                    .unwrap_or_else(|| panic!("{name}"))
                    .clone();
            }
            cmd.render_long_help().to_string()
        };
        let k = help(&mut cli, &["kubeconfig"]);
        for want in [
            "(admin; one control plane)",
            "~/.kube/config",
            "$KUBECONFIG",
            "--merge",
            "--force",
            "0600",
        ] {
            assert!(k.contains(want), "want {want:?} in {k}");
        }
        let p = help(&mut cli, &["image", "pull"]);
        for want in ["(operator)", "<REF>", "registry.k8s.io/pause:3.10"] {
            assert!(p.contains(want), "want {want:?} in {p}");
        }
    }

    #[test]
    fn the_default_path_is_kubectl_s() {
        let check = |kubeconfig: Option<&str>, home: Option<&str>, want: Option<&str>| {
            let got = default_path(kubeconfig.map(OsStr::new), home.map(OsStr::new));
            assert_eq!(
                got.ok().as_deref(),
                want.map(Path::new),
                "{kubeconfig:?} {home:?}"
            );
        };
        check(None, Some("/home/a"), Some("/home/a/.kube/config"));
        check(Some(""), Some("/home/a"), Some("/home/a/.kube/config"));
        check(Some("/k/one:/k/two"), Some("/home/a"), Some("/k/one"));
        check(Some(":/k/two"), None, Some("/k/two"));
        check(None, None, None);
        check(None, Some(""), None);
    }

    /// A kubeconfig as the node sends it, with one context `NAME` (user `NAME-admin`,
    /// cluster `NAME`).
    fn node_kubeconfig(name: &str) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: {name}\n  \
               cluster:\n    \
                 server: https://{name}.example:6443\n    \
                 certificate-authority-data: Q0E=\n\
             users:\n\
             - name: {name}-admin\n  \
               user:\n    \
                 client-certificate-data: Q0VSVA==\n    \
                 client-key-data: S0VZ\n\
             contexts:\n\
             - name: {name}-admin@{name}\n  \
               context:\n    \
                 cluster: {name}\n    \
                 user: {name}-admin\n\
             current-context: {name}-admin@{name}\n\
             preferences: {{}}\n"
        )
    }

    /// The contexts of a file and its current one, as Debian's kubectl reads them; `None`
    /// when kubectl is not installed (a skip, printed), unless KEELSON_REQUIRE_TOOLS=1.
    fn kubectl_contexts(file: &Path) -> Option<(Vec<String>, String)> {
        let kubectl = Path::new("/usr/bin/kubectl");
        if !kubectl.exists() {
            assert!(
                std::env::var("KEELSON_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "KEELSON_REQUIRE_TOOLS=1 but /usr/bin/kubectl is missing: apt-get install kubectl"
            );
            println!(
                "skipped: /usr/bin/kubectl is not installed, the merged file is not judged by kubectl"
            );
            return None;
        }
        let run = |args: &[&str]| {
            let out = std::process::Command::new(kubectl)
                .args(args)
                .arg("--kubeconfig")
                .arg(file)
                .output()
                .unwrap_or_else(|e| panic!("run kubectl: {e}"));
            assert!(out.status.success(), "kubectl {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let names = run(&["config", "get-contexts", "-o", "name"]);
        let current = run(&["config", "current-context"]);
        let mut names: Vec<String> = names.lines().map(str::to_owned).collect();
        names.sort();
        Some((names, current.trim().to_owned()))
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn the_kubeconfig_is_merged_as_kubectl_expects() {
        let home = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let dir = home.path().join(".kube");
        let file = dir.join("config");
        let other = node_kubeconfig("other");
        let demo = node_kubeconfig("demo");

        // A new file in a new directory: 0700 and 0600.
        let fresh = home.path().join("fresh").join("config");
        assert_eq!(
            write(&fresh, &demo, true, false).ok(),
            Some(Written::Created)
        );
        assert_eq!(
            (mode(fresh.parent().unwrap_or(&fresh)), mode(&fresh)),
            (0o700, 0o600)
        );
        if let Some(got) = kubectl_contexts(&fresh) {
            assert_eq!(
                got,
                (
                    vec!["demo-admin@demo".to_owned()],
                    "demo-admin@demo".to_owned()
                )
            );
        }

        // Merged beside an existing context: both kept, the new one current.
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
        std::fs::write(&file, &other).unwrap_or_else(|e| panic!("write: {e}"));
        assert_eq!(write(&file, &demo, true, false).ok(), Some(Written::Merged));
        assert_eq!(mode(&file), 0o600);
        let both = (
            vec!["demo-admin@demo".to_owned(), "other-admin@other".to_owned()],
            "demo-admin@demo".to_owned(),
        );
        if let Some(got) = kubectl_contexts(&file) {
            assert_eq!(got, both);
        }

        // The same name again: refused, the file unchanged; with --force, replaced.
        let before = std::fs::read_to_string(&file).unwrap_or_default();
        let again = node_kubeconfig("demo").replace("Q0VSVA==", "TkVX");
        let err = write(&file, &again, true, false)
            .err()
            .map(|e| format!("{e:#}"));
        let err = err.unwrap_or_else(|| panic!("a conflict was not refused"));
        assert!(err.contains("demo") && err.contains("--force"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap_or_default(), before);
        assert_eq!(write(&file, &again, true, true).ok(), Some(Written::Merged));
        let forced = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            // The demo user's certificate replaced; the other user's kept.
            forced.contains("TkVX") && forced.matches("Q0VSVA==").count() == 1,
            "{forced}"
        );
        if let Some(got) = kubectl_contexts(&file) {
            assert_eq!(got, both);
        }

        // --merge=false: an existing file is refused without --force, replaced with it.
        let err = write(&file, &other, false, false)
            .err()
            .map(|e| format!("{e:#}"));
        let err = err.unwrap_or_else(|| panic!("an existing file was replaced"));
        assert!(err.contains("exists") && err.contains("--force"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap_or_default(), forced);
        assert_eq!(
            write(&file, &other, false, true).ok(),
            Some(Written::Replaced)
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap_or_default(), other);
        assert_eq!(mode(&file), 0o600);
        if let Some(got) = kubectl_contexts(&file) {
            assert_eq!(
                got,
                (
                    vec!["other-admin@other".to_owned()],
                    "other-admin@other".to_owned()
                )
            );
        }
        let alone = home.path().join("alone.yaml");
        assert_eq!(
            write(&alone, &demo, false, false).ok(),
            Some(Written::Created)
        );
        assert_eq!(std::fs::read_to_string(&alone).unwrap_or_default(), demo);

        // A symbolic link is followed: its target gets the merge, the link stays.
        let real = home.path().join("dotfiles-kubeconfig");
        std::fs::write(&real, &other).unwrap();
        let link = home.path().join("link-config");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(write(&link, &demo, true, false).ok(), Some(Written::Merged));
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        let merged = std::fs::read_to_string(&real).unwrap();
        assert!(merged.contains("other-admin@other") && merged.contains("demo-admin@demo"));
    }
}
