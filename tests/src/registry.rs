//! Debian's `docker-registry` (the Distribution registry, the real tool) as a test's
//! container registry: plain HTTP on one address inside a network namespace the test
//! made (or on this host when none is named), its storage in a temporary directory.
//!
//! [`Registry::push_test_image`] pushes a small image built here, for both
//! architectures, with skopeo; the node then pulls it as it would a control-plane image.
//! [`write_test_image_archive`] writes the same image as an OCI archive, as an image bakes
//! it in (`cargo xtask image --kubernetes DIR`, `DIR/images/*.tar`).

use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::Arch;
use crate::http_server::{HttpResponse, http_get, in_netns, wait_until_answering};

/// The media types of an OCI image index and manifest, as a registry client accepts them.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// The file every test image holds, naming the image and its platform.
pub const TEST_IMAGE_FILE: &str = "keelson-test-image";

/// `docker-registry serve` with its own config; killed when dropped.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    netns: Option<String>,
    host: String,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Serve a new, empty registry on `address:port`, inside namespace `netns` when given
    /// (else on this host), and wait until it answers `GET /v2/` with 200.
    pub fn start(netns: Option<&str>, address: IpAddr, port: u16) -> Result<Registry> {
        let dir = tempfile::Builder::new()
            .prefix("keelson-registry-")
            .tempdir()
            .context("a directory for the registry")?;
        let host = crate::http_server::host_port(address, port);
        let config = dir.path().join("config.yml");
        std::fs::write(&config, registry_config(&dir.path().join("storage"), &host))
            .with_context(|| format!("writing {}", config.display()))?;
        let log = dir.path().join("registry.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = in_netns(netns, "docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting docker-registry (Debian package docker-registry)")?;
        let mut registry = Registry {
            child,
            netns: netns.map(str::to_owned),
            host,
            dir,
        };
        let url = format!("http://{}/v2/", registry.host);
        wait_until_answering(&mut registry.child, netns, &url, |r| r.status == 200).with_context(
            || format!("the registry never answered; its log:\n{}", registry.log()),
        )?;
        Ok(registry)
    }

    /// `ADDR:PORT`, as image references name the registry.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The reference of `repository:tag` in this registry (`ADDR:PORT/REPOSITORY:TAG`).
    pub fn reference(&self, repository: &str, tag: &str) -> String {
        format!("{}/{repository}:{tag}", self.host)
    }

    /// GET `path` (starting with `/v2/`) from the registry, from where it runs, accepting
    /// the media types in `accept`.
    pub fn get(&self, path: &str, accept: &[&str]) -> Result<HttpResponse> {
        let accept = accept.join(", ");
        let headers: &[(&str, &str)] = if accept.is_empty() {
            &[]
        } else {
            &[("Accept", &accept)]
        };
        http_get(
            self.netns.as_deref(),
            &format!("http://{}{path}", self.host),
            headers,
        )
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Build the test image `repository:tag` ([`write_test_image`]: an index of a linux/amd64
    /// and a linux/arm64 image) and push it here with skopeo, run from where the registry
    /// runs. Returns the digest of its index, as the registry serves it back.
    pub fn push_test_image(&self, repository: &str, tag: &str) -> Result<String> {
        let layout = tempfile::Builder::new()
            .prefix("keelson-test-image-")
            .tempdir()
            .context("a directory for the test image")?;
        let digest = write_test_image(layout.path(), repository, tag)?;
        let destination = format!("docker://{}", self.reference(repository, tag));
        let out = in_netns(self.netns.as_deref(), "skopeo")
            .args(["--insecure-policy", "copy", "--all", "--preserve-digests"])
            .args(["--dest-tls-verify=false", "--quiet"])
            .arg(format!("oci:{}:{tag}", layout.path().display()))
            .arg(&destination)
            .stdin(Stdio::null())
            .output()
            .context("running skopeo (Debian package skopeo)")?;
        if !out.status.success() {
            bail!(
                "skopeo copy to {destination} failed ({}): {}\nthe registry's log:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                crate::tail(&self.log(), 20)
            );
        }
        let served = self.get(&format!("/v2/{repository}/manifests/{tag}"), &[OCI_INDEX])?;
        let served_digest = served.header("Docker-Content-Digest").unwrap_or("");
        if served.status != 200 || served_digest != digest {
            bail!(
                "after the push, {destination} is served with status {} and digest \
                 {served_digest:?}, not the pushed index {digest}: {}",
                served.status,
                served.text()
            );
        }
        Ok(digest)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The registry's config: filesystem storage under `storage`, plain HTTP on `host`.
fn registry_config(storage: &Path, host: &str) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: info\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {host}\n",
        storage.display()
    )
}

/// Write the test image `repository:tag` into `dir` as an OCI image layout (`oci-layout`,
/// `index.json` naming it `tag`, `blobs/sha256/`): an image index of one image per
/// architecture (linux/amd64, linux/arm64), each one uncompressed layer holding
/// [`TEST_IMAGE_FILE`] (`REPOSITORY:TAG linux/ARCH`). Returns the index's digest
/// (`sha256:...`). The same arguments always give the same digests.
pub fn write_test_image(dir: &Path, repository: &str, tag: &str) -> Result<String> {
    write_layout(dir, repository, tag, None)
}

/// Write the test image `reference` (`[HOST/]REPOSITORY:TAG`, as containerd names it:
/// `registry.k8s.io/pause:3.10`) as an OCI image archive at `archive` (a tar of the
/// layout [`write_test_image`] writes, as `docker save` and `skopeo copy
/// oci-archive:` make them), its index annotated with the reference
/// (`io.containerd.image.name`) and the tag (`org.opencontainers.image.ref.name`), as a
/// node imports it from an image's archives. Returns the index's digest.
pub fn write_test_image_archive(archive: &Path, reference: &str) -> Result<String> {
    let (repository, tag) = reference
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .with_context(|| format!("{reference:?} has no tag (REPOSITORY:TAG)"))?;
    let layout = tempfile::Builder::new()
        .prefix("keelson-test-image-")
        .tempdir()
        .context("a directory for the test image")?;
    let digest = write_layout(layout.path(), repository, tag, Some(reference))?;
    let mut members = vec!["oci-layout".to_string(), "index.json".to_string()];
    let blobs = layout.path().join("blobs/sha256");
    let mut names: Vec<String> = std::fs::read_dir(&blobs)
        .with_context(|| format!("listing {}", blobs.display()))?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    members.extend(names.into_iter().map(|n| format!("blobs/sha256/{n}")));
    let mut tar = tar::Builder::new(Vec::new());
    for member in members {
        let bytes = std::fs::read(layout.path().join(&member))?;
        tar.append_data(&mut file_header(bytes.len()), &member, bytes.as_slice())
            .with_context(|| format!("archiving {member}"))?;
    }
    let bytes = tar.into_inner().context("finishing the archive")?;
    std::fs::write(archive, bytes).with_context(|| format!("writing {}", archive.display()))?;
    Ok(digest)
}

/// [`write_test_image`], its index also annotated with `containerd_name`.
fn write_layout(
    dir: &Path,
    repository: &str,
    tag: &str,
    containerd_name: Option<&str>,
) -> Result<String> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let mut manifests = Vec::new();
    for arch in [Arch::Amd64, Arch::Arm64] {
        let platform = json!({"architecture": arch.debian(), "os": "linux"});
        let contents = format!("{repository}:{tag} linux/{}\n", arch.debian());
        let layer = write_blob(
            &blobs,
            OCI_LAYER,
            &one_file_tar(TEST_IMAGE_FILE, &contents)?,
        )?;
        let config = json!({
            "architecture": arch.debian(),
            "os": "linux",
            "config": {"Labels": {"org.opencontainers.image.title": format!("{repository}:{tag}")}},
            "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
        });
        let config = write_blob(&blobs, OCI_CONFIG, &serde_json::to_vec(&config)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config,
            "layers": [layer],
        });
        let mut manifest = write_blob(&blobs, OCI_MANIFEST, &serde_json::to_vec(&manifest)?)?;
        manifest["platform"] = platform;
        manifests.push(manifest);
    }
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    let mut index = write_blob(&blobs, OCI_INDEX, &serde_json::to_vec(&index)?)?;
    let digest = index["digest"].as_str().unwrap_or_default().to_owned();
    index["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    if let Some(name) = containerd_name {
        index["annotations"]["io.containerd.image.name"] = json!(name);
    }
    let top = json!({"schemaVersion": 2, "manifests": [index]});
    let files = [
        ("index.json", serde_json::to_vec(&top)?),
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
    ];
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(digest)
}

/// Store `bytes` as a blob under `blobs` and return its descriptor.
fn write_blob(blobs: &Path, media_type: &str, bytes: &[u8]) -> Result<serde_json::Value> {
    let hex = hex::encode(Sha256::digest(bytes));
    let path = blobs.join(&hex);
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()}))
}

/// A tar archive of one file, `name` (mode 0644, owned by root, dated 1970).
fn one_file_tar(name: &str, contents: &str) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_data(&mut file_header(contents.len()), name, contents.as_bytes())
        .context("building the test image's layer")?;
    tar.into_inner().context("finishing the test image's layer")
}

/// A tar header for a regular file of `size` bytes: mode 0644, owned by root, dated 1970.
fn file_header(size: usize) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pushed_test_image_is_served_back() {
        let port = crate::free_loopback_port().unwrap();
        let registry = Registry::start(None, "127.0.0.1".parse().unwrap(), port).unwrap();
        let digest = registry
            .push_test_image("keelson-test/kube-apiserver", "v1.31.0")
            .unwrap();

        let index = registry
            .get(
                "/v2/keelson-test/kube-apiserver/manifests/v1.31.0",
                &[OCI_INDEX],
            )
            .unwrap();
        assert_eq!(index.status, 200, "{}", index.text());
        assert_eq!(index.header("Docker-Content-Digest"), Some(digest.as_str()));
        let index: serde_json::Value = serde_json::from_slice(&index.body).unwrap();
        let platforms: Vec<&str> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["platform"]["architecture"].as_str().unwrap())
            .collect();
        assert_eq!(platforms, ["amd64", "arm64"]);

        let arm64 = index["manifests"][1]["digest"].as_str().unwrap();
        let manifest = registry
            .get(
                &format!("/v2/keelson-test/kube-apiserver/manifests/{arm64}"),
                &[OCI_MANIFEST],
            )
            .unwrap();
        assert_eq!(manifest.status, 200, "{}", manifest.text());
        let manifest: serde_json::Value = serde_json::from_slice(&manifest.body).unwrap();
        let layer = manifest["layers"][0]["digest"].as_str().unwrap();
        let blob = registry
            .get(
                &format!("/v2/keelson-test/kube-apiserver/blobs/{layer}"),
                &[],
            )
            .unwrap();
        assert_eq!(blob.status, 200);
        let text = String::from_utf8_lossy(&blob.body);
        assert!(
            text.contains("keelson-test/kube-apiserver:v1.31.0 linux/arm64"),
            "{text}"
        );

        let missing = registry
            .get("/v2/keelson-test/nothing/manifests/v1", &[OCI_INDEX])
            .unwrap();
        assert_eq!(missing.status, 404);
    }

    /// A network namespace with a bridge holding `address/24` (as a test's LAN has it);
    /// deleted on drop.
    struct Namespace(String);

    impl Namespace {
        fn new(address: &str) -> Namespace {
            let ns = Namespace(format!("kt-registry-{}", std::process::id()));
            let run = |args: &[&str]| {
                let status = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .unwrap();
                assert!(status.success(), "ip {}", args.join(" "));
            };
            run(&["netns", "add", &ns.0]);
            run(&["-n", &ns.0, "link", "set", "lo", "up"]);
            run(&["-n", &ns.0, "link", "add", "br0", "type", "bridge"]);
            run(&[
                "-n",
                &ns.0,
                "addr",
                "add",
                &format!("{address}/24"),
                "dev",
                "br0",
            ]);
            run(&["-n", &ns.0, "link", "set", "br0", "up"]);
            ns
        }
    }

    impl Drop for Namespace {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "delete", &self.0])
                .status();
        }
    }

    /// As a VM test uses them: the registry and the HTTP server on a namespace's bridge
    /// address (root only: `ip netns add`).
    #[test]
    fn registry_and_http_server_serve_inside_a_namespace() {
        if !crate::cluster_env::is_root() {
            eprintln!("not root: no network namespace to test in");
            return;
        }
        let address = "10.123.45.1";
        let ns = Namespace::new(address);
        let registry = Registry::start(Some(&ns.0), address.parse().unwrap(), 5000).unwrap();
        let digest = registry.push_test_image("pause", "3.10").unwrap();
        let served = registry
            .get("/v2/pause/manifests/3.10", &[OCI_INDEX])
            .unwrap();
        assert_eq!(
            served.header("Docker-Content-Digest"),
            Some(digest.as_str())
        );

        let site = tempfile::tempdir().unwrap();
        std::fs::write(site.path().join("hello"), "hello").unwrap();
        let server = crate::http_server::HttpServer::start(
            Some(&ns.0),
            address.parse().unwrap(),
            8080,
            site.path(),
        )
        .unwrap();
        assert_eq!(server.url(), "http://10.123.45.1:8080");
        assert_eq!(server.get("/hello").unwrap().text(), "hello");
    }

    /// skopeo reads the archive back: the tagged index, and the image for an architecture.
    #[test]
    fn a_test_image_archive_is_an_oci_archive() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("pause.tar");
        let digest = write_test_image_archive(&archive, "registry.k8s.io/pause:3.10").unwrap();
        let source = format!("oci-archive:{}:3.10", archive.display());
        let skopeo = |args: &[&str]| {
            let out = std::process::Command::new("skopeo")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "skopeo {args:?}: {}",
                crate::show(&out)
            );
            out.stdout
        };
        let raw = skopeo(&["inspect", "--raw", &source]);
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&raw))),
            digest
        );
        let config = skopeo(&["--override-arch", "arm64", "inspect", "--config", &source]);
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(config["architecture"], "arm64");

        let listing = std::process::Command::new("tar")
            .arg("tf")
            .arg(&archive)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert!(
            listing.starts_with("oci-layout\nindex.json\nblobs/sha256/"),
            "{listing}"
        );
        let mut read = tar::Archive::new(std::fs::File::open(&archive).unwrap());
        let index = read
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().to_str() == Some("index.json"))
            .map(|mut e| {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut e, &mut text).unwrap();
                text
            })
            .unwrap();
        let index: serde_json::Value = serde_json::from_str(&index).unwrap();
        let annotations = &index["manifests"][0]["annotations"];
        assert_eq!(
            annotations["io.containerd.image.name"],
            "registry.k8s.io/pause:3.10"
        );
        assert_eq!(annotations["org.opencontainers.image.ref.name"], "3.10");
        assert!(write_test_image_archive(&archive, "registry.k8s.io/pause").is_err());
    }

    #[test]
    fn test_images_are_reproducible() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = write_test_image(a.path(), "x/y", "v1").unwrap();
        assert_eq!(write_test_image(b.path(), "x/y", "v1").unwrap(), first);
        assert_ne!(write_test_image(b.path(), "x/y", "v2").unwrap(), first);
    }
}
